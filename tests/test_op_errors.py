"""Every malformed-input class of docs/op-spec.md is an ORT error whose message names the input.

Inputs are fed as graph inputs (validated on every run) and, for the CSR, also as initializers
(validated once, when the session is created)."""

import numpy as np
import pytest
from conftest import make_session, random_layer
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, RuntimeException

from sqllm_onnx.op import INPUT_NAMES, IR_VERSION

ORT_ERRORS = (Fail, InvalidArgument, InvalidGraph, RuntimeException)
K, N, BITS = 70, 6, 3


def valid_feeds(dtype=np.float32):
    layer = random_layer(np.random.default_rng(0), K, N, BITS)
    return {"A": np.ones((2, K), dtype), "qweight": layer.qweight, "lut": layer.lut.astype(dtype),
            "sparse_indptr": layer.sparse_indptr, "sparse_indices": layer.sparse_indices,
            "sparse_values": layer.sparse_values.astype(dtype), "bias": layer.bias.astype(dtype)}


def model_with(feeds, attrs=None, as_initializers=(), omit=()):
    """A one-node model whose op inputs are graph inputs, except those turned into initializers."""
    attrs = {"K": K, "N": N, "bits": BITS, "layout": 2} if attrs is None else attrs
    inputs, graph_inputs, inits = [], [], []
    for name in INPUT_NAMES:
        if name in omit or name not in feeds:
            inputs.append("")
            continue
        inputs.append(name)
        value = np.asarray(feeds[name])
        if name in as_initializers:
            inits.append(numpy_helper.from_array(value, name))
        else:
            elem = helper.np_dtype_to_tensor_dtype(value.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, elem, list(value.shape)))
    node = helper.make_node("SqueezeMatMul", inputs, ["Y"], domain="sqllm", **attrs)
    graph = helper.make_graph([node], "bad", graph_inputs, [helper.make_empty_tensor_value_info("Y")],
                              initializer=inits)
    return helper.make_model(graph, ir_version=IR_VERSION,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("sqllm", 1)])


def run(feeds, **kw):
    model = model_with(feeds, **kw)
    session = make_session(model)
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def expect_error(pattern, feeds, **kw):
    with pytest.raises(ORT_ERRORS, match=pattern):
        run(feeds, **kw)


def test_valid_feeds_run():
    assert run(valid_feeds())[0].shape == (2, N)


@pytest.mark.parametrize("attrs,pattern", [
    ({"K": K, "N": N, "bits": 5}, r"attribute 'bits' must be one of 2, 3, 4, 8 \(got 5\)"),
    ({"K": K, "N": N}, r"attribute 'bits' \(int\) is required"),
    ({"K": 0, "N": N, "bits": BITS}, r"attribute 'K' must be in \[1, 2\^31\)"),
    ({"K": K, "N": 2**40, "bits": BITS}, r"attribute 'N' must be in \[1, 2\^31\)"),
    ({"K": K, "N": N, "bits": BITS, "layout": 7}, r"attribute 'layout' must be 1 or 2 \(got 7\)"),
    # a 3-bit node of an export made before code layout 2 (no `layout` attribute) is refused, not misread
    ({"K": K, "N": N, "bits": 3}, r"attribute 'layout' is 1 \(absent\): this 3-bit model packs its codes in code "
                                  r"layout 1 of earlier sqllm-onnx exports; .* re-export the model"),
])
def test_bad_attributes(attrs, pattern):
    expect_error(pattern, valid_feeds(), attrs=attrs)


def test_k_mismatch_names_A():
    feeds = valid_feeds()
    feeds["A"] = np.ones((2, K + 1), np.float32)
    expect_error(r"input 'A' last dimension is 71 but attribute K is 70", feeds)


def test_scalar_A():
    feeds = valid_feeds()
    feeds["A"] = np.array(1.0, dtype=np.float32)
    expect_error(r"input 'A' must have rank >= 1", feeds)


def test_qweight_shape():
    feeds = valid_feeds()
    feeds["qweight"] = feeds["qweight"][:, :-1]
    expect_error(r"input 'qweight' must have shape \[ceil\(N/16\), 32\*ceil\(K/64\)\*bits\] = \[1, 192\], got \[1, 191\]",
                 feeds)


def test_qweight_dtype():
    feeds = valid_feeds()
    feeds["qweight"] = feeds["qweight"].astype(np.int64)
    expect_error(r"input 'qweight' must be int32, got int64", feeds)


def test_lut_shape():
    feeds = valid_feeds()
    feeds["lut"] = np.ones((N, 16), np.float32)
    expect_error(r"input 'lut' must have shape \[N, 2\^bits\] = \[6, 8\], got \[6, 16\]", feeds)


@pytest.mark.parametrize("name", ["lut", "sparse_values", "bias"])
def test_mixed_float_dtypes(name):
    feeds = valid_feeds()
    feeds[name] = feeds[name].astype(np.float16)
    expect_error(rf"input '{name}' must have the same element type as 'A' \(float32\), got float16", feeds)


def test_sparse_inputs_must_come_together():
    expect_error(r"inputs 'sparse_indptr', 'sparse_indices' and 'sparse_values' must be given together",
                 valid_feeds(), omit=("sparse_values",))


def test_indptr_length():
    feeds = valid_feeds()
    feeds["sparse_indptr"] = feeds["sparse_indptr"][:-1]
    expect_error(r"input 'sparse_indptr' must have shape \[N\+1\] = \[7\], got \[6\]", feeds)


def test_values_length():
    feeds = valid_feeds()
    feeds["sparse_values"] = feeds["sparse_values"][:-1]
    expect_error(r"input 'sparse_values' must have shape \[nnz\] = \[\d+\] like 'sparse_indices'", feeds)


def test_bias_shape():
    feeds = valid_feeds()
    feeds["bias"] = feeds["bias"][:-1]
    expect_error(r"input 'bias' must have shape \[N\] = \[6\], got \[5\]", feeds)


def _csr(indptr, indices):
    feeds = valid_feeds()
    feeds["sparse_indptr"] = np.asarray(indptr, np.int32)
    feeds["sparse_indices"] = np.asarray(indices, np.int32)
    feeds["sparse_values"] = np.ones(len(indices), np.float32)
    return feeds


CSR_CASES = [
    (([1, 1, 1, 2, 2, 2, 2], [0, 1]), r"input 'sparse_indptr' must start at 0 \(got 1\)"),
    (([0, 2, 1, 2, 2, 2, 2], [0, 1]), r"input 'sparse_indptr' must be non-decreasing \(sparse_indptr\[1\] = 2 > sparse_indptr\[2\] = 1\)"),
    (([0, 1, 1, 1, 1, 1, 1], [0, 1]), r"input 'sparse_indptr' must end at nnz = len\(sparse_indices\) = 2 \(got 1\)"),
    (([0, 1, 1, 1, 1, 1, 2], [0, 70]), r"input 'sparse_indices' entry 1 \(row 5\) is 70, outside \[0, K=70\)"),
    (([0, 1, 1, 1, 1, 1, 2], [-3, 0]), r"input 'sparse_indices' entry 0 \(row 0\) is -3, outside \[0, K=70\)"),
]


@pytest.mark.parametrize("csr,pattern", CSR_CASES)
def test_malformed_csr_fed_at_run_time(csr, pattern):
    expect_error(pattern, _csr(*csr))


@pytest.mark.parametrize("csr,pattern", CSR_CASES)
def test_malformed_csr_initializers_fail_session_creation(csr, pattern):
    feeds = _csr(*csr)
    model = model_with(feeds, as_initializers=("qweight", "lut", "sparse_indptr", "sparse_indices", "sparse_values"))
    with pytest.raises(ORT_ERRORS, match=pattern):
        make_session(model)  # validated once, before any run


def test_unsorted_and_duplicate_indices_are_valid():
    feeds = _csr([0, 3, 3, 3, 3, 3, 3], [9, 2, 9])
    y = run(feeds)[0]
    assert np.isfinite(y).all()


def test_unsupported_A_dtype_is_rejected():
    feeds = valid_feeds()
    feeds["A"] = feeds["A"].astype(np.float64)
    # ORT's own type check, at session creation, names the input.
    with pytest.raises(ORT_ERRORS, match=r"tensor\(double\)' of input parameter \(A\) of operator \(SqueezeMatMul\)"):
        run(feeds)

"""SqueezeMatMul through onnxruntime.InferenceSession on the CPU, against the numpy reference."""

import numpy as np
import pytest
from conftest import assert_matches_reference, int8_applies, make_session, random_layer, reference_output
from onnx import TensorProto, helper, numpy_helper

from sqllm_onnx import reference as ref
from sqllm_onnx.op import IR_VERSION, make_model, make_node


@pytest.mark.parametrize("kernel", ["exact", "auto", "int8"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("sparse,bias", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("M", [1, 3, 8, 64])
def test_random_shapes_match_reference(M, bits, sparse, bias, dtype, kernel):
    rng = np.random.default_rng(hash((M, bits, sparse, bias, np.dtype(dtype).name)) % 2**32)
    K = int(rng.integers(1, 20)) * 32 + int(rng.integers(1, 32))  # never a multiple of 32
    N = int(rng.integers(1, 80))
    layer = random_layer(rng, K, N, bits, sparse=sparse, bias=bias).astype(dtype)
    session = make_session(make_model(layer, a_shape=("M", K), dtype=dtype), cpu_kernel_choice=kernel)
    A = rng.standard_normal((M, K)).astype(dtype)
    y = session.run(None, {"A": A})[0]
    assert_matches_reference(y, reference_output(A, layer), A, layer, int8=int8_applies(M, bits, kernel))


@pytest.mark.parametrize("lut_source", ["initializer", "input"])
@pytest.mark.parametrize("bits", [3, 4])
def test_int8_path_every_partial_unit(bits, lut_source):
    """Every shape of the partial last unit (0 to 3 groups of 64, K padded or not) at M = 1 .. 8, with
    the LUT quantized once per session (an initializer) or on every call (a graph input)."""
    rng = np.random.default_rng(bits)
    for K in (256, 64, 128, 192, 576, 960, 1000, 1536 + 64 * 3 - 5):
        N = int(rng.integers(1, 40))
        layer = random_layer(rng, K, N, bits)
        model = make_model(layer)
        if lut_source == "input":
            lut = next(t for t in model.graph.initializer if t.name == "w.lut")
            model.graph.initializer.remove(lut)
            model.graph.input.append(helper.make_tensor_value_info("w.lut", TensorProto.FLOAT, [N, 1 << bits]))
        session = make_session(model, cpu_kernel_choice="auto")
        for M in (1, 2, 5, 8):
            A = rng.standard_normal((M, K)).astype(np.float32)
            feeds = {"A": A} if lut_source == "initializer" else {"A": A, "w.lut": layer.lut}
            assert_matches_reference(session.run(None, feeds)[0], reference_output(A, layer), A, layer,
                                     int8=int8_applies(M, bits, "auto"))


@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("M", [1, 5])
def test_other_bit_widths(bits, M):
    rng = np.random.default_rng(bits + M)
    layer = random_layer(rng, 77, 19, bits)
    session = make_session(make_model(layer))
    A = rng.standard_normal((M, 77)).astype(np.float32)
    assert_matches_reference(session.run(None, {"A": A})[0], reference_output(A, layer), A, layer)


def test_leading_dims_and_empty_batch():
    rng = np.random.default_rng(1)
    layer = random_layer(rng, 50, 12, 3)
    session = make_session(make_model(layer, a_shape=("batch", "seq", 50)))
    A = rng.standard_normal((2, 7, 50)).astype(np.float32)
    y = session.run(None, {"A": A})[0]
    assert y.shape == (2, 7, 12)
    assert_matches_reference(y, reference_output(A, layer), A, layer)
    empty = session.run(None, {"A": np.zeros((0, 3, 50), np.float32)})[0]
    assert empty.shape == (0, 3, 12)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_thread_counts_agree(threads):
    rng = np.random.default_rng(2)
    layer = random_layer(rng, 300, 257, 4)
    A = rng.standard_normal((9, 300)).astype(np.float32)
    y = make_session(make_model(layer), threads=threads).run(None, {"A": A})[0]
    assert_matches_reference(y, reference_output(A, layer), A, layer)


@pytest.mark.parametrize("kernel", ["exact", "auto"])
def test_large_layer_both_paths(kernel):
    rng = np.random.default_rng(3)
    layer = random_layer(rng, 1000, 300, 3, density=0.0045)
    session = make_session(make_model(layer), cpu_kernel_choice=kernel)
    for M in (1, 17):
        A = rng.standard_normal((M, 1000)).astype(np.float32)
        assert_matches_reference(session.run(None, {"A": A})[0], reference_output(A, layer), A, layer,
                                 int8=int8_applies(M, 3, kernel))


@pytest.mark.parametrize("kernel", ["exact", "auto"])
def test_nan_and_inf_propagate(kernel):
    rng = np.random.default_rng(4)
    layer = random_layer(rng, 512, 20, 4, sparse=False, bias=False)
    session = make_session(make_model(layer), cpu_kernel_choice=kernel)
    A = rng.standard_normal((2, 512)).astype(np.float32)
    A[0, 3] = np.nan
    A[1, 5] = np.inf
    y = session.run(None, {"A": A})[0]
    assert np.isnan(y[0]).all() and not np.isfinite(y[1]).any()
    # a LUT entry of Inf reaches exactly the outputs of its row (the int8 path leaves such tiles to the exact one)
    layer.lut[7, :] = np.inf
    session = make_session(make_model(layer), cpu_kernel_choice=kernel)
    A = np.abs(rng.standard_normal((1, 512))).astype(np.float32)
    y = session.run(None, {"A": A})[0]
    assert np.isposinf(y[0, 7]) and np.isfinite(np.delete(y[0], 7)).all()


def test_model_built_by_hand_from_the_spec():
    """Only docs/op-spec.md and onnx.helper: domain 'sqllm', inputs in order, attributes K/N/bits,
    qweight packed by hand in the tiled layout (two tiles; a full unit and a partial one)."""
    rng = np.random.default_rng(5)
    K, N, bits = 300, 20, 3
    codes = rng.integers(0, 8, size=(N, K))
    G = -(-K // 64)
    full_units = G // 4
    qweight = np.zeros((-(-N // 16), 32 * G * bits), dtype=np.uint32)
    for n in range(N):
        tile, r = divmod(n, 16)
        h, g = divmod(r, 8)
        for k in range(K):
            unit, kk = divmod(k, 256)
            i, p, t, q, j = kk // 64, (kk // 32) % 2, (kk // 8) % 4, (kk // 4) % 2, kk % 4
            s, lane = 2 * p + q, 4 * g + t
            ng = 4 if unit < full_units else G % 4
            for b in range(bits):
                if (codes[n, k] >> b) & 1:
                    nibble = 4 * q + j  # 3 bits: planes (h, p) = (0, 0), (1, 0), (0, 1); (1, 1) in the top bits
                    if (h, p) == (1, 1):
                        bit = 32 * (b * ng + i) + 4 * nibble + 3
                    else:
                        bit = 32 * ((2 if p else h) * ng + i) + 4 * nibble + b
                    w = bit // 32
                    word = unit * 128 * bits + ((w // 4) * 128 + 4 * lane + w % 4 if unit < full_units else w * 32 + lane)
                    qweight[tile, word] |= np.uint32(1) << np.uint32(bit % 32)
    lut = rng.standard_normal((N, 8)).astype(np.float32)
    indptr = np.array([0, 1, 1, 3] + [3] * 16 + [4], np.int32)
    indices = np.array([299, 0, 2, 10], np.int32)
    values = np.array([0.5, -2.0, 1.0, 3.0], np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    inits = [numpy_helper.from_array(a, name) for a, name in [
        (qweight.view(np.int32), "qweight"), (lut, "lut"), (indptr, "indptr"), (indices, "indices"),
        (values, "values"), (bias, "bias")]]
    node = helper.make_node("SqueezeMatMul", ["A", "qweight", "lut", "indptr", "indices", "values", "bias"], ["Y"],
                            domain="sqllm", K=K, N=N, bits=bits, layout=2)
    graph = helper.make_graph([node], "by_hand", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])], initializer=inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17),
                                                                   helper.make_opsetid("sqllm", 1)])
    A = rng.standard_normal((9, K)).astype(np.float32)
    y = make_session(model, cpu_kernel_choice="exact").run(None, {"A": A})[0]
    W = lut[np.arange(N)[:, None], codes].astype(np.float64)
    for n in range(N):
        for e in range(indptr[n], indptr[n + 1]):
            W[n, indices[e]] += values[e]
    np.testing.assert_allclose(y, A.astype(np.float64) @ W.T + bias, rtol=1e-5, atol=1e-5)
    # and the packing helper agrees with the hand-packed words
    np.testing.assert_array_equal(ref.pack_codes(codes, bits), qweight.view(np.int32))


def test_row_major_qweight_of_old_exports_is_refused():
    rng = np.random.default_rng(8)
    layer = random_layer(rng, 100, 20, 3, sparse=False, bias=False)
    layer.qweight = np.zeros((20, (100 * 3 + 31) // 32), np.int32)  # [N, ceil(K*bits/32)]: sqllm-onnx 0.1
    with pytest.raises(Exception, match="row-major layout .* of sqllm-onnx 0.1 exports.*re-export"):
        make_session(make_model(layer)).run(None, {"A": np.zeros((1, 100), np.float32)})


def test_output_type_and_shape_are_inferred_at_registration():
    # Y is declared with no type or shape: ORT learns both from the op's shape inference, and the
    # Relu after it type-checks only because of that.
    layer = random_layer(np.random.default_rng(6), 40, 9, 4).astype(np.float16)
    node, inits = make_node("A", "Y0", layer, "w")
    relu = helper.make_node("Relu", ["Y0"], ["Y"])
    graph = helper.make_graph([node, relu], "infer", [helper.make_tensor_value_info("A", TensorProto.FLOAT16, ["b", "s", 40])],
                              [helper.make_empty_tensor_value_info("Y")], initializer=inits)
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", 17),
                                                                           helper.make_opsetid("sqllm", 1)])
    out = make_session(model).get_outputs()[0]
    assert out.shape == ["b", "s", 9] and out.type == "tensor(float16)"

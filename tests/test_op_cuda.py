"""SqueezeMatMul on ONNX Runtime's CUDAExecutionProvider, against the numpy reference.

Every test is marked `gpu` (conftest skips them without CUDAExecutionProvider). Sessions are created
with `session.disable_cpu_ep_fallback=1`, so a node the CUDA EP does not take fails session creation
instead of silently running on the CPU; `test_node_runs_on_cuda` also checks the profile.

Paths exercised (docs/cuda-kernels.md): decode on tensor cores (decode_tc.cu: fp16, bits 3/4,
M <= 32), decode on CUDA cores (fp32, bits 2/8, misaligned buffers, and forced through the hook),
prefill (dequantize + cuBLAS, larger M).

Tolerance: conftest's assert_matches_reference as on the CPU (1e-3 of the magnitude scale for
fp16, 1e-5 for fp32), plus, where the tensor-core decode kernel runs (fp16, bits 3/4, at most
SQLLM_CUDA_DECODE_MAX_M = 32 rows of A), the int8 contract's bound (docs/op-spec.md: the LUT in 8
bits, A in int8 plus a residual; the products are then exact int32 sums). Elsewhere products are
exact in fp32 (cuBLAS is called with CUBLAS_COMPUTE_32F, no TF32), so the error is one fp16
rounding of Y (<= 4.9e-4 of the scale) plus, on the prefill path, one fp16 rounding of the weights
that have a sparse part added.

SQLLM_TEST_REDUCED=1 selects a small parametrization, for compute-sanitizer runs
(benchmarks/gpu_kernels.sh).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import assert_matches_reference as _assert_matches_reference
from conftest import cuda_available, int8_error_bound, random_layer, reference_output
from onnx import TensorProto, helper, numpy_helper
from test_op_errors import BITS as ERR_BITS
from test_op_errors import CSR_CASES, ORT_ERRORS, _csr, model_with, valid_feeds
from test_op_errors import K as ERR_K
from test_op_errors import N as ERR_N

import sqllm_onnx
from sqllm_onnx import reference as ref
from sqllm_onnx.op import DEFAULT_ONNX_OPSET, DOMAIN, IR_VERSION, OPSET_VERSION, PackedLinear, make_model, make_node

pytestmark = pytest.mark.gpu

REDUCED = os.environ.get("SQLLM_TEST_REDUCED") == "1"
CUDA = "CUDAExecutionProvider"

if cuda_available() and hasattr(ort, "preload_dlls"):
    try:  # onnxruntime-gpu finds pip's CUDA libraries only after this
        ort.preload_dlls()
    except Exception:  # noqa: BLE001
        pass


def assert_matches_reference(y, expected, A, layer, int8=None):
    """The reference check, with the int8 bound where the tensor-core decode kernel may have run."""
    if int8 is None:
        rows = A.size // layer.K if layer.K else 0
        int8 = y.dtype == np.float16 and layer.bits in (3, 4) and rows <= 32
    _assert_matches_reference(y, expected, A, layer, int8=int8)


def pick(full, reduced):
    return reduced if REDUCED else full


def cuda_session(model, profile_prefix: str | None = None, **provider_options):
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    sqllm_onnx.register(so)
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    session = ort.InferenceSession(data, so, providers=[(CUDA, {k: str(v) for k, v in provider_options.items()})])
    assert session.get_providers()[0] == CUDA, session.get_providers()
    return session


def run_and_check(session, A, layer):
    y = session.run(None, {"A": A})[0]
    assert_matches_reference(y, reference_output(A, layer), A, layer)
    return y


def heavy_row_layer(rng, K, N, bits, heavy_row, heavy_count, density=0.01) -> PackedLinear:
    """A layer whose CSR has one very heavy row (with duplicate columns) among light ones."""
    layer = random_layer(rng, K, N, bits, sparse=False, bias=True)
    counts = rng.binomial(K, density, size=N)
    counts[heavy_row] = heavy_count
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    indices = rng.integers(0, K, size=int(indptr[-1])).astype(np.int32)
    start = int(indptr[heavy_row])
    indices[start:start + 40] = indices[start]  # 40 duplicates of one column
    layer.sparse_indptr, layer.sparse_indices = indptr, indices
    layer.sparse_values = rng.standard_normal(int(indptr[-1])).astype(np.float32)
    return layer


# ---- the CPU suite's cases, on CUDA ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", pick([np.float32, np.float16], [np.float16]))
@pytest.mark.parametrize("sparse,bias", pick([(False, False), (True, False), (False, True), (True, True)],
                                              [(True, True)]))
@pytest.mark.parametrize("bits", pick([3, 4], [3]))
@pytest.mark.parametrize("M", pick([1, 3, 64], [1, 64]))
def test_random_shapes_match_reference(M, bits, sparse, bias, dtype):
    rng = np.random.default_rng(hash((M, bits, sparse, bias, np.dtype(dtype).name)) % 2**32)
    K = int(rng.integers(1, 9)) * 32 + int(rng.integers(1, 32))  # never a multiple of 32
    N = int(rng.integers(1, 80))
    layer = random_layer(rng, K, N, bits, sparse=sparse, bias=bias).astype(dtype)
    session = cuda_session(make_model(layer, a_shape=("M", K), dtype=dtype))
    run_and_check(session, rng.standard_normal((M, K)).astype(dtype), layer)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_all_bit_widths(bits, dtype):
    rng = np.random.default_rng(bits)
    layer = random_layer(rng, 77, 19, bits).astype(dtype)
    session = cuda_session(make_model(layer, a_shape=("M", 77), dtype=dtype))
    for M in pick((1, 5, 8, 20, 40), (1, 40)):  # decode; decode in chunks (fp16 3/4 bits) or prefill
        run_and_check(session, rng.standard_normal((M, 77)).astype(dtype), layer)


def test_leading_dims_and_empty_batch():
    rng = np.random.default_rng(1)
    layer = random_layer(rng, 50, 12, 3)
    session = cuda_session(make_model(layer, a_shape=("batch", "seq", 50)))
    A = rng.standard_normal((2, 7, 50)).astype(np.float32)
    y = session.run(None, {"A": A})[0]
    assert y.shape == (2, 7, 12)
    assert_matches_reference(y, reference_output(A, layer), A, layer)
    empty = session.run(None, {"A": np.zeros((0, 3, 50), np.float32)})[0]
    assert empty.shape == (0, 3, 12)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_large_layer_both_paths(dtype):
    rng = np.random.default_rng(3)
    layer = random_layer(rng, 1000, 300, 3, density=0.0045).astype(dtype)
    session = cuda_session(make_model(layer, a_shape=("M", 1000), dtype=dtype))
    for M in (1, 17, 64):
        run_and_check(session, rng.standard_normal((M, 1000)).astype(dtype), layer)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("M", [2, 40])
def test_nan_and_inf_propagate(M, dtype):
    rng = np.random.default_rng(4)
    layer = random_layer(rng, 64, 4, 4, sparse=False, bias=False).astype(dtype)
    session = cuda_session(make_model(layer, a_shape=("M", 64), dtype=dtype))
    A = rng.standard_normal((M, 64)).astype(dtype)
    A[0, 3] = np.nan
    A[1, 5] = np.inf
    y = session.run(None, {"A": A})[0]
    assert np.isnan(y[0]).all() and not np.isfinite(y[1]).any()
    assert np.isfinite(y[2:]).all()


@pytest.mark.parametrize("bits", [3, 4])
def test_non_finite_lut_rows(bits):
    """The tensor-core kernel quantizes LUT rows to 8 bits; a row holding Inf or NaN is computed
    exactly instead: an entry in use reaches exactly its row's outputs, an unused one changes nothing."""
    rng = np.random.default_rng(14)
    K, N = 576, 40
    codes = rng.integers(0, (1 << bits) - 1, size=(N, K))  # the top entry is never used
    codes[7, 100] = (1 << bits) - 1  # ... except once in row 7
    lut = rng.standard_normal((N, 1 << bits)).astype(np.float16)
    lut[7, -1] = np.inf
    lut[20, -1] = np.nan  # unused: row 20 stays finite and exact
    layer = PackedLinear(ref.pack_codes(codes, bits), lut, bits, K)
    session = cuda_session(make_model(layer, a_shape=("M", K), dtype=np.float16))
    A = np.abs(rng.standard_normal((2, K))).astype(np.float16)
    y = session.run(None, {"A": A})[0]
    assert np.isposinf(y[:, 7]).all() and np.isfinite(np.delete(y, 7, axis=1)).all()
    lut_ok = lut.copy()
    lut_ok[7, -1] = lut_ok[20, -1] = 0  # row 20 does not use the entry; row 7's outputs were checked above
    ok_layer = PackedLinear(layer.qweight, lut_ok, bits, K)
    expected = reference_output(A, ok_layer)
    y[:, 7] = expected[:, 7]
    assert_matches_reference(y, expected, A, ok_layer)


def test_model_built_by_hand_from_the_spec():
    rng = np.random.default_rng(5)
    K, N, bits = 45, 7, 3  # the CPU test packs the tiled layout by hand; here pack_codes does
    codes = rng.integers(0, 8, size=(N, K))
    qweight = ref.pack_codes(codes, bits)
    lut = rng.standard_normal((N, 8)).astype(np.float32)
    indptr = np.array([0, 1, 1, 3, 3, 3, 3, 4], np.int32)
    indices = np.array([44, 0, 2, 10], np.int32)
    values = np.array([0.5, -2.0, 1.0, 3.0], np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    inits = [numpy_helper.from_array(a, name) for a, name in [
        (qweight, "qweight"), (lut, "lut"), (indptr, "indptr"), (indices, "indices"), (values, "values"),
        (bias, "bias")]]
    node = helper.make_node("SqueezeMatMul", ["A", "qweight", "lut", "indptr", "indices", "values", "bias"], ["Y"],
                            domain="sqllm", K=K, N=N, bits=bits, layout=2)
    graph = helper.make_graph([node], "by_hand", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])], initializer=inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17),
                                                                   helper.make_opsetid("sqllm", 1)])
    A = rng.standard_normal((3, K)).astype(np.float32)
    y = cuda_session(model).run(None, {"A": A})[0]
    W = lut[np.arange(N)[:, None], codes].astype(np.float64)
    for n in range(N):
        for j in range(indptr[n], indptr[n + 1]):
            W[n, indices[j]] += values[j]
    np.testing.assert_allclose(y, A.astype(np.float64) @ W.T + bias, rtol=1e-5, atol=1e-5)


def test_output_type_and_shape_are_inferred_at_registration():
    rng = np.random.default_rng(6)
    layer = random_layer(rng, 40, 9, 4).astype(np.float16)
    node, inits = make_node("A", "Y0", layer, "w")
    relu = helper.make_node("Relu", ["Y0"], ["Y"])
    graph = helper.make_graph([node, relu], "infer",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT16, ["b", "s", 40])],
                              [helper.make_empty_tensor_value_info("Y")], initializer=inits)
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", 17),
                                                                           helper.make_opsetid("sqllm", 1)])
    session = cuda_session(model)
    out = session.get_outputs()[0]
    assert out.shape == ["b", "s", 9] and out.type == "tensor(float16)"
    A = rng.standard_normal((2, 3, 40)).astype(np.float16)
    y = session.run(None, {"A": A})[0]
    expected = np.maximum(reference_output(A, layer), 0)
    assert_matches_reference(y, expected, A, layer)


# ---- decode and prefill paths at model-like sizes ---------------------------------------------------

@pytest.mark.parametrize("dtype", pick([np.float16, np.float32], [np.float16]))
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("K", pick([4160, 4173, 11008], [4173]))
def test_decode_rows_1_to_8(K, bits, dtype):
    """Every M of the decode path; K = 4096 + a 64-code tail (aligned rows), + 77 (3 bits aligned to
    8 bytes, 4 bits to 4 bytes: narrower loads) and 11008 (43 k-tiles, no tail). N = 40: a partial
    row tile."""
    rng = np.random.default_rng(K + bits)
    layer = random_layer(rng, K, 40, bits, density=0.0045).astype(dtype)
    session = cuda_session(make_model(layer, a_shape=("M", K), dtype=dtype))
    for M in pick(range(1, 9), (1, 3, 8)):
        run_and_check(session, rng.standard_normal((M, K)).astype(dtype), layer)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("K,N", pick([(4096, 48), (4096, 40), (11008, 48), (4096, 64)], [(11008, 48)]))
def test_bench_shapes_small_n(K, N, bits):
    """The benchmark's K (4096 and 11008) with small N, 0.45% sparse + bias, fp16: decode (M = 1, 8),
    decode in chunks of 8 (M = 20) and prefill (M = 512)."""
    rng = np.random.default_rng(K * 7 + N + bits)
    layer = random_layer(rng, K, N, bits, density=0.0045).astype(np.float16)
    session = cuda_session(make_model(layer, a_shape=("M", K), dtype=np.float16))
    for M in pick((1, 8, 20, 512), (1, 20, 512)):
        run_and_check(session, rng.standard_normal((M, K)).astype(np.float16), layer)


@pytest.mark.parametrize("dtype", pick([np.float16, np.float32], [np.float16]))
@pytest.mark.parametrize("bits", pick([3, 4], [3]))
def test_prefill_m512(bits, dtype):
    rng = np.random.default_rng(512 + bits)
    layer = random_layer(rng, 4096, 256, bits, density=0.0045).astype(dtype)
    session = cuda_session(make_model(layer, a_shape=("M", 4096), dtype=dtype))
    run_and_check(session, rng.standard_normal((512, 4096)).astype(dtype), layer)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("bits", pick([3, 4], [4]))
def test_heavy_sparse_row(bits, dtype):
    """One row with 3000 entries (40 of them one duplicated column), next to light rows: the
    decode kernels split entries per warp row, the dequantize kernel per chunk."""
    rng = np.random.default_rng(77 + bits)
    K = 4160
    layer = heavy_row_layer(rng, K, 40, bits, heavy_row=21, heavy_count=3000).astype(dtype)
    session = cuda_session(make_model(layer, a_shape=("M", K), dtype=dtype))
    for M in pick((1, 5, 24, 100), (1, 100)):
        run_and_check(session, rng.standard_normal((M, K)).astype(dtype), layer)


def test_large_k_decode_fallback_and_prefill():
    """K = 20000 (A of 8 rows does not fit the tensor-core kernel's shared memory on every GPU: the
    generic decode kernel reads A from global memory), fp16, and a prefill."""
    rng = np.random.default_rng(9)
    layer = random_layer(rng, 20000, 24, 3, density=0.0045).astype(np.float16)
    session = cuda_session(make_model(layer, a_shape=("M", 20000), dtype=np.float16))
    for M in pick((1, 8, 33), (8,)):
        run_and_check(session, rng.standard_normal((M, 20000)).astype(np.float16), layer)


@pytest.mark.skipif(REDUCED or os.environ.get("SQLLM_TEST_NESTED") == "1", reason="runs a reduced nested suite")
def test_tuning_switches():
    """The environment switches of ops/cuda/device_info.h are read once per process: a nested run
    with a 1 MiB prefill chunk (several dequantize + GEMM steps per op), PDL off, and fp16 decode
    limited to M <= 8 (M = 20 then takes the prefill path)."""
    env = dict(os.environ, SQLLM_TEST_NESTED="1", SQLLM_TEST_REDUCED="1", SQLLM_CUDA_PREFILL_CHUNK_MB="1",
               SQLLM_CUDA_PDL="0", SQLLM_CUDA_DECODE_MAX_M="8")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
           "bench_shapes or prefill_m512 or cuda_graph or heavy_sparse or decode_rows"]
    r = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert " passed" in r.stdout


# ---- both decode kernels, through the kernel-only hook ---------------------------------------------

def _decode_hook():
    """The library's decode hooks (ops/cuda/bench_hook.cc), or None for a build without them."""
    try:
        lib = ctypes.CDLL(sqllm_onnx.get_library_path())
        fn = lib.SqllmCudaLaunchDecodeKernel
    except (OSError, FileNotFoundError, AttributeError):
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    fn.argtypes = [p] * 8 + [i64] * 5 + [i32, p, i32]
    fn.restype = ctypes.c_char_p
    lib.SqllmCudaSynchronize.argtypes = []
    lib.SqllmCudaSynchronize.restype = ctypes.c_char_p
    return lib


KERNELS = {"default": 0, "cuda-cores": 1}  # SqllmCudaLaunchDecodeKernel's `kernel`

# (K, N, rows of A, misaligned buffers, sparse): K tails (4160: a partial unit of 1 group; 4173: a
# partial, masked unit), 43 full units (11008), many tiles per CTA (N = 30000: 1875 tiles), K < 256
# (one unit, partial), K = 320 (a full unit and a 1-group partial one), qweight / A / LUT / CSR values
# at odd offsets (the tensor-core kernel declines them: the CUDA-core kernel runs), no sparse part and
# no bias, and M = 20 (three chunks on the CUDA cores, A in one chunk on tensor cores).
HOOK_CASES = pick([(4160, 40, (1, 3, 8), False, True), (4173, 33, (2, 5), False, True),
                   (11008, 48, (1, 4), False, True), (600, 30000, (1, 8), False, True),
                   (4096, 40, (1, 6), True, True), (200, 24, (2,), False, True), (320, 70, (7, 20), False, False)],
                  [(4173, 33, (2,), False, True), (600, 30000, (1,), False, True), (4096, 40, (6,), True, True)])
_hook_layers: dict = {}


def _hook_layer(bits, K, N, sparse):
    """The layer of a case, its dequantized W and |W| (float64), shared by the kernels."""
    key = (bits, K, N, sparse)
    if key not in _hook_layers:
        rng = np.random.default_rng(K * 31 + N + bits)
        layer = random_layer(rng, K, N, bits, sparse=sparse, bias=sparse, density=0.0045).astype(np.float16)
        W = ref.dequantize(layer.qweight, layer.lut.astype(np.float32), K, bits, layer.sparse_indptr,
                           layer.sparse_indices, None if layer.sparse_values is None else
                           layer.sparse_values.astype(np.float32)).astype(np.float64)
        Wabs = np.abs(ref.dequantize(layer.qweight, layer.lut.astype(np.float32), K, bits, layer.sparse_indptr,
                                     layer.sparse_indices, None if layer.sparse_values is None else
                                     np.abs(layer.sparse_values.astype(np.float32)))).astype(np.float64)
        _hook_layers[key] = (layer, W, Wabs)
    return _hook_layers[key]


def _on_device(arr, offset_elems=0):
    """An OrtValue on the GPU holding `arr` after `offset_elems` leading elements, and the pointer."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    host = np.zeros(flat.size + offset_elems, flat.dtype)
    host[offset_elems:] = flat
    value = ort.OrtValue.ortvalue_from_numpy(host, "cuda", 0)
    return value, value.data_ptr() + offset_elems * flat.dtype.itemsize


def _run_hook(lib, kernel, layer, A, misaligned):
    M, K = A.shape
    off = 1 if misaligned else 0
    keep, ptrs = [], {}
    for name, arr, o in (("a", A, off), ("q", layer.qweight, off), ("lut", layer.lut, off),
                         ("indptr", layer.sparse_indptr, 0), ("indices", layer.sparse_indices, 0),
                         ("values", layer.sparse_values, off), ("bias", layer.bias, 0)):
        if arr is None:
            ptrs[name] = None
            continue
        value, ptrs[name] = _on_device(arr, o)
        keep.append(value)
    y = ort.OrtValue.ortvalue_from_shape_and_type((M, layer.N), np.float16, "cuda", 0)
    nnz = 0 if layer.sparse_indices is None else len(layer.sparse_indices)
    err = lib.SqllmCudaLaunchDecodeKernel(ptrs["a"], ptrs["q"], ptrs["lut"], ptrs["indptr"], ptrs["indices"],
                                          ptrs["values"], ptrs["bias"], y.data_ptr(), M, K, layer.N, layer.bits,
                                          nnz, 1, None, KERNELS[kernel])
    sync = lib.SqllmCudaSynchronize()
    assert sync is None, sync.decode()
    assert err is None, err.decode()
    return y.numpy()


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_decode_kernels(kernel, bits):
    """The tensor-core kernel (where it applies) and the CUDA-core kernel (forced), through
    SqllmCudaLaunchDecodeKernel, against the reference: fp16, sparse + bias, the cases of HOOK_CASES.
    The tensor-core kernel follows the int8 contract (its bound added); the CUDA-core one is exact."""
    lib = _decode_hook()
    for K, N, rows, misaligned, sparse in HOOK_CASES:
        layer, W, Wabs = _hook_layer(bits, K, N, sparse)
        rng = np.random.default_rng(K + N + len(kernel))
        for M in rows:
            A = rng.standard_normal((M, K)).astype(np.float16)
            y = _run_hook(lib, kernel, layer, A, misaligned)
            A64 = A.astype(np.float64)
            bias = 0 if layer.bias is None else layer.bias.astype(np.float64)
            expected = A64 @ W.T + bias
            scale = np.abs(A64) @ Wabs.T + np.abs(bias)
            err_abs = np.abs(y.astype(np.float64) - expected)
            int8 = int8_error_bound(A, layer) * 1.01 if kernel == "default" else 0.0
            assert np.all(err_abs <= 1e-3 * scale + int8 + 1e-6), \
                f"{kernel} bits={bits} K={K} N={N} M={M}: max error {err_abs.max():.3g}, max scale {scale.max():.3g}"


# ---- CUDA graphs -------------------------------------------------------------------------------------

def chain_model(layers, dtype):
    """A -> Y1 = op(A, l1); Y2 = op(Y1, l2); Y3 = op(A, l3). Outputs Y1, Y2, Y3."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    l1, l2, l3 = (layer.astype(dtype) for layer in layers)
    nodes, inits = [], []
    for a, y, layer, prefix in (("A", "Y1", l1, "l1"), ("Y1", "Y2", l2, "l2"), ("A", "Y3", l3, "l3")):
        node, node_inits = make_node(a, y, layer, prefix)
        nodes.append(node)
        inits += node_inits
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("A", elem, ["M", l1.K])],
                              [helper.make_tensor_value_info(y, elem, ["M", layer.N])
                               for y, layer in (("Y1", l1), ("Y2", l2), ("Y3", l3))], initializer=inits)
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[
        helper.make_opsetid("", DEFAULT_ONNX_OPSET), helper.make_opsetid(DOMAIN, OPSET_VERSION)])
    return model, (l1, l2, l3)


@pytest.mark.parametrize("dtype,M", pick([(np.float16, 1), (np.float16, 4), (np.float16, 20), (np.float16, 64),
                                          (np.float32, 2), (np.float32, 64)],
                                         [(np.float16, 1), (np.float16, 64)]))
def test_cuda_graph_session(dtype, M):
    """enable_cuda_graph: inputs and outputs bound to device buffers; after the capture, new input
    values are copied into the same bound buffer and every replay matches the reference."""
    rng = np.random.default_rng(100 + M)
    K, N1, N2, N3 = 600, 272, 40, 33
    layers = [random_layer(rng, K, N1, 3, density=0.0045), random_layer(rng, N1, N2, 4, density=0.01),
              random_layer(rng, K, N3, 4, sparse=False, bias=False)]
    model, (l1, l2, l3) = chain_model(layers, dtype)
    session = cuda_session(model, enable_cuda_graph=1)
    binding = session.io_binding()
    a_dev = ort.OrtValue.ortvalue_from_numpy(np.zeros((M, K), dtype), "cuda", 0)
    binding.bind_ortvalue_input("A", a_dev)
    outs = {name: ort.OrtValue.ortvalue_from_shape_and_type((M, n), dtype, "cuda", 0)
            for name, n in (("Y1", N1), ("Y2", N2), ("Y3", N3))}
    for name, value in outs.items():
        binding.bind_ortvalue_output(name, value)
    for run in range(6):  # warm-up run(s), capture, then replays
        A = rng.standard_normal((M, K)).astype(dtype)
        a_dev.update_inplace(A)
        session.run_with_iobinding(binding)
        y1, y2, y3 = (outs[name].numpy() for name in ("Y1", "Y2", "Y3"))
        assert_matches_reference(y1, reference_output(A, l1), A, l1)
        assert_matches_reference(y2, reference_output(y1, l2), y1, l2)  # on the GPU's own Y1
        assert_matches_reference(y3, reference_output(A, l3), A, l3)
    session.run_with_iobinding(binding)  # a replay with unchanged inputs changes nothing
    np.testing.assert_array_equal(outs["Y3"].numpy(), y3)


# ---- errors on CUDA ------------------------------------------------------------------------------------

def run_cuda(feeds, **kw):
    session = cuda_session(model_with(feeds, **kw))
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def expect_cuda_error(pattern, feeds, **kw):
    with pytest.raises(ORT_ERRORS, match=pattern):
        run_cuda(feeds, **kw)


def test_valid_feeds_run():
    feeds = valid_feeds()
    y = run_cuda(feeds)[0]
    layer = PackedLinear(feeds["qweight"], feeds["lut"], ERR_BITS, ERR_K, feeds["sparse_indptr"],
                         feeds["sparse_indices"], feeds["sparse_values"], feeds["bias"])
    assert y.shape == (2, ERR_N)
    assert_matches_reference(y, reference_output(feeds["A"], layer), feeds["A"], layer)


@pytest.mark.parametrize("csr,pattern", pick(CSR_CASES, CSR_CASES[-1:]))
def test_malformed_csr_fed_at_run_time(csr, pattern):
    expect_cuda_error(pattern, _csr(*csr))


@pytest.mark.parametrize("csr,pattern", pick(CSR_CASES, CSR_CASES[:1]))
def test_malformed_csr_initializers_fail_session_creation(csr, pattern):
    model = model_with(_csr(*csr), as_initializers=("qweight", "lut", "sparse_indptr", "sparse_indices",
                                                    "sparse_values"))
    with pytest.raises(ORT_ERRORS, match=pattern):
        cuda_session(model)


def test_unsorted_and_duplicate_indices_are_valid():
    feeds = _csr([0, 3, 3, 3, 3, 3, 3], [9, 2, 9])
    assert np.isfinite(run_cuda(feeds)[0]).all()


def _with(name, value):
    feeds = valid_feeds()
    feeds[name] = value(feeds) if callable(value) else value
    return feeds


@pytest.mark.parametrize("feeds_fn,kw,pattern", pick([
    (lambda: valid_feeds(), {"attrs": {"K": ERR_K, "N": ERR_N, "bits": 5}},
     r"attribute 'bits' must be one of 2, 3, 4, 8 \(got 5\)"),
    (lambda: _with("A", np.ones((2, ERR_K + 1), np.float32)), {}, r"input 'A' last dimension is 71 but attribute K is 70"),
    (lambda: _with("qweight", lambda f: f["qweight"][:, :-1]), {},
     r"input 'qweight' must have shape \[ceil\(N/16\), 32\*ceil\(K/64\)\*bits\] = \[1, 192\], got \[1, 191\]"),
    (lambda: _with("qweight", lambda f: f["qweight"].astype(np.int64)), {}, r"input 'qweight' must be int32, got int64"),
    (lambda: _with("lut", np.ones((ERR_N, 16), np.float32)), {},
     r"input 'lut' must have shape \[N, 2\^bits\] = \[6, 8\], got \[6, 16\]"),
    (lambda: _with("bias", lambda f: f["bias"].astype(np.float16)), {},
     r"input 'bias' must have the same element type as 'A' \(float32\), got float16"),
    (lambda: valid_feeds(), {"omit": ("sparse_values",)},
     r"inputs 'sparse_indptr', 'sparse_indices' and 'sparse_values' must be given together"),
    (lambda: _with("sparse_indptr", lambda f: f["sparse_indptr"][:-1]), {},
     r"input 'sparse_indptr' must have shape \[N\+1\] = \[7\], got \[6\]"),
    (lambda: _with("bias", lambda f: f["bias"][:-1]), {}, r"input 'bias' must have shape \[N\] = \[6\], got \[5\]"),
], []))
def test_input_errors(feeds_fn, kw, pattern):
    expect_cuda_error(pattern, feeds_fn(), **kw)


def test_node_runs_on_cuda(tmp_path):
    """The profile names the CUDA EP for every SqueezeMatMul node (no CPU fallback)."""
    rng = np.random.default_rng(11)
    layer = random_layer(rng, 300, 70, 4).astype(np.float16)
    session = cuda_session(make_model(layer, a_shape=("M", 300), dtype=np.float16),
                           profile_prefix=str(tmp_path / "profile"))
    for M in (1, 64):
        run_and_check(session, rng.standard_normal((M, 300)).astype(np.float16), layer)
    events = json.loads(open(session.end_profiling()).read())
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == "SqueezeMatMul"]
    assert nodes, "no SqueezeMatMul node events in the profile"
    assert {e["args"].get("provider") for e in nodes} == {CUDA}

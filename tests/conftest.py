"""Shared fixtures: random SqueezeMatMul problems and ORT sessions with the op library."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import onnxruntime as ort
import pytest

import sqllm_onnx
from sqllm_onnx import reference as ref
from sqllm_onnx.op import PackedLinear


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


# The CPU kernel's int8 path (docs/op-spec.md) is exact only up to its stated bound; the tests that
# compare whole models against torch at fp32 tolerance run the exact path, and the tests of the int8
# path (test_op_cpu.py, fuzz_op.py, test_cpu_int8.py) ask for it explicitly.
os.environ.setdefault("SQLLM_CPU_KERNEL", "exact")


@contextlib.contextmanager
def cpu_kernel(choice: str):
    """SQLLM_CPU_KERNEL=choice while sessions are created (the kernel reads it then)."""
    old = os.environ.get("SQLLM_CPU_KERNEL")
    os.environ["SQLLM_CPU_KERNEL"] = choice
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SQLLM_CPU_KERNEL", None)
        else:
            os.environ["SQLLM_CPU_KERNEL"] = old


def cpu_int8_available() -> bool:
    return "int8-avx512-vnni" in sqllm_onnx.library_info()["cpu_paths"]


def int8_applies(M: int, bits: int, choice: str) -> bool:
    """Whether a CPU session created under SQLLM_CPU_KERNEL=choice runs the int8 path for M, bits."""
    return cpu_int8_available() and bits in (3, 4) and choice in ("int8", "auto")


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs onnxruntime-gpu with CUDAExecutionProvider")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def random_layer(rng, K: int, N: int, bits: int, sparse: bool = True, bias: bool = True,
                 density: float = 0.02) -> PackedLinear:
    """A random packed layer: codes, LUT, a CSR with unsorted and duplicate entries, bias."""
    codes = rng.integers(0, 1 << bits, size=(N, K))
    lut = rng.standard_normal((N, 1 << bits)).astype(np.float32)
    layer = PackedLinear(ref.pack_codes(codes, bits), lut, bits, K)
    if sparse:
        counts = rng.binomial(K, density, size=N)
        counts[rng.integers(0, N)] += 5  # one heavy row
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        layer.sparse_indptr = indptr
        layer.sparse_indices = rng.integers(0, K, size=int(indptr[-1])).astype(np.int32)
        layer.sparse_values = rng.standard_normal(int(indptr[-1])).astype(np.float32)
    if bias:
        layer.bias = rng.standard_normal(N).astype(np.float32)
    return layer


def reference_output(A: np.ndarray, layer: PackedLinear) -> np.ndarray:
    return ref.squeeze_matmul(A, layer.qweight, layer.lut, layer.sparse_indptr, layer.sparse_indices,
                              layer.sparse_values, layer.bias, K=layer.K, N=layer.N, bits=layer.bits)


def make_session(model, providers=("CPUExecutionProvider",), threads: int = 0, cpu_kernel_choice: str | None = None,
                 **provider_options):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sqllm_onnx.register(so)
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    with cpu_kernel(cpu_kernel_choice or os.environ.get("SQLLM_CPU_KERNEL", "exact")):
        return ort.InferenceSession(data, so, providers=list(providers))


def int8_error_bound(A: np.ndarray, layer: PackedLinear) -> np.ndarray:
    """The CPU int8 path's bound on |Y - Y_ref| beyond fp32/fp16 rounding (docs/op-spec.md): per row n
    of W with LUT step sw = (max - min) / 255 and per unit u of 256 k (the last one partial) with A
    step sa = max_u |A| / 127, sum over k of  sw/2 |A_k| + sa/254 (|W_k| + sw/2)."""
    K = layer.K
    a = np.abs(A.reshape(-1, K).astype(np.float64))
    lut = layer.lut.astype(np.float64)
    sw = (lut.max(axis=1) - lut.min(axis=1)) / 255  # [N]
    codes = ref.unpack_codes(layer.qweight, K, layer.bits, layer.N)[:, :K]
    w = np.abs(np.take_along_axis(lut, codes.astype(np.int64), axis=1))  # [N, K]
    pad = (-K) % 256
    sa = np.pad(a, ((0, 0), (0, pad))).reshape(a.shape[0], -1, 256).max(axis=2) / 127  # [M, units]
    sa_k = np.repeat(sa, 256, axis=1)[:, :K]
    bound = (a.sum(axis=1)[:, None] * sw[None, :] / 2 + (sa_k / 254) @ (w + sw[:, None] / 2).T)
    return bound.reshape(*A.shape[:-1], layer.N)


def assert_matches_reference(y: np.ndarray, expected: np.ndarray, A: np.ndarray, layer: PackedLinear,
                             int8: bool = False):
    """Tolerance scaled by the size of the terms summed: fp32 accumulation error, plus one fp16
    rounding of the output when T is float16; with int8=True also the CPU int8 path's bound."""
    assert y.dtype == expected.dtype and y.shape == expected.shape
    W = np.abs(ref.dequantize(layer.qweight, layer.lut, layer.K, layer.bits, layer.sparse_indptr,
                              layer.sparse_indices,
                              None if layer.sparse_values is None else np.abs(layer.sparse_values)))
    scale = np.abs(A.astype(np.float64)) @ W.T + (0 if layer.bias is None else np.abs(layer.bias.astype(np.float64)))
    eps = 1e-5 if y.dtype == np.float32 else 1e-3
    extra = int8_error_bound(A, layer) * 1.01 if int8 else 0.0
    err = np.abs(y.astype(np.float64) - expected.astype(np.float64))
    assert np.all(err <= eps * scale + extra + 1e-6), f"max error {err.max():.3g}, max scale {scale.max():.3g}"


def lazy_exports(root, cases: dict, config_for, seed: int = 0):
    """name -> export folder of a tiny random model, made on first use under `root`.
    cases: name -> (architecture, dtype, quantized); config_for(name) is the QuantConfig of a quantized
    case. Each export is checked to hold SqueezeMatMul nodes exactly when it is quantized."""
    import onnx

    from sqllm_onnx import models
    from sqllm_onnx.export.exporter import export

    made = {}

    def get(name: str):
        if name not in made:
            arch, dtype, quantized = cases[name]
            model_dir = root / f"{arch}-model"
            if not model_dir.exists():
                model, tokenizer = models.random_model(arch, seed=seed)
                model.save_pretrained(model_dir)
                tokenizer.save_pretrained(model_dir)
            out = export(root / name, config_for(name) if quantized else None, str(model_dir), dtype=dtype,
                         progress=False, log=lambda *a: None)
            squeeze = sum(n.op_type == "SqueezeMatMul" for n in onnx.load(str(out / "model.onnx")).graph.node)
            assert (squeeze > 0) == quantized, f"{name}: {squeeze} SqueezeMatMul nodes"
            made[name] = out
        return made[name]

    return get

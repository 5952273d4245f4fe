"""CUDA-event timings of the SqueezeMatMul decode kernel (needs torch with CUDA).

- ``device_name()``: the GPU's name.
- ``copy_bandwidth_gbps()``: device-to-device copy bandwidth (bytes read + written), median of
  many copies of a buffer much larger than L2: the practical ceiling of a bandwidth-bound kernel.
- ``kernel_time_us(method, K, N, M, ops, dtype, kernel=0)``: the decode kernel alone, launched
  through the library's ``SqllmCudaLaunchDecodeKernel`` hook (ops/cuda/bench_hook.cc) on torch's
  current stream, rotating over ``ops`` distinct random layers (so weights come from HBM, not L2),
  timed with CUDA events over a captured graph of many launches; median microseconds per launch.
  ``kernel=1`` forces the CUDA-core kernel.

Kernel development without onnxruntime-gpu or torch: benchmarks/decode_driver.cu.
torch is imported lazily so that this module can be imported (and fail clearly) without it.
"""

from __future__ import annotations

import ctypes
import math
import statistics
import sys

import numpy as np

import sqllm_onnx

_COPY_BYTES = 1 << 30  # 1 GiB copied per sample (read 1 GiB + write 1 GiB); L2 is ~50 MB
_lib = None


def _preload_ort_cuda_libraries() -> None:
    """onnxruntime-gpu >= 1.21 finds the CUDA libraries of pip's nvidia packages only after this."""
    try:
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
    except Exception:  # noqa: BLE001 - best effort: sessions report their own errors
        pass


_preload_ort_cuda_libraries()


def _torch():
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("the CUDA kernel timings need torch with a CUDA device")
    return torch


def device_name() -> str:
    torch = _torch()
    return torch.cuda.get_device_name(torch.cuda.current_device())


def _median_ms(torch, fn, repeats: int, inner: int) -> float:
    """Median over `repeats` samples of the event time of `inner` back-to-back calls, in ms."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def _copy_ms(torch, repeats: int) -> float:
    src = torch.empty(_COPY_BYTES // 4, dtype=torch.float32, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    return _median_ms(torch, lambda: dst.copy_(src), repeats, 1)


def copy_bandwidth_gbps(repeats: int = 20) -> float:
    torch = _torch()
    ms = _copy_ms(torch, repeats)
    torch.cuda.empty_cache()  # give the 2 GiB back before the sessions allocate
    return 2 * _COPY_BYTES / (ms * 1e-3) / 1e9


def _library():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(sqllm_onnx.get_library_path())
        try:
            fn = lib.SqllmCudaLaunchDecodeKernel
        except AttributeError as e:
            raise RuntimeError(f"{sqllm_onnx.get_library_path()} was built without CUDA "
                               "(no SqllmCudaLaunchDecodeKernel)") from e
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
        fn.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i32, p, i32]
        fn.restype = ctypes.c_char_p
        _lib = lib
    return _lib


class _Layers:
    """`ops` random layers on the GPU (torch tensors) and the hook's pointer arguments for each."""

    def __init__(self, K: int, N: int, bits: int, ops: int, dtype, sparsity: float = 0.0, seed: int = 1234,
                 on_gpu: bool = True):
        from sqllm_onnx import reference as ref
        from sqllm_onnx.bench import kernel as bench

        torch = _torch()
        self.K, self.N, self.bits, self.ops = K, N, bits, ops
        self.half = np.dtype(dtype) == np.float16
        self.tdtype = torch.float16 if self.half else torch.float32
        dev = torch.device("cuda")
        self.layers = []  # (tensors, nnz); tensors = q, lut, indptr, indices, values, bias (or None)
        rng = np.random.default_rng(seed)
        if on_gpu and not sparsity:  # fast: random words and LUTs generated on the device
            gen = torch.Generator(device=dev)
            gen.manual_seed(seed)
            shape = ref.qweight_shape(N, K, bits)  # random words: kernels ignore padding codes
            for _ in range(ops):
                q = torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, device=dev, generator=gen)
                lut = (torch.randn(N, 1 << bits, device=dev, generator=gen) * 0.02).to(self.tdtype)
                self.layers.append(([q, lut, None, None, None, None], 0))
            self.weight_bytes = shape[0] * shape[1] * 4 + N * (1 << bits) * (2 if self.half else 4)
        else:
            def to_dev(a):
                return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(dev)
            for _ in range(ops):
                layer = bench.random_squeeze_layer(rng, K, N, bits, sparsity, dtype)
                self.weight_bytes = sum(a.nbytes for a in layer.arrays().values())
                self.layers.append(([to_dev(a) for a in (layer.qweight, layer.lut, layer.sparse_indptr,
                                                         layer.sparse_indices, layer.sparse_values, layer.bias)],
                                    layer.nnz))

    def launcher(self, M: int, kernel: int = 0):
        """A function launching the `ops` layers once each on a stream; returns None or the error."""
        torch = _torch()
        hook = _library().SqllmCudaLaunchDecodeKernel
        a = (torch.randn(M, self.K, device="cuda") * 0.5).to(self.tdtype)
        ys = [torch.empty(M, self.N, device="cuda", dtype=self.tdtype) for _ in range(self.ops)]
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        calls = [([ptr(a)] + [ptr(t) for t in tensors[:6]] + [ptr(y)], nnz)
                 for (tensors, nnz), y in zip(self.layers, ys)]
        K, N, bits, half = self.K, self.N, self.bits, int(self.half)

        def launch_all(stream: int, rounds: int = 1):
            for _ in range(rounds):
                for p, nnz in calls:
                    err = hook(*p, M, K, N, bits, nnz, half, stream, kernel)
                    if err is not None:
                        return err.decode()
            return None
        launch_all.keep = (a, ys)  # the buffers live as long as the launcher
        return launch_all


def _time_launcher(launch_all, ops: int, weight_bytes: int, repeats: int) -> float:
    """Median microseconds per launch: the chain (several rounds over the layers) captured once into a
    CUDA graph and replayed between two CUDA events (eager launches if the capture fails). NaN when
    the hook refuses the problem (not on the decode path); raises on other errors."""
    torch = _torch()
    err = launch_all(torch.cuda.current_stream().cuda_stream)
    if err is not None:
        if "not on the decode path" in err:
            return math.nan
        raise RuntimeError(err)
    torch.cuda.synchronize()
    # ~2 ms of GPU time per replay at an assumed 2.5 TB/s; at most 4096 launches in the graph.
    per_launch_s = max(weight_bytes / 2.5e12, 1e-6)
    rounds = int(min(max(2, math.ceil(2e-3 / (per_launch_s * ops))), max(2, 4096 // ops)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            launch_all(side.cuda_stream)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            err = launch_all(torch.cuda.current_stream().cuda_stream, rounds)
        if err is not None:
            raise RuntimeError(err)
        graph.replay()
        torch.cuda.synchronize()
        ms = _median_ms(torch, graph.replay, repeats, 1)
        del graph
    except Exception as e:  # noqa: BLE001 - fall back to eager launches (may be launch-rate bound)
        print(f"warning: kernel timing: CUDA graph capture failed ({str(e).splitlines()[0][:200]}); "
              "timing eager launches instead", file=sys.stderr)
        torch.cuda.synchronize()
        ms = _median_ms(torch, lambda: launch_all(torch.cuda.current_stream().cuda_stream, rounds), repeats, 1)
    torch.cuda.synchronize()
    return ms * 1e3 / (rounds * ops)


def kernel_time_us(method, K: int, N: int, M: int, ops: int, dtype, repeats: int = 15, kernel: int = 0) -> float:
    """Median microseconds of one decode launch, in a chain rotating through `ops` layers.

    The chain (several rounds over the layers) is captured once into a CUDA graph and replayed
    between two CUDA events, so host launch overhead (Python, ctypes) does not enter the figure:
    it is GPU time per kernel, back to back, as under ORT's enable_cuda_graph. Returns NaN for an
    M the decode hook does not take (the prefill path needs ORT's allocator and cuBLAS: time it
    through the session figures instead). kernel=1: the CUDA-core kernel."""
    layers = _Layers(K, N, method.bits, ops, dtype, method.sparsity, on_gpu=not method.sparsity)
    return _time_launcher(layers.launcher(M, kernel), ops, layers.weight_bytes, repeats)

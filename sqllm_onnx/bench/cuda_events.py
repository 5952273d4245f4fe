"""CUDA-event timings of the SqueezeMatMul decode kernels (needs torch with CUDA).

- ``device_name()``: the GPU's name.
- ``copy_bandwidth_gbps()``: device-to-device copy bandwidth (bytes read + written), median of
  many copies of a buffer much larger than L2: the practical ceiling of a bandwidth-bound kernel.
- ``kernel_time_us(method, K, N, M, ops, dtype, variant=-1)``: the SqueezeMatMul decode kernels
  alone, launched through the library's ``SqllmCudaLaunchDecodeVariant`` hook
  (ops/cuda/bench_hook.cc) on torch's current stream, rotating over ``ops`` distinct random layers
  (so weights come from HBM, not L2), timed with CUDA events over many launches; median
  microseconds per launch. ``variant`` forces a tensor-core decode variant (``decode_variants()``;
  -1 = the library's policy).
- ``decode_sweep(...)`` / ``python -m sqllm_onnx.bench.cuda_events sweep``: every variant on a list
  of shapes, bit widths and M, layers generated on the GPU and shared by the variants
  (benchmarks/gpu_decode_sweep.sh); ``... profile``: a few eager launches of one variant, for
  Nsight Compute.

torch is imported lazily so that this module can be imported (and fail clearly) without it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
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
            fn = lib.SqllmCudaLaunchDecodeVariant
        except AttributeError as e:
            raise RuntimeError(f"{sqllm_onnx.get_library_path()} was built without CUDA "
                               "(no SqllmCudaLaunchDecodeVariant)") from e
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
        fn.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i32, p, i32]
        fn.restype = ctypes.c_char_p
        lib.SqllmCudaDecodeVariantName.argtypes = [i32]
        lib.SqllmCudaDecodeVariantName.restype = ctypes.c_char_p
        lib.SqllmCudaDecodeDefaultVariant.argtypes = [i64, i64, i64, i64]
        lib.SqllmCudaDecodeDefaultVariant.restype = i32
        _lib = lib
    return _lib


def decode_variants() -> list[str]:
    """Names of the tensor-core decode variants, by index (kernels.h DecodeVariant)."""
    lib, names = _library(), []
    while (name := lib.SqllmCudaDecodeVariantName(len(names))) is not None:
        names.append(name.decode())
    return names


def default_variant(M: int, K: int, N: int, bits: int) -> str:
    """The variant the library's policy picks for an fp16 problem (ops/cuda/decode_policy.cc)."""
    return decode_variants()[_library().SqllmCudaDecodeDefaultVariant(M, K, N, bits)]


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
            words = ref.words_per_row(K, bits)
            pad = (K * bits) % 32
            for _ in range(ops):
                q = torch.randint(-2**31, 2**31 - 1, (N, words), dtype=torch.int32, device=dev, generator=gen)
                if pad:  # padding bits must be zero
                    q[:, -1] &= (1 << pad) - 1
                lut = (torch.randn(N, 1 << bits, device=dev, generator=gen) * 0.02).to(self.tdtype)
                self.layers.append(([q, lut, None, None, None, None], 0))
            self.weight_bytes = N * words * 4 + N * (1 << bits) * (2 if self.half else 4)
        else:
            def to_dev(a):
                return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(dev)
            for _ in range(ops):
                layer = bench.random_squeeze_layer(rng, K, N, bits, sparsity, dtype)
                self.weight_bytes = sum(a.nbytes for a in layer.arrays().values())
                self.layers.append(([to_dev(a) for a in (layer.qweight, layer.lut, layer.sparse_indptr,
                                                         layer.sparse_indices, layer.sparse_values, layer.bias)],
                                    layer.nnz))

    def launcher(self, M: int, variant: int = -1):
        """A function launching the `ops` layers once each on a stream; returns None or the error."""
        torch = _torch()
        hook = _library().SqllmCudaLaunchDecodeVariant
        a = (torch.randn(M, self.K, device="cuda") * 0.5).to(self.tdtype)
        ys = [torch.empty(M, self.N, device="cuda", dtype=self.tdtype) for _ in range(self.ops)]
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        calls = [([ptr(a)] + [ptr(t) for t in tensors[:6]] + [ptr(y)], nnz)
                 for (tensors, nnz), y in zip(self.layers, ys)]
        K, N, bits, half = self.K, self.N, self.bits, int(self.half)

        def launch_all(stream: int, rounds: int = 1):
            for _ in range(rounds):
                for p, nnz in calls:
                    err = hook(*p, M, K, N, bits, nnz, half, stream, variant)
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
        if "not on the decode path" in err or "does not take" in err:
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


def kernel_time_us(method, K: int, N: int, M: int, ops: int, dtype, repeats: int = 15, variant: int = -1) -> float:
    """Median microseconds of one decode launch, in a chain rotating through `ops` layers.

    The chain (several rounds over the layers) is captured once into a CUDA graph and replayed
    between two CUDA events, so host launch overhead (Python, ctypes) does not enter the figure:
    it is GPU time per kernel, back to back, as under ORT's enable_cuda_graph. Returns NaN for an
    M the decode hook does not take (the prefill path needs ORT's allocator and cuBLAS: time it
    through the session figures instead), or a forced `variant` that does not take the problem."""
    layers = _Layers(K, N, method.bits, ops, dtype, method.sparsity, on_gpu=False)
    return _time_launcher(layers.launcher(M, variant), ops, layers.weight_bytes, repeats)


def decode_sweep(cases, variants=None, ops: int = 16, repeats: int = 15, min_rotation_mb: float = 100,
                 progress=print) -> dict:
    """Kernel-only time of every decode variant (fp16) for each case (K, N, bits, percent sparse,
    [M, ...]). The layers of a case are generated once (dense: on the GPU) and shared by its
    variants and M; their number is `ops`, raised (up to 64) until the rotation spans
    `min_rotation_mb` (twice L2 or more). Returns {device, copy_gbps, variants, rows}."""
    torch = _torch()
    names = decode_variants()
    variants = names if variants is None else variants
    out = {"device": device_name(), "copy_gbps": copy_bandwidth_gbps(), "variants": variants, "rows": []}
    copy = out["copy_gbps"]
    for K, N, bits, sparsity, ms in cases:
        probe = _Layers(K, N, bits, 1, np.float16, sparsity)
        n_ops = int(min(64, max(ops, math.ceil(min_rotation_mb * 1e6 / probe.weight_bytes))))
        del probe
        layers = _Layers(K, N, bits, n_ops, np.float16, sparsity)
        for M in ms:
            default = default_variant(M, K, N, bits)
            for v in variants:
                us = _time_launcher(layers.launcher(M, names.index(v)), n_ops, layers.weight_bytes, repeats)
                row = {"K": K, "N": N, "bits": bits, "sparsity": sparsity, "M": M, "variant": v, "ops": n_ops,
                       "weight_bytes": layers.weight_bytes, "us": us, "default": v == default}
                if not math.isnan(us):
                    row["gbps"] = layers.weight_bytes / (us * 1e-6) / 1e9
                    row["pct_copy"] = 100 * row["gbps"] / copy
                out["rows"].append(row)
                progress(f"{K}x{N} {bits}b{f' {sparsity}%' if sparsity else ''} M={M} {v:5s}: "
                         + (f"{us:7.2f} us {row['gbps']:6.0f} GB/s {row['pct_copy']:4.0f}%" if "gbps" in row
                            else "declined"))
        del layers
        torch.cuda.empty_cache()
    return out


def sweep_markdown(res: dict) -> str:
    """Per (shape, bits, sparsity, M): us and % of copy bandwidth of every variant, and the winner."""
    variants = res["variants"]
    lines = [f"Device: {res['device']}; copy bandwidth {res['copy_gbps']:.0f} GB/s (read + write). Kernel-only "
             "us per launch (CUDA graph of a rotation over distinct layers, CUDA events), fp16; "
             "(% of copy bandwidth); * = the library's current default.", "",
             "| K x N | bits | M | " + " | ".join(variants) + " | best (GB/s) | best vs base | best vs default |",
             "|" + "---|" * (len(variants) + 6)]
    keys = []
    for r in res["rows"]:
        k = (r["K"], r["N"], r["bits"], r["sparsity"], r["M"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        rows = {r["variant"]: r for r in res["rows"] if (r["K"], r["N"], r["bits"], r["sparsity"], r["M"]) == k}
        cells = []
        for v in variants:
            r = rows.get(v)
            if r is None or "gbps" not in r:
                cells.append("-")
            else:
                cells.append(f"{r['us']:.2f} ({r['pct_copy']:.0f}%){'*' if r['default'] else ''}")
        timed = [r for r in rows.values() if "gbps" in r]
        best = min(timed, key=lambda r: r["us"]) if timed else None
        base = rows.get("base")
        dflt = next((r for r in rows.values() if r["default"] and "gbps" in r), None)
        ratio = lambda r: f"{best['us'] / r['us']:.2f}x" if best and r and "gbps" in r else "-"  # noqa: E731
        sp = f" {k[3]}%" if k[3] else ""
        lines.append(f"| {k[0]}x{k[1]}{sp} | {k[2]} | {k[4]} | " + " | ".join(cells)
                     + f" | {best['variant'] + ' (' + format(best['gbps'], '.0f') + ')' if best else '-'}"
                     + f" | {ratio(base)} | {ratio(dflt)} |")
    return "\n".join(lines) + "\n"


def suggest_policy(res: dict, margin: float = 0.02) -> str:
    """C++ rows for ops/cuda/decode_policy.cc kPolicy from the dense M = 1 rows: per bit width, one
    catch-all row if one variant is within `margin` of the best everywhere, else one row per shape
    (sorted so that the first match is the intended one) and a catch-all with the most frequent
    winner."""
    lines = []
    for bits in sorted({r["bits"] for r in res["rows"]}):
        per_shape = {}
        for r in res["rows"]:
            if r["bits"] == bits and r["M"] == 1 and not r["sparsity"] and "gbps" in r:
                per_shape.setdefault((r["K"], r["N"]), {})[r["variant"]] = r["us"]
        if not per_shape:
            continue
        good = None
        for v in res["variants"]:
            if all(v in t and t[v] <= (1 + margin) * min(t.values()) for t in per_shape.values()):
                good = v if good is None or sum(t[v] for t in per_shape.values()) < sum(
                    t[good] for t in per_shape.values()) else good
        kname = lambda v: "kDecode" + v.capitalize()  # noqa: E731
        if good:
            lines.append(f"    {{{bits}, kAny, kAny, 8, kEither, {kname(good)}}},")
            continue
        winners = {}
        for (K, N) in sorted(per_shape):
            t = per_shape[(K, N)]
            w = min(t, key=t.get)
            winners[w] = winners.get(w, 0) + 1
            lines.append(f"    {{{bits}, {K}, {N}, 8, kEither, {kname(w)}}},")
        lines.append(f"    {{{bits}, kAny, kAny, 8, kEither, {kname(max(winners, key=winners.get))}}},")
    return "\n".join(lines)


def profile_launches(variant: str, K: int, N: int, bits: int, M: int = 1, warmup: int = 2, launches: int = 3) -> None:
    """Eager launches of one layer for Nsight Compute: `warmup` + `launches` launches of `variant`
    (profile with --launch-skip warmup --launch-count launches and a kernel-name filter)."""
    torch = _torch()
    layers = _Layers(K, N, bits, 1, np.float16)
    launch = layers.launcher(M, decode_variants().index(variant))
    for _ in range(warmup + launches):
        err = launch(torch.cuda.current_stream().cuda_stream)
        if err is not None:
            raise RuntimeError(err)
    torch.cuda.synchronize()


def _shapes(text: str):
    return [tuple(int(x) for x in s.lower().split("x")) for s in text.split(",") if s]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sqllm_onnx.bench.cuda_events")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="time every decode variant (benchmarks/gpu_decode_sweep.sh)")
    s.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096,4096x32000")
    s.add_argument("--bits", default="3,4")
    s.add_argument("--m", default="1", help="comma-separated rows of A for --shapes")
    s.add_argument("--extra", default="", help="more cases KxNxBITSxM[xPERCENT], e.g. 4096x11008x3x4 (M = 4) "
                   "or 4096x11008x3x1x0.45 (0.45%% sparse)")
    s.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
    s.add_argument("--ops", type=int, default=16)
    s.add_argument("--repeats", type=int, default=15)
    s.add_argument("--json", help="write the results here")
    s.add_argument("--markdown", help="write the table here")
    q = sub.add_parser("profile", help="a few eager launches of one variant (for ncu)")
    q.add_argument("--variant", required=True)
    q.add_argument("--shape", default="4096x11008")
    q.add_argument("--bits", type=int, default=3)
    q.add_argument("--m", type=int, default=1)
    q.add_argument("--warmup", type=int, default=2)
    q.add_argument("--launches", type=int, default=3)
    args = p.parse_args(argv)
    if args.cmd == "profile":
        (K, N), = _shapes(args.shape)
        profile_launches(args.variant, K, N, args.bits, args.m, args.warmup, args.launches)
        return 0
    variants = [v for v in args.variants.split(",") if v] or None
    ms = [int(m) for m in args.m.split(",")]
    cases = [(K, N, int(b), 0.0, ms) for (K, N) in _shapes(args.shapes) for b in args.bits.split(",")]
    for case in (c for c in args.extra.split(",") if c):
        f = case.lower().split("x")
        cases.append((int(f[0]), int(f[1]), int(f[2]), float(f[4]) if len(f) > 4 else 0.0, [int(f[3])]))
    res = decode_sweep(cases, variants, args.ops, args.repeats, progress=lambda line: print(line, flush=True))
    md = sweep_markdown(res)
    print()
    print(md)
    print("Suggested kPolicy rows (ops/cuda/decode_policy.cc), from the dense M = 1 rows:")
    print(suggest_policy(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\nSuggested kPolicy rows (dense, M = 1):\n\n```\n" + suggest_policy(res) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

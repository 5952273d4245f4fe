"""Where a batch-1 decode step's time goes on the GPU (issue 6's "why"), for exported folders:

    python benchmarks/decode_breakdown.py DIR [DIR ...] [--prompt-len 128] [--steps 32] [--json FILE]

For each folder, in the harness of `sqllm-onnx bench` (bench.decode.DeviceDecoder: KV cache on the
GPU, IOBinding): a prompt is prefilled, then `--steps` greedy steps are timed on the wall clock, then
`--steps` more under torch.profiler, whose CUPTI trace holds every CUDA kernel the process ran (ORT's
and the op library's alike). Reported per token: wall ms, GPU busy ms (the sum of kernel and memcpy
durations; one stream, so they do not overlap), the rest (host-side overhead: ORT's per-node dispatch
and launches, binding, the logits copy), kernel launches, and the kernels taking the most time.
Needs onnxruntime-gpu and a CUDA build of torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np


def _device_us(event) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):  # newer / older torch
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def breakdown(model_dir: Path, prompt_len: int, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from sqllm_onnx.bench.decode import DeviceDecoder, describe, weight_bytes
    from sqllm_onnx.runtime.session import open_session

    decoder = DeviceDecoder(open_session(model_dir, "cuda"), "cuda")
    prompt = np.random.default_rng(0).integers(3, decoder.vocab, size=(1, prompt_len), dtype=np.int64)
    decoder.feed(prompt)  # warm-up
    decoder.reset()
    wall = decoder.greedy(decoder.feed(prompt), steps)
    decoder.reset()
    logits = decoder.feed(prompt)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.greedy(logits, steps)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if _device_us(e) > 0]
    busy_us = sum(_device_us(e) for e in kernels)
    top = sorted(kernels, key=_device_us, reverse=True)[:12]
    wall_ms = statistics.median(wall) * 1e3
    busy_ms = busy_us / steps / 1e3
    del decoder
    return {"model_dir": str(model_dir), "label": describe(model_dir), "weight_bytes": weight_bytes(model_dir),
            "ms_per_token": wall_ms, "gpu_busy_ms_per_token": busy_ms, "other_ms_per_token": wall_ms - busy_ms,
            "kernels_per_token": sum(e.count for e in kernels) / steps,
            "top_kernels": [{"name": e.key[:120], "per_token": e.count / steps,
                             "us_per_token": _device_us(e) / steps} for e in top]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = []
    for d in args.dirs:
        r = breakdown(d, args.prompt_len, args.steps)
        rows.append(r)
        print(f"{r['label']}: {r['ms_per_token']:.2f} ms/token wall, GPU busy {r['gpu_busy_ms_per_token']:.2f} ms, "
              f"other {r['other_ms_per_token']:.2f} ms, {r['kernels_per_token']:.0f} kernels/token", flush=True)
        for k in r["top_kernels"][:6]:
            print(f"    {k['us_per_token']:8.1f} us  x{k['per_token']:5.1f}  {k['name']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The RTN g128 row of docs/results.md's quantizer table: ORT's int4 format (MatMulNBits, 4 bits,
blocks of 128 along K, fp16 scale and uint8 zero point per block; `sqllm_onnx.finequant` with a fixed
block size) measured with the quantizer table's protocol: torch float32 with the dequantized weights,
every held-out window of 512 tokens.

    python benchmarks/rtn_g128_torch.py OUT.json [--bits 4] [--block-size 128] [--eval-windows N]
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=None, help="the first N held-out windows (default: all)")
    args = p.parse_args()

    import torch

    from sqllm_onnx import perplexity
    from sqllm_onnx.finequant import FineQuantConfig, apply_to_model, quantize_model
    from sqllm_onnx.models import load_model

    model, tok = load_model(None, dtype=torch.float32)
    t0 = time.perf_counter()
    q = quantize_model(model, FineQuantConfig(bits=args.bits, block_size=args.block_size, scale_dtype="float16",
                                              device="cpu"), progress=True)
    seconds = time.perf_counter() - t0
    weights = sum(layer.N * layer.K for layer in q.layers.values())
    stored = sum(layer.nbytes - (0 if layer.bias is None else layer.bias.nbytes) for layer in q.layers.values())
    apply_to_model(model, q)
    windows = perplexity.eval_windows(tok, None, 512, args.eval_windows)
    ppl = perplexity.torch_perplexity(model, windows, progress=True)
    result = {"method": f"RTN g{args.block_size} (ORT MatMulNBits int{args.bits}, asymmetric, fp16 scales)",
              "bits": args.bits, "block_size": args.block_size, "bits_per_weight": 8 * stored / weights,
              "ppl": ppl, "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
              "source": "stdlib:pydoc_data.topics[eval]", "backend": "torch float32 (dequantized weights)",
              "quantize_s": round(seconds, 2), "python": platform.python_version(), "torch": torch.__version__}
    print(json.dumps(result, indent=2))
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

"""Torch perplexity of the unquantized SmolLM2-135M on the held-out stdlib text, in float32 and
float16 (the reference row of docs/results.md's quantizer table).

    PYTHONPATH=. python3 benchmarks/quantize_baseline_ppl.py --dtypes float32 float16
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    import torch

    from sqllm_onnx import perplexity
    from sqllm_onnx.models import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    p.add_argument("--eval-windows", type=int, default=None)
    args = p.parse_args()
    for dtype in args.dtypes:
        model, tok = load_model(args.model, dtype=getattr(torch, dtype))
        windows = perplexity.eval_windows(tok, max_windows=args.eval_windows)
        t = time.perf_counter()
        ppl = perplexity.torch_perplexity(model, windows)
        print(json.dumps({"dtype": dtype, "ppl": round(ppl, 4), "windows": int(windows.shape[0]),
                          "seq_len": int(windows.shape[1]), "seconds": round(time.perf_counter() - t, 1)}), flush=True)


if __name__ == "__main__":
    main()

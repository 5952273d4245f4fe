"""`sqllm-onnx eval DIR`: perplexity of an exported model through ONNX Runtime, with the protocol of
sqllm_onnx.perplexity (fixed context windows, the held-out stdlib text by default)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from sqllm_onnx import perplexity
from sqllm_onnx.runtime.session import Decoder, open_session


def ort_perplexity(model_dir, windows, provider: str = "cpu", threads: int = 0, progress: bool = False) -> float:
    """Perplexity of DIR's model on the windows (each window scored from an empty KV cache)."""
    from tqdm.auto import tqdm

    decoder = Decoder(open_session(model_dir, provider, threads))
    total, count = 0.0, 0
    for w in tqdm(windows, desc=f"perplexity (ORT {provider})", disable=not progress, unit="window"):
        decoder.reset()
        nll, n = perplexity.nll_from_logits(decoder.step(w), w)
        total, count = total + nll, count + n
    return math.exp(total / count)


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    from sqllm_onnx.errors import UserError

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken tokenizer
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"{model_dir}: its tokenizer cannot be loaded ({first.strip()[:200]}): re-export the model") from None


def add_arguments(p) -> None:
    p.add_argument("model_dir", type=Path, help="an exported folder (the --out of `sqllm-onnx export`)")
    p.add_argument("--data", default=None, help="evaluation text: a file, hf:NAME, or 'stdlib' (default: the "
                   "held-out part of pydoc_data.topics)")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime execution provider")
    p.add_argument("--seq-len", type=int, default=perplexity.DEFAULT_SEQ_LEN, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's choice)")
    p.add_argument("--json", type=Path, help="also write the result here")


def main(args, command: str) -> int:
    from sqllm_onnx import export_folder
    from sqllm_onnx.errors import UsageError

    if args.seq_len < 2:
        raise UsageError("--seq-len must be at least 2")
    if args.max_windows is not None and args.max_windows < 1:
        raise UsageError("--max-windows must be at least 1")
    if args.threads < 0:
        raise UsageError("--threads must be >= 0")
    export_folder.inspect(args.model_dir)
    tokenizer = load_tokenizer(args.model_dir)
    windows = perplexity.eval_windows(tokenizer, args.data, args.seq_len, args.max_windows)
    t0 = time.time()
    ppl = ort_perplexity(args.model_dir, windows, args.provider, args.threads, progress=True)
    result = {"model_dir": str(args.model_dir), "perplexity": ppl, "windows": int(len(windows)),
              "seq_len": args.seq_len, "provider": args.provider, "data": args.data or "stdlib (eval part)",
              "seconds": round(time.time() - t0, 1), "command": command}
    print(f"perplexity {ppl:.4f} over {len(windows)} windows of {args.seq_len} tokens ({args.provider})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0

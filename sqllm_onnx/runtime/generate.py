"""`sqllm-onnx generate DIR --prompt TEXT`: greedy decoding with the KV cache through ONNX Runtime."""

from __future__ import annotations

import time
from pathlib import Path

from sqllm_onnx.runtime.session import Decoder, greedy_generate, open_session


def generate_text(model_dir, prompt: str, max_new_tokens: int = 32, provider: str = "cpu", threads: int = 0):
    """(generated text, ms per new token)."""
    from transformers import GenerationConfig

    from sqllm_onnx.runtime.evaluate import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    try:
        eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    except OSError:
        eos = tokenizer.eos_token_id
    ids = tokenizer(prompt)["input_ids"]
    decoder = Decoder(open_session(model_dir, provider, threads))
    t0 = time.perf_counter()
    new = greedy_generate(decoder, ids, max_new_tokens, eos)
    ms = (time.perf_counter() - t0) * 1000 / max(len(new), 1)
    return tokenizer.decode(new, skip_special_tokens=True), ms


def add_arguments(p) -> None:
    p.add_argument("model_dir", type=Path, help="an exported folder (the --out of `sqllm-onnx export`)")
    p.add_argument("--prompt", required=True, help="text to continue (not empty)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime execution provider")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's choice)")


def main(args, command: str) -> int:
    from sqllm_onnx import export_folder
    from sqllm_onnx.errors import UsageError

    if not args.prompt.strip():
        raise UsageError("--prompt is empty: give the text to continue")
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    if args.threads < 0:
        raise UsageError("--threads must be >= 0")
    export_folder.inspect(args.model_dir)
    text, ms = generate_text(args.model_dir, args.prompt, args.max_new_tokens, args.provider, args.threads)
    print(args.prompt + text)
    print(f"[{ms:.1f} ms/token, {args.provider}]")
    return 0

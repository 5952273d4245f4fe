"""`sqllm-onnx export`: quantize (or load a checkpoint) and write an ONNX decoder folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from sqllm_onnx import models


def add_quant_arguments(p: argparse.ArgumentParser) -> None:
    """The quantization options shared by `export` and `demo`."""
    p.add_argument("--model", default=models.EMBEDDED, help=f"local folder, hub id, or short name ({models.EMBEDDED} "
                   f"is the embedded SmolLM2-135M; short names: {', '.join(sorted(models.SHORT_NAMES))}; "
                   "random:ARCH[-7b] for random weights, e.g. random:llama-7b)")
    p.add_argument("--tokenizer", default=None, help="folder or hub id to take the tokenizer from, for a model "
                   "folder saved without one (default: the model's own)")
    p.add_argument("--bits", type=int, default=3, help="code width: 3 or 4 (2 and 8 also work); "
                   "--method finequant: 4 or 8")
    p.add_argument("--sparsity", type=float, default=0.05, help="percent of weights kept sparse: 0.05 = 0.05%%, "
                   "0.45 = 0.45%% (paper naming)")
    p.add_argument("--method", default="squeezellm", choices=("squeezellm", "lnq", "kmeans", "rtn", "finequant", "none"),
                   help="squeezellm = Fisher-weighted k-means (default, the paper); lnq = the same format with codes "
                   "and tables chosen by error feedback on the calibration activations (sqllm_onnx/quantize/lnq.py); "
                   "kmeans and rtn for ablations; none = the "
                   "unquantized model (the baseline of every comparison); finequant = "
                   "calibration-free block-wise int4/int8 as ORT MatMulNBits nodes, block size chosen per matrix "
                   "(docs/finequant.md; --sparsity and --calib-* do not apply)")
    p.add_argument("--block-size", type=int, default=None, help="--method finequant only: one fixed block size "
                   "for every matrix (16, 32, 64, 128 or 256; plain fixed-block RTN) instead of the adaptive choice")
    p.add_argument("--sensitive", type=float, default=None, help="percent of the weights kept sparse for their "
                   "Fisher sensitivity, part of --sparsity (default 0.05 when --sparsity >= 0.05; 0 needs no "
                   "calibration with --method rtn or kmeans)")
    p.add_argument("--calib-data", default=None, help="calibration text: a file, hf:NAME[:CONFIG][:SPLIT] (online), "
                   "or 'stdlib' (default: the calibration part of pydoc_data.topics)")
    p.add_argument("--calib-samples", type=int, default=100, help="calibration windows (paper: 100)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (paper: 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kmeans-solver", choices=("exact", "lloyd"), default="exact",
                   help="exact: optimal weighted 1-D k-means per row (default); lloyd: seeded Lloyd iterations, "
                   "faster on a CPU; its error is never below the exact one's")
    p.add_argument("--quantize-lm-head", action="store_true", help="also quantize lm_head (kept fp16 by default)")


def quant_config_from(args, dtype: str):
    """The quantization config the arguments ask for (None for --method none)."""
    if args.method == "none":
        return None
    block_size = getattr(args, "block_size", None)
    if args.method == "finequant":
        from sqllm_onnx.finequant import BLOCK_SIZES, FineQuantConfig

        if args.bits not in (4, 8):
            raise SystemExit(f"--method finequant needs --bits 4 or 8 (got {args.bits})")
        if block_size is not None and block_size not in BLOCK_SIZES:
            raise SystemExit(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))} (got {block_size})")
        return FineQuantConfig(bits=args.bits, block_size=block_size, quantize_lm_head=args.quantize_lm_head,
                               scale_dtype="float16" if dtype == "fp16" else "float32")
    if block_size is not None:
        raise SystemExit("--block-size applies to --method finequant only")
    if args.bits not in (2, 3, 4, 8):
        raise SystemExit(f"--bits must be 2, 3, 4 or 8 (got {args.bits})")
    if not args.sparsity >= 0:
        raise SystemExit(f"--sparsity must be >= 0 percent (got {args.sparsity})")
    if args.calib_samples < 1 or args.calib_seq_len < 2:
        raise SystemExit("--calib-samples must be >= 1 and --calib-seq-len >= 2")
    try:
        return _squeezellm_config(args, dtype)
    except ValueError as e:  # QuantConfig validates combinations (e.g. --sensitive above --sparsity)
        raise SystemExit(f"invalid quantization options: {e}")


def _squeezellm_config(args, dtype: str):
    from sqllm_onnx.quantize import QuantConfig

    return QuantConfig(bits=args.bits, sparsity=args.sparsity, sensitive=args.sensitive, method=args.method,
                       calib_data=args.calib_data,
                       calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, seed=args.seed,
                       lut_dtype="float16" if dtype == "fp16" else "float32",
                       quantize_lm_head=args.quantize_lm_head,
                       kmeans_solver=getattr(args, "kmeans_solver", "exact"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_quant_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically: nothing is left "
                   "there if the export fails)")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16",
                   help="activation/LUT dtype of the graph: fp16 for GPUs (default), fp32 for CPU deployment")
    p.add_argument("--from-checkpoint", type=Path, default=None,
                   help="a checkpoint from `sqllm-onnx quantize` (skips quantization)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-validate", action="store_true", help="skip comparing ORT logits with torch")
    p.add_argument("--graph", choices=("lean", "plain"), default=None,
                   help="lean: decoder layers as ORT fused ops (GroupQueryAttention, SkipSimplifiedLayerNormalization; "
                   "~13 nodes per layer, for fast decoding); plain: Optimum's graph op by op. Default: lean for "
                   "llama, mistral, qwen2, qwen3, phi3 and the gemmas, plain otherwise")


def main(args, command: str) -> int:
    config = quant_config_from(args, args.dtype)
    models.check_model_source(args.model, args.tokenizer)  # one line, before the heavy imports
    from sqllm_onnx.export.exporter import export

    if args.method == "finequant" and args.from_checkpoint is not None:
        raise SystemExit("--from-checkpoint holds SqueezeLLM checkpoints; --method finequant needs none")
    if args.from_checkpoint is not None and not args.from_checkpoint.exists():
        raise SystemExit(f"--from-checkpoint {args.from_checkpoint} does not exist")
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"--out {args.out} already exists; pass --overwrite to replace it")
    export(args.out, config, args.model, dtype=args.dtype, from_checkpoint=args.from_checkpoint,
           overwrite=args.overwrite, validate=not args.no_validate, graph=args.graph, tokenizer=args.tokenizer)
    return 0

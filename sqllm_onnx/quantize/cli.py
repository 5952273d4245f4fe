"""`sqllm-onnx quantize`: a causal LM -> a quantized checkpoint folder (model.safetensors +
manifest.json), optionally with torch perplexity of the unquantized and the quantized model; or
`--import-squeezellm FILE.pt` to convert an original SqueezeLLM checkpoint."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from sqllm_onnx.errors import UsageError
from sqllm_onnx.quantize import distributed
from sqllm_onnx.quantize.config import KMEANS_SOLVERS, LUT_DTYPES, METHODS, OUTLIER_RULES, SUPPORTED_BITS


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0 or value > 100:
        raise argparse.ArgumentTypeError(f"{text} is not a percentage from 0 to 100 (0.45 means 0.45 %)")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="local folder, hub id or short name (smollm2-135m is "
                   "the embedded SmolLM2-135M)")
    p.add_argument("--tokenizer", default=None, help="folder or hub id to take the tokenizer from, for a model "
                   "folder saved without one (default: the model's own)")
    p.add_argument("--out", required=True, help="checkpoint folder (created; an unfinished run in it resumes)")
    p.add_argument("--bits", type=int, default=3, choices=SUPPORTED_BITS, help="code width")
    p.add_argument("--sparsity", type=_percent, default=0.0,
                   help="percent of each matrix kept sparse (0.45 = 0.45 %%: 0.05 sensitive + 0.40 outliers)")
    p.add_argument("--sensitive", type=_percent, default=None,
                   help="part of --sparsity (percent) taken by top-Fisher values; default 0.05 when "
                   "sparsity >= 0.05, else all of it")
    p.add_argument("--method", choices=METHODS, default="squeezellm",
                   help="squeezellm: Fisher-weighted k-means (the paper); lnq: the same format with codes and tables "
                   "chosen by error feedback on the calibration activations, block by block (slower, better "
                   "layer outputs); kmeans: unweighted; rtn: per-channel round-to-nearest")
    p.add_argument("--lnq-iters", type=_positive, default=2, help="--method lnq: rounds of code assignment with "
                   "error feedback + table re-fit")
    p.add_argument("--calib-data", default=None, help="'stdlib' (default: calibration part of pydoc_data.topics), "
                   "a text file, or hf:NAME[:CONFIG][:SPLIT]")
    p.add_argument("--calib-samples", type=_positive, default=100, help="calibration windows")
    p.add_argument("--calib-seq-len", type=_positive, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and of k-means")
    p.add_argument("--lut-dtype", choices=LUT_DTYPES, default="float16",
                   help="dtype of tables, sparse values and bias (float32 for CPU float32 exports)")
    p.add_argument("--quantize-lm-head", action="store_true", help="quantize lm_head too (untied only)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--devices", default=None, metavar="D0,D1,...",
                   help="one process per device (cuda:0,cuda:1; cpu,cpu runs the same code on the CPU): the decoder "
                   "blocks placed across them for the Fisher pass, each process clustering the layers it holds; "
                   "the checkpoint is the one-process run's. Under torchrun each process takes its LOCAL_RANK's "
                   "entry (default cuda:LOCAL_RANK)")
    p.add_argument("--kmeans-solver", choices=KMEANS_SOLVERS, default="exact",
                   help="ablation: exact (optimal weighted 1-D k-means) or lloyd (seeded restarts)")
    p.add_argument("--outlier-rule", choices=OUTLIER_RULES, default="magnitude",
                   help="ablation: outliers by |w| (SqueezeLLM), distance outside the row's IQR, or "
                   "Fisher-weighted error of a first fit")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="dtype the model is loaded in for calibration")
    p.add_argument("--fisher-cache", default=None, help="file to reuse the Fisher from (same model and "
                   "calibration), written when absent: ablations then share one calibration pass")
    p.add_argument("--import-squeezellm", metavar="FILE.pt", default=None,
                   help="convert an original SqueezeLLM checkpoint (sq-*-w{3,4}-s*.pt) instead of quantizing")
    p.add_argument("--eval", action="store_true", help="print torch perplexity of the quantized model on the "
                   "held-out text (dequantized weights, reference.dequantize)")
    p.add_argument("--eval-baseline", action="store_true", help="with --eval: also the unquantized model")
    p.add_argument("--eval-windows", type=_positive, default=None, help="evaluate at most N windows")
    p.add_argument("--eval-seq-len", type=_positive, default=512, help="tokens per evaluation window")
    p.add_argument("--eval-data", default=None, help="evaluation text (default: held-out part of pydoc_data.topics)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _error(msg: str) -> int:
    print(f"sqllm-onnx quantize: error: {msg}", file=sys.stderr)
    return 2


def _check_text_source(source: str | None, what: str) -> str | None:
    if source is None or source == "stdlib" or source.startswith("hf:"):
        return None
    if not Path(source).is_file():
        return f"{what} {source!r} is not a file (use 'stdlib', a text file, or hf:NAME[:CONFIG][:SPLIT])"
    return None


def main(args, command: str) -> int:
    from sqllm_onnx.quantize.config import QuantConfig

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _error(f"--out {out} exists and is not a folder")
    if args.eval_baseline and not args.eval:
        return _error("--eval-baseline needs --eval")
    for source, what in ((args.calib_data, "--calib-data"), (args.eval_data, "--eval-data")):
        problem = _check_text_source(source, what)
        if problem:
            return _error(problem)
    if args.fisher_cache and Path(args.fisher_cache).is_dir():
        return _error(f"--fisher-cache {args.fisher_cache} is a folder; give a file name")
    if args.import_squeezellm:
        if not Path(args.import_squeezellm).is_file():
            return _error(f"--import-squeezellm {args.import_squeezellm!r} is not a file")
        return _import(args, command)
    try:
        config = QuantConfig(bits=args.bits, sparsity=args.sparsity, sensitive=args.sensitive, method=args.method,
                             calib_data=args.calib_data, calib_samples=args.calib_samples,
                             calib_seq_len=args.calib_seq_len, seed=args.seed, lut_dtype=args.lut_dtype,
                             quantize_lm_head=args.quantize_lm_head, device=args.device,
                             kmeans_solver=args.kmeans_solver, outlier_rule=args.outlier_rule,
                             lnq_iters=args.lnq_iters)
    except ValueError as e:
        return _error(str(e))
    from sqllm_onnx.models import check_model_source, load_model

    check_model_source(args.model, args.tokenizer)  # one line, before the heavy imports
    if args.devices is not None or distributed.torchrun_env() is not None:
        return _quantize_distributed(args, config, _distributed_devices(args, config), command)
    if config.device and config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return _error(f"--device {config.device}: torch sees no CUDA device")

    import torch

    from sqllm_onnx.quantize import apply_to_model, quantize_model
    from sqllm_onnx.quantize.checkpoint import MANIFEST, write_atomic_json

    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), tokenizer=args.tokenizer)
    windows = _eval_windows(args, tokenizer) if args.eval else None
    results = {}
    if args.eval_baseline:
        results["baseline_ppl"] = _ppl(model, windows, args, "unquantized", config.resolved_device())
    from sqllm_onnx.quantize.checkpoint import CheckpointError

    t0 = time.perf_counter()
    try:
        qmodel = quantize_model(model, tokenizer, config, checkpoint_dir=out, progress=not args.no_progress,
                                fisher_cache=args.fisher_cache)
    except CheckpointError as e:
        return _error(str(e))
    m = _report(qmodel.manifest, time.perf_counter() - t0, command, out)
    if args.eval:
        apply_to_model(model, qmodel)
        results["ppl"] = _ppl(model, windows, args, "quantized", config.resolved_device())
        if "baseline_ppl" in results:
            results["ratio"] = results["ppl"] / results["baseline_ppl"]
            print(f"perplexity ratio quantized/unquantized: {results['ratio']:.4f}")
        results.update({"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                        "source": args.eval_data or "stdlib:pydoc_data.topics[eval]",
                        "dtype": args.dtype, "backend": "torch (reference.dequantize weights)"})
        m["evaluation"] = results
    write_atomic_json(out / MANIFEST, m)
    return 0


def _report(m: dict, wall: float, command: str, out: Path) -> dict:
    """Print what the run made; the manifest gets the command."""
    m["command"] = command
    timing = m.get("timing", {})
    print(f"quantized {len(m['layers'])} layers of {m['model']['name_or_path']}: method={m['method']} "
          f"bits={m['bits']} sparsity={m['sparsity']}% (nnz {m['totals']['nnz']}, "
          f"{m['totals']['nnz_percent']:.3f}%), weighted error {m['totals']['weighted_error']}")
    print(f"wall time {wall:.1f} s (Fisher {timing.get('fisher_s')} s, clustering {timing.get('clustering_s')} s, "
          f"device {timing.get('device')}, {timing.get('resumed_layers', 0)} layers resumed) -> {out}")
    return m


def _distributed_devices(args, config) -> list[str]:
    """The devices of `--devices` (or of a torchrun launch), with a UsageError for what the
    distributed run does not do."""
    for given, flag, hint in ((args.device, "--device", ""), (args.fisher_cache, "--fisher-cache", ""),
                              (args.eval, "--eval", " (evaluate the export with `sqllm-onnx eval`)")):
        if given:
            raise UsageError(f"{flag} does not go with --devices or a torchrun launch{hint}")
    if config.method == "lnq":
        raise UsageError("--method lnq runs the blocks in sequence in one process; use --devices with "
                         "squeezellm, kmeans or rtn")
    return distributed.parse_devices(args.devices) if args.devices is not None else []


def _quantize_distributed(args, config, devices: list[str], command: str) -> int:
    from sqllm_onnx.models import load_config
    from sqllm_onnx.quantize.checkpoint import MANIFEST, CheckpointError, write_atomic_json
    from sqllm_onnx.quantize.pipeline import block_ranges

    launched = distributed.torchrun_env()
    world = launched[1] if launched else len(devices)
    blocks = getattr(load_config(args.model), "num_hidden_layers", None)
    if blocks is not None:
        block_ranges(blocks, world)  # a UsageError when there are more processes than blocks
    t0 = time.perf_counter()
    job = distributed.Job(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, config=config,
                          out=str(args.out), devices=devices, progress=not args.no_progress)
    try:
        manifest = distributed.quantize(job)
    except CheckpointError as e:
        return _error(str(e))
    if manifest is not None:  # rank 0 (every spawned process reports through it)
        write_atomic_json(Path(args.out) / MANIFEST, _report(manifest, time.perf_counter() - t0, command, args.out))
    return 0


def _eval_windows(args, tokenizer):
    from sqllm_onnx import perplexity

    return perplexity.eval_windows(tokenizer, args.eval_data, args.eval_seq_len, args.eval_windows)


def _ppl(model, windows, args, label: str, device: str = "cpu") -> float:
    """Torch perplexity on `device` (the quantization device: a 135M model takes ~80 s on 16 CPU cores and
    seconds on a GPU); the model goes back to the CPU afterwards, where quantizing expects it."""
    from sqllm_onnx import perplexity

    try:
        ppl = perplexity.torch_perplexity(model.to(device), windows, progress=not args.no_progress)
    finally:
        model.to("cpu")
    print(f"perplexity ({label}, torch {args.dtype} on {device}, {windows.shape[0]} x {windows.shape[1]} tokens): "
          f"{ppl:.4f}")
    return ppl


def _import(args, command: str) -> int:
    from sqllm_onnx.quantize.checkpoint import CheckpointError, save_checkpoint
    from sqllm_onnx.quantize.squeezellm_import import import_squeezellm

    try:
        qmodel = import_squeezellm(args.import_squeezellm, lut_dtype=args.lut_dtype)
    except CheckpointError as e:
        return _error(str(e))
    qmodel.manifest["command"] = command
    if args.eval:
        import torch

        from sqllm_onnx.models import load_model
        from sqllm_onnx.quantize import apply_to_model

        model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
        windows = _eval_windows(args, tokenizer)
        results = {"baseline_ppl": _ppl(model, windows, args, "unquantized")} if args.eval_baseline else {}
        apply_to_model(model, qmodel)
        results["ppl"] = _ppl(model, windows, args, "imported")
        qmodel.manifest["evaluation"] = results
    save_checkpoint(qmodel, args.out)
    m = qmodel.manifest
    print(f"imported {len(qmodel.layers)} layers ({m['bits']}-bit, nnz {m['totals']['nnz']} = "
          f"{m['totals']['nnz_percent']:.3f}%) from {args.import_squeezellm} -> {args.out}")
    print(json.dumps({"layers": len(qmodel.layers), "bits": m["bits"]}))
    return 0

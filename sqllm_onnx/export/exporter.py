"""quantize -> pack -> export: a causal LM to an ONNX decoder (KV cache) with SqueezeMatMul layers.

The ONNX graph comes from Hugging Face Optimum's exporter (its `text-generation-with-past` config:
input and output names, dynamic axes, model patching) after every quantized `nn.Linear` has been
replaced by a `SqueezeLinear`, whose symbolic function writes one SqueezeMatMul node.

Memory: the model is loaded once; each quantized layer's full-precision weight is freed as its
packed replacement goes in, so two full-precision copies never coexist; the layers left unquantized
are stored transposed so that torch's constant folding makes no copy of them, and the weights pass
through the export once (big_weights.py).
Atomicity: everything is written into a hidden sibling folder that is renamed to the output folder
only when complete; on failure it is removed (a killed process leaves only that hidden folder,
which the next run clears). Quantization results are cached per layer beside it, so a rerun after
an interruption resumes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import sqllm_onnx
from sqllm_onnx import models
from sqllm_onnx.errors import UserError
from sqllm_onnx.export import big_weights, configs, lean_graph, onnx_graph

TASK = "text-generation-with-past"
DTYPES = ("fp16", "fp32")
MIN_OPSET = 17
LARGE_MODEL_PARAMS = 3e9  # above this, load in fp16 instead of fp32


class ExportError(UserError):
    pass


def export(out_dir: str | Path, quant_config=None, model_name_or_path: str | None = None, dtype: str = "fp16",
           from_checkpoint: str | Path | None = None, overwrite: bool = False, validate: bool = True,
           progress: bool = True, log=print, graph: str | None = None, tokenizer: str | None = None) -> Path:
    """Export `model_name_or_path` (default: the embedded SmolLM2-135M) into `out_dir`, quantized
    with `quant_config` or from the checkpoint `from_checkpoint`; with neither, unquantized (the
    baseline the quantized exports are compared with). `graph`: "lean" (fused ORT ops, see
    lean_graph.py), "plain" (Optimum's graph as traced), or None: lean where supported. `tokenizer`:
    a folder or hub id to take the tokenizer from (a model folder saved without one)."""
    out_dir = Path(out_dir).resolve()
    models.check_model_source(model_name_or_path, tokenizer)  # before anything is written
    import torch

    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if graph not in (None, *lean_graph.GRAPH_STYLES):
        raise ExportError(f"graph must be one of {lean_graph.GRAPH_STYLES}, got {graph!r}")
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists; pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir.parent, os.W_OK):
        raise ExportError(f"cannot write into {out_dir.parent}")
    started = time.time()
    staging = out_dir.parent / f".{out_dir.name}.partial"
    cache = out_dir.parent / f".{out_dir.name}.quant-cache"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run

    qmodel = None
    nbits = getattr(quant_config, "method", None) == "finequant"  # FineQuant: MatMulNBits, sqllm_onnx/finequant
    if nbits and from_checkpoint is not None:
        raise ExportError("FineQuant needs no checkpoint (it is calibration-free); drop from_checkpoint")
    if quant_config is None and from_checkpoint is None:
        log("no quantization requested: exporting the model as it is (a baseline)")
    elif from_checkpoint is not None:
        from sqllm_onnx.quantize import load_checkpoint

        qmodel = load_checkpoint(from_checkpoint)
        log(f"loaded quantized checkpoint {from_checkpoint} ({len(qmodel.layers)} layers)")
    log(f"loading {model_name_or_path or models.EMBEDDED}")
    model, tokenizer = models.load_model(model_name_or_path, dtype=_load_dtype(model_name_or_path), tokenizer=tokenizer)
    if nbits:
        from sqllm_onnx.export import nbits_linear
        from sqllm_onnx.finequant import quantize_model as finequant_model

        log(f"quantizing: {quant_config.describe()}")
        qmodel = finequant_model(model, quant_config, progress=progress, log=log)
    elif qmodel is None and quant_config is not None:
        from sqllm_onnx.quantize import quantize_model

        log(f"quantizing: {quant_config.method}, {quant_config.bits} bits, {quant_config.sparsity}% sparse")
        qmodel = quantize_model(model, tokenizer, quant_config, checkpoint_dir=cache, progress=progress)
    layers = {}
    if qmodel is not None:
        _check_checkpoint_matches(qmodel, model)
        from sqllm_onnx.export.squeeze_linear import swap_in

        np_dtype = np.float16 if dtype == "fp16" else np.float32
        layers = {name: layer.astype(np_dtype) for name, layer in qmodel.layers.items()}
        if nbits:
            nbits_linear.swap_in(model, layers, quant_config.accuracy_level)
        else:
            swap_in(model, layers)
    model.to(torch.float16 if dtype == "fp16" else torch.float32)
    big_weights.pretranspose_linears(model)  # the layers left unquantized (see big_weights.py)
    try:
        style, note = lean_graph.resolve_style(model, graph)
    except lean_graph.LeanGraphUnsupported as e:
        raise ExportError(f"graph='lean' is not possible for this model: {e}") from None
    if note:
        log(note)

    # the lean graph computes q/k/v of a layer with one quantized node (lean_graph.fused_projections)
    fused = lean_graph.fused_projections(model) if style == "lean" else {}
    try:
        staging.mkdir()
        log(f"exporting through Optimum ({TASK}, {style} graph) into {staging}")
        with lean_graph.patched(model) if style == "lean" else contextlib.nullcontext():
            _optimum_export(model, staging, dtype)
        if style == "lean":
            lean_graph.finalize(staging / "model.onnx", model.config.vocab_size)
        summary = onnx_graph.finalize(staging / "model.onnx")
        if nbits:
            summary["matmul_nbits_nodes"] = nbits_linear.count_nodes(staging / "model.onnx")
        op_name, op_count = ("MatMulNBits", summary["matmul_nbits_nodes"]) if nbits else \
            ("SqueezeMatMul", summary["squeeze_matmul_nodes"])
        expected = len(layers) - sum(len(parts) - 1 for parts in fused.values())
        if op_count != expected:
            raise ExportError(f"the graph has {op_count} {op_name} nodes but {len(layers)} layers were quantized "
                              f"({len(fused)} fused q/k/v projections: {expected} nodes expected)")
        if fused:
            summary["fused_projections"] = {name: [[part, n] for part, n in parts] for name, parts in fused.items()}
        _write_side_files(model, tokenizer, staging, out_dir)
        check = _validate(staging, model, tokenizer, dtype) if validate else None
        manifest = _manifest(qmodel, dtype, summary, check, staging, time.time() - started, style)
        if nbits:
            manifest["op"] = nbits_linear.OP_INFO
        configs.write_json(staging / configs.MANIFEST, manifest)
        _replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(cache, ignore_errors=True)
    log(f"wrote {out_dir} in {time.time() - started:.0f} s (peak memory of this process: {_peak_rss_gb():.1f} GB)")
    return out_dir


def _load_dtype(name):
    import torch
    from transformers import AutoConfig

    resolved = models.resolve(name)
    if resolved == models.EMBEDDED:
        return torch.float32
    if resolved.startswith(models.RANDOM_PREFIX):
        return torch.float16 if resolved.endswith("-7b") else torch.float32
    try:
        path = Path(resolved)
        c = AutoConfig.from_pretrained(path.parent, gguf_file=path.name) if models.is_gguf(resolved) else \
            AutoConfig.from_pretrained(resolved)
        params = 12 * c.num_hidden_layers * c.hidden_size ** 2 + 2 * c.vocab_size * c.hidden_size
    except Exception:
        return torch.float32  # load_model reports a missing model with its own clear error
    return torch.float16 if params > LARGE_MODEL_PARAMS else torch.float32


def _check_checkpoint_matches(qmodel, model) -> None:
    import torch

    recorded = (qmodel.manifest.get("model") or {}).get("model_type")
    if recorded and recorded != model.config.model_type:
        raise ExportError(f"the quantized checkpoint was made from a {recorded!r} model, but the model to export is "
                          f"{model.config.model_type!r}")

    from sqllm_onnx.quantize.targets import check_layer_names

    for name, layer in qmodel.layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ExportError(f"the quantized checkpoint has layer {name!r}, which the model does not have") from None
        if not isinstance(module, torch.nn.Linear):
            raise ExportError(f"the quantized checkpoint's layer {name!r} is a {type(module).__name__} in the model, "
                              "not a linear layer")
        if tuple(module.weight.shape) != (layer.N, layer.K):
            raise ExportError(f"layer {name!r}: the checkpoint holds [{layer.N}, {layer.K}] but the model's weight is "
                              f"{list(module.weight.shape)}")
    try:
        check_layer_names(model, qmodel.layers, "the quantized checkpoint")
    except ValueError as e:
        raise ExportError(str(e)) from None


def _optimum_export(model, folder: Path, dtype: str) -> None:
    import torch
    from optimum.exporters.onnx.convert import export_models
    from optimum.exporters.tasks import TasksManager
    from optimum.exporters.utils import get_decoder_models_for_export

    constructor = TasksManager.get_exporter_config_constructor(model=model, exporter="onnx", task=TASK,
                                                              library_name="transformers")
    onnx_config = constructor(model.config, int_dtype="int64", float_dtype=dtype)
    models_and_configs = get_decoder_models_for_export(model, onnx_config)
    # Optimum's dynamic-axes fix and validation open plain sessions, which lack our op library;
    # _validate does the validation instead. Its preprocessor copy would look the model up on the
    # hub by name, so the tokenizer is saved by _write_side_files.
    name_or_path = model.config._name_or_path
    model.config._name_or_path = str(folder)
    try:
        with torch.no_grad(), _quiet_export_warnings(), big_weights.lean_weight_traffic():
            export_models(models_and_configs, output_dir=folder, opset=max(onnx_config.DEFAULT_ONNX_OPSET, MIN_OPSET),
                          output_names=["model.onnx"], disable_dynamic_axes_fix=True, dtype=dtype)
    finally:
        model.config._name_or_path = name_or_path
    big_weights.merge_external_data(folder / "model.onnx")  # models over 2 GB: one model.onnx_data


@contextlib.contextmanager
def _quiet_export_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*TracerWarning.*")
        try:
            from torch.jit import TracerWarning

            warnings.filterwarnings("ignore", category=TracerWarning)
        except ImportError:
            pass
        yield


def _write_side_files(model, tokenizer, folder: Path, final_dir: Path) -> None:
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    # The fast tokenizer alone: a GGUF-loaded one would otherwise copy the whole GGUF file as its
    # "vocab file".
    tokenizer.save_pretrained(folder, legacy_format=False)
    # A copy of the op library travels with the model, for C/C++ and ORT GenAI applications.
    shutil.copy2(sqllm_onnx.get_library_path(), folder / configs.LIBRARY_COPY)
    configs.write_json(folder / configs.GENAI_CONFIG, configs.genai_config(
        model.config, getattr(model, "generation_config", None), folder / "model.onnx",
        configs.LIBRARY_COPY))  # relative: GenAI resolves it against DIR, so the folder can move


def _validate(folder: Path, model, tokenizer, dtype: str) -> dict:
    """Logits of the exported graph (ORT, CPU) against the torch model it came from."""
    import onnxruntime as ort
    import torch

    ids = np.asarray(tokenizer("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
                     ["input_ids"][:16], dtype=np.int64)[None]
    from sqllm_onnx.runtime.session import quiet

    so = sqllm_onnx.register(quiet(ort.SessionOptions()))
    session = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    feeds = decoder_feeds(session, ids)
    onnx_logits = session.run(["logits"], feeds)[0].astype(np.float64)
    with torch.no_grad():
        torch_logits = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.double().numpy()
    scale = float(np.abs(torch_logits).max())
    diff = float(np.abs(onnx_logits - torch_logits).max())
    limit = (1e-3 if dtype == "fp32" else 5e-2) * scale
    if not diff <= limit:
        raise ExportError(f"validation failed: ORT logits differ from torch by {diff:.4g} (logit scale {scale:.4g}, "
                          f"limit {limit:.4g})")
    return {"max_abs_diff": diff, "logit_scale": scale, "tokens": int(ids.shape[1])}


def decoder_feeds(session, ids: np.ndarray, past_length: int = 0) -> dict:
    """Inputs for one Optimum decoder step with an empty KV cache."""
    batch, seq = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((batch, past_length + seq), np.int64),
             "position_ids": np.arange(past_length, past_length + seq, dtype=np.int64)[None].repeat(batch, 0)}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values"):
            shape = [batch if d == "batch_size" else (0 if isinstance(d, str) or d is None else d) for d in inp.shape]
            feeds[inp.name] = np.zeros(shape, np.float16 if "float16" in inp.type else np.float32)
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def _manifest(qmodel, dtype, summary, check, folder: Path, seconds: float, graph_style: str = "plain") -> dict:
    from sqllm_onnx.export_folder import sha256_file

    paths = [p for p in sorted(folder.iterdir()) if p.is_file()]
    files = {p.name: p.stat().st_size for p in paths}  # checked when a folder is opened (cheap)
    sha256 = {p.name: sha256_file(p) for p in paths}  # checked by `sqllm-onnx check DIR`
    return {"format": "sqllm-onnx export", "sqllm_onnx_version": sqllm_onnx.__version__,
            "op": {"domain": "sqllm", "op_type": "SqueezeMatMul", "opset": 1},
            "dtype": dtype, "task": TASK, "graph_style": graph_style,
            "quantization": qmodel.manifest if qmodel is not None else None, "graph": summary,
            "validation": check, "op_library": _library_info(folder / configs.LIBRARY_COPY),
            "files": files, "sha256": sha256, "export_seconds": round(seconds, 1),
            "peak_rss_gb": round(_peak_rss_gb(), 2)}


def _library_info(path: Path) -> dict | None:
    """What the folder's copy of the op library holds (CUDA architectures, CPU paths, versions)."""
    return sqllm_onnx.library_info(str(path)) if path.is_file() else None


def _peak_rss_gb() -> float:
    """The process's peak resident memory so far (Linux reports KiB, macOS bytes); 0 where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


def _replace(staging: Path, out_dir: Path) -> None:
    """Move the finished folder into place; an existing one is replaced only after that succeeds."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["export", "ExportError", "decoder_feeds", "DTYPES"]

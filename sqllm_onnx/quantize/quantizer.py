"""`quantize_model`: Fisher sensitivity on calibration text, then every linear layer through the
dense-and-sparse split, weighted k-means and packing, with a resumable checkpoint folder.

Resume: with a `checkpoint_dir`, the run writes `partial/run.json` (what is being computed),
`partial/fisher.safetensors` once the Fisher is known, and `partial/layers/<name>.safetensors` as each
layer finishes (each file atomically). Running the same configuration on the same model again reuses
all of it and quantizes only the missing layers; a different configuration (or model) in the same
folder is an error. When every layer is done, `model.safetensors` and `manifest.json` are written
and `partial/` is removed; running again then just loads the finished checkpoint.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import shutil
import time
from pathlib import Path

from sqllm_onnx import reference
from sqllm_onnx.quantize import calibration, checkpoint as ckpt, fisher as fisher_mod, lnq, sequential
from sqllm_onnx.quantize.checkpoint import CheckpointError, QuantizedModel
from sqllm_onnx.quantize.config import QuantConfig
from sqllm_onnx.quantize.layer import quantize_weight
from sqllm_onnx.quantize.targets import linear_layer_names

PARTIAL = "partial"


def weight_summaries(modules: dict) -> dict[str, str]:
    """{name: shape and checksums of its weight} of the modules {name: nn.Linear}: the parts of the
    model fingerprint (a process that holds some of the layers summarises those)."""
    import torch

    out = {}
    with torch.no_grad():
        for name, m in modules.items():
            w = m.weight.detach()
            wd = w.double()
            out[name] = f"{name}:{list(w.shape)}:{float(wd.sum())!r}:{float((wd * wd).sum())!r};"
    return out


def model_fingerprint(model, names: list[str], summaries: dict[str, str] | None = None) -> dict:
    """Identity of the model for resume checks: architecture, quantized shapes, and a weight checksum
    (over `summaries`, default: `weight_summaries` of the layers `names`)."""
    if summaries is None:
        summaries = weight_summaries({name: model.get_submodule(name) for name in names})
    h = hashlib.sha256()
    for name in names:
        h.update(summaries[name].encode())
    cfg = getattr(model, "config", None)
    return {"name_or_path": str(getattr(cfg, "name_or_path", "") or type(model).__name__),
            "model_type": getattr(cfg, "model_type", None), "weights_sha256": h.hexdigest()[:32]}


def _model_config(model) -> dict | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    try:
        return json.loads(cfg.to_json_string(use_diff=False))
    except Exception:  # pragma: no cover - exotic configs
        return None


def quantize_model(model, tokenizer, config: QuantConfig, checkpoint_dir: str | Path | None = None,
                   progress: bool = True, *, fisher=None, fisher_cache: str | Path | None = None,
                   log=None) -> QuantizedModel:
    """Quantize every linear layer of `model` (see `linear_layer_names`) with `config`.

    The model is not modified (use `apply_to_model`). `fisher` may give precomputed Fisher buffers
    {name: tensor}; `fisher_cache` names a file that is read when it holds the Fisher of the same
    calibration (model, text, samples, length, seed) and written otherwise, so ablations share one
    calibration pass.
    """
    import torch
    from tqdm.auto import tqdm

    config.validate()
    log = log or (print if progress else (lambda *a: None))
    t_start = time.perf_counter()
    device = config.resolved_device()
    names = linear_layer_names(model, config.quantize_lm_head)
    model_id = model_fingerprint(model, names)
    run_id = {"config": config.fingerprint(), "model": model_id}

    folder, partial, finished = open_run(checkpoint_dir, run_id, names, log)
    if finished:
        return ckpt.load_checkpoint(folder)

    # ---- sensitivity ------------------------------------------------------------------------------
    calib = None
    fisher_s = 0.0
    F: dict = {}
    if config.needs_fisher:
        t0 = time.perf_counter()
        in_partial = partial / "fisher.safetensors" if partial is not None else None
        if fisher is not None:
            F = dict(fisher)
            missing = [n for n in names if n not in F]
            if missing:
                raise ValueError(f"the given Fisher has no buffer for {missing[:3]}")
            _, calib = calibration_record(tokenizer, config)
        else:
            todo = [n for n in names if partial is None or not layer_file(partial, n).is_file()]
            caches = [c for c in (in_partial, fisher_cache) if c is not None]
            F, calib = sensitivity(model, tokenizer, config, names, caches=caches, device=device,
                                   progress=progress, compute=bool(todo), model_id=model_id,
                                   progress_file=partial / "fisher-progress.safetensors" if partial else None)
        if in_partial is not None and F and not in_partial.is_file():
            fisher_mod.save_fisher(F, in_partial, fisher_meta(model_id, calib, names))
        if partial is not None:  # superseded by the whole Fisher
            (partial / "fisher-progress.safetensors").unlink(missing_ok=True)
        fisher_s = time.perf_counter() - t0

    # ---- layers -----------------------------------------------------------------------------------
    t1 = time.perf_counter()
    layers, stats = load_layers(partial, names, config)  # an earlier run's: the bar starts after them
    resumed = len(layers)

    def finish(name, layer, st):
        layers[name], stats[name] = layer, st
        return finish_layer(name, layer, st, F, config, partial)

    if config.method == "lnq":  # error feedback, block by block on the CPU (sequential, lnq)
        bar = tqdm(total=len(names), initial=resumed, desc="error feedback (lnq)", unit="layer",
                   disable=not progress)
        windows, _ = calibration_record(tokenizer, config)
        sequential.quantize_sequentially(
            model, windows, names, done=dict(layers), bar=bar,
            dequantized=lambda layer: torch.from_numpy(ckpt.dequantized_weight(layer)),
            quantize_one=lambda name, module, H: finish(name, *lnq.quantize_weight_lnq(
                module.weight, H, usable_fisher(F, name), config, bias=module.bias, name=name)))
    else:
        bar = tqdm(total=len(names), initial=resumed, desc="clustering", unit="layer", disable=not progress)
    for name in names:
        if name in layers:
            continue
        bar.set_postfix_str(name, refresh=False)
        finish(name, *quantize_layer(name, model.get_submodule(name), F, config, device))
        bar.update(1)
    bar.close()
    clustering_s = time.perf_counter() - t1
    qmodel = assemble(model, config, names, layers, stats, model_id=model_id, run_id=run_id, calib=calib,
                      device=device, timing={"fisher_s": round(fisher_s, 2), "clustering_s": round(clustering_s, 2),
                                             "total_s": round(time.perf_counter() - t_start, 2),
                                             "resumed_layers": resumed})
    if folder is not None:
        write_checkpoint(qmodel, folder)
    return qmodel


def open_run(checkpoint_dir, run_id: dict, names: list[str], log) -> tuple[Path | None, Path | None, bool]:
    """(folder, its partial/ folder, whether the run is finished there) for the run `run_id` in the
    checkpoint folder (None: no folder). A different run in that folder is a CheckpointError. An
    unfinished run gets `partial/run.json` (created when new) and a line saying what it left."""
    if checkpoint_dir is None:
        return None, None, False
    folder = Path(checkpoint_dir)
    if (folder / ckpt.MANIFEST).is_file():
        manifest = ckpt.read_manifest(folder)
        if manifest.get("run") != run_id:
            raise CheckpointError(_mismatch(folder, manifest.get("run"), run_id))
        return folder, None, True
    partial = folder / PARTIAL
    run_file = partial / "run.json"
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{run_file} is corrupt ({e}); delete {partial} to start over") from e
        if previous != run_id:
            raise CheckpointError(_mismatch(folder, previous, run_id))
    else:
        (partial / "layers").mkdir(parents=True, exist_ok=True)
        ckpt.write_atomic_json(run_file, run_id)
    done = sum(layer_file(partial, n).is_file() for n in names)
    fisher_saved = (partial / "fisher.safetensors").is_file() or (partial / "fisher-progress.safetensors").is_file()
    if done or fisher_saved:
        log(f"resuming the run in {partial}: {done} of {len(names)} layers already quantized"
            + (", Fisher saved" if fisher_saved else ""))
    return folder, partial, False


def usable_fisher(F: dict, name: str):
    """The Fisher buffer of a layer, or None when there is none or it is zero: the layer saw too few
    tokens (fisher.py), no signal to weight by."""
    f = F.get(name)
    if f is not None and not bool(f.any()):
        return None
    return f


def quantize_layer(name: str, module, F: dict, config: QuantConfig, device):
    """(PackedLinear, stats) of one linear layer, weighted by its Fisher in F (`usable_fisher`)."""
    return quantize_weight(module.weight, usable_fisher(F, name), config, bias=module.bias, name=name, device=device)


def finish_layer(name: str, layer, st: dict, F: dict, config: QuantConfig, partial: Path | None):
    """Record whether the layer went without Fisher, write its layer file (resume), and free its
    Fisher buffer as soon as it is done."""
    st["fisher_fallback"] = config.needs_fisher and usable_fisher(F, name) is None
    if partial is not None:
        ckpt.save_arrays_atomic(layer_file(partial, name), ckpt.layer_arrays(name, layer),
                                {"stats": json.dumps(st), "bits": str(layer.bits), "K": str(layer.K),
                                 "code_layout": str(reference.CODE_LAYOUT)})
    F.pop(name, None)
    return layer


def load_layers(partial: Path | None, names: list[str], config: QuantConfig) -> tuple[dict, dict]:
    """({name: PackedLinear}, {name: stats}) of the layers `names` whose files are in `partial`."""
    layers, stats = {}, {}
    for name in names:
        file = layer_file(partial, name) if partial is not None else None
        if file is not None and file.is_file():
            layers[name], stats[name] = _load_layer(file, name, config)
    return layers, stats


def assemble(model, config: QuantConfig, names: list[str], layers: dict, stats: dict, *, model_id: dict,
             run_id: dict, calib: dict | None, device: str, timing: dict) -> QuantizedModel:
    """The QuantizedModel of every layer `names`, with its manifest (totals over the layers in the order
    of `names`, settings, `timing` after the device (where k-means ran), torch version and machine)."""
    import torch

    from sqllm_onnx import __version__

    stats = {name: stats[name] for name in names}
    total = {k: sum(s[k] or 0 for s in stats.values()) for k in ("nnz", "sensitive", "outliers", "sse")}
    numel = sum(s["N"] * s["K"] for s in stats.values())
    werr = [s["weighted_error"] for s in stats.values()]
    total.update({"weights": numel, "layers": len(names), "nnz_percent": 100.0 * total["nnz"] / max(numel, 1),
                  "weighted_error": None if all(e is None for e in werr) else sum(e for e in werr if e is not None),
                  "fisher_fallback_layers": sum(bool(s.get("fisher_fallback")) for s in stats.values())})
    if config.method == "lnq":  # the objective on the calibration inputs, against SqueezeLLM's layers
        for key in ("output_error", "output_error_squeezellm"):
            total[key] = sum(s[key] for s in stats.values())
    manifest = {
        "format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION, "sqllm_onnx_version": __version__,
        "method": config.method, "bits": config.bits, "sparsity": config.sparsity,
        "sensitive": config.sensitive_percent, "outliers": config.outlier_percent,
        "lut_dtype": config.lut_dtype, "seed": config.seed, "quantize_lm_head": config.quantize_lm_head,
        "calibration": calib,
        "algorithm": {"clustering": _clustering(config),
                      "sample_weights": "fisher" if config.method in ("squeezellm", "lnq") else "uniform",
                      "sensitive": "top Fisher per matrix", "outliers": f"{config.outlier_rule} per matrix",
                      "fisher_fallback": f"layers that saw < {fisher_mod.MIN_TOKENS_FRACTION:.0%} of the calibration "
                      f"tokens (at least {fisher_mod.MIN_TOKENS}): unweighted k-means, magnitude outliers only",
                      "native_kmeans": _native_used(config, device)},
        "model": {**model_id, "config": _model_config(model)},
        "run": run_id,
        "totals": total,
        "timing": {"device": device, "torch": torch.__version__, "machine": platform.machine(), **timing},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "layers": {name: {"bits": layers[name].bits, **stats[name]} for name in names},
    }
    return QuantizedModel(layers={name: layers[name] for name in names}, manifest=manifest)


def write_checkpoint(qmodel: QuantizedModel, folder: Path) -> None:
    """The finished checkpoint into `folder`; the unfinished run's files go."""
    ckpt.save_checkpoint(qmodel, folder)
    shutil.rmtree(folder / PARTIAL, ignore_errors=True)


def calibration_record(tokenizer, config: QuantConfig):
    """(calibration windows, their description for manifests and Fisher files)."""
    windows = calibration.calibration_windows(tokenizer, config.calib_data, config.calib_samples,
                                              config.calib_seq_len, config.seed)
    return windows, {"source": calibration.describe_source(config.calib_data), "samples": int(windows.shape[0]),
                     "seq_len": int(windows.shape[1]), "seed": config.seed,
                     "windows_sha256": fisher_mod.windows_digest(windows)}


def fisher_meta(model_id: dict, calib: dict, names: list[str]) -> dict:
    return {"model": model_id, "calibration": calib, "layers": len(names)}


def sensitivity(model, tokenizer, config: QuantConfig, names: list[str] | None = None, caches=(),
                device: str | None = None, progress: bool = True, compute: bool = True, model_id=None,
                progress_file: Path | None = None):
    """Fisher buffers {name: fp32 [N, K]} of the layers (default: `linear_layer_names`) for the
    calibration of `config`, and the calibration's description. The first of `caches` (files) that
    holds the Fisher of this model and calibration is read; otherwise it is computed (unless
    `compute` is False: then {}) and written to the last cache file."""
    names = names or linear_layer_names(model, config.quantize_lm_head)
    model_id = model_id or model_fingerprint(model, names)
    windows, calib = calibration_record(tokenizer, config)
    meta = fisher_meta(model_id, calib, names)
    for cache in caches:
        if Path(cache).is_file():
            return fisher_mod.load_fisher(cache, meta, names), calib
    if not compute:
        return {}, calib
    F = fisher_mod.compute_fisher(model, windows, names, device=device or config.resolved_device(),
                                  progress=progress, progress_file=progress_file, meta=meta)
    if caches and caches[-1] is not None:
        fisher_mod.save_fisher(F, caches[-1], meta)
    return F, calib


def _clustering(config: QuantConfig) -> str:
    if config.method == "rtn":
        return "uniform min..max grid per output row"
    first = f"{config.kmeans_solver} weighted k-means per output row"
    if config.method != "lnq":
        return first
    return (f"{first}, then {config.lnq_iters} x (GPTQ code assignment with error feedback + least-squares "
            "table re-fit) under each layer's input Hessian, blocks in sequence through the quantized ones; "
            "per row the lowest output error kept")


def _native_used(config: QuantConfig, device: str) -> bool:
    if config.method == "rtn" or config.kmeans_solver != "exact":
        return False
    import os

    from sqllm_onnx.quantize import kmeans1d_native

    on_cpu = device == "cpu" or os.environ.get("SQLLM_ONNX_NATIVE_KMEANS") == "1"
    return bool(on_cpu and kmeans1d_native.available())


def layer_file(partial: Path, name: str) -> Path:
    return partial / "layers" / f"{name}.safetensors"


def _load_layer(file: Path, name: str, config: QuantConfig):
    arrays, meta = ckpt.load_arrays(file, str(file.parent.parent))
    try:
        st = json.loads(meta["stats"])
        bits, K = int(meta["bits"]), int(meta["K"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{file} lacks its metadata; delete it to quantize that layer again") from e
    # layer files of a run started before code layout 2 carry no code_layout: repacked on load
    return ckpt.layer_from_arrays(name, arrays, bits, K, st.get("N"), config.lut_dtype, where=str(file),
                                  code_layout=int(meta.get("code_layout", 1))), st


def _mismatch(folder: Path, old, new) -> str:
    diffs = []
    if isinstance(old, dict):
        for part in ("config", "model"):
            a, b = (old.get(part) or {}), (new.get(part) or {})
            diffs += [f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    detail = "; ".join(diffs) if diffs else "unknown settings"
    return (f"{folder} holds a quantization run with different settings ({detail}). Use another folder, "
            "or delete this one to start over.")

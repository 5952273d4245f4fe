"""Diagonal Fisher information of the linear weights: the sensitivity SqueezeLLM weights k-means by.

F[n, k] = sum over calibration samples s of (d loss_s / d W[n, k])^2, where loss_s is the mean
next-token cross-entropy of sample s. One forward and one backward per sample (batch of 1), so each
squared gradient is a per-sample gradient; squares accumulate in one fp32 buffer per weight as soon as
each gradient is ready (a post-accumulate-grad hook), so no gradient outlives its backward pass and
no per-sample gradient is ever stored.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

FP16_LOSS_SCALE = 1024.0  # keeps fp16 gradients of small models above the subnormal range


def compute_fisher(model, windows: np.ndarray, layer_names: list[str], device: str | None = None,
                   progress: bool = True) -> dict:
    """Fisher buffers {layer name: fp32 tensor [N, K] on the CPU} over the token windows [S, L].

    The model runs on `device` (default: where it is) and is put back where it was; its parameters'
    `requires_grad` flags are restored afterwards.
    """
    import torch
    from tqdm.auto import tqdm

    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"calibration windows must be [samples, seq_len >= 2], got {windows.shape}")
    params = list(model.parameters())
    home = params[0].device
    device = torch.device(device) if device else home
    flags = [p.requires_grad for p in params]
    was_training = model.training
    modules = {name: model.get_submodule(name) for name in layer_names}
    fisher = {name: torch.zeros(m.weight.shape, dtype=torch.float32, device=device) for name, m in modules.items()}
    scale = FP16_LOSS_SCALE if params[0].dtype == torch.float16 else 1.0
    hooks = []
    try:
        model.to(device)
        model.eval()  # no dropout: the gradient of the deterministic loss
        for p in params:
            p.requires_grad_(False)
        for name, m in modules.items():
            w = m.weight
            w.requires_grad_(True)

            def accumulate(p, buf=fisher[name]):
                g = p.grad.float()
                if scale != 1.0:
                    g = g / scale
                buf.addcmul_(g, g)
                p.grad = None

            hooks.append(w.register_post_accumulate_grad_hook(accumulate))
        skipped = 0
        for row in tqdm(windows, desc="calibration (Fisher)", unit="sample", disable=not progress):
            ids = torch.as_tensor(row[None], device=device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                skipped += 1
                continue
            (loss * scale).backward()
        if skipped == len(windows):
            raise RuntimeError("every calibration sample gave a non-finite loss; check the model and its dtype")
    finally:
        for h in hooks:
            h.remove()
        for p, f in zip(params, flags):
            p.grad = None
            p.requires_grad_(f)
        model.to(home)
        model.train(was_training)
    for name, buf in fisher.items():
        if not torch.isfinite(buf).all():
            raise RuntimeError(f"the Fisher of {name} is not finite (gradient overflow?); use a float32 or "
                               "bfloat16 model for calibration")
    return {name: buf.cpu() for name, buf in fisher.items()}


def windows_digest(windows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int64).tobytes()).hexdigest()[:16]


def save_fisher(fisher: dict, path: str | Path, meta: dict) -> None:
    """Write the buffers to a safetensors file atomically; `meta` (JSON) identifies what they measure."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in fisher.items()}, str(tmp),
              metadata={"sqllm_onnx_fisher": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)


def load_fisher(path: str | Path, expected_meta: dict | None = None, layer_names=None) -> dict:
    """Read buffers written by `save_fisher`; a different `expected_meta` is an error."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("sqllm_onnx_fisher", "null"))
            if expected_meta is not None and meta != json.loads(json.dumps(expected_meta, sort_keys=True)):
                raise ValueError(f"the Fisher file {path} was computed for {meta}, not for {expected_meta}; "
                                 "delete it or point to another file")
            names = list(f.keys()) if layer_names is None else list(layer_names)
            missing = [n for n in names if n not in f.keys()]
            if missing:
                raise ValueError(f"the Fisher file {path} has no buffer for {missing[:3]}")
            return {n: f.get_tensor(n) for n in names}
    except ValueError:
        raise
    except Exception as e:  # truncated or not a safetensors file
        raise ValueError(f"cannot read the Fisher file {path}: {e}") from e

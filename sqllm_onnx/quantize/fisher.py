"""Diagonal Fisher information of the linear weights: the sensitivity SqueezeLLM weights k-means by.

F[n, k] = sum over calibration samples s of (d loss_s / d W[n, k])^2, where loss_s is the mean
next-token cross-entropy of sample s. One forward and one backward per sample (batch of 1), so each
squared gradient is a per-sample gradient; squares accumulate in one fp32 buffer per weight as soon as
each gradient is ready (a post-accumulate-grad hook), so no gradient outlives its backward pass and
no per-sample gradient is ever stored.

Experts of a mixture-of-experts block see only the tokens routed to them, and some see few or none
during calibration: a Fisher summed over a handful of tokens ranks weights by noise. The pass counts
the tokens each layer's forward receives, and the buffer of a layer that saw fewer than
`min_tokens(total)` tokens (1 % of the calibration tokens, at least 16) is set to zero, which the
quantizer reads as "no sensitivity signal": that layer gets unweighted k-means and its whole sparse
budget goes to magnitude outliers (quantizer.quantize_model). Dense layers see every token.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

FP16_LOSS_SCALE = 1024.0  # keeps fp16 gradients of small models above the subnormal range


MIN_TOKENS, MIN_TOKENS_FRACTION = 16, 0.01  # below this many tokens a layer's Fisher is dropped (see above)


def min_tokens(total_tokens: int) -> int:
    return max(MIN_TOKENS, int(np.ceil(MIN_TOKENS_FRACTION * total_tokens)))


SAVE_EVERY_S = float(os.environ.get("SQLLM_FISHER_SAVE_S", "120"))  # progress saves of an interruptible pass


class Accumulator:
    """While entered: the squares of the gradients of the weights of `modules` {name: nn.Linear} added
    into one fp32 buffer per weight as each gradient is ready (a post-accumulate-grad hook that then
    drops the gradient), and the tokens each module's forward receives counted. Inside, only those
    weights require grad and the model is in eval mode (no dropout: the gradient of the
    deterministic loss); `requires_grad` flags and the mode are restored on exit.

    `scale`: the loss scale the backward passes use (the squares are of the unscaled gradients).
    """

    def __init__(self, model, modules: dict, device, scale: float = 1.0):
        import torch

        self.model, self.modules, self.scale = model, modules, scale
        self.fisher = {name: torch.zeros(m.weight.shape, dtype=torch.float32, device=device)
                       for name, m in modules.items()}
        self.tokens = dict.fromkeys(modules, 0)  # tokens each layer's forward received
        self._hooks = []

    def __enter__(self):
        model = self.model
        self._params = list(model.parameters())
        self._flags = [p.requires_grad for p in self._params]
        self._was_training = model.training
        model.eval()
        for p in self._params:
            p.requires_grad_(False)
        for name, m in self.modules.items():
            w = m.weight
            w.requires_grad_(True)

            def accumulate(p, buf=self.fisher[name]):
                g = p.grad.float()
                if self.scale != 1.0:
                    g = g / self.scale
                buf.addcmul_(g, g)
                p.grad = None

            self._hooks.append(w.register_post_accumulate_grad_hook(accumulate))

            def count(module, args, name=name):
                self.tokens[name] += args[0].numel() // args[0].shape[-1] if args[0].numel() else 0

            self._hooks.append(m.register_forward_pre_hook(count))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for p, f in zip(self._params, self._flags):
            p.grad = None
            p.requires_grad_(f)
        self.model.train(self._was_training)

    def result(self, total_tokens: int) -> dict:
        """The buffers, checked finite, with those of layers that saw fewer than `min_tokens(total_tokens)`
        tokens set to zero (an expert that too few tokens reached: no sensitivity signal, module docstring)."""
        import torch

        for name, buf in self.fisher.items():
            if not torch.isfinite(buf).all():
                raise RuntimeError(f"the Fisher of {name} is not finite (gradient overflow?); use a float32 or "
                                   "bfloat16 model for calibration")
        floor = min_tokens(total_tokens)
        for name, seen in self.tokens.items():
            if seen < floor:
                self.fisher[name].zero_()
        return self.fisher


def loss_scale(model) -> float:
    import torch

    return FP16_LOSS_SCALE if next(model.parameters()).dtype == torch.float16 else 1.0


def check_windows(windows) -> np.ndarray:
    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"calibration windows must be [samples, seq_len >= 2], got {windows.shape}")
    return windows


def compute_fisher(model, windows: np.ndarray, layer_names: list[str], device: str | None = None,
                   progress: bool = True, progress_file: str | Path | None = None, meta: dict | None = None) -> dict:
    """Fisher buffers {layer name: fp32 tensor [N, K] on the CPU} over the token windows [S, L].

    The model runs on `device` (default: where it is) and is put back where it was; its parameters'
    `requires_grad` flags are restored afterwards. With `progress_file`, the partial sums and the
    number of samples they cover are saved there (atomically) every SAVE_EVERY_S seconds, and a pass
    that finds that file for the same `meta` continues after its samples: the sums are the same fp32
    numbers, added in the same order, as an uninterrupted pass gives.
    """
    import torch
    from tqdm.auto import tqdm

    windows = check_windows(windows)
    home = next(model.parameters()).device
    device = torch.device(device) if device else home
    modules = {name: model.get_submodule(name) for name in layer_names}
    acc = Accumulator(model, modules, device, loss_scale(model))
    fisher, tokens, scale = acc.fisher, acc.tokens, acc.scale
    done = 0
    if progress_file is not None and Path(progress_file).is_file():
        saved, done, saved_tokens = load_progress(progress_file, meta, layer_names)
        for name, buf in saved.items():
            fisher[name].copy_(buf)
        tokens.update(saved_tokens)
    try:
        model.to(device)
        with acc:
            skipped = 0
            last_save = time.monotonic()
            bar = tqdm(total=len(windows), initial=done, desc="calibration (Fisher)", unit="sample",
                       disable=not progress)
            for i in range(done, len(windows)):
                ids = torch.as_tensor(windows[i][None], device=device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                if not torch.isfinite(loss):
                    skipped += 1
                else:
                    (loss * scale).backward()
                bar.update(1)
                if progress_file is not None and i + 1 < len(windows) and time.monotonic() - last_save > SAVE_EVERY_S:
                    save_progress(fisher, i + 1, progress_file, meta, tokens)
                    last_save = time.monotonic()
            bar.close()
            check_skipped(skipped, len(windows) - done, done)
    finally:
        model.to(home)
    return {name: buf.cpu() for name, buf in acc.result(windows.size).items()}


def check_skipped(skipped: int, ran: int, resumed: int = 0) -> None:
    if skipped == ran and resumed == 0:
        raise RuntimeError("every calibration sample gave a non-finite loss; check the model and its dtype")


def save_progress(fisher: dict, samples_done: int, path: str | Path, meta: dict | None, tokens: dict) -> None:
    save_fisher({k: v.cpu() for k, v in fisher.items()}, path,
                {"pass": meta, "samples_done": samples_done, "tokens": tokens})


def load_progress(path: str | Path, meta: dict | None, layer_names) -> tuple[dict, int, dict]:
    """(partial sums, samples they cover, tokens per layer) of a pass interrupted after `save_progress`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        saved = json.loads((f.metadata() or {}).get("sqllm_onnx_fisher", "null")) or {}
    if saved.get("pass") != json.loads(json.dumps(meta, sort_keys=True)):
        raise ValueError(f"{path} holds the partial Fisher of another calibration; delete it to start over")
    return load_fisher(path, saved, layer_names), int(saved["samples_done"]), dict(saved.get("tokens") or {})


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

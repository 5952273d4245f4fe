"""Perplexity on held-out text, the same protocol for torch and ONNX Runtime models.

Protocol: the evaluation text is tokenized once (no special tokens) and cut into non-overlapping
windows of `seq_len` tokens; each window is scored independently (fixed context) and perplexity is
exp(mean negative log-likelihood) over every predicted token of every window.
"""

from __future__ import annotations

import math

import numpy as np

from sqllm_onnx import data

DEFAULT_SEQ_LEN = 512


def eval_windows(tokenizer, source=None, seq_len: int = DEFAULT_SEQ_LEN, max_windows: int | None = None) -> np.ndarray:
    """The evaluation windows [W, seq_len] of `source` (default: the held-out stdlib part)."""
    return data.sequential_windows(data.tokenize(tokenizer, data.load_text(source, "eval")), seq_len, max_windows)


def nll_from_logits(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods (float64) and the number of predictions."""
    logits = logits[:-1].astype(np.float64)
    target = ids[1:]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float((logz - logits[np.arange(len(target)), target]).sum()), len(target)


def torch_perplexity(model, windows: np.ndarray, progress: bool = False) -> float:
    """Perplexity of a torch causal LM on the windows (one window per forward pass)."""
    import torch
    from tqdm.auto import tqdm

    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for w in tqdm(windows, desc="perplexity (torch)", disable=not progress, unit="window"):
            ids = torch.as_tensor(w[None], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0].float().cpu().numpy()
            nll, n = nll_from_logits(logits, w)
            total, count = total + nll, count + n
    return math.exp(total / count)

"""Dense-and-sparse decomposition: which weights leave the dense LUT part, and their CSR values.

A sparsity level (percent of each matrix) is split into
- sensitive values: the largest Fisher entries of the matrix (SqueezeLLM's sensitivity-based
  sparsity), and
- outliers, by one of three rules (`QuantConfig.outlier_rule`):
  "magnitude" (default): the largest |w| of the matrix, as SqueezeLLM's per-matrix threshold;
  "row-iqr": the values furthest outside their own row's interquartile range [q1, q3], in units of
  that row's IQR (a per-row notion of "outside the bulk");
  "error" (decided in layer.py): the largest Fisher-weighted errors of a first dense fit.
  docs/results.md compares them: on SmolLM2 they are within 2 % of each other in perplexity, with
  "row-iqr" last at both 3 and 4 bits.

The removed values get zero weight in clustering and are stored as CSR entries with
value = w - lut[code], so dense + sparse gives back w at those positions.
"""

from __future__ import annotations

import numpy as np
import torch

OUTLIER_RULES = ("magnitude", "row-iqr")  # plus "error", decided in layer.py (needs a first fit)


def count_for(percent: float, numel: int) -> int:
    """Number of entries that `percent` % of `numel` weights makes (rounded to nearest)."""
    return int(min(numel, max(0, round(percent / 100.0 * numel))))


def _top_mask(score: torch.Tensor, count: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if count <= 0:
        return mask.view(score.shape)
    s = score.reshape(-1).double()
    if exclude is not None:
        s = torch.where(exclude.reshape(-1), torch.full_like(s, -float("inf")), s)
    mask[torch.topk(s, count, sorted=False).indices] = True
    return mask.view(score.shape)


def _row_quantiles(W: torch.Tensor, ps) -> list[torch.Tensor]:
    """Per-row quantiles, each [N, 1], with linear interpolation (torch.quantile caps the tensor size)."""
    s = torch.sort(W, dim=1).values
    out = []
    for p in ps:
        pos = p * (W.shape[1] - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, W.shape[1] - 1)
        out.append((s[:, lo] + (s[:, hi] - s[:, lo]) * (pos - lo))[:, None])
    return out


def outlier_scores(W: torch.Tensor, rule: str = "magnitude") -> torch.Tensor:
    """How far each value lies outside the bulk of the matrix (larger = more of an outlier)."""
    W = W.double()
    if rule == "magnitude":
        return W.abs()
    if rule != "row-iqr":
        raise ValueError(f"outlier rule must be one of {OUTLIER_RULES} (got {rule!r})")
    q1, med, q3 = _row_quantiles(W, (0.25, 0.5, 0.75))
    iqr = (q3 - q1).clamp_min(torch.finfo(W.dtype).tiny)
    beyond = torch.maximum(W - q3, q1 - W).clamp_min(0)
    # inside the bulk, the distance to the median orders the values (only matters for huge levels)
    inside = (W - med).abs() / (iqr * 1e6)
    return torch.where(beyond > 0, beyond / iqr + 1.0, inside)


def select_sparse(W: torch.Tensor, fisher: torch.Tensor | None, n_sensitive: int, n_outliers: int,
                  rule: str = "magnitude") -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (sensitive, outliers) of the weights kept in the sparse part; disjoint."""
    if n_sensitive > 0 and fisher is None:
        raise ValueError("sensitive values need the Fisher sensitivity")
    sensitive = _top_mask(fisher, n_sensitive) if n_sensitive > 0 else torch.zeros_like(W, dtype=torch.bool)
    outliers = (_top_mask(outlier_scores(W, rule), n_outliers, exclude=sensitive) if n_outliers > 0
                else torch.zeros_like(W, dtype=torch.bool))
    return sensitive, outliers


def sparse_residuals(W: torch.Tensor, mask: torch.Tensor, lut: torch.Tensor, dtype: torch.dtype,
                     weight_dtype: torch.dtype = torch.float32):
    """CSR of the masked weights: (indptr int32 [N+1], indices int32 [nnz], values [nnz] in `dtype`,
    codes int64 [nnz], exact bool [nnz]), values = w - lut[code].

    `lut` holds the stored table (already rounded to `dtype`). The code of each sparse position is
    chosen so that lut[code] + value reproduces w: exactly in real arithmetic when some entry makes
    w - entry representable in `dtype`, otherwise exactly once the sum is rounded to `weight_dtype`
    (what a float32 kernel and `apply_to_model` produce), otherwise as closely as possible; among
    equals the smallest residual wins. `exact` flags the entries reproduced in `weight_dtype`.
    Entries are sorted by row, then column.
    """
    N, K = W.shape
    rows, cols = torch.nonzero(mask, as_tuple=True)  # row-major order
    w = W[rows, cols].double()[:, None]  # [nnz, 1]
    table = lut.double()[rows]  # [nnz, 2^bits]
    res = (w - table).to(dtype).double()
    recon = table + res
    tier = torch.full(res.shape, 2, dtype=torch.int64, device=W.device)
    tier = torch.where(recon.to(weight_dtype).double() == w, torch.ones_like(tier), tier)
    tier = torch.where(recon == w, torch.zeros_like(tier), tier)
    best_tier = tier.amin(dim=1, keepdim=True)
    secondary = torch.where(best_tier == 2, (recon - w).abs(), res.abs())
    secondary = torch.where(tier == best_tier, secondary, torch.full_like(secondary, float("inf")))
    code = secondary.argmin(dim=1)
    values = torch.gather(res, 1, code[:, None]).squeeze(1).to(dtype)
    counts = torch.bincount(rows, minlength=N)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64, device=W.device), counts.cumsum(0)])
    return indptr.to(torch.int32), cols.to(torch.int32), values, code, best_tier.squeeze(1) < 2


def to_numpy_csr(indptr, indices, values):
    return (np.ascontiguousarray(indptr.cpu().numpy(), dtype=np.int32),
            np.ascontiguousarray(indices.cpu().numpy(), dtype=np.int32), values.cpu().numpy())

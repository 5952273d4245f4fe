"""Quantizing one weight matrix: dense-and-sparse split, per-row LUT, codes, packing into the op's
layout (`sqllm_onnx.op.PackedLinear`, docs/op-spec.md)."""

from __future__ import annotations

import time

import numpy as np
import torch

from sqllm_onnx import reference
from sqllm_onnx.op import PackedLinear
from sqllm_onnx.quantize import decompose, kmeans
from sqllm_onnx.quantize.config import QuantConfig

# Rows are clustered in chunks of about this many weights (bounds the solver's temporaries).
CHUNK_ELEMENTS = 1 << 20


def _chunks(n_rows: int, row_len: int):
    step = max(1, CHUNK_ELEMENTS // max(row_len, 1))
    for r0 in range(0, n_rows, step):
        yield slice(r0, min(n_rows, r0 + step))


def fit_tables(W: torch.Tensor, weights: torch.Tensor | None, bits: int, method: str, generator=None,
               solver: str = "exact") -> torch.Tensor:
    """Per-row tables float64 [N, 2^bits] for `method` (weights: sample weights, 0 = ignored)."""
    out = torch.empty(W.shape[0], 1 << bits, dtype=torch.float64, device=W.device)
    for s in _chunks(W.shape[0], W.shape[1]):
        w = None if weights is None else weights[s]
        if method == "rtn":
            out[s] = kmeans.rtn_table(W[s], w, bits)
        else:
            out[s] = kmeans.weighted_kmeans(W[s], w, bits, generator=generator, solver=solver)
    return out


def prepare(W: torch.Tensor, fisher: torch.Tensor | None, name: str = "", device="cpu"):
    """(W float32, Fisher float32 >= 0 or None, the weight's own dtype) on `device`, checked."""
    if W.ndim != 2:
        raise ValueError(f"{name or 'weight'}: expected a 2-D weight, got shape {tuple(W.shape)}")
    weight_dtype = W.dtype if W.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    W = W.detach().to(device=device, dtype=torch.float32)
    F = None if fisher is None else fisher.detach().to(device=device, dtype=torch.float32).clamp_min(0)
    if F is not None and F.shape != W.shape:
        raise ValueError(f"{name}: Fisher shape {tuple(F.shape)} differs from the weight's {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise ValueError(f"{name}: the weight holds NaN or Inf")
    return W, F, weight_dtype


def split_and_cluster(W: torch.Tensor, F: torch.Tensor | None, config: QuantConfig, name: str = ""):
    """The dense-and-sparse split and the first table: (sensitive, outliers, stored table rounded to
    the LUT dtype), the sparse values given zero weight in the clustering."""
    solver, outlier_rule = config.kmeans_solver, config.outlier_rule
    T = config.torch_lut_dtype
    N, K = W.shape
    n_total = decompose.count_for(config.sparsity, N * K)
    n_sensitive = min(decompose.count_for(config.sensitive_percent, N * K), n_total) if F is not None else 0
    n_outliers = n_total - n_sensitive
    generator = kmeans.row_generator(config.seed, name, device=W.device)
    fisher_weighted = config.method in ("squeezellm", "lnq")

    def cluster(sparse_mask):
        """The stored table (rounded to T) with the sparse values given zero weight."""
        dense = (~sparse_mask).float()
        if fisher_weighted and F is not None:  # sample weights: Fisher, or uniform without Fisher signal
            weights = F * dense
            weights = torch.where(weights.sum(dim=1, keepdim=True) <= 0, dense, weights)
        else:
            weights = dense
        return fit_tables(W, weights, config.bits, "rtn" if config.method == "rtn" else "kmeans",
                          generator, solver).to(T)

    if outlier_rule == "error" and n_outliers > 0:
        # outliers = the largest (Fisher-weighted) errors of a first clustering without them
        sensitive, _ = decompose.select_sparse(W, F, n_sensitive, 0)
        first = cluster(sensitive).double()
        q = torch.gather(first, 1, kmeans.assign_nearest(W.double(), first))
        score = (W.double() - q) ** 2 * (F.double() if F is not None and fisher_weighted else 1.0)
        outliers = decompose._top_mask(score, n_outliers, exclude=sensitive)
    else:
        sensitive, outliers = decompose.select_sparse(W, F, n_sensitive, n_outliers, outlier_rule)
    return sensitive, outliers, cluster(sensitive | outliers)


def quantize_weight(W: torch.Tensor, fisher: torch.Tensor | None, config: QuantConfig, *, bias=None,
                    name: str = "", device: str | torch.device = "cpu") -> tuple[PackedLinear, dict]:
    """Quantize one [N, K] weight (an nn.Linear's orientation) into a PackedLinear plus statistics.

    `fisher` (same shape, >= 0) weights the k-means of "squeezellm" and ranks the sensitive values;
    None (no Fisher, or none worth having: a starved expert) means unweighted k-means and the whole
    sparse budget for outliers.
    """
    start = time.perf_counter()
    W, F, weight_dtype = prepare(W, fisher, name, device)
    sensitive, outliers, table = split_and_cluster(W, F, config, name)
    codes = kmeans.assign_nearest(W.double(), table.double())  # nearest entry of the rounded table
    return pack(W, W, table, codes, sensitive, outliers, F, config, bias, weight_dtype, start)


def pack(W: torch.Tensor, target: torch.Tensor, table: torch.Tensor, codes: torch.Tensor, sensitive: torch.Tensor,
         outliers: torch.Tensor, F: torch.Tensor | None, config: QuantConfig, bias, weight_dtype: torch.dtype,
         start: float) -> tuple[PackedLinear, dict]:
    """The PackedLinear of `table` (stored dtype) and dense `codes`, the sparse positions holding
    `target` exactly (W itself, or the values error feedback moved them to), and its statistics
    against the original W."""
    T = config.torch_lut_dtype
    bits = config.bits
    N, K = W.shape
    sparse = sensitive | outliers
    codes = codes.clone()
    csr = None
    if sparse.any():
        indptr, indices, values, sparse_codes, exact = decompose.sparse_residuals(target, sparse, table, T,
                                                                                  weight_dtype)
        codes[sparse] = sparse_codes
        csr = decompose.to_numpy_csr(indptr, indices, values)

    # the weight the op computes with, in the weight's dtype (what apply_to_model gives the model)
    W_hat = torch.gather(table.double(), 1, codes)
    if csr is not None:
        W_hat[sparse] += values.double()
    W_hat = W_hat.to(weight_dtype).double()
    err = (W.double() - W_hat) ** 2
    stats = {
        "N": N, "K": K, "nnz": int(sparse.sum()), "sensitive": int(sensitive.sum()), "outliers": int(outliers.sum()),
        "weighted_error": None if F is None else float((F.double() * err).sum()),
        "sse": float(err.sum()),
        "rel_error": float(err.sum() / (W.double() ** 2).sum().clamp_min(1e-300)),
        "sparse_max_abs_error": float(((target.double() - W_hat) ** 2)[sparse].max().sqrt()) if csr is not None else 0.0,
        "sparse_inexact": int((~exact).sum()) if csr is not None else 0,
    }
    nptype = np.dtype(config.lut_dtype)
    packed = PackedLinear(
        qweight=reference.pack_codes(codes.to(torch.uint8).cpu().numpy(), bits),
        lut=np.ascontiguousarray(table.cpu().numpy(), dtype=nptype), bits=bits, K=K)
    if csr is not None:
        packed.sparse_indptr, packed.sparse_indices, packed.sparse_values = csr
    if bias is not None:
        packed.bias = np.ascontiguousarray(bias.detach().float().cpu().numpy(), dtype=nptype)
    stats["time_s"] = round(time.perf_counter() - start, 4)
    return packed, stats

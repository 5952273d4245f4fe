"""Error feedback for SqueezeLLM's format: one matrix's per-row tables and codes chosen to keep the
layer's *outputs* on calibration activations, not its weights, close to the original.

The objective of a row w (its K inputs) with stored weights w^ is the output error over the
calibration inputs X [T, K]: (w - w^)^T H (w - w^), H = X^T X / T (`sequential` collects H with the
inputs propagated through the already quantized layers). Dense-and-sparse stays: the sensitive and
outlier positions are picked first (as SqueezeLLM does, `layer.split_and_cluster`), and they hold any
value exactly (the CSR), so they cost no error; the rest are codes into the row's table.

Alternating minimisation in the spirit of LNQ (GuidedQuant, ICML 2025), starting from SqueezeLLM's
Fisher-weighted k-means table:

1. code assignment with error feedback (GPTQ): columns are quantized one after the other, most
   active inputs first, each to its row's nearest table entry, and the error of each column is
   pushed into the columns not yet quantized through the Cholesky factor of H^-1 (blocks of
   `BLOCK` columns, the lazy batch updates of GPTQ). A sparse position takes the value the
   feedback has moved it to (no error).
2. table re-fit given the codes: per row the least-squares table c = (O^T H O)^-1 O^T H u, O the
   one-hot code matrix of the dense positions and u the row minus its sparse values: the exact
   minimiser of the output error for those codes.

`lnq_iters` rounds of (1, 2); per row the candidate with the lowest output error is kept, SqueezeLLM's
own result included, so no row ends worse than SqueezeLLM's on the calibration inputs.
"""

from __future__ import annotations

import contextlib
import time

import torch

from sqllm_onnx import reference
from sqllm_onnx.op import PackedLinear
from sqllm_onnx.quantize import kmeans, layer as layer_mod
from sqllm_onnx.quantize.config import QuantConfig

BLOCK = 128  # columns per lazy batch update (GPTQ)
DAMP = 0.01  # of the mean diagonal of H, added to its diagonal before the inverse (GPTQ's percdamp)
REFIT_ROWS = 1 << 17  # rows x K of one chunk of the table re-fit (bounds its one-hot temporaries)


def damped(H: torch.Tensor) -> torch.Tensor:
    """H (float64) with dead inputs given a unit diagonal and DAMP x mean diagonal added."""
    H = H.double().clone()
    diag = torch.diagonal(H)
    dead = diag <= 0
    diag[dead] = 1.0
    diag += DAMP * float(diag.mean())
    return H


def inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H damped and positive definite): GPTQ's update matrix."""
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        H = H + torch.eye(H.shape[0], dtype=H.dtype) * (DAMP * float(torch.diagonal(H).mean()) * 10 ** attempt)
    raise RuntimeError("the calibration Hessian is not positive definite even after damping")


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row (w - w^)^T H (w - w^) in float64 [N]."""
    E = W.double() - W_hat.double()
    return ((E @ H) * E).sum(dim=1)


def assign_with_feedback(W: torch.Tensor, U: torch.Tensor, lut: torch.Tensor, sparse: torch.Tensor):
    """GPTQ over the columns of W (already in the order of U): (codes int64 [N, K], W^ float64 [N, K]),
    W^ = lut[code] on dense positions and the fed-back value on sparse ones. `lut` float64 sorted."""
    W = W.double().clone()
    N, K = W.shape
    mid = ((lut[:, 1:] + lut[:, :-1]) * 0.5).contiguous()
    codes = torch.empty(N, K, dtype=torch.int64)
    Q = torch.empty(N, K, dtype=torch.float64)
    for i1 in range(0, K, BLOCK):
        i2 = min(i1 + BLOCK, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            c = torch.searchsorted(mid, w[:, None].contiguous()).squeeze(1)
            q = torch.where(sparse[:, i1 + i], w, lut.gather(1, c[:, None]).squeeze(1))
            codes[:, i1 + i], Q[:, i1 + i] = c, q
            e = (w - q) / U1[i, i]
            W1[:, i:].addr_(e, U1[i, i:], alpha=-1.0)
            E1[:, i] = e
        W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)
    return codes, Q


def refit_tables(W: torch.Tensor, Q: torch.Tensor, codes: torch.Tensor, sparse: torch.Tensor, H: torch.Tensor,
                 lut: torch.Tensor) -> torch.Tensor:
    """The least-squares tables float64 [N, k] for these codes (entries no dense position uses keep
    their value), sorted, and the codes renumbered to match: (lut, codes)."""
    N, K = W.shape
    k = lut.shape[1]
    u = torch.where(sparse, W.double() - Q, W.double())  # the row less its sparse values
    Hf = H.float()
    out = torch.empty_like(lut)
    step = max(1, REFIT_ROWS // max(K, 1))
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        onehot = torch.zeros(r1 - r0, K, k, dtype=torch.float32)
        onehot.scatter_(2, codes[r0:r1, :, None], 1.0)
        onehot[sparse[r0:r1]] = 0.0
        OH = torch.matmul(onehot.transpose(1, 2), Hf).double()  # [R, k, K]
        G = torch.matmul(OH, onehot.double())  # [R, k, k]
        b = torch.matmul(OH, u[r0:r1, :, None]).squeeze(2)  # [R, k]
        # a small ridge keeps G invertible; unused entries (zero row and column) stay where they were
        lam = 1e-6 * torch.diagonal(G, dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
        G = G + lam[:, None, None] * torch.eye(k, dtype=G.dtype)
        b = b + lam[:, None] * lut[r0:r1]
        out[r0:r1] = torch.linalg.solve(G, b)
    order = torch.argsort(out, dim=1, stable=True)
    rank = torch.argsort(order, dim=1)
    return torch.gather(out, 1, order), torch.gather(rank, 1, codes)


@contextlib.contextmanager
def _one_thread():
    """torch on one thread: the column loop is thousands of operations on vectors of a few hundred
    values, where a thread pool only adds synchronisation (20-70x slower on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quantize_weight_lnq(W: torch.Tensor, H: torch.Tensor, fisher: torch.Tensor | None, config: QuantConfig, *,
                        bias=None, name: str = "") -> tuple[PackedLinear, dict]:
    """Quantize one [N, K] weight with error feedback under the input Hessian H [K, K] (X^T X / T of
    the calibration inputs this layer sees). Same output format and statistics as
    `layer.quantize_weight`, plus the output error (the objective, summed over rows) of the result
    and of SqueezeLLM's table and nearest codes on the same inputs."""
    with _one_thread():
        return _quantize(W, H, fisher, config, bias, name)


def _quantize(W, H, fisher, config, bias, name):
    start = time.perf_counter()
    W, F, weight_dtype = layer_mod.prepare(W, fisher, name, "cpu")
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"{name}: Hessian shape {tuple(H.shape)} does not match the weight's inputs {W.shape[1]}")
    if not torch.isfinite(H).all():
        raise ValueError(f"{name}: the calibration Hessian holds NaN or Inf")
    T = config.torch_lut_dtype
    sensitive, outliers, table = layer_mod.split_and_cluster(W, F, config, name)
    sparse = sensitive | outliers
    H = H.double()
    W64 = W.double()

    def stored(lut, codes, target):
        """W^ as stored: the table rounded to the LUT dtype; sparse positions hold `target`."""
        q = torch.gather(lut.to(T).double(), 1, codes)
        return torch.where(sparse, target, q)

    # SqueezeLLM's layer: its table, nearest codes, sparse values exact
    best_lut = table.double()
    best_codes = kmeans.assign_nearest(W64, best_lut)
    best_target = W64.clone()
    best_err = output_error(W64, stored(best_lut, best_codes, best_target), H)
    squeezellm_err = float(best_err.sum())

    Hd = damped(H)
    order = torch.sort(torch.diagonal(Hd), descending=True, stable=True).indices  # most active inputs first
    inv = torch.argsort(order)
    U = inverse_cholesky(Hd[order][:, order])
    lut = best_lut
    kept = torch.ones(W.shape[0], dtype=torch.bool)
    history = []
    for _ in range(config.lnq_iters):
        codes_p, Q_p = assign_with_feedback(W64[:, order], U, lut, sparse[:, order])
        codes, Q = codes_p[:, inv], Q_p[:, inv]
        lut, codes = refit_tables(W64, Q, codes, sparse, H, lut)
        lut = lut.to(T).double()
        target = torch.where(sparse, Q, W64)
        err = output_error(W64, stored(lut, codes, target), H)
        history.append(float(err.sum()))
        better = err < best_err
        best_lut = torch.where(better[:, None], lut, best_lut)
        best_codes = torch.where(better[:, None], codes, best_codes)
        best_target = torch.where(better[:, None], target, best_target)
        best_err = torch.minimum(err, best_err)
        kept &= ~better

    packed, stats = layer_mod.pack(W, best_target, best_lut.to(T), best_codes, sensitive, outliers, F, config,
                                   bias, weight_dtype, start)
    W_hat = torch.from_numpy(reference.dequantize(
        packed.qweight, packed.lut, packed.K, packed.bits, packed.sparse_indptr, packed.sparse_indices,
        packed.sparse_values)).to(weight_dtype).double()
    stats.update({"output_error": float(output_error(W64, W_hat, H).sum()),
                  "output_error_squeezellm": squeezellm_err, "output_error_passes": history,
                  "rows_kept_from_squeezellm": int(kept.sum())})
    stats["time_s"] = round(time.perf_counter() - start, 4)
    return packed, stats

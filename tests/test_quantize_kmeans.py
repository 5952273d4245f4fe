"""Per-row clustering: the exact weighted k-means against scikit-learn and brute force, Lloyd, RTN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sqllm_onnx.quantize import kmeans


def _rows(seed: int, R: int, n: int):
    """Heavy-tailed values and Fisher-like weights (squared gradients: a few entries dominate)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(4, size=(R, n)).astype(np.float32)
    w = (rng.standard_normal((R, n)) ** 2 * rng.lognormal(0, 2, size=(R, n))).astype(np.float32)
    return x, w


def _sse(x, w, lut):
    xt, wt, lt = torch.as_tensor(x), torch.as_tensor(w), torch.as_tensor(lut)
    return kmeans.weighted_sse(xt, wt, lt, kmeans.assign_nearest(xt.double(), lt)).numpy()


def _brute_force_sse(x, w, k):
    """Optimal weighted 1-D k-means by the O(k n^2) dynamic program over sorted values."""
    o = np.argsort(x)
    x, w = x[o].astype(np.float64), w[o].astype(np.float64)
    n = len(x)
    W, S, Q = (np.concatenate([[0], np.cumsum(v)]) for v in (w, w * x, w * x * x))
    best = np.full((k + 1, n + 1), np.inf)
    best[0, 0] = 0
    for m in range(1, k + 1):
        for i in range(1, n + 1):
            j = np.arange(i)
            dw = W[i] - W[j]
            cost = Q[i] - Q[j] - np.where(dw > 0, (S[i] - S[j]) ** 2 / np.where(dw > 0, dw, 1), 0)
            best[m, i] = np.min(best[m - 1, j] + np.maximum(cost, 0))
    return best[1:, n].min()


@pytest.mark.parametrize("bits", [3, 4])
def test_weighted_sse_no_worse_than_sklearn(bits):
    from sklearn.cluster import KMeans

    x, w = _rows(1, 8, 256)
    lut = kmeans.weighted_kmeans(torch.as_tensor(x), torch.as_tensor(w), bits).numpy()
    ours = _sse(x, w, lut)
    best_of_10, single = [], []
    for r in range(x.shape[0]):
        for n_init, out in ((10, best_of_10), (1, single)):  # 1 = what the SqueezeLLM code ran
            km = KMeans(n_clusters=1 << bits, n_init=n_init, random_state=0, max_iter=300)
            km.fit(x[r, :, None].astype(np.float64), sample_weight=w[r].astype(np.float64))
            out.append(_sse(x[r:r + 1], w[r:r + 1], km.cluster_centers_[:, 0][None])[0])
    assert np.all(ours <= np.array(best_of_10) * (1 + 1e-9)), (ours, best_of_10)
    # and clearly better on some rows: Lloyd-type local optima are common with Fisher-like weights
    assert np.any(ours < 0.98 * np.array(single))


@pytest.mark.parametrize("R,n,bits", [(6, 40, 2), (6, 40, 3), (4, 20, 4), (3, 5, 3), (2, 1, 2)])
def test_exact_solver_is_optimal(R, n, bits):
    x, w = _rows(2, R, n)
    w[0, : n // 2] = 0  # zero-weight values (the sparse ones) must not matter
    lut = kmeans.optimal_kmeans(torch.as_tensor(x), torch.as_tensor(w), bits)
    assert lut.shape == (R, 1 << bits) and torch.isfinite(lut).all()
    assert (lut[:, 1:] >= lut[:, :-1]).all()
    wn = kmeans._fix_weights(torch.as_tensor(w).double()).numpy()  # the solver's per-row scaling
    ours = _sse(x, wn, lut.numpy())
    for r in range(R):
        assert ours[r] == pytest.approx(_brute_force_sse(x[r], wn[r], min(1 << bits, n)), rel=1e-9, abs=1e-12)


def test_lloyd_is_deterministic_for_a_seed_and_no_worse_than_its_starts():
    x, w = torch.as_tensor(_rows(3, 8, 128)[0]), torch.as_tensor(_rows(3, 8, 128)[1])
    a = kmeans.weighted_kmeans(x, w, 3, kmeans.row_generator(7, "layer"), solver="lloyd")
    b = kmeans.weighted_kmeans(x, w, 3, kmeans.row_generator(7, "layer"), solver="lloyd")
    assert torch.equal(a, b)
    exact = kmeans.weighted_kmeans(x, w, 3)
    assert (_sse(x.numpy(), w.numpy(), exact.numpy()) <= _sse(x.numpy(), w.numpy(), a.numpy()) * (1 + 1e-9)).all()


def test_unweighted_kmeans_equals_uniform_weights():
    x, _ = _rows(4, 5, 64)
    x = torch.as_tensor(x)
    assert torch.allclose(kmeans.weighted_kmeans(x, None, 3), kmeans.weighted_kmeans(x, torch.ones_like(x), 3))


def test_rtn_table_is_uniform_grid_over_dense_values():
    x = torch.tensor([[-1.0, 0.0, 2.0, 100.0]])
    w = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # 100 is a sparse value: not part of the range
    t = kmeans.rtn_table(x, w, 2)
    assert torch.allclose(t, torch.tensor([[-1.0, 0.0, 1.0, 2.0]], dtype=torch.float64))


def test_assign_nearest_unsorted_table():
    lut = torch.tensor([[3.0, -1.0, 1.0, 0.0]])
    x = torch.tensor([[-5.0, 0.2, 0.6, 2.5, 10.0]])
    assert kmeans.assign_nearest(x, lut).tolist() == [[1, 3, 2, 0, 0]]


def test_native_and_torch_solvers_agree():
    from sqllm_onnx.quantize import kmeans1d_native

    if not kmeans1d_native.available():
        pytest.skip("no C compiler: only the torch solver runs here")
    for R, n, bits in ((10, 300, 3), (6, 97, 4), (3, 5, 4), (4, 33, 2)):
        x, w = _rows(R + n, R, n)
        w[1, ::3] = 0
        a = kmeans.optimal_kmeans(torch.as_tensor(x), torch.as_tensor(w), bits, native=True)
        b = kmeans.optimal_kmeans(torch.as_tensor(x), torch.as_tensor(w), bits, native=False)
        torch.testing.assert_close(a, b, rtol=0, atol=0)

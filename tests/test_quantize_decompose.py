"""Dense-and-sparse split of one matrix: counts, selection rules, exact reconstruction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sqllm_onnx import reference
from sqllm_onnx.quantize import QuantConfig, decompose
from sqllm_onnx.quantize.layer import quantize_weight


def _matrix(seed=0, N=48, K=96):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.02
    W[3, 5], W[10, 70], W[20, 1] = 0.9, -0.7, 0.5  # outliers
    F = torch.rand(N, K, generator=g) ** 6
    return W, F


def test_config_split_of_the_sparsity_level():
    assert QuantConfig(sparsity=0.45).sensitive_percent == 0.05
    assert QuantConfig(sparsity=0.45).outlier_percent == pytest.approx(0.40)
    assert QuantConfig(sparsity=0.03).sensitive_percent == 0.03
    assert QuantConfig(sparsity=0.5, sensitive=0.2).outlier_percent == pytest.approx(0.3)
    assert decompose.count_for(0.45, 10_000) == 45


@pytest.mark.parametrize("method", ["squeezellm", "kmeans", "rtn"])
@pytest.mark.parametrize("bits", [3, 4])
def test_exact_reconstruction_at_sparse_positions(method, bits):
    W, F = _matrix()
    W = W.half().float()  # weights as checkpoints store them (16-bit values)
    cfg = QuantConfig(bits=bits, sparsity=2.0, sensitive=0.5, method=method, lut_dtype="float32")
    layer, stats = quantize_weight(W, F, cfg, name="w")
    assert stats["nnz"] == decompose.count_for(2.0, W.numel()) == layer.nnz
    assert stats["sensitive"] == decompose.count_for(0.5, W.numel())
    dense = reference.dequantize(layer.qweight, layer.lut, layer.K, layer.bits)
    full = reference.dequantize(layer.qweight, layer.lut, layer.K, layer.bits, layer.sparse_indptr,
                                layer.sparse_indices, layer.sparse_values)
    rows = np.repeat(np.arange(layer.N), np.diff(layer.sparse_indptr))
    cols = layer.sparse_indices
    w = W.numpy().astype(np.float64)
    # dense + sparse == w exactly at every sparse position, summed in float32 as the op does (and
    # as apply_to_model's float64 sum rounded to the weight's dtype gives it)
    np.testing.assert_array_equal(dense[rows, cols].astype(np.float32) + layer.sparse_values,
                                  w[rows, cols].astype(np.float32))
    np.testing.assert_array_equal(full[rows, cols].astype(np.float32), w[rows, cols].astype(np.float32))
    assert stats["sparse_inexact"] == 0 and stats["sparse_max_abs_error"] == 0.0
    # ... and nowhere else: the dense part alone differs from w at the sparse positions
    assert np.any(dense[rows, cols] != w[rows, cols])
    # the planted outliers are sparse
    for r, c in ((3, 5), (10, 70), (20, 1)):
        assert np.any((rows == r) & (cols == c))


def test_arbitrary_float32_weights_reconstruct_to_float32_rounding_of_the_residual():
    W, F = _matrix(5)  # full float32 mantissas: w - entry is not always a float32 number
    layer, stats = quantize_weight(W, F, QuantConfig(bits=3, sparsity=2.0, sensitive=1.0, lut_dtype="float32"),
                                   name="w")
    full = reference.dequantize(layer.qweight, layer.lut, layer.K, layer.bits, layer.sparse_indptr,
                                layer.sparse_indices, layer.sparse_values)
    rows = np.repeat(np.arange(layer.N), np.diff(layer.sparse_indptr))
    w = W.numpy()[rows, layer.sparse_indices]
    got = full[rows, layer.sparse_indices]
    exact = got.astype(np.float32) == w
    assert exact.mean() > 0.9 and stats["sparse_inexact"] == int((~exact).sum())
    # the rest: tiny values far from every table entry, off by at most half a float32 ulp of the residual
    residual = np.abs(layer.sparse_values.astype(np.float64))
    assert np.all(np.abs(got - w) <= np.spacing(residual.astype(np.float32)) / 2 + 1e-30)
    # the outliers (large values) are always exact
    big = np.abs(w) > 0.3
    assert big.sum() == 3 and np.all(exact[big])


def test_float16_residuals_close_within_float16_rounding():
    W, F = _matrix(1)
    layer, stats = quantize_weight(W, F, QuantConfig(bits=3, sparsity=1.0), name="w")
    assert layer.lut.dtype == np.float16 and layer.sparse_values.dtype == np.float16
    full = reference.dequantize(layer.qweight, layer.lut, layer.K, layer.bits, layer.sparse_indptr,
                                layer.sparse_indices, layer.sparse_values)
    rows = np.repeat(np.arange(layer.N), np.diff(layer.sparse_indptr))
    w = W.numpy().astype(np.float64)[rows, layer.sparse_indices]
    assert np.all(np.abs(full[rows, layer.sparse_indices] - w) <= np.abs(w) * 2 ** -11 + 2 ** -24)


def test_sensitive_values_are_the_top_fisher_entries_and_disjoint_from_outliers():
    W, F = _matrix(2)
    sens, out = decompose.select_sparse(W, F, 20, 30)
    assert int(sens.sum()) == 20 and int(out.sum()) == 30 and not (sens & out).any()
    assert F[sens].min() >= F[~sens].max()
    # outliers by row-relative deviation: the planted values are found
    assert out[3, 5] and out[10, 70] and out[20, 1]


def test_row_relative_outliers_find_values_outside_a_narrow_row():
    # row 0 is wide, row 1 is narrow with one value far outside its own bulk
    W = torch.zeros(2, 64)
    W[0] = torch.linspace(-1, 1, 64)
    W[1] = torch.linspace(-0.01, 0.01, 64)
    W[1, 7] = 0.2
    _, out = decompose.select_sparse(W, None, 0, 1, rule="row-iqr")
    assert out[1, 7]
    _, out = decompose.select_sparse(W, None, 0, 1, rule="magnitude")
    assert not out[1, 7]  # global magnitude picks an edge of the wide row instead


def test_more_sparsity_lowers_the_error():
    W, F = _matrix(3)
    errs = [quantize_weight(W, F, QuantConfig(bits=3, sparsity=s), name="w")[1]["weighted_error"]
            for s in (0.0, 0.45, 2.0)]
    assert errs[0] > errs[1] > errs[2]


def test_sparse_codes_are_stored_in_row_major_csr():
    W, F = _matrix(4)
    layer, _ = quantize_weight(W, F, QuantConfig(bits=4, sparsity=3.0), name="w")
    for n in range(layer.N):
        cols = layer.sparse_indices[layer.sparse_indptr[n]:layer.sparse_indptr[n + 1]]
        assert np.all(np.diff(cols) > 0)


@pytest.mark.parametrize("rule", ["magnitude", "row-iqr", "error"])
def test_every_outlier_rule_keeps_the_counts_and_lowers_the_error(rule):
    W, F = _matrix(6)
    dense = quantize_weight(W, F, QuantConfig(bits=3), name="w")[1]["weighted_error"]
    layer, stats = quantize_weight(W, F, QuantConfig(bits=3, sparsity=1.0, outlier_rule=rule), name="w")
    assert stats["nnz"] == layer.nnz == decompose.count_for(1.0, W.numel())
    assert stats["sensitive"] == decompose.count_for(0.05, W.numel())
    assert stats["weighted_error"] < dense


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="outlier_rule"):
        QuantConfig(outlier_rule="biggest")
    with pytest.raises(ValueError, match="kmeans_solver"):
        QuantConfig(kmeans_solver="sklearn")
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=5)
    with pytest.raises(ValueError, match="percentage"):
        QuantConfig(sparsity=-1)
    with pytest.raises(ValueError, match="cannot exceed"):
        QuantConfig(sparsity=0.1, sensitive=0.2)

"""method "lnq" (error feedback, sequential calibration) on tiny random models: better layer outputs
than SqueezeLLM, deterministic, resumable, the same output format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sqllm_onnx.quantize import (CheckpointError, QuantConfig, apply_to_model, linear_layer_names, load_checkpoint,
                                 quantize_model)
from sqllm_onnx.quantize import lnq, quantizer, sequential
from sqllm_onnx.quantize.checkpoint import dequantized_weight
from test_quantize_model import FAST, _kl_to_original, _model, _same


@pytest.fixture(scope="module")
def llama():
    return _model()


@pytest.fixture(scope="module")
def runs(llama):
    model, tok = llama
    return {(m, b): quantize_model(model, tok, QuantConfig(bits=b, sparsity=0.45, method=m, **FAST), progress=False)
            for m in ("squeezellm", "lnq") for b in (3, 4)}


def _layer_inputs(model, tok, names):
    """Each layer's inputs X [T, K] in the unquantized model on the calibration windows."""
    from sqllm_onnx.quantize.quantizer import calibration_record

    windows, _ = calibration_record(tok, QuantConfig(**FAST))
    xs = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: xs[n].append(i[0].detach().reshape(-1, i[0].shape[-1]))) for n in names]
    with torch.no_grad():
        model(input_ids=torch.as_tensor(windows))
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in xs.items()}


@pytest.mark.parametrize("bits", [3, 4])
def test_lnq_beats_squeezellm_on_layer_outputs(llama, runs, bits):
    model, tok = llama
    names = linear_layer_names(model)
    X = _layer_inputs(model, tok, names)
    err = {}
    for method in ("squeezellm", "lnq"):
        q = runs[(method, bits)]
        err[method] = 0.0
        for n in names:
            W = model.get_submodule(n).weight.detach().double()
            E = (W - torch.from_numpy(dequantized_weight(q.layers[n]))) @ X[n].T
            err[method] += float((E * E).mean())
    # the layer outputs of the unquantized model's activations: lnq's error well below SqueezeLLM's
    assert err["lnq"] < 0.7 * err["squeezellm"], err
    # its own objective (each layer on the inputs it saw, sequentially): never worse than SqueezeLLM's layer
    m = runs[("lnq", bits)].manifest
    for n in names:
        st = m["layers"][n]
        assert st["output_error"] <= st["output_error_squeezellm"] * (1 + 1e-6), n
    assert m["totals"]["output_error"] < 0.7 * m["totals"]["output_error_squeezellm"]
    # and the model as a whole is closer to the original
    assert _kl_to_original(model, runs[("lnq", bits)], tok) < _kl_to_original(model, runs[("squeezellm", bits)], tok)


def test_lnq_keeps_squeezellms_format(llama, runs):
    model, _ = llama
    q, s = runs[("lnq", 3)], runs[("squeezellm", 3)]
    assert q.manifest["method"] == "lnq" and "GPTQ" in q.manifest["algorithm"]["clustering"]
    for n in linear_layer_names(model):
        a, b = q.layers[n], s.layers[n]
        assert a.qweight.shape == b.qweight.shape and a.lut.shape == b.lut.shape and a.lut.dtype == np.float16
        assert a.nnz == b.nnz  # the same dense-and-sparse split
        np.testing.assert_array_equal(a.sparse_indptr, b.sparse_indptr)
        np.testing.assert_array_equal(a.sparse_indices, b.sparse_indices)
        assert np.all(np.diff(a.lut.astype(np.float64), axis=1) >= 0)  # sorted tables
    before = {n: model.get_submodule(n).weight.detach().clone() for n in linear_layer_names(model)}
    quantize_model(model, _, QuantConfig(bits=3, method="lnq", **FAST), progress=False)
    for n, w in before.items():  # the sequential pass put the original weights back
        assert torch.equal(model.get_submodule(n).weight, w), n


def test_lnq_deterministic_for_a_seed(llama, runs):
    model, tok = llama
    again = quantize_model(model, tok, QuantConfig(bits=3, sparsity=0.45, method="lnq", **FAST), progress=False)
    _same(again, runs[("lnq", 3)])
    other = quantize_model(model, tok, QuantConfig(bits=3, sparsity=0.45, method="lnq", seed=1, **FAST),
                           progress=False)
    assert any(not np.array_equal(other.layers[n].lut, again.layers[n].lut) for n in again.layers)


def test_lnq_resume_after_an_interruption(llama, runs, tmp_path, monkeypatch):
    model, tok = llama
    cfg = QuantConfig(bits=3, sparsity=0.45, method="lnq", **FAST)
    real = lnq.quantize_weight_lnq
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # interrupted in the middle of the second block (7 layers per block)
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(quantizer.lnq, "quantize_weight_lnq", flaky)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, tok, cfg, checkpoint_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "partial" / "layers").iterdir())) == 10
    with pytest.raises(CheckpointError, match="unfinished run"):
        load_checkpoint(tmp_path)
    monkeypatch.setattr(quantizer.lnq, "quantize_weight_lnq", real)
    with pytest.raises(CheckpointError, match="different settings.*lnq_iters"):
        quantize_model(model, tok, QuantConfig(bits=3, sparsity=0.45, method="lnq", lnq_iters=1, **FAST),
                       checkpoint_dir=tmp_path, progress=False)

    monkeypatch.setattr(quantizer.fisher_mod, "compute_fisher",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("Fisher recomputed")))
    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(quantizer.lnq, "quantize_weight_lnq", counting)
    resumed = quantize_model(model, tok, cfg, checkpoint_dir=tmp_path, progress=False)
    reference_run = runs[("lnq", 3)]
    assert counted["n"] == len(reference_run.layers) - 10
    assert resumed.manifest["timing"]["resumed_layers"] == 10
    _same(resumed, reference_run)  # the same result as the uninterrupted run
    _same(load_checkpoint(tmp_path), reference_run)


def test_table_refit_is_the_least_squares_optimum():
    g = torch.Generator().manual_seed(0)
    N, K, k = 6, 40, 8
    W = torch.randn(N, K, generator=g, dtype=torch.float64)
    X = torch.randn(200, K, generator=g, dtype=torch.float64)
    H = X.T @ X / 200
    codes = torch.randint(0, k, (N, K), generator=g)
    sparse = torch.zeros(N, K, dtype=torch.bool)
    sparse[0, 3] = sparse[2, 7] = True
    Q = torch.where(sparse, W + 0.1, torch.zeros_like(W))
    lut0 = torch.sort(torch.randn(N, k, generator=g, dtype=torch.float64), dim=1).values
    lut, new_codes = lnq.refit_tables(W, Q, codes, sparse, H, lut0)
    assert torch.all(lut[:, 1:] >= lut[:, :-1])
    def err(table, c):
        return lnq.output_error(W, torch.where(sparse, Q, torch.gather(table, 1, c)), H)
    best = err(lut, new_codes)
    assert torch.all(best <= err(lut0, codes) + 1e-12)
    for _ in range(20):  # no perturbation of the tables does better
        assert torch.all(best <= err(lut + 1e-3 * torch.randn(N, k, generator=g, dtype=torch.float64), new_codes))


def test_lnq_errors():
    with pytest.raises(ValueError, match="lm_head"):
        QuantConfig(method="lnq", quantize_lm_head=True)
    with pytest.raises(ValueError, match="lnq_iters"):
        QuantConfig(method="lnq", lnq_iters=0)
    model, _ = _model()
    with pytest.raises(ValueError, match="not inside a list of decoder blocks"):
        sequential.decoder_blocks(model, ["lm_head"])
    W, H = torch.randn(4, 8), torch.eye(6)
    with pytest.raises(ValueError, match="Hessian shape"):
        lnq.quantize_weight_lnq(W, H, None, QuantConfig(bits=3, method="lnq"))


def test_other_architectures_sequential():
    for arch in ("opt", "qwen2"):
        model, tok = _model(arch)
        q = quantize_model(model, tok, QuantConfig(bits=4, method="lnq", **FAST), progress=False)
        assert list(q.layers) == linear_layer_names(model)
        assert q.manifest["totals"]["output_error"] < q.manifest["totals"]["output_error_squeezellm"]
        apply_to_model(model, q)

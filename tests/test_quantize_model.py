"""quantize_model on tiny random models: layers, packing, determinism, sparsity, checkpoints, resume."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from sqllm_onnx import perplexity, reference
from sqllm_onnx.models import random_model
from sqllm_onnx.quantize import (CheckpointError, QuantConfig, QuantizedModel, apply_to_model,
                                 linear_layer_names, load_checkpoint, quantize_model, save_checkpoint)
from sqllm_onnx.quantize import quantizer

FAST = dict(calib_samples=4, calib_seq_len=48)


def _model(arch="llama", seed=0):
    """A tiny random model whose layers matter (weights x3) with a few large weights (x10 on 0.2 %),
    as trained LLMs have and random initialisation has not."""
    model, tok = random_model(arch, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in linear_layer_names(model):
            w = model.get_submodule(name).weight
            w *= 3
            idx = torch.randint(0, w.numel(), (max(1, w.numel() // 500),), generator=g)
            w.view(-1)[idx] *= 10
    return model, tok


def _same(a: QuantizedModel, b: QuantizedModel):
    assert list(a.layers) == list(b.layers)
    for name in a.layers:
        la, lb = a.layers[name], b.layers[name]
        for k, v in la.arrays().items():
            np.testing.assert_array_equal(v, lb.arrays()[k], err_msg=f"{name}.{k}")


@pytest.fixture(scope="module")
def llama():
    return _model()


def test_layer_names_per_architecture():
    m, _ = random_model("llama")
    names = linear_layer_names(m)
    assert len(names) == 14 and names[0] == "model.layers.0.self_attn.q_proj" and "lm_head" not in names
    assert [n.rsplit(".", 1)[1] for n in names[:7]] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"]
    assert {n.rsplit(".", 1)[1] for n in linear_layer_names(random_model("opt")[0])} == \
        {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert linear_layer_names(m, quantize_lm_head=True)[-1] == "lm_head"
    m.lm_head.weight = m.model.embed_tokens.weight  # tied, as SmolLM2's
    with pytest.raises(ValueError, match="shares its weight"):
        linear_layer_names(m, quantize_lm_head=True)


def test_quantized_layers_follow_the_op_contract(llama):
    model, tok = llama
    q = quantize_model(model, tok, QuantConfig(bits=3, sparsity=0.45, **FAST), progress=False)
    assert list(q.layers) == linear_layer_names(model)
    for name, layer in q.layers.items():
        lin = model.get_submodule(name)
        N, K = lin.weight.shape
        assert layer.N == N and layer.K == K and layer.bits == 3
        assert layer.qweight.shape == reference.qweight_shape(N, K, 3) and layer.qweight.dtype == np.int32
        assert layer.lut.shape == (N, 8) and layer.lut.dtype == np.float16
        assert layer.sparse_indptr.shape == (N + 1,) and layer.sparse_values.dtype == np.float16
        assert layer.nnz == round(0.0045 * N * K)
        assert (layer.bias is None) == (lin.bias is None)  # the tiny llama has attention biases
        if lin.bias is not None:
            np.testing.assert_array_equal(layer.bias, lin.bias.detach().numpy().astype(np.float16))
    m = q.manifest
    assert m["method"] == "squeezellm" and m["bits"] == 3 and m["sparsity"] == 0.45 and m["sensitive"] == 0.05
    assert m["calibration"]["samples"] == 4 and m["calibration"]["seq_len"] == 48
    assert m["calibration"]["source"].startswith("stdlib")
    assert all(v["weighted_error"] > 0 and v["nnz"] > 0 for v in m["layers"].values())
    json.dumps(m)  # serialisable


def test_apply_to_model_uses_the_ops_weights(llama):
    model, tok = llama
    q = quantize_model(model, tok, QuantConfig(bits=4, sparsity=0.5, lut_dtype="float32", **FAST), progress=False)
    m2 = copy.deepcopy(model)
    apply_to_model(m2, q)
    for name, layer in q.layers.items():
        W = reference.dequantize(layer.qweight, layer.lut, layer.K, layer.bits, layer.sparse_indptr,
                                 layer.sparse_indices, layer.sparse_values)
        np.testing.assert_array_equal(m2.get_submodule(name).weight.detach().numpy(), W.astype(np.float32))
    other = copy.deepcopy(model)
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(8, 8)
    with pytest.raises(ValueError, match="weight is"):
        apply_to_model(other, q)


def test_deterministic_for_a_seed(llama):
    model, tok = llama
    cfg = QuantConfig(bits=3, sparsity=0.45, **FAST)
    a = quantize_model(model, tok, cfg, progress=False)
    b = quantize_model(model, tok, cfg, progress=False)
    _same(a, b)
    c = quantize_model(model, tok, QuantConfig(bits=3, sparsity=0.45, seed=1, **FAST), progress=False)
    assert c.manifest["calibration"]["windows_sha256"] != a.manifest["calibration"]["windows_sha256"]
    assert any(not np.array_equal(a.layers[n].lut, c.layers[n].lut) for n in a.layers)


def _kl_to_original(model, qmodel, tok):
    """Mean KL(original || quantized) of the next-token distributions on held-out windows."""
    quantized = copy.deepcopy(model)
    apply_to_model(quantized, qmodel)
    ids = torch.as_tensor(perplexity.eval_windows(tok, seq_len=64, max_windows=4))
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
        q = torch.log_softmax(quantized(input_ids=ids).logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_sparsity_improves_a_tiny_model(llama):
    model, tok = llama
    errs, kls = [], []
    for s in (0.0, 0.45, 2.0):
        q = quantize_model(model, tok, QuantConfig(bits=3, sparsity=s, **FAST), progress=False)
        errs.append(q.manifest["totals"]["weighted_error"])
        kls.append(_kl_to_original(model, q, tok))
    assert errs[0] > errs[1] > errs[2]
    assert kls[0] > kls[1] > kls[2] > 0


def test_squeezellm_beats_unweighted_and_rtn_in_weighted_error(llama):
    model, tok = llama
    err = {m: quantize_model(model, tok, QuantConfig(bits=3, method=m, sparsity=0.45, **FAST),
                             progress=False).manifest["totals"]["weighted_error"] for m in ("squeezellm", "kmeans", "rtn")}
    assert err["squeezellm"] < err["kmeans"] < err["rtn"]


def test_methods_without_fisher_skip_calibration(llama, monkeypatch):
    model, tok = llama

    def boom(*a, **k):
        raise AssertionError("calibration should not run")

    monkeypatch.setattr(quantizer.fisher_mod, "compute_fisher", boom)
    q = quantize_model(model, tok, QuantConfig(bits=4, method="rtn", lut_dtype="float32"), progress=False)
    assert q.manifest["calibration"] is None and q.manifest["totals"]["weighted_error"] is None
    for name, layer in q.layers.items():  # RTN: evenly spaced tables from the row's min to its max
        W = model.get_submodule(name).weight.detach().numpy()
        steps = np.diff(layer.lut.astype(np.float64), axis=1)
        assert np.allclose(steps, steps[:, :1], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(layer.lut[:, 0], W.min(1), rtol=1e-6)
        np.testing.assert_allclose(layer.lut[:, -1], W.max(1), rtol=1e-6)


def test_checkpoint_roundtrip_and_errors(llama, tmp_path):
    model, tok = llama
    q = quantize_model(model, tok, QuantConfig(bits=4, sparsity=0.45, **FAST), progress=False)
    save_checkpoint(q, tmp_path / "ck")
    back = load_checkpoint(tmp_path / "ck")
    _same(q, back)
    assert back.manifest["layers"].keys() == q.layers.keys()
    # corrupt weights
    data = (tmp_path / "ck" / "model.safetensors").read_bytes()
    (tmp_path / "ck" / "model.safetensors").write_bytes(data[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(data)
    # a manifest that disagrees with the tensors
    man = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    first = next(iter(man["layers"]))
    man["layers"][first]["K"] += 32
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="qweight"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_checkpoint(tmp_path)


def test_resume_after_an_interruption(llama, tmp_path, monkeypatch):
    model, tok = llama
    cfg = QuantConfig(bits=3, sparsity=0.45, **FAST)
    reference_run = quantize_model(model, tok, cfg, progress=False)

    real = quantizer.quantize_weight
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(quantizer, "quantize_weight", flaky)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, tok, cfg, checkpoint_dir=tmp_path, progress=False)
    done = sorted(p.name for p in (tmp_path / "partial" / "layers").iterdir())
    assert len(done) == 5 and (tmp_path / "partial" / "fisher.safetensors").is_file()
    assert not any(p.name.endswith(".tmp") or ".tmp" in p.name for p in (tmp_path / "partial" / "layers").iterdir())
    with pytest.raises(CheckpointError, match="unfinished run"):
        load_checkpoint(tmp_path)

    # a different configuration in the same folder is refused
    monkeypatch.setattr(quantizer, "quantize_weight", real)
    with pytest.raises(CheckpointError, match="different settings.*bits"):
        quantize_model(model, tok, QuantConfig(bits=4, sparsity=0.45, **FAST), checkpoint_dir=tmp_path, progress=False)

    # the rerun neither recomputes the Fisher nor the finished layers
    def no_fisher(*a, **k):
        raise AssertionError("the Fisher should come from the checkpoint folder")

    monkeypatch.setattr(quantizer.fisher_mod, "compute_fisher", no_fisher)
    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(quantizer, "quantize_weight", counting)
    resumed = quantize_model(model, tok, cfg, checkpoint_dir=tmp_path, progress=False)
    assert counted["n"] == len(reference_run.layers) - 5
    assert resumed.manifest["timing"]["resumed_layers"] == 5
    _same(resumed, reference_run)
    assert not (tmp_path / "partial").exists() and (tmp_path / "manifest.json").is_file()
    _same(load_checkpoint(tmp_path), reference_run)
    # finished: a rerun loads it; another config is refused
    assert quantize_model(model, tok, cfg, checkpoint_dir=tmp_path, progress=False).manifest["layers"].keys() == \
        reference_run.layers.keys()
    with pytest.raises(CheckpointError, match="different settings"):
        quantize_model(model, tok, QuantConfig(bits=3, sparsity=0.0, **FAST), checkpoint_dir=tmp_path, progress=False)


def test_fisher_cache_is_reused_and_checked(llama, tmp_path, monkeypatch):
    model, tok = llama
    cache = tmp_path / "fisher.safetensors"
    a = quantize_model(model, tok, QuantConfig(bits=3, **FAST), progress=False, fisher_cache=cache)
    assert cache.is_file()
    monkeypatch.setattr(quantizer.fisher_mod, "compute_fisher",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    b = quantize_model(model, tok, QuantConfig(bits=3, **FAST), progress=False, fisher_cache=cache)
    _same(a, b)
    with pytest.raises(ValueError, match="computed for"):
        quantize_model(model, tok, QuantConfig(bits=3, calib_samples=5, calib_seq_len=48), progress=False,
                       fisher_cache=cache)


@pytest.mark.parametrize("arch", ["opt", "qwen2", "mistral"])
def test_other_architectures(arch):
    model, tok = _model(arch)
    q = quantize_model(model, tok, QuantConfig(bits=4, sparsity=0.45, method="kmeans", sensitive=0.0),
                       progress=False)
    assert list(q.layers) == linear_layer_names(model)
    apply_to_model(model, q)


def test_fisher_is_a_sum_of_squared_per_sample_gradients():
    from sqllm_onnx.quantize.fisher import compute_fisher

    model, _ = random_model("llama")
    rng = np.random.default_rng(0)
    windows = rng.integers(3, 500, size=(3, 16))
    name = "model.layers.1.mlp.down_proj"
    F = compute_fisher(model, windows, [name], progress=False)[name]
    expected = torch.zeros_like(F)
    w = model.get_submodule(name).weight
    for row in windows:
        ids = torch.as_tensor(row[None])
        g, = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, [w])
        expected += g.float() ** 2
    torch.testing.assert_close(F, expected, rtol=1e-5, atol=1e-12)
    assert not any(p.requires_grad is False for p in model.parameters())  # flags restored
    assert all(p.grad is None for p in model.parameters())


def test_format_version_1_checkpoint_is_repacked(llama, tmp_path):
    """Checkpoints of format version 1 hold 3-bit qweight in code layout 1 (an LSB-first stream):
    they load into the current layout, so exports from them compute the same layer."""
    from sqllm_onnx.quantize.checkpoint import save_arrays_atomic, sha256_file

    model, tok = llama
    q = quantize_model(model, tok, QuantConfig(bits=3, sparsity=0.45, **FAST), progress=False)
    save_checkpoint(q, tmp_path / "ck")
    folder = tmp_path / "ck"
    man = json.loads((folder / "manifest.json").read_text())
    arrays = {}
    for name, layer in q.layers.items():
        codes = reference.unpack_codes(layer.qweight, layer.K, 3, layer.N)
        for key, value in {"qweight": reference.pack_codes(codes, 3, code_layout=1), "lut": layer.lut,
                           "sparse_indptr": layer.sparse_indptr, "sparse_indices": layer.sparse_indices,
                           "sparse_values": layer.sparse_values, "bias": layer.bias}.items():
            if value is not None:
                arrays[f"{name}.{key}"] = value
    save_arrays_atomic(folder / "model.safetensors", arrays, {"format": man["format"]})
    man["format_version"] = 1
    man["files"]["model.safetensors"] = {"sha256": sha256_file(folder / "model.safetensors"),
                                         "bytes": (folder / "model.safetensors").stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(man))
    _same(q, load_checkpoint(folder))

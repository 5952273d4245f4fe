"""Export tiny random models of every supported architecture and run them in ONNX Runtime (CPU).

Per architecture: quantize to a checkpoint, export from it, then compare the exported graph with
the torch model carrying the same dequantized weights: logits (fp32, max abs difference <= 1e-3
of the logit scale), 20 greedy tokens, and ORTModelForCausalLM.generate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import sqllm_onnx
from sqllm_onnx import models
from sqllm_onnx.export import configs
from sqllm_onnx.export.exporter import ExportError, export
from sqllm_onnx.quantize import QuantConfig, apply_to_model, load_checkpoint, quantize_model, save_checkpoint
from sqllm_onnx.runtime.session import Decoder, greedy_generate, open_session

ARCHS = ["llama", "mistral", "qwen2", "opt"]
SMALL_CALIB = dict(calib_samples=4, calib_seq_len=32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (export dir, model dir, checkpoint dir); built once for the module."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for i, arch in enumerate(ARCHS):
        model, tokenizer = models.random_model(arch, seed=i)
        model_dir = root / f"{arch}-model"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        config = QuantConfig(bits=3 if i % 2 == 0 else 4, sparsity=0.45, lut_dtype="float32", **SMALL_CALIB)
        qmodel = quantize_model(model, tokenizer, config, progress=False)
        ckpt = root / f"{arch}-q"
        save_checkpoint(qmodel, ckpt)
        export_dir = export(root / f"{arch}-onnx", config, str(model_dir), dtype="fp32", from_checkpoint=ckpt,
                            progress=False, log=lambda *a: None)
        out[arch] = (export_dir, model_dir, ckpt)
    return out


def reference_model(model_dir, ckpt):
    model, _ = models.load_model(str(model_dir))
    apply_to_model(model, load_checkpoint(ckpt))
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_export_folder_contents(exported, arch):
    export_dir, _, ckpt = exported[arch]
    for name in ("model.onnx", "config.json", "generation_config.json", "tokenizer.json", configs.GENAI_CONFIG,
                 configs.MANIFEST, configs.LIBRARY_COPY):
        assert (export_dir / name).is_file(), name
    proto = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    assert proto.ir_version <= 10
    assert ("sqllm", 1) in [(o.domain, o.version) for o in proto.opset_import]
    squeeze = [n for n in proto.graph.node if n.op_type == "SqueezeMatMul"]
    fused = json.loads((export_dir / configs.MANIFEST).read_text())["graph"].get("fused_projections", {})
    assert len(squeeze) == len(load_checkpoint(ckpt).layers) - sum(len(parts) - 1 for parts in fused.values())
    inits = {t.name for t in proto.graph.initializer}
    for node in squeeze:  # packed tensors (and the CSR) are plain initializers
        assert all(name in inits for name in node.input[1:] if name)
    assert not proto.graph.sparse_initializer
    io = [i.name for i in proto.graph.input] + [o.name for o in proto.graph.output]
    assert {"input_ids", "attention_mask", "logits", "past_key_values.0.key", "present.0.value"} <= set(io)
    genai = json.loads((export_dir / configs.GENAI_CONFIG).read_text())
    assert genai["model"]["decoder"]["session_options"]["custom_ops_library"]
    manifest = json.loads((export_dir / configs.MANIFEST).read_text())
    assert manifest["quantization"]["bits"] in (3, 4) and manifest["sqllm_onnx_version"] == sqllm_onnx.__version__
    assert manifest["validation"]["max_abs_diff"] <= 1e-3 * manifest["validation"]["logit_scale"]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_torch_with_dequantized_weights(exported, arch):
    export_dir, model_dir, ckpt = exported[arch]
    model = reference_model(model_dir, ckpt)
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, size=24)
    decoder = Decoder(open_session(export_dir))
    onnx_logits = np.concatenate([decoder.step(ids[:10]), decoder.step(ids[10:11]), decoder.step(ids[11:])])
    with torch.no_grad():
        torch_logits = model(input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()
    scale = np.abs(torch_logits).max()
    assert np.abs(onnx_logits - torch_logits).max() <= 1e-3 * scale


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_match_torch(exported, arch):
    export_dir, model_dir, ckpt = exported[arch]
    model = reference_model(model_dir, ckpt)
    prompt = [1, 17, 29, 41, 53]
    onnx_tokens = greedy_generate(Decoder(open_session(export_dir)), prompt, 20)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                             eos_token_id=None, pad_token_id=0)
    assert onnx_tokens == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_ort_model_for_causal_lm_generates(exported, arch):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    export_dir, _, _ = exported[arch]
    so = sqllm_onnx.register(ort.SessionOptions())
    model = ORTModelForCausalLM.from_pretrained(export_dir, session_options=so, provider="CPUExecutionProvider")
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    inputs = tokenizer("The class of an object is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 8


def test_export_refuses_existing_folder_and_leaves_no_partial(tmp_path, exported):
    _, model_dir, ckpt = exported["llama"]
    config = QuantConfig(bits=3, sparsity=0.45, lut_dtype="float32", **SMALL_CALIB)
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export(target, config, str(model_dir), dtype="fp32", from_checkpoint=ckpt, log=lambda *a: None)
    # A checkpoint of another model fails before anything is written, and nothing is left behind.
    other_dir = tmp_path / "other-model"
    m, t = models.random_model("opt")
    m.save_pretrained(other_dir)
    t.save_pretrained(other_dir)
    with pytest.raises(ExportError, match="checkpoint"):
        export(tmp_path / "mismatch", config, str(other_dir), dtype="fp32", from_checkpoint=ckpt, log=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-model", "out"]


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    """Mixtral: transformers has it, optimum-onnx 0.1.0 has no ONNX config for it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=64, num_local_experts=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mixtral")
    with pytest.raises(ValueError, match="unsupported architecture 'mixtral': optimum-onnx 0.1.0 exports .* only these "
                                         "decoder families: arcee, bloom, .*gpt2, .*qwen3, qwen3_moe"):
        models.load_model(str(tmp_path / "mixtral"))


def test_offline_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelNotAvailable, match="not available locally"):
        models.load_model("sqllm-onnx-tests/no-such-model")

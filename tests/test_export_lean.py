"""The lean graph style (sqllm_onnx/export/lean_graph.py) on tiny random models, ORT CPU.

Per architecture (llama with q/k/v/o biases, mistral with a sliding window shorter than the test
sequences, qwen2 with q/k/v biases and one sliding-window layer after a full-attention one), an
unquantized fp32 export in both styles: the lean graph is a handful of fused nodes per layer and
keeps Optimum's I/O contract; its logits match the torch model (max abs difference <= 1e-3 of the
logit scale) for a prompt and for incremental steps with the KV cache; 20 greedy tokens match
torch's generate; ORTModelForCausalLM generates the same tokens as torch. Plus: fp16 (GroupQueryAttention
fp16 on CPU), a quantized lean export when the quantizer is importable, style resolution, refusals."""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import sqllm_onnx
from sqllm_onnx import models
from sqllm_onnx.export import configs, lean_graph
from sqllm_onnx.export.exporter import ExportError, export
from sqllm_onnx.runtime.session import Decoder, greedy_generate, open_session

ARCHS = ["llama", "mistral", "qwen2"]
WINDOW = 8  # shorter than the 24-token test sequences, so the sliding window matters
MAX_NODES_PER_LAYER = 20
FIXED_NODES = 12  # embedding, seqlens_k/total_sequence_length (6), final norm, lm_head, slack
QUANTIZER = importlib.util.find_spec("sqllm_onnx.quantize") is not None
quiet = dict(progress=False, log=lambda *a: None)


def tiny_model(arch: str, seed: int):
    from transformers import AutoModelForCausalLM

    config = models.random_config(arch)
    if arch == "mistral":
        config.sliding_window = WINDOW
    if arch == "qwen2":  # layer 0 full attention, layer 1 a sliding window
        config.use_sliding_window, config.sliding_window, config.max_window_layers = True, WINDOW, 1
        config.layer_types = ["full_attention", "sliding_attention"]
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval(), models.simple_tokenizer(config.vocab_size)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> {"model": dir, "lean": export dir, "plain": export dir}; built once for the module."""
    root = tmp_path_factory.mktemp("lean")
    out = {}
    for i, arch in enumerate(ARCHS):
        model, tokenizer = tiny_model(arch, seed=i)
        model_dir = root / f"{arch}-model"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        out[arch] = {"model": model_dir}
        for style in lean_graph.GRAPH_STYLES:
            out[arch][style] = export(root / f"{arch}-{style}", None, str(model_dir), dtype="fp32", graph=style,
                                      **quiet)
    return out


def op_counts(export_dir) -> Counter:
    proto = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    return Counter(n.op_type for n in proto.graph.node)


def non_constant(ops: Counter) -> int:
    return sum(n for op, n in ops.items() if op != "Constant")


def incremental_logits(export_dir, ids):
    decoder = Decoder(open_session(export_dir))
    return np.concatenate([decoder.step(ids[:10]), decoder.step(ids[10:11]), decoder.step(ids[11:])])


def torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.asarray(ids))[None]).logits[0].float().numpy()


TEST_IDS = np.random.default_rng(0).integers(3, 512, size=24)


@pytest.mark.parametrize("arch", ARCHS)
def test_lean_graph_is_small_and_fused(exported, arch):
    lean, plain = op_counts(exported[arch]["lean"]), op_counts(exported[arch]["plain"])
    layers = models.random_config(arch).num_hidden_layers
    assert lean["GroupQueryAttention"] == layers
    assert lean["SkipSimplifiedLayerNormalization"] == 2 * layers  # + 1 SimplifiedLayerNormalization (layer 0)
    assert lean["SimplifiedLayerNormalization"] == 1
    assert non_constant(lean) <= MAX_NODES_PER_LAYER * layers + FIXED_NODES, lean
    # Nothing of the primitive attention, norm, rotary or mask construction is left.
    for op in ("Softmax", "Pow", "ReduceMean", "Sqrt", "Cos", "Sin", "Range", "Where", "Expand", "Transpose",
               "Reshape", "Concat", "Unsqueeze"):
        assert op not in lean, op
    assert non_constant(plain) > 5 * non_constant(lean)


@pytest.mark.parametrize("arch", ARCHS)
def test_lean_graph_keeps_the_io_contract(exported, arch):
    def io(export_dir):
        proto = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
        def describe(values):
            return [(v.name, v.type.tensor_type.elem_type,
                     [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]
        return describe(proto.graph.input), describe(proto.graph.output)

    lean, plain = exported[arch]["lean"], exported[arch]["plain"]
    assert io(lean) == io(plain)
    assert [i[0] for i in io(lean)[0]][:3] == ["input_ids", "attention_mask", "position_ids"]
    # Shapes at run time: present = past + new, [batch, kv_heads, length, head_dim].
    decoder = Decoder(open_session(lean))
    decoder.step(TEST_IDS[:5])
    decoder.step(TEST_IDS[5:7])
    config = models.random_config(arch)
    for value in decoder.cache.values():
        assert value.shape == (1, config.num_key_value_heads, 7, config.hidden_size // config.num_attention_heads)
        assert value.dtype == np.float32
    manifest = json.loads((lean / configs.MANIFEST).read_text())
    assert manifest["graph_style"] == "lean"
    assert json.loads((plain / configs.MANIFEST).read_text())["graph_style"] == "plain"
    assert manifest["validation"]["max_abs_diff"] <= 1e-3 * manifest["validation"]["logit_scale"]
    genai = json.loads((lean / configs.GENAI_CONFIG).read_text())
    assert genai["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"


@pytest.mark.parametrize("arch", ARCHS)
def test_lean_logits_match_torch_with_kv_cache(exported, arch):
    model, _ = models.load_model(str(exported[arch]["model"]))
    expected = torch_logits(model, TEST_IDS)
    scale = np.abs(expected).max()
    for style in lean_graph.GRAPH_STYLES:
        got = incremental_logits(exported[arch][style], TEST_IDS)
        assert np.abs(got - expected).max() <= 1e-3 * scale, style


@pytest.mark.parametrize("arch", ARCHS)
def test_lean_unpadded_batch_matches_torch(exported, arch):
    """Batch 2 without padding: a prompt, then one token per row with the cache."""
    from sqllm_onnx.export.exporter import decoder_feeds

    session = open_session(exported[arch]["lean"])
    ids = np.stack([TEST_IDS[:12], TEST_IDS[12:]])
    feeds = decoder_feeds(session, ids[:, :11])
    outputs = session.run(None, feeds)
    names = [o.name for o in session.get_outputs()]
    step = {"input_ids": ids[:, 11:], "attention_mask": np.ones((2, 12), np.int64),
            "position_ids": np.full((2, 1), 11, np.int64)}
    step.update({n.replace("present.", "past_key_values."): v for n, v in zip(names, outputs) if n != "logits"})
    last = session.run(["logits"], step)[0]
    got = np.concatenate([outputs[names.index("logits")], last], axis=1)
    model, _ = models.load_model(str(exported[arch]["model"]))
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()


def test_the_sliding_windows_are_exercised(exported):
    """The windowed test models differ from full attention on the test sequence, so the lean graph's
    local_window_size is really checked by the logits test."""
    from transformers import AutoModelForCausalLM

    for arch in ("mistral", "qwen2"):
        model, _ = models.load_model(str(exported[arch]["model"]))
        config = model.config.__class__.from_dict(model.config.to_dict())
        config.sliding_window, config.use_sliding_window = None, False
        config.layer_types = ["full_attention"] * config.num_hidden_layers
        full = AutoModelForCausalLM.from_config(config).eval()
        full.load_state_dict(model.state_dict())
        assert np.abs(torch_logits(full, TEST_IDS) - torch_logits(model, TEST_IDS)).max() > 1e-3, arch


@pytest.mark.parametrize("arch", ARCHS)
def test_lean_greedy_tokens_match_torch(exported, arch):
    model, _ = models.load_model(str(exported[arch]["model"]))
    prompt = [1, 17, 29, 41, 53]
    onnx_tokens = greedy_generate(Decoder(open_session(exported[arch]["lean"])), prompt, 20)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                             eos_token_id=None, pad_token_id=0)
    assert onnx_tokens == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_lean_ort_model_for_causal_lm_generates(exported, arch):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    export_dir = exported[arch]["lean"]
    so = sqllm_onnx.register(ort.SessionOptions())
    ort_model = ORTModelForCausalLM.from_pretrained(export_dir, session_options=so, provider="CPUExecutionProvider")
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    inputs = tokenizer("The class of an object is", return_tensors="pt")
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    out = ort_model.generate(**inputs, **kwargs)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 8
    model, _ = models.load_model(str(exported[arch]["model"]))
    with torch.no_grad():
        assert out.tolist() == model.generate(**inputs, **kwargs).tolist()


def test_lean_fp16_runs_on_cpu(exported, tmp_path):
    """GroupQueryAttention and the fused norms in float16 on the CPU EP (looser tolerance)."""
    export_dir = export(tmp_path / "llama-fp16", None, str(exported["llama"]["model"]), dtype="fp16", graph="lean",
                        **quiet)
    assert Decoder(open_session(export_dir)).float_type == np.float16
    got = incremental_logits(export_dir, TEST_IDS)
    model, _ = models.load_model(str(exported["llama"]["model"]))
    expected = torch_logits(model, TEST_IDS)
    assert np.abs(got - expected).max() <= 2e-2 * np.abs(expected).max()
    proto = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    caches = {t.name: t.data_type for t in proto.graph.initializer if "cos_cache" in t.name or "sin_cache" in t.name}
    assert set(caches.values()) == {onnx.TensorProto.FLOAT16}


@pytest.mark.skipif(not QUANTIZER, reason="sqllm_onnx.quantize is not importable")
def test_lean_quantized_export_matches_dequantized_torch(exported, tmp_path):
    from sqllm_onnx.quantize import QuantConfig, apply_to_model, load_checkpoint, quantize_model, save_checkpoint

    model_dir = exported["llama"]["model"]
    model, tokenizer = models.load_model(str(model_dir))
    config = QuantConfig(bits=3, sparsity=0.45, lut_dtype="float32", calib_samples=4, calib_seq_len=32)
    qmodel = quantize_model(model, tokenizer, config, progress=False)
    ckpt = tmp_path / "llama-q"
    save_checkpoint(qmodel, ckpt)
    export_dir = export(tmp_path / "llama-q-lean", config, str(model_dir), dtype="fp32", from_checkpoint=ckpt,
                        graph="lean", **quiet)
    ops = op_counts(export_dir)
    # q/k/v of each of the 2 layers are one fused SqueezeMatMul (and a Split)
    assert ops["SqueezeMatMul"] == len(load_checkpoint(ckpt).layers) - 2 * 2 and ops["GroupQueryAttention"] == 2
    manifest = json.loads((export_dir / configs.MANIFEST).read_text())
    assert len(manifest["graph"]["fused_projections"]) == 2
    reference, _ = models.load_model(str(model_dir))
    apply_to_model(reference, load_checkpoint(ckpt))
    expected = torch_logits(reference, TEST_IDS)
    got = incremental_logits(export_dir, TEST_IDS)
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()
    # the fused export computes what three separate nodes do: against the plain graph's logits
    plain = export(tmp_path / "llama-q-plain", config, str(model_dir), dtype="fp32", from_checkpoint=ckpt,
                   graph="plain", **quiet)
    assert op_counts(plain)["SqueezeMatMul"] == len(load_checkpoint(ckpt).layers)
    unfused = incremental_logits(plain, TEST_IDS)
    assert np.abs(got - unfused).max() <= 1e-4 * np.abs(unfused).max()


def test_concat_rows_is_the_layers_side_by_side():
    """concat_rows stacks layers along N (tiles as they are, or repacked when an N is not a multiple of
    16), with CSR offsets and bias: the stacked op computes the separate ones' outputs."""
    from sqllm_onnx import reference as ref
    from sqllm_onnx.export.squeeze_linear import concat_rows

    from conftest import random_layer

    rng = np.random.default_rng(3)
    A = rng.standard_normal((3, 100)).astype(np.float32)
    for Ns in ((32, 16, 16), (40, 8, 24), (16, 20, 16)):
        parts = [random_layer(rng, 100, n, 3, sparse=i != 1, bias=i == 2) for i, n in enumerate(Ns)]
        fused = concat_rows(parts)
        assert fused.N == sum(Ns) and fused.qweight.shape == ref.qweight_shape(sum(Ns), 100, 3)
        got = ref.squeeze_matmul(A, fused.qweight, fused.lut, fused.sparse_indptr, fused.sparse_indices,
                                 fused.sparse_values, fused.bias, K=100, N=fused.N, bits=3)
        want = np.concatenate([ref.squeeze_matmul(A, p.qweight, p.lut, p.sparse_indptr, p.sparse_indices,
                                                  p.sparse_values, p.bias, K=100, N=p.N, bits=3) for p in parts], axis=1)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="differ"):
        concat_rows([random_layer(rng, 100, 16, 3), random_layer(rng, 100, 16, 4)])


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_torch_model_matches_and_is_restored(arch):
    """The fused ops' torch forwards reproduce the model (what tracing sees), with and without a
    cache, and leaving the context restores the model exactly."""
    from transformers.cache_utils import DynamicCache

    model, _ = tiny_model(arch, seed=3)
    ids = torch.from_numpy(TEST_IDS)[None]
    state = set(model.state_dict())
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with lean_graph.patched(model):
            full = model(input_ids=ids, use_cache=False).logits
            cache = DynamicCache()
            steps = [model(input_ids=part, past_key_values=cache, use_cache=True).logits
                     for part in (ids[:, :10], ids[:, 10:11], ids[:, 11:])]
        after = model(input_ids=ids).logits
    assert (full - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (torch.cat(steps, 1) - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.equal(after, expected) and set(model.state_dict()) == state
    assert "forward" not in model.model.__dict__


def test_graph_style_resolution_and_refusals(tmp_path):
    llama, _ = models.random_model("llama")
    assert lean_graph.resolve_style(llama, None) == ("lean", None)
    assert lean_graph.resolve_style(llama, "plain") == ("plain", None)
    opt, tokenizer = models.random_model("opt")
    style, note = lean_graph.resolve_style(opt, None)
    assert style == "plain" and "opt" in note
    with pytest.raises(lean_graph.LeanGraphUnsupported, match="opt"):
        lean_graph.resolve_style(opt, "lean")
    # A rope type that depends on the sequence length: plain by default, an error when lean is asked.
    config = models.random_config("llama")
    config.rope_scaling = {"rope_type": "dynamic", "factor": 2.0}
    from transformers import AutoModelForCausalLM

    dynamic = AutoModelForCausalLM.from_config(config).eval()
    style, note = lean_graph.resolve_style(dynamic, None)
    assert style == "plain" and "dynamic" in note
    with pytest.raises(lean_graph.LeanGraphUnsupported, match="dynamic"):
        lean_graph.check(dynamic)
    # Through export: explicit lean on OPT fails before anything is written; a bad style name too.
    opt.save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    with pytest.raises(ExportError, match="lean"):
        export(tmp_path / "opt-lean", None, str(tmp_path / "opt"), dtype="fp32", graph="lean", **quiet)
    with pytest.raises(ExportError, match="graph must be one of"):
        export(tmp_path / "bad", None, str(tmp_path / "opt"), dtype="fp32", graph="fused", **quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt"]


def test_cli_graph_flag():
    from sqllm_onnx.export import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert parser.parse_args(["--out", "x"]).graph is None
    assert parser.parse_args(["--out", "x", "--graph", "plain"]).graph == "plain"
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--graph", "fused"])

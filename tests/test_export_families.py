"""Every decoder family (sqllm_onnx.families) through `sqllm-onnx export`, on tiny random models (hidden
64, 2 layers) saved to a folder with a tokenizer, ORT CPU, fp32, 0.45 % sparse:

- every linear the discovery finds in the decoder blocks (routers aside) is one SqueezeMatMul node,
  read back from the graph by its initializer names;
- ORT's logits (a prompt, then single tokens through the KV cache) match the float model carrying
  the weights the graph's packed tensors dequantize to (max abs difference <= 1e-3 of the logit scale);
- at 4 bits (a few families) the logits stay close to the float model's, and much closer than at 3 bits.
Plus: MoE experts whose calibration saw too few tokens fall back to uniform sensitivity, and the
families that cannot be quantized or exported are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from sqllm_onnx import cli, families, models, reference
from sqllm_onnx.export import configs, lean_graph
from sqllm_onnx.quantize.targets import linear_layer_names
from sqllm_onnx.runtime.session import Decoder, open_session

QUANTIZABLE = [f for f in families.FAMILIES if f != "gpt_oss"]  # gpt_oss: fused 3-D experts, refused below
FOUR_BITS = QUANTIZABLE  # every family, at 3 and 4 bits
CALIB = ["--calib-samples", "4", "--calib-seq-len", "32"]
IDS = np.random.default_rng(0).integers(3, 512, size=24)


def run_cli(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out + out.err + (rc if isinstance(rc, str) else "")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    made = {}

    def get(family):
        if family not in made:
            model, tokenizer = models.random_model(family, seed=families.FAMILIES.index(family))
            folder = root / family
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            made[family] = folder
        return made[family]

    return get


def export_cli(model_dir, out, bits, capsys, *extra):
    rc, text = run_cli(["export", "--model", str(model_dir), "--bits", str(bits), "--sparsity", "0.45",
                        "--dtype", "fp32", *CALIB, "--out", str(out), *extra], capsys)
    assert rc == 0, text
    return out


def graph_weights(export_dir) -> dict:
    """layer name -> W [N, K] float64 that its SqueezeMatMul node computes with (from the initializers;
    a node of fused q/k/v projections, per the manifest's fused_projections, gives the three's rows)."""
    fused = json.loads((export_dir / configs.MANIFEST).read_text())["graph"].get("fused_projections", {})
    proto = onnx.load(str(export_dir / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    weights = {}
    for node in proto.graph.node:
        if node.op_type != "SqueezeMatMul":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        inputs = [inits.get(name) if name else None for name in node.input] + [None] * 7
        qweight, lut, indptr, indices, values = inputs[1:6]
        name = node.input[1][: -len(".qweight")]
        W = reference.dequantize(qweight, lut, attrs["K"], attrs["bits"], indptr, indices, values)
        if name in fused:
            starts = np.cumsum([0] + [n for _, n in fused[name]])
            weights.update({part: W[a:b] for (part, _), a, b in zip(fused[name], starts[:-1], starts[1:])})
        else:
            weights[name] = W
    return weights


def float_model(model_dir):
    model, _ = models.load_model(str(model_dir))
    return model


def with_weights(model, weights):
    with torch.no_grad():
        for name, W in weights.items():
            module = model.get_submodule(name)
            module.weight.copy_(torch.from_numpy(W).to(module.weight.dtype))
    return model


def torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(IDS)[None], use_cache=False).logits[0].double().numpy()


def ort_logits(export_dir):
    decoder = Decoder(open_session(export_dir))
    return np.concatenate([decoder.step(IDS[:10]), decoder.step(IDS[10:11]), decoder.step(IDS[11:])]).astype(np.float64)


@pytest.mark.parametrize("family", QUANTIZABLE)
def test_family_exports_3bit_and_matches_torch(family, model_dirs, tmp_path, capsys):
    model_dir = model_dirs(family)
    out = export_cli(model_dir, tmp_path / "out", 3, capsys)
    model = float_model(model_dir)
    discovered = linear_layer_names(model)
    weights = graph_weights(out)
    assert sorted(weights) == sorted(discovered)  # every decoder-block linear, and nothing else
    assert not any(name.endswith((".mlp.gate", "router")) for name in weights)
    expected = torch_logits(with_weights(model, weights))
    got = ort_logits(out)
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()
    manifest = json.loads((out / configs.MANIFEST).read_text())
    fused = manifest["graph"].get("fused_projections", {})
    assert manifest["quantization"]["bits"] == 3
    assert manifest["graph"]["squeeze_matmul_nodes"] == len(discovered) - 2 * len(fused)
    lean = family in lean_graph.ARCHITECTURES
    assert manifest["graph_style"] == ("lean" if lean else "plain")
    if lean:  # one fused attention per layer
        ops = [n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]
        assert ops.count("GroupQueryAttention") == model.config.num_hidden_layers
    genai = json.loads((out / configs.GENAI_CONFIG).read_text())
    assert genai["model"]["type"] == families.genai_type(family)


@pytest.mark.parametrize("family", FOUR_BITS)
def test_family_4bit_stays_close_to_the_float_model(family, model_dirs, tmp_path, capsys):
    model_dir = model_dirs(family)
    errors = {}
    for bits in (3, 4):
        out = export_cli(model_dir, tmp_path / f"b{bits}", bits, capsys)
        if bits == 4:  # the graph against torch with its weights, as at 3 bits
            expected = torch_logits(with_weights(float_model(model_dir), graph_weights(out)))
            got = ort_logits(out)
            assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()
        reference_logits = torch_logits(float_model(model_dir))
        errors[bits] = np.linalg.norm(ort_logits(out) - reference_logits) / np.linalg.norm(reference_logits)
    # relative Frobenius error of the logits; tiny random models are far more fragile than trained ones
    # (measured 2026-12-03 on qwen3, gemma3_text, phi3, gpt2, falcon, qwen3_moe: 0.09-0.25 at 4 bits,
    # 0.2-0.53 at 3 bits; all 31 families pass)
    assert errors[4] < 0.3 and errors[4] < 0.6 * errors[3], errors


class RouteToFirstTwo(torch.nn.Module):
    """A router that sends every token to experts 0 and 1 (top-2 of 4)."""

    def forward(self, x):
        return torch.tensor([5.0, 4.0, -5.0, -5.0], dtype=x.dtype).expand(x.shape[0], 4)


def moe_with_starved_experts():
    model, tokenizer = models.random_model("qwen3_moe")
    for layer in model.model.layers:
        layer.mlp.gate = RouteToFirstTwo()
    return model, tokenizer


def test_starved_experts_fall_back_to_uniform_sensitivity():
    """Experts 2 and 3 see no calibration token, so their Fisher is dropped (unweighted k-means,
    magnitude outliers only) while the experts that were reached keep Fisher-ranked sensitive values."""
    from sqllm_onnx.quantize import QuantConfig, quantize_model

    model, tokenizer = moe_with_starved_experts()
    q = quantize_model(model, tokenizer, QuantConfig(bits=3, sparsity=0.45, calib_samples=4, calib_seq_len=32),
                       progress=False)
    stats = q.manifest["layers"]
    for name, st in stats.items():
        starved = ".experts.2." in name or ".experts.3." in name
        assert st["fisher_fallback"] == starved, name
        if starved:
            assert st["sensitive"] == 0 and st["outliers"] == st["nnz"] > 0 and st["weighted_error"] is None
        else:
            assert st["sensitive"] > 0 and st["weighted_error"] is not None
    assert q.manifest["totals"]["fisher_fallback_layers"] == 2 * 2 * 3


def test_fisher_counts_tokens_and_zeroes_layers_below_the_floor():
    from sqllm_onnx.quantize import fisher

    model, _ = moe_with_starved_experts()
    names = linear_layer_names(model)
    windows = np.random.default_rng(0).integers(3, 512, size=(2, 16))
    F = fisher.compute_fisher(model, windows, names, progress=False)
    assert fisher.min_tokens(windows.size) == 16
    for name in names:
        reached = not (".experts.2." in name or ".experts.3." in name)
        assert bool(F[name].any()) == reached, name


def test_gpt_oss_fused_experts_are_refused_in_one_line_and_export_unquantized(model_dirs, tmp_path, capsys):
    model_dir = model_dirs("gpt_oss")
    rc, text = run_cli(["export", "--model", str(model_dir), "--bits", "3", "--dtype", "fp32", *CALIB,
                        "--out", str(tmp_path / "q")], capsys)
    assert rc not in (0, None) and "fused 3-D parameters" in text and "--method none" in text
    assert not (tmp_path / "q").exists()
    out = tmp_path / "fp32"
    rc, text = run_cli(["export", "--model", str(model_dir), "--method", "none", "--dtype", "fp32", "--out", str(out)],
                       capsys)
    assert rc == 0, text
    expected = torch_logits(float_model(model_dir))
    assert np.abs(ort_logits(out) - expected).max() <= 1e-3 * np.abs(expected).max()


def test_architectures_optimum_cannot_export_are_refused_naming_the_families(tmp_path, capsys):
    from transformers import AutoConfig

    AutoConfig.for_model("mixtral", hidden_size=64, num_hidden_layers=1).save_pretrained(tmp_path / "mixtral")
    rc, text = run_cli(["export", "--model", str(tmp_path / "mixtral"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 or rc not in (0, None)
    line = [t for t in text.splitlines() if "unsupported architecture 'mixtral'" in t]
    assert line and all(f in line[0] for f in ("qwen3", "gemma3_text", "phi3", "gpt2", "qwen3_moe"))


def test_sharded_folder_exports(model_dirs, tmp_path, capsys):
    """A folder saved in several safetensors shards with an index, as large hub models are."""
    model, tokenizer = models.random_model("qwen3", seed=5)
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    out = export_cli(folder, tmp_path / "out", 3, capsys)
    assert len(graph_weights(out)) == len(linear_layer_names(model))


def test_folder_without_tokenizer_needs_tokenizer_option(model_dirs, tmp_path, capsys):
    model, _ = models.random_model("gemma3_text", seed=6)
    folder = tmp_path / "no-tokenizer"
    model.save_pretrained(folder)
    rc, text = run_cli(["export", "--model", str(folder), "--out", str(tmp_path / "o")], capsys)
    assert rc not in (0, None) and "no tokenizer files" in text and "--tokenizer" in text
    out = export_cli(folder, tmp_path / "o", 3, capsys, "--tokenizer", str(model_dirs("llama")))
    assert (out / "tokenizer.json").is_file()


def write_tiny_llama_gguf(path, hidden=64, inter=176, layers=2, heads=4, kv_heads=2, vocab=512):
    """A float32 llama GGUF file without tokenizer metadata (gguf's own writer)."""
    import gguf

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    kv = kv_heads * hidden // heads
    matrix = lambda *shape: (rng.standard_normal(shape) * 0.02).astype(np.float32)  # noqa: E731
    ones = np.ones(hidden, np.float32)
    tensors = {"token_embd": matrix(vocab, hidden), "output_norm": ones, "output": matrix(vocab, hidden)}
    for i in range(layers):
        tensors.update({f"blk.{i}.{n}": a for n, a in (
            ("attn_q", matrix(hidden, hidden)), ("attn_k", matrix(kv, hidden)), ("attn_v", matrix(kv, hidden)),
            ("attn_output", matrix(hidden, hidden)), ("ffn_gate", matrix(inter, hidden)),
            ("ffn_up", matrix(inter, hidden)), ("ffn_down", matrix(hidden, inter)), ("attn_norm", ones),
            ("ffn_norm", ones))})
    for name, array in tensors.items():
        writer.add_tensor(f"{name}.weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_file_exports(model_dirs, tmp_path, capsys):
    """--model FILE.gguf through transformers' GGUF loader (tokenizer from --tokenizer: this file has none)."""
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf_file)
    out = export_cli(gguf_file, tmp_path / "o", 3, capsys, "--tokenizer", str(model_dirs("llama")))
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert json.loads((out / configs.MANIFEST).read_text())["graph"]["squeeze_matmul_nodes"] == 2 * 5  # q/k/v fused
    rc, text = run_cli(["export", "--model", str(gguf_file), "--out", str(tmp_path / "o2")], capsys)
    assert rc not in (0, None) and "--tokenizer" in text  # no tokenizer inside: one line, not a traceback
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    rc, text = run_cli(["export", "--model", str(bad), "--out", str(tmp_path / "o3")], capsys)
    assert rc not in (0, None) and "cannot read this GGUF file" in text


def test_short_names_cover_the_new_families():
    for short in ("llama3.1-8b", "llama3.2-1b", "qwen2.5-0.5b", "qwen3-0.6b", "gemma3-1b", "phi3-mini", "phi4-mini",
                  "mistral-7b", "qwen3-moe"):
        assert models.resolve(short) == models.SHORT_NAMES[short] and "/" in models.SHORT_NAMES[short]


def test_a_checkpoint_naming_a_router_is_refused():
    """Checkpoints (ours, imported SqueezeLLM .pt files) must name layers the discovery quantizes."""
    from sqllm_onnx.quantize import QuantConfig, apply_to_model, quantize_model

    model, tokenizer = models.random_model("qwen3_moe")
    q = quantize_model(model, tokenizer, QuantConfig(bits=3, method="rtn"), progress=False)
    layer = q.layers.pop("model.layers.0.mlp.experts.0.gate_proj")
    q.layers["model.layers.0.mlp.gate"] = layer  # a router has the shape of no expert: caught before shapes
    with pytest.raises(ValueError, match="not linear layers of this model's decoder blocks.*mlp.gate"):
        apply_to_model(model, q)


def assert_lean_export_matches_torch(model, tmp_path, capsys):
    """Save `model`, export it unquantized through the CLI: a lean graph whose logits match torch's."""
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    models.simple_tokenizer(model.config.vocab_size).save_pretrained(folder)
    out = tmp_path / "out"
    rc, text = run_cli(["export", "--model", str(folder), "--method", "none", "--dtype", "fp32", "--out", str(out)],
                       capsys)
    assert rc == 0, text
    assert json.loads((out / configs.MANIFEST).read_text())["graph_style"] == "lean"
    expected = torch_logits(float_model(folder))
    assert np.abs(ort_logits(out) - expected).max() <= 1e-3 * np.abs(expected).max()


def test_phi3_partial_rotary_lean_matches_torch(tmp_path, capsys):
    """Phi-4-mini's partial rotary (rotary on 3/4 of each head): GroupQueryAttention's cos/sin tables
    cover the rotated part only (here half of a 32-dim head: tables of 8 columns, ORT's minimum). A
    rotated part that GroupQueryAttention cannot take falls back to the plain graph."""
    from sqllm_onnx.export import lean_graph

    config = models.random_config("phi3")
    config.num_attention_heads, config.num_key_value_heads, config.partial_rotary_factor = 2, 1, 0.5
    from transformers import AutoModelForCausalLM

    assert_lean_export_matches_torch(AutoModelForCausalLM.from_config(config).eval(), tmp_path, capsys)
    config.num_attention_heads, config.num_key_value_heads = 4, 2  # 16-dim heads: 8 rotated dims
    style, note = lean_graph.resolve_style(AutoModelForCausalLM.from_config(config), None)
    assert style == "plain" and "multiple of 8" in note


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_lean_windows_softcap_and_local_rotary_match_torch(family, tmp_path, capsys):
    """Gemma's lean layers with what the tiny defaults leave unexercised: a sliding window shorter than
    the test sequence on alternate layers, Gemma 2's attention softcapping at a value that bends the
    scores, Gemma 3's second (local) rotary embedding on its sliding layers."""
    from transformers import AutoModelForCausalLM

    config = models.random_config(family)
    config.sliding_window = 8
    config.layer_types = ["sliding_attention", "full_attention"]
    if family == "gemma2":
        config.attn_logit_softcapping = 0.05
    model = AutoModelForCausalLM.from_config(config, **models.attention_kwargs(config)).eval()
    models.fill_random(model, seed=3, std=0.2)  # larger weights: scores beyond the softcap
    assert_lean_export_matches_torch(model, tmp_path, capsys)


def write_gemma_tokenizer_gguf(path):
    """A GGUF file of architecture gemma3 holding only a SentencePiece BPE tokenizer (scores = minus
    the merge rank): 4 control tokens, byte fallback pieces, and the pieces of "stat" and "tat"."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma3")
    control = ["<pad>", "<eos>", "<bos>", "<unk>"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    # "▁stat" merges last (score -50): BPE still reaches it from "▁st" + "at", while a Unigram model
    # over these scores would prefer the two short pieces (-2 - 5 > -50): the bug this rebuild fixes
    normal = {"▁": -100.0, "s": -101.0, "t": -102.0, "a": -103.0, "▁s": -1.0, "▁st": -2.0, "at": -5.0,
              "▁stat": -50.0}
    tokens = control + byte_pieces + list(normal)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(control) + [0.0] * 256 + list(normal.values()))
    writer.add_token_types([3] * len(control) + [6] * 256 + [1] * len(normal))
    writer.add_pad_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_bos_token_id(2)
    writer.add_unk_token_id(3)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def test_gemma_gguf_tokenizer_is_bpe(tmp_path):
    """Gemma's GGUF tokenizer is SentencePiece BPE, which transformers' converter turns into a Unigram
    model: models.gguf_tokenizer rebuilds it as BPE (merges ranked by score), so words segment as in
    the original ("stat" is one piece, not "▁st" "at")."""
    from sqllm_onnx import gguf_tokenizer

    path = tmp_path / "gemma3-tokenizer.gguf"
    write_gemma_tokenizer_gguf(path)
    assert gguf_tokenizer.needs_rebuild(path)
    tok = models.gguf_tokenizer(path, str(path))
    ids = tok("a stat")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "a", "▁stat"]  # Gemma: no dummy prefix
    assert tok.decode(ids, skip_special_tokens=True) == "a stat"
    assert tok.convert_ids_to_tokens(tok("z")["input_ids"]) == ["<bos>", "<0x7A>"]  # byte fallback
    llama = tmp_path / "llama.gguf"
    write_tiny_llama_gguf(llama)
    assert not gguf_tokenizer.needs_rebuild(llama)

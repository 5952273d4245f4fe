"""FineQuant (sqllm_onnx/finequant, sqllm_onnx/export/nbits_linear.py): the block-size heuristic,
the MatMulNBits tensors against ONNX Runtime's own kernel (CPU), and tiny exported models against
torch carrying the dequantized weights. CPU only, tiny random models, fast."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from sqllm_onnx import cli, models
from sqllm_onnx.export import configs
from sqllm_onnx.export.exporter import ExportError, export
from sqllm_onnx.export.nbits_linear import NBitsLinear, make_model, swap_in
from sqllm_onnx.finequant import FineQuantConfig, apply_to_model, quantize_model, target_layers
from sqllm_onnx.finequant.heuristic import choose_block_size, coarse_start
from sqllm_onnx.finequant.quantize import (dequantize, dequantize_torch, pack_codes, quantize_blocks, quantize_layer,
                                           unpack_codes)
from sqllm_onnx.runtime.session import Decoder, open_session

QUIET = dict(progress=False, log=lambda *a: None)


def planted(seed: int, frac: float, shape=(256, 1024), magnitude: float = 20.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(*shape, generator=g) * 0.02
    W[torch.rand(shape, generator=g) < frac] *= magnitude
    return W


# ---- the heuristic -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_planted_outliers_get_finer_blocks_and_gaussian_stays_coarse(bits, seed):
    clean = choose_block_size(planted(seed, 0.0), bits)
    assert clean.block_size == 128 and clean.start == 128
    for frac in (0.002, 0.01):  # 0.2 % and 1 % of the weights at 20 sigma
        choice = choose_block_size(planted(seed, frac), bits)
        assert choice.block_size == 32, (frac, choice)
        # each halving was taken because it cut the error by more than the threshold
        assert choice.errors[128] > 1.25 * choice.errors[64] and choice.errors[64] > 1.25 * choice.errors[32]


def test_outliers_confined_to_some_matrices_only_refine_those():
    config = FineQuantConfig(bits=4, scale_dtype="float32")
    model, _ = models.random_model("llama")
    with torch.no_grad():
        for i, name in enumerate(target_layers(model)):
            module = model.get_submodule(name)
            module.weight.copy_(planted(i, 0.01 if name.endswith("o_proj") else 0.0,
                                        tuple(module.weight.shape)))
    q = quantize_model(model, config)
    for name, stats in q.manifest["layers"].items():
        # hidden 64 and intermediate 176: both start at block 64 (176 = 2x64 + 48 padded beats 128 or 32)
        assert stats["start_block"] == 64
        assert stats["block_size"] == (32 if name.endswith("o_proj") else 64), (name, stats)
        assert stats["rel_error"] == pytest.approx(stats["errors_by_block"][str(stats["block_size"])], rel=1e-4)


def test_coarse_start_minimises_storage():
    blocks = [32, 64, 128]
    assert coarse_start(4096, 4, blocks) == 128
    assert coarse_start(1536, 4, blocks) == 128
    assert coarse_start(576, 4, blocks) == 64  # 128 would pad 576 to 640 values per row
    assert coarse_start(576, 8, blocks) == 64
    assert coarse_start(176, 4, blocks) == 64


def test_fixed_block_size_is_plain_rtn():
    model, _ = models.random_model("opt")
    q = quantize_model(model, FineQuantConfig(bits=8, block_size=16, scale_dtype="float32"))
    assert {s["block_size"] for s in q.manifest["layers"].values()} == {16}
    assert {s["choice"] for s in q.manifest["layers"].values()} == {"fixed"}
    assert q.manifest["block_size"] == 16 and q.manifest["method"] == "finequant"


@pytest.mark.parametrize("kwargs", [dict(bits=3), dict(bits=2), dict(block_size=48), dict(block_size=512),
                                    dict(min_block=64, max_block=32), dict(halving_gain=1.0),
                                    dict(scale_dtype="bfloat16"), dict(accuracy_level=7)])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        FineQuantConfig(**kwargs)


# ---- the MatMulNBits tensors ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_pack_roundtrip_and_nibble_order(bits):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1 << bits, size=(3, 5, 32), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 32 * bits // 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, 32), codes)
    if bits == 4:  # element 2i in the low nibble of byte i
        assert packed[0, 0, 0] == codes[0, 0, 0] | (codes[0, 0, 1] << 4)


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_error_is_within_half_a_step(bits):
    W = planted(3, 0.01, (40, 200))
    codes, scales, zeros = quantize_blocks(W, bits, 64)
    W_hat = torch.from_numpy(dequantize(pack_codes(codes.numpy(), bits), scales.numpy(),
                                        pack_codes(zeros.numpy(), bits), bits, 64, 200))
    step = scales.repeat_interleave(64, dim=1)[:, :200]
    assert torch.all((W_hat - W).abs() <= step / 2 + 1e-6)
    # the padded tail of the last block holds the zero point
    assert torch.all(codes[:, -1, 200 - 3 * 64:] == zeros[:, -1:])


def ort_dequantized(layer, dtype) -> np.ndarray:
    """W [N, K] as ORT's MatMulNBits computes it: Y = I @ W^T."""
    session = ort.InferenceSession(make_model(layer, dtype).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": np.eye(layer.K, dtype=dtype)})[0].T


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("K", [256, 200])  # 200: a partial last block
def test_ort_dequantizes_exactly_like_the_reference(bits, block_size, K):
    W = planted(block_size + K, 0.01, (24, K))
    layer = quantize_layer(W, bits, block_size, np.float32)
    ref = dequantize(layer.B, layer.scales, layer.zero_points, bits, block_size, K)
    np.testing.assert_array_equal(ort_dequantized(layer, np.float32), ref)
    torch_ref = dequantize_torch(*(torch.from_numpy(a) for a in (layer.B, layer.scales, layer.zero_points)),
                                 bits, block_size, K)
    np.testing.assert_array_equal(torch_ref.numpy(), ref)


@pytest.mark.parametrize("bits", [4, 8])
def test_ort_fp16_and_bias(bits):
    W = planted(7, 0.01, (16, 192))
    layer = quantize_layer(W, bits, 64, np.float16, bias=torch.randn(16))
    ref = layer.dequantize()
    # fp16 scales: ORT's fp16 kernel matches the reference to fp16 rounding of the outputs
    np.testing.assert_allclose(ort_dequantized(layer.astype(np.float16), np.float16) - layer.bias[:, None],
                               ref, atol=2e-3 * np.abs(ref).max())
    A = np.random.default_rng(1).standard_normal((5, 192)).astype(np.float32)
    session = ort.InferenceSession(make_model(layer, np.float32).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    y = session.run(None, {"A": A})[0]
    np.testing.assert_allclose(y, A @ ref.T + layer.bias.astype(np.float32), rtol=1e-5, atol=1e-5)


def test_nbits_linear_eager_matches_dequantized_linear():
    linear = torch.nn.Linear(96, 40)
    layer = quantize_layer(linear.weight, 4, 32, np.float32, bias=linear.bias)
    module = NBitsLinear(layer)
    x = torch.randn(3, 7, 96)
    expected = torch.nn.functional.linear(x, torch.from_numpy(layer.dequantize()), linear.bias)
    torch.testing.assert_close(module(x), expected)
    with pytest.raises(ValueError, match="the model's layer"):
        swap_in(torch.nn.Sequential(torch.nn.Linear(8, 8)), {"0": layer})


# ---- exported models ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fq-models")
    out = {}
    for i, arch in enumerate(("llama", "opt")):
        model, tokenizer = models.random_model(arch, seed=10 + i)
        folder = root / arch
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[arch] = folder
    return out


@pytest.fixture(scope="module")
def exported(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("fq-exports")
    out = {}
    for arch, folder in model_dirs.items():
        for bits in (4, 8):
            config = FineQuantConfig(bits=bits, scale_dtype="float32")
            out[arch, bits] = export(root / f"{arch}-int{bits}", config, str(folder), dtype="fp32", **QUIET)
    return out


def reference_from_graph(model_dir, export_dir):
    """The float model with every quantized linear's weight replaced by what the graph's MatMulNBits
    tensors dequantize to (read back from model.onnx, independently of the exporter)."""
    model, _ = models.load_model(str(model_dir))
    proto = onnx.load(str(export_dir / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    fused = json.loads((export_dir / configs.MANIFEST).read_text())["graph"].get("fused_projections", {})
    with torch.no_grad():
        for node in nodes:
            attrs = {a.name: a.i for a in node.attribute}
            name = node.input[1][: -len(".B")]
            B, scales, zp = (numpy_helper.to_array(inits[i]) for i in node.input[1:4])
            W = dequantize(B, scales, zp, attrs["bits"], attrs["block_size"], attrs["K"])
            parts = fused.get(name, [[name, W.shape[0]]])  # a fused q/k/v node holds the three's rows
            starts = np.cumsum([0] + [n for _, n in parts])
            for (part, _), a, b in zip(parts, starts[:-1], starts[1:]):
                model.get_submodule(part).weight.copy_(torch.from_numpy(W[a:b]))
    return model, nodes, sum(len(p) - 1 for p in fused.values())


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("bits", [4, 8])
def test_exported_graph_matches_torch_with_dequantized_weights(exported, model_dirs, arch, bits):
    export_dir = exported[arch, bits]
    model, nodes, merged = reference_from_graph(model_dirs[arch], export_dir)
    assert len(nodes) == len(target_layers(model)) - merged
    ids = np.random.default_rng(bits).integers(3, model.config.vocab_size, size=24)
    decoder = Decoder(open_session(export_dir))  # prompt, then single tokens through the KV cache
    onnx_logits = np.concatenate([decoder.step(ids[:10]), decoder.step(ids[10:11]), decoder.step(ids[11:])])
    with torch.no_grad():
        torch_logits = model(input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()
    scale = np.abs(torch_logits).max()
    assert np.abs(onnx_logits - torch_logits).max() <= 1e-3 * scale
    # and a plain session without the sqllm op library runs it too: MatMulNBits is ORT's own op
    plain = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "logits" in [o.name for o in plain.get_outputs()]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_export_folder_and_manifest(exported, arch):
    export_dir = exported[arch, 4]
    proto = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    for node in nodes:
        assert node.domain == "com.microsoft"
        assert all(name in inits for name in node.input[1:4])
        assert inits[node.input[1]].data_type == onnx.TensorProto.UINT8
        assert inits[node.input[3]].data_type == onnx.TensorProto.UINT8
        assert len(node.input) == 4  # no g_idx, no bias input (a bias is a separate Add)
    assert not any("lm_head" in n.input[1] for n in nodes)  # lm_head stays a float MatMul
    manifest = json.loads((export_dir / configs.MANIFEST).read_text())
    assert manifest["op"] == {"domain": "com.microsoft", "op_type": "MatMulNBits", "opset": 1}
    q = manifest["quantization"]
    assert q["method"] == "finequant" and q["bits"] == 4 and q["block_size"] == "adaptive"
    fused = manifest["graph"].get("fused_projections", {})
    assert manifest["graph"]["matmul_nbits_nodes"] == len(nodes) == len(q["layers"]) - sum(
        len(p) - 1 for p in fused.values())
    for node in nodes:
        name = node.input[1][: -len(".B")]
        stats = q["layers"][fused[name][0][0] if name in fused else name]  # fused: q/k/v share the block size
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["block_size"] == stats["block_size"] and attrs["bits"] == 4
        assert 0 < stats["rel_error"] < 0.2
    assert manifest["validation"]["max_abs_diff"] <= 1e-3 * manifest["validation"]["logit_scale"]
    assert manifest["graph_style"] == ("plain" if arch == "opt" else "lean")
    from sqllm_onnx.bench.decode import describe  # the benchmark table's row label

    blocks = ", ".join(f"{n}x{b}" for b, n in q["block_size_histogram"].items())
    assert describe(export_dir) == f"FineQuant int4 (blocks {blocks})"


def test_fp16_export_validates(model_dirs, tmp_path):
    out = export(tmp_path / "fp16", FineQuantConfig(bits=4), str(model_dirs["llama"]), dtype="fp16", **QUIET)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    scales = {t.name: t.data_type for t in proto.graph.initializer if t.name.endswith(".scales")}
    assert scales and set(scales.values()) == {onnx.TensorProto.FLOAT16}


def test_export_refuses_a_checkpoint(model_dirs, tmp_path):
    with pytest.raises(ExportError, match="calibration-free"):
        export(tmp_path / "x", FineQuantConfig(), str(model_dirs["llama"]), from_checkpoint=tmp_path, **QUIET)


# ---- CLI -------------------------------------------------------------------------------------------------

def run_export(argv, capsys):
    try:
        rc = cli.main(["export", *argv])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out + out.err + (rc if isinstance(rc, str) else "")


@pytest.mark.parametrize("argv,message", [
    (["--method", "finequant", "--bits", "3"], "needs --bits 4 or 8"),
    (["--method", "finequant", "--bits", "4", "--block-size", "48"], "--block-size must be one of"),
    (["--method", "finequant", "--bits", "4", "--block-size", "512"], "--block-size must be one of"),
    (["--bits", "4", "--block-size", "32"], "applies to --method finequant only"),
    (["--method", "finequant", "--bits", "4", "--from-checkpoint", "/nonexistent"], "needs none"),
    (["--method", "fineqaunt"], "invalid choice"),
])
def test_cli_argument_validation(argv, message, capsys, tmp_path):
    rc, text = run_export(["--out", str(tmp_path / "o"), *argv], capsys)
    assert rc not in (0, None) and message in text
    assert not (tmp_path / "o").exists()


def test_cli_export_fixed_block(model_dirs, capsys, tmp_path):
    out = tmp_path / "rtn32"
    rc, _ = run_export(["--model", str(model_dirs["opt"]), "--method", "finequant", "--bits", "8",
                        "--block-size", "32", "--dtype", "fp32", "--out", str(out)], capsys)
    assert rc == 0
    manifest = json.loads((out / configs.MANIFEST).read_text())
    assert manifest["quantization"]["block_size"] == 32
    assert manifest["quantization"]["block_size_histogram"] == {"32": len(manifest["quantization"]["layers"])}
    from sqllm_onnx.bench.decode import describe

    assert describe(out) == "RTN int8 block 32 (MatMulNBits)"


def test_fixed_block_lean_export_fuses_qkv(model_dirs, tmp_path):
    """With one block size for every matrix, each layer's q/k/v are one MatMulNBits (and a Split) in
    the lean graph; the logits equal those of the plain graph, which keeps them separate."""
    config = FineQuantConfig(bits=4, block_size=32, scale_dtype="float32")
    lean = export(tmp_path / "lean", config, str(model_dirs["llama"]), dtype="fp32", graph="lean", **QUIET)
    plain = export(tmp_path / "plain", config, str(model_dirs["llama"]), dtype="fp32", graph="plain", **QUIET)
    manifest = json.loads((lean / configs.MANIFEST).read_text())
    layers = len(manifest["quantization"]["layers"])
    fused = manifest["graph"]["fused_projections"]
    assert len(fused) == 2 and manifest["graph"]["matmul_nbits_nodes"] == layers - 2 * 2
    assert json.loads((plain / configs.MANIFEST).read_text())["graph"]["matmul_nbits_nodes"] == layers
    ids = np.random.default_rng(5).integers(3, 200, size=12)
    logits = []
    for folder in (lean, plain):
        decoder = Decoder(open_session(folder))
        logits.append(np.concatenate([decoder.step(ids[:8]), decoder.step(ids[8:9]), decoder.step(ids[9:])]))
    assert np.abs(logits[0] - logits[1]).max() <= 1e-4 * np.abs(logits[1]).max()


# ---- mixture of experts ----------------------------------------------------------------------------------

def test_moe_experts_quantize_and_export_through_optimum(tmp_path):
    """Tiny random Qwen3-MoE (Optimum 2.1 exports qwen3_moe; it has no ONNX config for Mixtral or
    Qwen2-MoE): every expert's projections become MatMulNBits nodes, the routers stay float, and the
    graph matches torch for prompts that route differently. This drives the Optimum call export() makes
    on a model built in-process (tests/test_export_families.py exports qwen3_moe through the CLI)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sqllm_onnx.export import exporter, nbits_linear, onnx_graph

    try:
        config = AutoConfig.for_model("qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      vocab_size=512, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    except (KeyError, ValueError):
        pytest.skip("this transformers has no qwen3_moe")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    q = quantize_model(model, FineQuantConfig(bits=4, scale_dtype="float32"))
    assert sum(".experts." in name for name in q.layers) == 2 * 4 * 3
    assert not any(name.endswith(".mlp.gate") for name in q.layers)  # routers stay float
    swap_in(model, q.layers)
    exporter._optimum_export(model, tmp_path, "fp32")
    onnx_graph.finalize(tmp_path / "model.onnx")
    assert nbits_linear.count_nodes(tmp_path / "model.onnx") == len(q.layers)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config).eval()
    apply_to_model(reference, q)
    for ids in ([[5, 17, 99, 3, 250, 7, 42, 8]], [[400, 1, 2, 3, 300, 301, 302, 303, 77, 66]]):
        ids = np.array(ids, np.int64)
        logits = session.run(["logits"], exporter.decoder_feeds(session, ids))[0]
        with torch.no_grad():
            expected = reference(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
        assert np.abs(logits - expected).max() <= 1e-3 * np.abs(expected).max()

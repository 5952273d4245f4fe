"""The exporter's large-model measures (sqllm_onnx/export/big_weights.py): external data merged by
streaming, unquantized linears stored transposed, and an export over 2 GB that still matches torch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

import sqllm_onnx
from sqllm_onnx import models
from sqllm_onnx.export import big_weights, exporter
from sqllm_onnx.op import IR_VERSION


def _two_matmuls(folder, rng):
    a = rng.standard_normal((8, 16)).astype(np.float32)
    b = rng.standard_normal((16, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    path = folder / "model.onnx"
    # one file per tensor, as torch's exporter writes models over 2 GB
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    return path, a, b


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


def test_merge_external_data_streams_tensors_into_one_aligned_file(tmp_path):
    path, a, b = _two_matmuls(tmp_path, np.random.default_rng(0))
    x = np.ones((1, 8), np.float32)
    before = _run(path, x)
    per_tensor = sorted(p.name for p in tmp_path.iterdir() if p.name != "model.onnx")
    assert len(per_tensor) == 2

    moved = big_weights.merge_external_data(path)

    assert moved == a.nbytes + b.nbytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx_data"]
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "model.onnx_data"
        assert int(info["offset"]) % big_weights.ALIGNMENT == 0
    np.testing.assert_array_equal(_run(path, x), before)
    np.testing.assert_allclose(before, x @ a @ b, rtol=1e-5)
    assert big_weights.merge_external_data(path) == a.nbytes + b.nbytes  # merging again: same result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx_data"]
    np.testing.assert_array_equal(_run(path, x), before)


def test_merge_external_data_without_external_tensors_does_nothing(tmp_path):
    path, _, _ = _two_matmuls(tmp_path, np.random.default_rng(1))
    onnx.save(onnx.load(str(path)), str(path))  # back to inline tensors
    for p in tmp_path.iterdir():
        if p.name != "model.onnx":
            p.unlink()
    assert big_weights.merge_external_data(path) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_merge_external_data_refuses_a_missing_file_and_deletes_nothing(tmp_path):
    path, _, _ = _two_matmuls(tmp_path, np.random.default_rng(2))
    files = sorted(p for p in tmp_path.iterdir() if p.name != "model.onnx")
    files[0].unlink()
    with pytest.raises(ValueError, match="is not a file"):
        big_weights.merge_external_data(path)
    assert files[1].exists()
    model = onnx.load(str(path), load_external_data=False)
    assert all(e.value != "model.onnx_data" for t in model.graph.initializer for e in t.external_data)


def test_merge_external_data_refuses_a_truncated_file(tmp_path):
    path, _, _ = _two_matmuls(tmp_path, np.random.default_rng(3))
    victim = next(p for p in tmp_path.iterdir() if p.name != "model.onnx")
    victim.write_bytes(victim.read_bytes()[:10])
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:  # a recorded length longer than the file
        for e in t.external_data:
            if e.key == "location" and e.value == victim.name:
                entry = t.external_data.add()
                entry.key, entry.value = "length", str(1000)
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="early"):
        big_weights.merge_external_data(path)
    assert victim.exists()


def test_pretranspose_linears_keeps_outputs_and_the_output_embedding():
    model, _ = models.random_model("llama", seed=4)  # attention_bias: linears with a bias
    ids = torch.tensor([[1, 7, 30, 2, 99]])
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
    lm_head = model.lm_head
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())

    swapped = big_weights.pretranspose_linears(model)

    assert swapped == n_linear - 1 and model.lm_head is lm_head
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, big_weights.PretransposedLinear) and q.bias is not None
    with torch.no_grad():
        after = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_pretranspose_linears_replaces_a_shared_linear_once():
    shared = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    x = torch.randn(2, 4)
    with torch.no_grad():
        before = model(x)
    assert big_weights.pretranspose_linears(model) == 1
    assert model[0] is model[2] and isinstance(model[0], big_weights.PretransposedLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_export_over_2gb_matches_torch(tmp_path, monkeypatch):
    """A 7B-shaped llama cut to 2 layers, fp32 (2.7 GB: torch writes external data): one merged
    model.onnx_data, no MatMul on a Transpose, and ORT logits equal to an untouched copy of the model."""
    config = models.random_config

    def two_layers(arch, preset="tiny"):
        c = config(arch, preset)
        c.num_hidden_layers = 2
        return c

    monkeypatch.setattr(models, "random_config", two_layers)
    out = exporter.export(tmp_path / "big", model_name_or_path="random:llama-7b", dtype="fp32", validate=False,
                          progress=False, log=lambda *a: None)
    names = sorted(p.name for p in out.iterdir())
    assert "model.onnx_data" in names and not [n for n in names if n.startswith(("onnx__", "model.layers"))]
    assert (out / "model.onnx_data").stat().st_size > 2 ** 31
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert not [n for n in graph.node if n.op_type == "Transpose"]

    reference, _ = models.random_model("llama", "7b", dtype=torch.float16)  # the exporter's weights
    reference = reference.float()
    ids = np.array([[1, 5, 9, 200, 3000, 17]], np.int64)
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    del reference
    session = ort.InferenceSession(str(out / "model.onnx"), sqllm_onnx.register(ort.SessionOptions()),
                                   providers=["CPUExecutionProvider"])
    got = session.run(["logits"], exporter.decoder_feeds(session, ids))[0]
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()

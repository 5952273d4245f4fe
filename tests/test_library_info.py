"""What the op library says about itself, and the clear errors of CUDA sessions whose library cannot
serve them (faked where this machine has no GPU)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_session, random_layer

import sqllm_onnx
from sqllm_onnx.errors import UserError
from sqllm_onnx.op import make_model
from sqllm_onnx.runtime import session as session_mod


def test_library_info_fields():
    info = sqllm_onnx.library_info()
    assert info["version"] and info["ort_api_version"] >= 21
    assert isinstance(info["cuda_archs"], list) and info["cpu_paths"]
    assert all(a.split("-")[0].isdigit() for a in info["cuda_archs"])


def test_info_command_json():
    out = subprocess.run([sys.executable, "-m", "sqllm_onnx.cli", "info", "--json"], capture_output=True, text=True,
                         check=True).stdout
    r = json.loads(out)
    assert r["library"] == sqllm_onnx.get_library_path()
    assert r["cuda_archs"] == sqllm_onnx.library_info()["cuda_archs"]
    assert "CPUExecutionProvider" in r["providers"] and "onnxruntime" in " ".join(r["distributions"])
    if r["cuda_archs"]:
        assert set(r["cuda"]) >= {"devices", "runs"}


def test_kernel_counts_see_where_nodes_went():
    layer = random_layer(np.random.default_rng(0), 64, 16, 3)
    model = make_model(layer)
    cpu0, cuda0 = sqllm_onnx.kernel_counts()
    make_session(model)
    cpu1, cuda1 = sqllm_onnx.kernel_counts()
    assert (cpu1 - cpu0, cuda1 - cuda0) == (1, 0)


def test_placement_on_cpu_is_an_error():
    session_mod.check_placement((5, 2), (5, 9))  # every new node on CUDA: fine
    with pytest.raises(UserError, match=r"placed 3 of 10 SqueezeMatMul nodes on the CPU provider"):
        session_mod.check_placement((0, 0), (3, 7))


def test_cpu_only_library_refused_for_cuda():
    with pytest.raises(UserError, match=r"has no CUDA kernels.*CUDA-enabled wheel"):
        session_mod.check_cuda_library(info={"cuda_archs": []})


def test_library_without_code_for_this_gpu_refused():
    probe = {"devices": 1, "name": "Tesla T4", "cc": "7.5", "runs": False,
             "error": "no kernel image is available for execution on the device"}
    with pytest.raises(UserError, match=r"architectures 80-real, 90-virtual\) cannot run on Tesla T4 \(compute "
                                        r"capability 7.5\): no kernel image"):
        session_mod.check_cuda_library(info={"cuda_archs": ["80-real", "90-virtual"]}, probe=probe)


def test_open_session_cuda_with_cpu_only_library(tmp_path, monkeypatch):
    """The whole path of `eval/generate/bench --provider cuda` on a CPU-only library: one clear error
    before any session is created (the CUDA provider faked as available)."""
    (tmp_path / "model.onnx").write_bytes(make_model(random_layer(np.random.default_rng(0), 64, 16, 3))
                                          .SerializeToString())
    monkeypatch.setattr(session_mod.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(sqllm_onnx, "library_info", lambda path=None: {"cuda_archs": []})
    with pytest.raises(UserError, match="has no CUDA kernels"):
        session_mod.open_session(tmp_path, provider="cuda")


def test_info_warns_about_cpu_and_gpu_onnxruntime_together(monkeypatch):
    from sqllm_onnx import info

    monkeypatch.setattr(info, "installed_distributions", lambda: {"onnxruntime": "1.31.1", "onnxruntime-gpu": "1.31.1"})
    assert any("both onnxruntime and onnxruntime-gpu" in w for w in info.report()["warnings"])
    monkeypatch.setattr(info, "installed_distributions", lambda: {"onnxruntime-gpu": "1.31.1"})
    assert not any("both" in w for w in info.report()["warnings"])


def test_cuda_without_onnxruntime_gpu_is_one_clear_error(tmp_path):
    (tmp_path / "model.onnx").write_bytes(make_model(random_layer(np.random.default_rng(0), 64, 16, 3))
                                          .SerializeToString())
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(UserError, match=r"CUDAExecutionProvider is not available.*pip install onnxruntime-gpu"):
        session_mod.open_session(tmp_path, provider="cuda")


def test_graphs_without_the_op_skip_the_cuda_library_check(tmp_path):
    """A baseline folder (fp16, ORT int4) needs no CUDA kernels of ours: only graphs with SqueezeMatMul
    are checked before a CUDA session."""
    from onnx import TensorProto, helper

    plain = tmp_path / "plain"
    plain.mkdir()
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    (plain / "model.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    assert not session_mod.uses_squeeze_matmul(plain)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "model.onnx").write_bytes(make_model(random_layer(np.random.default_rng(0), 64, 16, 3)).SerializeToString())
    assert session_mod.uses_squeeze_matmul(ours)
    (ours / "sqllm_manifest.json").write_text(json.dumps({"graph": {"squeeze_matmul_nodes": 0}}))
    assert not session_mod.uses_squeeze_matmul(ours)  # the manifest's count wins


def test_cuda_session_of_a_plain_graph_still_asks_for_the_cuda_provider(tmp_path, monkeypatch):
    """A baseline folder skips the library check, not the CUDA provider (faked: no GPU here)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    (tmp_path / "model.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    monkeypatch.setattr(session_mod.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(sqllm_onnx, "library_info", lambda path=None: {"cuda_archs": []})  # would refuse ours
    if hasattr(session_mod.ort, "preload_dlls"):
        monkeypatch.setattr(session_mod.ort, "preload_dlls", lambda *a, **k: None)
    seen = {}

    def fake_session(path, so, providers):
        seen["providers"] = providers
        return object()

    monkeypatch.setattr(session_mod.ort, "InferenceSession", fake_session)
    session_mod.open_session(tmp_path, provider="cuda")
    assert seen["providers"][0][0] == "CUDAExecutionProvider"

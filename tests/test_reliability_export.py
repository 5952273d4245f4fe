"""Export faults: a killed or failing export leaves no output folder, a rerun resumes from the cached
per-layer results, and damaged checkpoints are clear errors (docs/reliability.md)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sqllm_onnx import models
from sqllm_onnx.export import configs
from sqllm_onnx.export.exporter import ExportError, export
from sqllm_onnx.quantize import CheckpointError, QuantConfig, load_checkpoint, quantize_model, save_checkpoint

CONFIG = dict(bits=3, sparsity=0.45, lut_dtype="float32", calib_samples=4, calib_seq_len=32)
CLI = ["--method", "squeezellm", "--bits", "3", "--sparsity", "0.45", "--dtype", "fp32", "--calib-samples", "4", "--calib-seq-len", "32"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny-llama"
    model, tokenizer = models.random_model("llama", seed=3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_export_killed_at(model_dir: Path, out: Path, where: str, after: int) -> int:
    """Run `sqllm-onnx export` in a child process that SIGKILLs itself at `where` (after `after`
    calls): the same as a user's kill -9 at that moment. Returns the child's exit status."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        import sqllm_onnx.quantize.quantizer as quantizer
        import sqllm_onnx.export.onnx_graph as onnx_graph
        calls = [0]
        def killer(real):
            def wrapped(*a, **k):
                calls[0] += 1
                if calls[0] > {after}:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*a, **k)
            return wrapped
        if {where!r} == "layer":
            quantizer.quantize_weight = killer(quantizer.quantize_weight)
        else:
            onnx_graph.finalize = killer(onnx_graph.finalize)
        from sqllm_onnx.cli import main
        sys.exit(main(["export", "--model", {str(model_dir)!r}, "--out", {str(out)!r}, *{CLI!r}]))
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=600).returncode


def test_kill_during_quantization_leaves_nothing_and_rerun_resumes(tmp_path, model_dir):
    out = tmp_path / "exported"
    rc = run_export_killed_at(model_dir, out, "layer", after=5)
    assert rc == -signal.SIGKILL
    assert not out.exists()
    cache = tmp_path / ".exported.quant-cache"
    done = list(cache.rglob("*.safetensors"))
    assert done, "the per-layer cache should hold the layers finished before the kill"
    export(out, QuantConfig(**CONFIG), str(model_dir), dtype="fp32", progress=False, log=lambda *a: None)
    manifest = json.loads((out / configs.MANIFEST).read_text())
    assert manifest["quantization"]["timing"]["resumed_layers"] == 5
    assert not cache.exists()  # removed once the export succeeded


def test_kill_while_writing_the_graph_leaves_no_output_folder(tmp_path, model_dir):
    out = tmp_path / "exported"
    rc = run_export_killed_at(model_dir, out, "finalize", after=0)
    assert rc == -signal.SIGKILL
    assert not out.exists()  # only the hidden staging folder may remain; the rerun clears it
    export(out, QuantConfig(**CONFIG), str(model_dir), dtype="fp32", progress=False, log=lambda *a: None)
    assert (out / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


def test_full_disk_leaves_no_output_and_no_staging(tmp_path, model_dir, monkeypatch):
    import sqllm_onnx.export.exporter as exporter

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exporter.configs, "write_json", no_space)
    out = tmp_path / "exported"
    with pytest.raises(OSError, match="No space left"):
        export(out, QuantConfig(**CONFIG), str(model_dir), dtype="fp32", progress=False, log=lambda *a: None)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert "exported" not in leftovers and ".exported.partial" not in leftovers
    # the finished quantization is kept for the rerun
    assert leftovers == [".exported.quant-cache"]


def test_existing_output_survives_a_failed_overwrite(tmp_path, model_dir, monkeypatch):
    import sqllm_onnx.export.exporter as exporter

    out = tmp_path / "exported"
    export(out, QuantConfig(**CONFIG), str(model_dir), dtype="fp32", progress=False, log=lambda *a: None)
    before = (out / "model.onnx").read_bytes()
    monkeypatch.setattr(exporter, "_validate", lambda *a, **k: (_ for _ in ()).throw(ExportError("injected")))
    with pytest.raises(ExportError, match="injected"):
        export(out, QuantConfig(**CONFIG), str(model_dir), dtype="fp32", overwrite=True, progress=False,
               log=lambda *a: None)
    assert (out / "model.onnx").read_bytes() == before  # nothing was lost


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model_dir):
    model, tokenizer = models.load_model(str(model_dir))
    folder = tmp_path_factory.mktemp("ckpt") / "q"
    save_checkpoint(quantize_model(model, tokenizer, QuantConfig(**CONFIG), progress=False), folder)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_checkpoint_is_a_clear_error(tmp_path, checkpoint, model_dir):
    bad = _copy(checkpoint, tmp_path / "bad")
    weights = next(p for p in bad.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    proc = subprocess.run([sys.executable, "-m", "sqllm_onnx.cli", "export", "--model", str(model_dir), "--out",
                           str(tmp_path / "out"), "--from-checkpoint", str(bad), *CLI],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "checkpoint" in proc.stderr.lower()
    assert not (tmp_path / "out").exists()


def test_mismatched_manifest_is_a_clear_error(tmp_path, checkpoint):
    bad = _copy(checkpoint, tmp_path / "bad")
    manifest = bad / "manifest.json"
    data = json.loads(manifest.read_text())
    first = next(iter(data["layers"]))
    data["layers"][first]["bits"] = 4  # the tensors hold 3-bit codes
    manifest.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=first):
        load_checkpoint(bad)


def test_top_level_bits_disagreeing_with_a_layer_is_a_clear_error(tmp_path, checkpoint):
    bad = _copy(checkpoint, tmp_path / "bad")
    manifest = bad / "manifest.json"
    data = json.loads(manifest.read_text())
    data["bits"] = 4  # every layer (and its tensors) is 3-bit
    manifest.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="top level says 4"):
        load_checkpoint(bad)


def test_checkpoint_of_another_model_is_refused_before_writing(tmp_path, checkpoint):
    other = tmp_path / "other"
    m, t = models.random_model("qwen2")
    m.save_pretrained(other)
    t.save_pretrained(other)
    with pytest.raises(ExportError, match="checkpoint"):
        export(tmp_path / "out", None, str(other), dtype="fp32", from_checkpoint=checkpoint, log=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
    assert os.listdir(tmp_path / "other")

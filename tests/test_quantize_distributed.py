"""`quantize --devices cpu,cpu`: the distributed path (two processes, gloo) gives the one-process
checkpoint bit for bit, fresh and when resuming a one-process run; bad --devices values are one-line
errors."""

from __future__ import annotations

import json

import pytest
import torch

from sqllm_onnx import cli, models
from sqllm_onnx.quantize import distributed, quantizer

# 3 blocks over 2 processes: rank 0 holds blocks 0-1, rank 1 block 2 and lm_head (quantized here too)
ARGS = ["--bits", "3", "--sparsity", "0.45", "--calib-samples", "4", "--calib-seq-len", "32", "--quantize-lm-head",
        "--no-progress"]
LAYERS, RANK0_LAYERS = 22, 14  # 7 per block and lm_head


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("llama-3-blocks")
    config = models.random_config("llama")
    config.num_hidden_layers = 3
    model = AutoModelForCausalLM.from_config(config)
    models.fill_random(model, seed=0)
    model.save_pretrained(folder)
    models.simple_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder


def quantize(argv, capsys):
    rc = cli.main(["quantize", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_process(argv) -> int:
    """The one-process run, with the CPU threads each of 2 processes gets: matrix products and
    reductions may split their sums by thread count, and the comparison is bitwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(distributed.threads_per_process(2))
    try:
        return cli.main(["quantize", *argv, "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)


def same_checkpoint(a, b):
    """The same codes, tables and CSR (model.safetensors byte for byte) and the same per-layer
    statistics: their weighted error is sum(F * err^2), so the Fisher buffers agree to the last bit too.
    Bitwise, not approximately: each process adds its layers' squared gradients sample by sample, in
    the one-process pass's order (quantize/pipeline.py), and the gradients crossing processes are
    sent exactly."""
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    ma, mb = (json.loads((f / "manifest.json").read_text()) for f in (a, b))
    assert ma["run"] == mb["run"] and ma["calibration"] == mb["calibration"]
    strip = [{n: {k: v for k, v in s.items() if k != "time_s"} for n, s in m["layers"].items()} for m in (ma, mb)]
    assert strip[0] == strip[1]
    assert ma["totals"] == mb["totals"] and ma["totals"]["fisher_fallback_layers"] == 0
    return mb


@pytest.fixture(scope="module")
def reference_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-process") / "q"
    assert one_process(["--model", str(model_dir), *ARGS, "--out", str(out)]) == 0
    return out


def test_two_processes_give_the_one_process_checkpoint(model_dir, reference_dir, tmp_path, capsys):
    out = tmp_path / "q"
    rc, stdout, err = quantize(["--model", str(model_dir), *ARGS, "--devices", "cpu,cpu", "--out", str(out)], capsys)
    assert rc == 0, err
    assert f"quantized {LAYERS} layers" in stdout and "device cpu,cpu" in stdout
    m = same_checkpoint(reference_dir, out)
    ranks = m["timing"]["processes"]
    assert [(r["rank"], r["blocks"], r["layers"]) for r in ranks] == [(0, [0, 2], RANK0_LAYERS),
                                                                     (1, [2, 3], LAYERS - RANK0_LAYERS)]
    assert m["command"].endswith("--devices cpu,cpu --out " + str(out))
    assert not (out / "partial").exists()


def test_two_processes_resume_a_one_process_run(model_dir, reference_dir, tmp_path, capsys, monkeypatch):
    """A one-process run stopped after rank 0's layers, its Fisher file removed: the two processes
    compute the Fisher of the missing layers only (rank 0 relays, with no gradient of its own)."""
    out = tmp_path / "q"
    real, calls = quantizer.quantize_weight, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > RANK0_LAYERS:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(quantizer, "quantize_weight", interrupted)
    assert one_process(["--model", str(model_dir), *ARGS, "--out", str(out)]) == 130
    monkeypatch.setattr(quantizer, "quantize_weight", real)
    (out / "partial" / "fisher.safetensors").unlink()
    assert len(list((out / "partial" / "layers").iterdir())) == RANK0_LAYERS

    rc, stdout, err = quantize(["--model", str(model_dir), *ARGS, "--devices", "cpu,cpu", "--out", str(out)], capsys)
    assert rc == 0, err
    assert f"{RANK0_LAYERS} layers resumed" in stdout
    m = same_checkpoint(reference_dir, out)
    assert [r["quantized"] for r in m["timing"]["processes"]] == [0, LAYERS - RANK0_LAYERS]


@pytest.mark.parametrize("devices,message", [
    ("gpu0,gpu1", "'gpu0' is not a device"),
    ("cuda,cuda", "give each GPU its index"),
    ("cpu,", "'' is not a device"),
    ("cpu,cuda:0", "all cpu or all cuda:N"),
    ("cuda:0,cuda:0", "a GPU is named twice"),
    (f"cuda:{torch.cuda.device_count()},cuda:{torch.cuda.device_count() + 1}",
     f"cuda:{torch.cuda.device_count()} does not exist"),
    ("cpu,cpu,cpu", "3 processes but the model has 2 decoder blocks"),
])
def test_bad_devices_are_one_line_errors(devices, message, tmp_path, capsys):
    rc, _, err = quantize(["--model", "random:llama", "--devices", devices, "--out", str(tmp_path / "q")], capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("extra,message", [
    (["--device", "cpu"], "--device does not go with --devices"),
    (["--eval"], "--eval does not go with --devices"),
    (["--method", "lnq"], "--method lnq runs the blocks in sequence"),
])
def test_options_the_distributed_run_refuses(extra, message, tmp_path, capsys):
    rc, _, err = quantize(["--model", "random:llama", "--devices", "cpu,cpu", *extra, "--out", str(tmp_path / "q")],
                          capsys)
    assert rc == 2 and message in err, err

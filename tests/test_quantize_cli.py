"""`sqllm-onnx quantize`: argument validation, a run on a tiny local model, SqueezeLLM import."""

from __future__ import annotations

import json

import pytest
import torch

from sqllm_onnx import cli
from sqllm_onnx.models import random_model
from sqllm_onnx.quantize import load_checkpoint


def run(argv, capsys):
    try:
        rc = cli.main(["quantize", *argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("argv,message", [
    (["--bits", "5"], "invalid choice: 5"),
    (["--bits", "three"], "invalid int value"),
    (["--sparsity", "-0.1"], "not a percentage"),
    (["--sparsity", "abc"], "not a number"),
    (["--sparsity", "101"], "not a percentage"),
    (["--sparsity", "0.05", "--sensitive", "0.1"], "cannot exceed sparsity"),
    (["--method", "gptq"], "invalid choice"),
    (["--lut-dtype", "bfloat16"], "invalid choice"),
    (["--calib-samples", "0"], "must be at least 1"),
    (["--calib-data", "/nonexistent/text.txt"], "is not a file"),
    (["--eval-data", "/nonexistent/eval.txt", "--eval"], "is not a file"),
    (["--eval-baseline"], "needs --eval"),
    (["--import-squeezellm", "/nonexistent/sq-x-w3-s0.pt"], "is not a file"),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys, tmp_path):
    rc, _, err = run(["--out", str(tmp_path / "o"), *argv], capsys)
    assert rc == 2 and message in err
    assert not (tmp_path / "o").exists()  # nothing was loaded or written


def test_out_is_required_and_must_be_a_folder(capsys, tmp_path):
    rc, _, err = run([], capsys)
    assert rc == 2 and "--out" in err
    (tmp_path / "file").write_text("x")
    rc, _, err = run(["--out", str(tmp_path / "file")], capsys)
    assert rc == 2 and "not a folder" in err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tok = random_model("llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_quantize_command_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["--model", str(tiny_model_dir), "--bits", "4", "--sparsity", "0.45", "--calib-samples", "3",
            "--calib-seq-len", "32", "--lut-dtype", "float32", "--out", str(out), "--eval", "--eval-baseline",
            "--eval-windows", "2", "--eval-seq-len", "64", "--no-progress"]
    rc, stdout, err = run(argv, capsys)
    assert rc == 0, err
    assert "quantized 14 layers" in stdout and "perplexity ratio" in stdout
    q = load_checkpoint(out)
    m = q.manifest
    assert m["bits"] == 4 and m["sparsity"] == 0.45 and m["lut_dtype"] == "float32"
    assert m["command"].startswith("sqllm-onnx quantize --model")
    ev = m["evaluation"]
    assert ev["windows"] == 2 and ev["ppl"] > 1 and ev["baseline_ppl"] > 1
    assert ev["ratio"] == pytest.approx(ev["ppl"] / ev["baseline_ppl"])
    # same command again: the finished checkpoint is reused; other settings in the folder are refused
    rc, stdout, _ = run(argv[:-7] + ["--no-progress"], capsys)
    assert rc == 0 and "quantized 14 layers" in stdout
    assert load_checkpoint(out).manifest["evaluation"] == ev
    rc, _, err = run(["--model", str(tiny_model_dir), "--bits", "3", "--out", str(out), "--no-progress",
                      "--calib-samples", "3", "--calib-seq-len", "32"], capsys)
    assert rc == 2 and "different settings" in err and "bits: 4 there, 3 now" in err


def test_import_command(tmp_path, capsys):
    from test_quantize_import import synthetic_checkpoint

    sd, _ = synthetic_checkpoint(3, True)
    torch.save(sd, tmp_path / "sq-tiny-w3-s45.pt")
    rc, stdout, err = run(["--import-squeezellm", str(tmp_path / "sq-tiny-w3-s45.pt"), "--out",
                           str(tmp_path / "ck"), "--lut-dtype", "float32"], capsys)
    assert rc == 0, err
    q = load_checkpoint(tmp_path / "ck")
    assert q.manifest["method"] == "squeezellm-import" and q.manifest["bits"] == 3
    assert json.loads(stdout.strip().splitlines()[-1])["layers"] == 3

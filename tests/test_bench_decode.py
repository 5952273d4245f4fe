"""`sqllm-onnx bench DIR` (batch-1 decoding benchmark) on the CPU: its stepping agrees with the runtime's
Decoder, the command writes the JSON and markdown it promises (GenAI folders through GenAI's loop too), or
refuses bad arguments; `sqllm-onnx bench kernel` times its methods round-robin."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sqllm_onnx import cli
from sqllm_onnx.bench.decode import DeviceDecoder, StaticCacheDecoder, weight_bytes
from sqllm_onnx.quantize import QuantConfig
from sqllm_onnx.runtime.session import Decoder, open_session

from conftest import lazy_exports


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    get = lazy_exports(tmp_path_factory.mktemp("bench"), {"sq3": ("llama", "fp32", True)},
                       lambda name: QuantConfig(bits=3, sparsity=0.45, method="rtn", sensitive=0))
    return get("sq3")


@pytest.mark.parametrize("static", [False, True], ids=["growing-cache", "static-cache"])
def test_decoders_step_like_the_runtime_decoder(exported, static):
    """DeviceDecoder (cache grows each step) and StaticCacheDecoder (one max-length buffer per layer shared
    by past and present, the CUDA-graph layout; run here on the CPU EP) give the runtime's logits."""
    session = open_session(exported, "cpu")
    reference = Decoder(session)
    device = StaticCacheDecoder(session, "cpu", max_len=16) if static else DeviceDecoder(session, "cpu")
    prompt = np.array([[5, 17, 3, 99, 42]], np.int64)
    for _ in range(2):  # a second round after reset(): a static cache keeps its buffers
        reference.reset()
        device.reset()
        expected = reference.step(prompt[0])[-1]
        logits = device.feed(prompt)
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
        for _ in range(6):  # greedy steps
            token = int(np.argmax(logits))
            expected = reference.step([token])[-1]
            logits = device.feed(np.array([[token]], np.int64))
            np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    times = device.greedy(logits, 3)
    assert len(times) == 3 and all(t > 0 for t in times)
    if static:
        with pytest.raises(ValueError, match="holds 16 positions"):
            device.feed(np.zeros((1, 4), np.int64))


def test_bench_command_writes_json_and_markdown(exported, tmp_path, capsys):
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    rc = cli.main(["bench", str(exported), "--provider", "cpu", "--prompt-len", "8", "--new-tokens", "4",
                   "--json", str(out_json), "--markdown", str(out_md)])
    assert rc == 0
    data = json.loads(out_json.read_text())
    (row,) = data["results"]
    assert row["label"] == "SqueezeLLM 3b 0.45% (rtn)"
    assert row["weight_bytes"] == weight_bytes(exported) > 0
    assert row["ms_per_token"] > 0 and row["prefill_tokens_per_s"] > 0 and row["peak_gpu_mb"] is None
    assert (row["prompt_len"], row["new_tokens"]) == (8, 4)
    md = out_md.read_text()
    assert "| SqueezeLLM 3b 0.45% (rtn) |" in md and "ms/token" in md
    assert "SqueezeLLM 3b 0.45% (rtn):" in capsys.readouterr().out


def test_bench_command_times_a_genai_folder_through_genai(exported, tmp_path):
    """--genai DIR: the folder decoded by onnxruntime_genai's own generator loop, a row beside the others."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install '.[genai]')")
    out_json = tmp_path / "b.json"
    rc = cli.main(["bench", str(exported), "--genai", str(exported), "--provider", "cpu", "--prompt-len", "8",
                   "--new-tokens", "4", "--json", str(out_json)])
    assert rc == 0
    ours, genai = json.loads(out_json.read_text())["results"]
    assert genai["label"] == "ORT GenAI: SqueezeLLM 3b 0.45% (rtn)" and genai["runner"].startswith("onnxruntime-genai")
    assert genai["ms_per_token"] > 0 and genai["prefill_tokens_per_s"] > 0
    assert genai["weight_bytes"] == ours["weight_bytes"] and not genai["cuda_graph"]


def test_bench_command_refuses_a_genai_folder_without_its_config(exported, tmp_path, capsys):
    assert cli.main(["bench", str(exported), "--genai", str(tmp_path), "--provider", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "no genai_config.json" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--new-tokens", "0"], "must be >= 1"),
    (["--prompt-len", "0"], "must be >= 1"),
    (["--cuda-graph"], "needs --provider cuda"),
])
def test_bench_command_refuses_bad_arguments(exported, argv, message, capsys):
    assert cli.main(["bench", str(exported), "--provider", "cpu", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bench_command_refuses_a_folder_without_a_model(tmp_path, capsys):
    assert cli.main(["bench", str(tmp_path), "--provider", "cpu"]) == 1
    assert "is not an sqllm-onnx export" in capsys.readouterr().err


def test_kernel_bench_times_every_method_round_robin():
    """`sqllm-onnx bench kernel` on the CPU: every method of a shape gets a time from the same
    round-robin rounds, and a method whose run fails gets its error in its row, not the others'."""
    from sqllm_onnx.bench import kernel

    methods = [m for m in kernel.default_methods() if m.name in ("ORT MatMulNBits 4b g128", "SqueezeMatMul 3b 0.45%")]
    results = kernel.run_benchmark("cpu", [(256, 48)], methods, M=1, ops=2, repeats=3, threads=1, kernel_only=False,
                                   progress=lambda line: None)
    assert [r["method"] for r in results["rows"]] == [m.name for m in methods]
    for row in results["rows"]:
        assert row["us"] > 0 and row["gbps"] > 0 and "error" not in row

    order = []

    def failing():
        order.append("b")
        raise RuntimeError("broken\nsecond line")

    medians, errors = kernel.interleaved_medians({"a": lambda: order.append("a"), "b": failing}, repeats=3)
    assert order == ["a", "b", "a", "a"]  # round-robin; the failed one drops out after its error
    assert set(medians) == {"a"} and errors == {"b": "broken"}

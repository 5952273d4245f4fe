"""Reliability of the op library under fuzzing and concurrency (CPU)."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import make_session, random_layer, reference_output

import sqllm_onnx
from sqllm_onnx.op import make_model

FUZZ = Path(__file__).with_name("fuzz_op.py")


@pytest.mark.parametrize("kernel", ["exact", "auto"])
def test_fuzz_in_a_subprocess(tmp_path, kernel):
    """A few thousand random and malformed cases (docs/reliability.md runs 100,000): a crash would
    kill the subprocess; every rejection must be a clear ORT error and every accepted case must
    match the reference (fuzz_op.py asserts both), for both CPU kernel choices."""
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, str(FUZZ), "--cases", "2500", "--seed", "11", "--threads", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SQLLM_CPU_KERNEL": kernel})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["cases"] == 2500 and sum(result["outcomes"].values()) == 2500
    assert result["outcomes"]["ok"] > 800 and result["outcomes"]["rejected"] > 800
    assert len(result["by_kind"]) >= 20  # every malformation class was generated


def test_one_session_many_threads_identical_outputs():
    rng = np.random.default_rng(0)
    layer = random_layer(rng, 300, 200, 3, density=0.0045)
    session = make_session(make_model(layer), threads=2)
    inputs = [rng.standard_normal((m, 300)).astype(np.float32) for m in (1, 5, 1, 9)]
    expected = [session.run(None, {"A": a})[0] for a in inputs]
    for a, y in zip(inputs, expected):
        np.testing.assert_allclose(y, reference_output(a, layer), rtol=1e-4, atol=1e-4)
    failures = []

    def worker(t):
        for i in range(100):
            k = (t + i) % len(inputs)
            y = session.run(None, {"A": inputs[k]})[0]
            if not np.array_equal(y, expected[k]):
                failures.append((t, i))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert failures == []


def test_two_sessions_share_the_library():
    rng = np.random.default_rng(1)
    layers = [random_layer(rng, 64, 32, bits) for bits in (3, 4)]
    so = sqllm_onnx.register(ort.SessionOptions())  # one options object, registered once, two sessions
    sessions = [ort.InferenceSession(make_model(l).SerializeToString(), so, providers=["CPUExecutionProvider"])
                for l in layers]
    a = rng.standard_normal((2, 64)).astype(np.float32)
    for s, layer in zip(sessions, layers):
        np.testing.assert_allclose(s.run(None, {"A": a})[0], reference_output(a, layer), rtol=1e-4, atol=1e-4)
    # a second registration in a fresh options object also works alongside
    third = make_session(make_model(layers[0]))
    np.testing.assert_array_equal(third.run(None, {"A": a})[0], sessions[0].run(None, {"A": a})[0])

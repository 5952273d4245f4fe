"""Which onnxruntime versions the op library runs with (docs/reliability.md, "Version skew").

The library is built against the ORT 1.21 headers and asks for ORT API 21: every onnxruntime from
1.21 on runs it, and older ones refuse it with a clear error instead of crashing. Each version is
installed from PyPI into its own folder (cached between runs) and checked in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest

import sqllm_onnx

REPO = Path(__file__).resolve().parents[1]
CHECK = Path(__file__).with_name("ort_version_check.py")
CACHE = Path(os.environ.get("SQLLM_ORT_VERSIONS_CACHE", Path.home() / ".cache" / "sqllm-onnx-tests" / "ort"))
EXPECTED = {"1.20.1": "REFUSED", "1.21.1": "OK", "1.24.4": "OK"}


def install(version: str) -> Path:
    target = CACHE / version
    if not (target / "onnxruntime" / "__init__.py").is_file():
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                               f"onnxruntime=={version}"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"could not install onnxruntime {version} from PyPI: {proc.stderr[-500:]}")
    return target


@pytest.mark.parametrize("version,expected", sorted(EXPECTED.items()))
def test_onnxruntime_version(version, expected):
    site = install(version)
    env = dict(os.environ, PYTHONPATH=str(site), SQLLM_OPS_LIBRARY=sqllm_onnx.get_library_path())
    proc = subprocess.run([sys.executable, str(CHECK), str(REPO)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(f"{expected} {version}"), line
    if expected == "REFUSED":
        assert "needs onnxruntime >= 1.21" in line


def test_installed_onnxruntime():
    proc = subprocess.run([sys.executable, str(CHECK), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == f"OK {onnxruntime.__version__}"

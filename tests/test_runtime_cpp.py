"""The C++ example (runtime/sqllm_generate.cc, ONNX Runtime C++ API + the op library): built with
CMake, run on tiny exported models on the CPU; its greedy tokens must equal the Python decoding
path's (`sqllm_onnx.runtime.session.greedy_generate`) on the same export.

The build goes to build/runtime-example (kept between runs: a rebuild is a few seconds). The ONNX
Runtime headers already fetched by the package build are reused when present; the library is the
one in the onnxruntime wheel. The quantized cases need `sqllm_onnx.quantize` (QuantConfig and
export(..., quant_config)); until it is importable they fail with a message saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import lazy_exports

from sqllm_onnx.export import configs
from sqllm_onnx.runtime.session import Decoder, greedy_generate, open_session

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "runtime-example"
BINARY = BUILD / "runtime" / "sqllm_generate"
PROMPT = [1, 17, 29, 41, 53]
NEW_TOKENS = 16

# name -> (architecture, dtype, quantized)
CASES = {
    "llama-fp32-q3": ("llama", "fp32", True),   # position_ids, fp32 KV cache, SqueezeMatMul
    "opt-fp16-q3": ("opt", "fp16", True),       # fp16 KV cache and logits, SqueezeMatMul
    "llama-fp16": ("llama", "fp16", False),     # fp16 baseline without the quantizer
    "gemma3_text-fp32-q3": ("gemma3_text", "fp32", True),  # a plain graph of another family
    "qwen3_moe-fp32-q3": ("qwen3_moe", "fp32", True),      # mixture of experts, every expert quantized
}


def quant_config():
    """The quantizer's config for the tests; a clear failure while sqllm_onnx.quantize lacks it."""
    try:
        from sqllm_onnx.quantize import QuantConfig
    except ImportError as e:
        pytest.fail(f"a quantized export needs sqllm_onnx.quantize.QuantConfig, which is not importable yet ({e})")
    return QuantConfig(bits=3, sparsity=0.45, lut_dtype="float32", calib_samples=4, calib_seq_len=32)


def _ort_include_dir() -> str | None:
    """Headers the package build already fetched (no second download), or None to let CMake decide."""
    if os.environ.get("ORT_INCLUDE_DIR"):
        return os.environ["ORT_INCLUDE_DIR"]
    for header in sorted(ROOT.glob("build/*/ort-headers/root/usr/include/onnxruntime/onnxruntime_cxx_api.h")):
        return str(header.parent)
    return None


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def generate_binary() -> Path:
    cmake = shutil.which("cmake")
    assert cmake, "cmake is not on PATH: the C++ example cannot be built"
    configure = [cmake, "-S", str(ROOT), "-B", str(BUILD), "-DSQLLM_BUILD_RUNTIME_EXAMPLE=ON", "-DSQLLM_CUDA=OFF",
                 "-DCMAKE_BUILD_TYPE=Release", f"-DPython3_EXECUTABLE={sys.executable}",
                 "-DORT_LIBRARY="]  # empty: found again in this interpreter's onnxruntime wheel
    include = _ort_include_dir()
    if include:
        configure.append(f"-DORT_INCLUDE_DIR={include}")
    _run(configure, timeout=300)
    _run([cmake, "--build", str(BUILD), "--target", "sqllm_generate", "-j", "2"], timeout=300)
    assert BINARY.is_file()
    return BINARY


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> export folder, made on first use."""
    return lazy_exports(tmp_path_factory.mktemp("runtime-cpp"), CASES, lambda name: quant_config())


def run_generate(binary: Path, model_dir: Path, *args, check: bool = True, env=None):
    # No LD_LIBRARY_PATH: the binary finds libonnxruntime through its rpath.
    env = {k: v for k, v in (env or os.environ).items() if k != "LD_LIBRARY_PATH"}
    proc = subprocess.run([str(binary), str(model_dir), *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)
    if check:
        assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def parse_tokens(stdout: str) -> list[int]:
    lines = [line for line in stdout.splitlines() if line.startswith("tokens:")]
    assert len(lines) == 1, stdout
    return [int(t) for t in lines[0].split()[1:]]


def python_tokens(model_dir: Path, max_new_tokens: int = NEW_TOKENS, eos=None) -> list[int]:
    return greedy_generate(Decoder(open_session(model_dir)), PROMPT, max_new_tokens, eos)


@pytest.mark.parametrize("case", list(CASES))
def test_cpp_tokens_equal_python(generate_binary, exports, case):
    model_dir = exports(case)
    proc = run_generate(generate_binary, model_dir, "--max-new-tokens", NEW_TOKENS, "--ignore-eos", *PROMPT)
    tokens = parse_tokens(proc.stdout)
    assert len(tokens) == NEW_TOKENS
    assert tokens == python_tokens(model_dir)
    dtype = CASES[case][1]
    assert f"KV cache {dtype}" in proc.stdout and f"logits {dtype}" in proc.stdout
    assert re.search(r"^prefill: 5 prompt tokens in [0-9.]+ ms", proc.stdout, re.M), proc.stdout
    assert re.search(r"^decode: 15 new tokens after the first, [0-9.]+ ms/token", proc.stdout, re.M), proc.stdout


def test_cpp_stops_at_eos(generate_binary, exports):
    model_dir = exports("llama-fp32-q3")
    full = python_tokens(model_dir)
    eos = full[3]
    expected = python_tokens(model_dir, eos=eos)
    assert expected[-1] == eos and len(expected) <= 4
    proc = run_generate(generate_binary, model_dir, "--eos", eos, "--max-new-tokens", NEW_TOKENS, ",".join(map(str, PROMPT)))
    assert parse_tokens(proc.stdout) == expected
    # Without --eos the eos_token_id of generation_config.json applies.
    default_eos = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id")
    proc = run_generate(generate_binary, model_dir, "--max-new-tokens", NEW_TOKENS, *PROMPT)
    assert parse_tokens(proc.stdout) == python_tokens(model_dir, eos=default_eos)


def test_cpp_explicit_ops_library_and_moved_folder(generate_binary, exports, tmp_path):
    """The folder is self-contained: moved elsewhere it runs with its own copy of the op library,
    and --ops-library picks another copy."""
    model_dir = exports("llama-fp32-q3")
    moved = tmp_path / "moved"
    shutil.copytree(model_dir, moved)
    lib = tmp_path / "lib" / "libsqllm_ops.so"
    lib.parent.mkdir()
    shutil.move(moved / configs.LIBRARY_COPY, lib)
    proc = run_generate(generate_binary, moved, "--ops-library", lib, "--max-new-tokens", 8, "--ignore-eos", *PROMPT)
    assert parse_tokens(proc.stdout) == python_tokens(model_dir, 8)
    # Without it, the missing default copy is a clear error.
    proc = run_generate(generate_binary, moved, *PROMPT, check=False)
    assert proc.returncode == 1 and "op library" in proc.stderr and "--ops-library" in proc.stderr


@pytest.mark.parametrize("args, rc, message", [
    ((), 2, "missing DIR"),
    (("{dir}",), 2, "missing the prompt's token ids"),
    (("{dir}", "1", "x7"), 2, "non-negative integers"),
    (("{dir}", "--max-new-tokens", "0", "1"), 2, "--max-new-tokens must be an integer >= 1"),
    (("{dir}", "--frobnicate", "1"), 2, "unknown option '--frobnicate'"),
    (("{dir}", "1", "999999"), 2, "out of range (vocabulary size 512)"),
    (("{tmp}/no-such-dir", "1"), 1, "is not a folder"),
    (("{tmp}", "1"), 1, "holds no model.onnx"),
])
def test_cpp_bad_arguments_are_clear_errors(generate_binary, exports, tmp_path, args, rc, message):
    model_dir = exports("llama-fp16")
    argv = [a.format(dir=model_dir, tmp=tmp_path) for a in args]
    proc = subprocess.run([str(generate_binary), *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == rc, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr


def test_cpp_help(generate_binary):
    proc = subprocess.run([str(generate_binary), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "usage: sqllm_generate DIR" in proc.stdout

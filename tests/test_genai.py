"""ORT GenAI (`onnxruntime_genai`, the engine behind its C, C#, Java and Python APIs) generates from
exported folders: genai_config.json names the op library copy in the folder, GenAI loads it, and
its greedy tokens equal the Python decoding path's (`greedy_generate`).

Prompts are raw token ids: GenAI's tokenizer (onnxruntime-extensions) cannot read the word-level
tokenizer.json of the tiny test models. Skips only when onnxruntime_genai is not installed (the
`test` extra installs it). The quantized cases need `sqllm_onnx.quantize`; until it is importable
they fail with a message saying so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import lazy_exports

from sqllm_onnx import families
from sqllm_onnx.export import configs, lean_graph
from sqllm_onnx.runtime.session import Decoder, greedy_generate, open_session

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install '.[genai]')")

PROMPT = [1, 17, 29, 41, 53]
NEW_TOKENS = 16

# name -> (architecture, dtype, quantized); GenAI runs OPT and Qwen3-MoE (plain graphs) as its generic
# "decoder" type, Qwen3 (lean graph) as its own "qwen3".
CASES = {
    "llama-fp32-q3": ("llama", "fp32", True),
    "opt-fp32-q4": ("opt", "fp32", True),
    "llama-fp16": ("llama", "fp16", False),
    "qwen3-fp32-q3": ("qwen3", "fp32", True),
    "qwen3_moe-fp32-q3": ("qwen3_moe", "fp32", True),
}


def quant_config(bits: int):
    try:
        from sqllm_onnx.quantize import QuantConfig
    except ImportError as e:
        pytest.fail(f"a quantized export needs sqllm_onnx.quantize.QuantConfig, which is not importable yet ({e})")
    return QuantConfig(bits=bits, sparsity=0.45, lut_dtype="float32", calib_samples=4, calib_seq_len=32)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return lazy_exports(tmp_path_factory.mktemp("genai"), CASES,
                        lambda name: quant_config(4 if name.endswith("q4") else 3), seed=1)


def genai_tokens(model_dir: Path, max_new_tokens: int = NEW_TOKENS) -> list[int]:
    """Greedy search through onnxruntime_genai, from raw token ids."""
    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(PROMPT) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([PROMPT], dtype=np.int32))
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def python_tokens(model_dir: Path, max_new_tokens: int = NEW_TOKENS) -> list[int]:
    eos = json.loads((model_dir / configs.GENAI_CONFIG).read_text())["model"]["eos_token_id"]
    return greedy_generate(Decoder(open_session(model_dir)), PROMPT, max_new_tokens, eos)


@pytest.mark.parametrize("case", list(CASES))
def test_genai_tokens_equal_python(exports, case):
    model_dir = exports(case)
    assert genai_tokens(model_dir) == python_tokens(model_dir)


def test_genai_config_names_the_library_copy(exports):
    for case, (arch, _, _) in CASES.items():
        config = json.loads((exports(case) / configs.GENAI_CONFIG).read_text())
        assert config["model"]["decoder"]["session_options"]["custom_ops_library"] == configs.LIBRARY_COPY
        assert config["model"]["type"] == families.genai_type(arch)
        assert config["model"]["type"] == {"opt": "decoder", "qwen3_moe": "decoder"}.get(arch, arch)
        # the lean graph (GroupQueryAttention) shares one max-length cache buffer; a plain graph cannot
        assert config["search"]["past_present_share_buffer"] is (arch in lean_graph.ARCHITECTURES)


# Run in a fresh interpreter that has loaded no libsqllm_ops.so: in this process one is loaded
# already (by the Python path), and dlopen would hand it back for a bare "libsqllm_ops.so" that
# GenAI failed to find in the folder.
_GENAI_SCRIPT = """
import json, sys
import numpy as np
import onnxruntime_genai as og
model = og.Model(sys.argv[1])
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=len(json.loads(sys.argv[2])) + int(sys.argv[3]))
generator = og.Generator(model, params)
generator.append_tokens(np.array([json.loads(sys.argv[2])], dtype=np.int32))
out = []
while not generator.is_done():
    generator.generate_next_token()
    out.append(int(generator.get_next_tokens()[0]))
print(json.dumps(out))
"""


def genai_tokens_fresh_process(model_dir: Path, max_new_tokens: int, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _GENAI_SCRIPT, str(model_dir), json.dumps(PROMPT), str(max_new_tokens)],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_genai_runs_a_moved_folder_from_another_directory(exports, tmp_path):
    """custom_ops_library is relative and GenAI resolves it against the folder of genai_config.json:
    a moved export works whatever the working directory, with the old folder gone."""
    original = exports("llama-fp32-q3")
    expected = python_tokens(original, 8)
    moved = tmp_path / "somewhere" / "else"
    shutil.copytree(original, moved)
    hidden = original.with_name(original.name + ".hidden")
    original.rename(hidden)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    try:
        proc = genai_tokens_fresh_process(moved, 8, elsewhere)
    finally:
        hidden.rename(original)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == expected


def test_genai_without_the_library_fails_clearly(exports, tmp_path):
    moved = tmp_path / "no-lib"
    shutil.copytree(exports("llama-fp32-q3"), moved)
    (moved / configs.LIBRARY_COPY).unlink()
    proc = genai_tokens_fresh_process(moved, 4, tmp_path)
    assert proc.returncode != 0
    assert "libsqllm_ops.so" in proc.stderr

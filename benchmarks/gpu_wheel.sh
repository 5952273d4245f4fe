#!/usr/bin/env bash
# The GPU half of the wheel check (issue: a CUDA-enabled wheel): on the GPU machine, install the
# wheel that `.ci/wheel` built on a CPU machine (dist/*.whl, carried) with no build step, then run
# benchmarks/gpu_kernels.sh against it without its build step: the CUDA tests, `bench kernel`,
# compute-sanitizer. PYTHONSAFEPATH keeps the source tree off sys.path, so `import sqllm_onnx` and
# its op library are the wheel's. Run from the repo root with the staged site on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
TARGET=${WHEEL_TARGET:-/root/sqllm-wheel}
python3 -m pip install -q --no-deps --no-build-isolation --target "$TARGET" dist/*.whl || exit 1
export PYTHONSAFEPATH=1 PYTHONPATH="$TARGET:${PYTHONPATH:-}"
unset SQLLM_OPS_LIBRARY
python3 -m sqllm_onnx.cli info | tee "$OUT/info.log"
python3 -c "import sqllm_onnx, sys; p = sqllm_onnx.get_library_path(); print('library:', p); sys.exit(0 if p.startswith('$TARGET') else 1)" \
  || { echo "the op library is not the wheel's" >&2; exit 1; }
STEPS=${STEPS:-"tests bench memcheck racecheck"} TESTS=${TESTS:-"tests/test_op_cuda.py tests/test_library_info.py"} \
  OUT="$OUT" bash benchmarks/gpu_kernels.sh

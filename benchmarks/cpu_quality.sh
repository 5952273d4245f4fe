#!/usr/bin/env bash
# The rows of docs/results.md "Quantizer quality" measured on the 2-core CPU machine (no GPU), and the
# CPU quantization wall time: `sqllm-onnx quantize --eval` (torch float32, all held-out windows),
# sequentially (one job at a time, so that the wall times mean something). The first run computes the
# Fisher (100 x 512 tokens) from scratch; the other SqueezeLLM runs reuse it through --fisher-cache.
# The held-out text is Python's own pydoc_data.topics, which differs between Python versions: compare
# rows of one machine (this VM: Python 3.11, 95 windows; the GPU machine: Python 3.12, 99 windows).
#   bash benchmarks/cpu_quality.sh [WORK]      (default WORK=/tmp/sqllm-cpu-quality)
# Each run leaves WORK/NAME/manifest.json (with "evaluation" and "timing") and WORK/NAME.log;
# `python3 benchmarks/quantize_table.py WORK` prints the table (after copying manifests as below).
set -u -o pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/sqllm-cpu-quality}
PY=${PYTHON:-.venv/bin/python}
CONFIGS=${CONFIGS:-"sq3s5 rtn3 rtn4 km3 sq4s5 sq3s45 sq3s0 sq4s0 sq4s45"}
mkdir -p "$WORK"
F=$WORK/fisher-smollm2-stdlib-100x512.safetensors
. benchmarks/quality_variants.sh  # (run from the repository root)
for name in $CONFIGS; do
  { date -u +"# %Y-%m-%dT%H:%M:%SZ"; uptime; echo "+ sqllm-onnx quantize --device cpu $(quantize_args "$name") $(quantize_extra "$name" "$F") --eval"; } > "$WORK/$name.log"
  rm -rf "${WORK:?}/$name"
  /usr/bin/time -v "$PY" -m sqllm_onnx.cli quantize --no-progress --device cpu $(quantize_args "$name") $(quantize_extra "$name" "$F") --eval \
    --out "$WORK/$name" >> "$WORK/$name.log" 2>&1
  echo "$name: rc $?"; grep -E "^(perplexity|wall time)|Elapsed|Maximum resident" "$WORK/$name.log"
  [ -f "$WORK/$name/manifest.json" ] && cp "$WORK/$name/manifest.json" "$WORK/manifest-$name.json"
done

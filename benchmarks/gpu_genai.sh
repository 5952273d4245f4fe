#!/usr/bin/env bash
# Issue 15's strongest competitor on the GPU machine: ORT GenAI's model builder int4 model of the same
# random llama as our exports, decoded by GenAI's own loop, timed beside our exports in one
# `sqllm-onnx bench` run. From the repository root, after the staging of ../shared/device with the
# GenAI wheel in the bundle (EXTRA="<the default pins> onnxruntime-genai-cuda==0.18.0" for prepare.sh):
#
#   PRESET=7b DIRS="/root/e2e/fp16 /root/e2e/ort-rtn /root/e2e/sq3s0" bash benchmarks/gpu_genai.sh
#
# 1. the random model (random:llama-$PRESET, seed 0: the weights our exports of it hold) saved as a
#    Hugging Face folder (our pinned transformers);
# 2. `python -m onnxruntime_genai.models.builder -p int4 -e cuda` on it, run with the image's own
#    transformers: GenAI 0.18's builder imports names newer than our pin, so its PYTHONPATH holds only
#    onnxruntime(-gpu) and onnxruntime_genai, linked from the staged site;
# 3. `sqllm-onnx bench $DIRS --genai <builder output> --provider cuda --cuda-graph --json $OUT/...`.
# Written 2026-12-06 without a GPU machine: not run yet.
set -euo pipefail
PRESET=${PRESET:-7b}
OUT=${OUT:-$PWD/gpu-out}
WORK=${WORK:-/root/genai}
SITE=${SITE:-/root/sqllm-site}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD:$SITE
hf=$WORK/llama-$PRESET-hf
if [ ! -f "$hf/config.json" ]; then
  "$PY" - "$PRESET" "$hf" <<'EOF'
import sys
import torch
from sqllm_onnx import models
preset, out = sys.argv[1], sys.argv[2]
model, tokenizer = models.random_model("llama", preset, seed=0, dtype=torch.float16)
model.save_pretrained(out, safe_serialization=True)
tokenizer.save_pretrained(out)
print("saved", out)
EOF
fi
genai_site=$WORK/genai-site  # onnxruntime + onnxruntime_genai only: the builder uses the image's transformers
mkdir -p "$genai_site"
for p in "$SITE"/onnxruntime* "$SITE"/onnxruntime_genai*; do ln -sfn "$p" "$genai_site/$(basename "$p")"; done
built=$WORK/genai-int4-$PRESET
if [ ! -f "$built/genai_config.json" ]; then
  /usr/bin/time -v env PYTHONPATH="$genai_site" "$PY" -m onnxruntime_genai.models.builder -i "$hf" -o "$built" \
    -p int4 -e cuda -c "$WORK/cache" > "$OUT/genai_builder.log" 2>&1 || { tail -20 "$OUT/genai_builder.log"; exit 1; }
fi
: "${DIRS:?DIRS: the exported folders to time beside GenAI (e.g. benchmarks/gpu_e2e.sh outputs)}"
"$PY" -m sqllm_onnx.cli bench $DIRS --genai "$built" --provider cuda --cuda-graph --prompt-len 128 \
  --new-tokens 128 --repeats 2 --json "$OUT/e2e_bench_genai_$PRESET.json" --markdown "$OUT/e2e_bench_genai_$PRESET.md"

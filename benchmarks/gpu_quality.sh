#!/usr/bin/env bash
# Quantizer quality on the GPU machine (docs/results.md "Quantizer quality", issue 3) and the ORT-CPU
# versus torch perplexity check of the exporter (issue 4), in one run. From the repo root:
#
#   PYTHONPATH=<site with torch + the transformers/optimum pins> bash benchmarks/gpu_quality.sh
#
# 1. `sqllm-onnx quantize --eval` (torch float32 on the GPU, all held-out windows) for the table:
#    SqueezeLLM 3/4 bit at 0 / 0.05 / 0.45 %, RTN 3/4, unweighted k-means 3/4. One Fisher
#    (100 x 512 tokens) is computed by the first run, which therefore also gives the GPU wall time
#    from scratch, and shared by the others through --fisher-cache.
# 2. For sq{3,4} at 0 % and 0.45 %, in the background while the GPU goes on: a float32 export from that
#    checkpoint (`export --from-checkpoint`) and its perplexity through ONNX Runtime on the CPU
#    (`sqllm-onnx eval --provider cpu`), on the same windows as the torch number of step 1.
# Checkpoints stay in $WORK (named like gpu_e2e.sh's variants, so that it can reuse them through
# CKPT=$WORK). Output under $OUT: quality.log, quality.md (table), quality_ort.json, and the manifests.
set -u -o pipefail
START=$(date +%s)
BUDGET_S=${BUDGET_S:-560}
OUT=${OUT:-$PWD/gpu-out}
WORK=${WORK:-/root/q}
PY=${PYTHON:-python3}
CONFIGS=${CONFIGS:-"sq3s45 sq3s0 sq4s0 sq4s45 rtn3 rtn4 km3 sq3s5 sq4s5 km4"}
ORT_CHECK=${ORT_CHECK:-"sq3s0 sq3s45 sq4s0 sq4s45"}
export PYTHONPATH=$PWD:${PYTHONPATH:-}
# the ORT check needs the op library (its CPU kernel): the one benchmarks/gpu_kernels.sh built
export SQLLM_OPS_LIBRARY=${SQLLM_OPS_LIBRARY:-$PWD/build/gpu/libsqllm_ops.so}
[ -f "$SQLLM_OPS_LIBRARY" ] || { echo "no op library at $SQLLM_OPS_LIBRARY (run benchmarks/gpu_kernels.sh first)"; exit 1; }
mkdir -p "$OUT" "$WORK"
LOG=$OUT/quality.log
F=$WORK/fisher-smollm2-stdlib-100x512.safetensors
elapsed() { echo $(( $(date +%s) - START )); }
{
  echo "host $(hostname) date $(date -Is)"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1
  "$PY" -c "import torch, transformers, onnxruntime as o; print('torch', torch.__version__, 'transformers', transformers.__version__, 'onnxruntime', o.__version__)"
  echo "cpus $(nproc)"
} 2>&1 | tee -a "$LOG"

. benchmarks/quality_variants.sh  # (run from the repository root)
ort_check() {  # NAME: float32 export from the checkpoint, then ORT CPU perplexity (background job)
  local name=$1
  timeout -k 10 $(( BUDGET_S - $(elapsed) - 5 )) bash -c "
    '$PY' -m sqllm_onnx.cli export --from-checkpoint '$WORK/$name' --dtype fp32 --overwrite --no-validate \
      --out '$WORK/$name-fp32' > '$WORK/$name-fp32.log' 2>&1 &&
    '$PY' -m sqllm_onnx.cli eval '$WORK/$name-fp32' --provider cpu --threads 6 --json '$WORK/ort-$name.json' \
      >> '$WORK/$name-fp32.log' 2>&1" && echo "   ort check $name done at $(elapsed)s" | tee -a "$LOG" \
    || { echo "   ort check $name FAILED (rc $?) at $(elapsed)s:" | tee -a "$LOG"; tail -5 "$WORK/$name-fp32.log" | tee -a "$LOG"; }
}

for name in $CONFIGS; do
  left=$(( BUDGET_S - $(elapsed) - 20 ))
  if (( left < 30 )); then echo "== $name: skipped (budget)" | tee -a "$LOG"; continue; fi
  extra=(--eval $(quantize_extra "$name" "$F"))
  rm -rf "$WORK/$name"
  echo "== $name: sqllm-onnx quantize $(quantize_args "$name") ${extra[*]} (limit ${left}s, at $(elapsed)s)" | tee -a "$LOG"
  timeout -k 10 "$left" /usr/bin/time -v "$PY" -m sqllm_onnx.cli quantize --no-progress $(quantize_args "$name") "${extra[@]}" \
    --out "$WORK/$name" > "$WORK/$name.log" 2>&1
  rc=$?
  grep -E "^(perplexity|wall time|quantized)|Maximum resident|Elapsed \(wall" "$WORK/$name.log" | sed 's/^\s*/   /' | tee -a "$LOG"
  [ $rc = 0 ] || { echo "   rc $rc"; tail -5 "$WORK/$name.log"; } | tee -a "$LOG"
  [ $rc = 0 ] && cp "$WORK/$name/manifest.json" "$OUT/manifest-$name.json"
  [ $rc = 0 ] && [[ " $ORT_CHECK " == *" $name "* ]] && ort_check "$name" &
done
wait
"$PY" benchmarks/quantize_table.py "$OUT" > "$OUT/quality.md" 2>&1; cat "$OUT/quality.md" | tee -a "$LOG"
"$PY" - "$WORK" "$OUT" $ORT_CHECK <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys
work, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = []
for n in names:
    try:
        torch_ppl = json.load(open(os.path.join(work, n, "manifest.json")))["evaluation"]["ppl"]
        ort = json.load(open(os.path.join(work, f"ort-{n}.json")))
    except (OSError, KeyError) as e:
        print(f"{n}: incomplete ({e})"); continue
    rows.append({"name": n, "torch_ppl": torch_ppl, "ort_cpu_ppl": ort["perplexity"], "windows": ort["windows"],
                 "rel_diff_percent": 100 * (ort["perplexity"] / torch_ppl - 1)})
    print(f"{n}: torch fp32 {torch_ppl:.4f}  ORT CPU fp32 {ort['perplexity']:.4f}  ({ort['windows']} windows) "
          f"diff {rows[-1]['rel_diff_percent']:+.3f}% (acceptance: within 0.5%)")
json.dump(rows, open(os.path.join(out, "quality_ort.json"), "w"), indent=2)
EOF
echo "total $(elapsed)s" | tee -a "$LOG"

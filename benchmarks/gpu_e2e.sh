#!/usr/bin/env bash
# End to end on the GPU machine (issue 6): export, perplexity through ORT CUDA, decode speed and
# memory, for one model and the whole comparison set, in one run. From the repo root:
#
#   MODEL=smollm2-135m bash benchmarks/gpu_e2e.sh     # quality and speed (the embedded model)
#   MODEL=random:llama-7b bash benchmarks/gpu_e2e.sh  # speed and memory only (random weights)
#
# Needs: PYTHONPATH with onnxruntime-gpu + the transformers/optimum pins (../shared/device), the op
# library built for the GPU (SQLLM_OPS_LIBRARY, default build/gpu/libsqllm_ops.so from
# benchmarks/gpu_kernels.sh). Writes under $OUT: e2e.log, e2e_bench.json/.md, e2e_ppl.json, and
# the export logs with peak RSS (GNU time) per export.
# RESERVE_S / EXPORT_CAP_S: seconds kept for the benchmark / allowed per export (7B: ~200 / 420).
# METHODS: which variants to export (default: all). CKPT: a folder of checkpoints named like the
# variants (benchmarks/gpu_quality.sh's $WORK): those variants are exported from them. Each step has a time limit so the script ends
# before BUDGET_S. REUSE=1: a variant whose finished export is already in $WORK (a manifest there) is
# benchmarked as it is, not exported again (7B: export in one device call, benchmark in the next).
# BENCH=0: export only. BENCH_S: the benchmark's time limit (default 240 s).
set -u -o pipefail
START=$(date +%s)
BUDGET_S=${BUDGET_S:-570}
OUT=${OUT:-$PWD/gpu-out}
MODEL=${MODEL:-smollm2-135m}
WORK=${WORK:-/root/e2e}
PY=${PYTHON:-python3}
METHODS=${METHODS:-"fp16 ort-rtn ort-hqq sq3s0 sq3s45 sq4s0 sq4s45"}
CALIB=${CALIB:-"--calib-samples 100 --calib-seq-len 512"}
QMETHOD=${QMETHOD:-squeezellm}
EVAL_WINDOWS=${EVAL_WINDOWS:-95}
export SQLLM_OPS_LIBRARY=${SQLLM_OPS_LIBRARY:-$PWD/build/gpu/libsqllm_ops.so}
export PYTHONPATH=$PWD:${PYTHONPATH:-}
mkdir -p "$OUT" "$WORK"
. benchmarks/quality_variants.sh  # variant names -> quantize arguments (run from the repository root)
LOG=$OUT/e2e.log
tag=$(echo "$MODEL" | tr ':/' '--')
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
# seconds for the next export: at most EXPORT_CAP_S, keeping RESERVE_S for the benchmark after them
export_limit() { local l=$(( $(left) - ${RESERVE_S:-0} )); (( l > ${EXPORT_CAP_S:-300} )) && l=${EXPORT_CAP_S:-300}; echo $l; }
run() {  # run NAME SECONDS CMD...  (GNU time -v for peak RSS when available)
  local name=$1 secs=$2; shift 2
  (( secs > $(left) )) && secs=$(left)
  if (( secs < 20 )); then echo "== $name: skipped (budget)" | tee -a "$LOG"; return 1; fi
  echo "== $name (limit ${secs}s, at $(elapsed)s)" | tee -a "$LOG"
  local timer=()
  [ -x /usr/bin/time ] && timer=(/usr/bin/time -v)
  timeout -k 10 "$secs" "${timer[@]}" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  tail -n 5 "$WORK/$name.log" | grep -v "^\s*$" | sed 's/^/   /' | tee -a "$LOG"
  grep -E "Maximum resident|Elapsed \(wall" "$WORK/$name.log" | sed 's/^\s*/   /' | tee -a "$LOG"
  echo "== $name: rc $rc after $(elapsed)s" | tee -a "$LOG"
  return $rc
}
{
  echo "host $(hostname) date $(date -Is) model $MODEL"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1
  "$PY" -c "import onnxruntime as o, transformers, torch; print('onnxruntime', o.__version__, o.get_available_providers(), 'transformers', transformers.__version__, 'torch', torch.__version__)"
  nproc; free -g | head -2
} 2>&1 | tee -a "$LOG"
[ -f "$SQLLM_OPS_LIBRARY" ] || { echo "no op library at $SQLLM_OPS_LIBRARY (run benchmarks/gpu_kernels.sh first)" | tee -a "$LOG"; exit 1; }

dirs=()
base=$WORK/$tag-fp16
reusable() {  # reusable DIR: REUSE=1 and DIR holds a finished export
  [ "${REUSE:-0}" = 1 ] && [ -f "$1/sqllm_manifest.json" ] && { echo "== reusing $1" | tee -a "$LOG"; dirs+=("$1"); }
}
for m in $METHODS; do
  reusable "$WORK/$tag-$m" && continue  # every variant's folder, $base included, is $WORK/$tag-$m
  case $m in
    fp16)
      run export-fp16 "$(export_limit)" "$PY" -m sqllm_onnx.cli export --model "$MODEL" --method none --dtype fp16 --overwrite \
        --no-validate --out "$base" \
        && dirs+=("$base") ;;
    ort-rtn|ort-hqq)
      algo=${m#ort-}
      rm -rf "$WORK/$tag-ort-$algo"
      [ -d "$base" ] && run "export-ort-$algo" "$(export_limit)" "$PY" -c "from sqllm_onnx.bench.ort_int4 import quantize_ort_int4; quantize_ort_int4('$base', '$WORK/$tag-ort-$algo', '$algo')" \
        && dirs+=("$WORK/$tag-ort-$algo") ;;
    sq*)
      qargs=($(quantize_args "$m")) || continue  # --bits B --sparsity S
      extra=()
      [ "$QMETHOD" != squeezellm ] && extra+=(--method "$QMETHOD" --no-validate)
      [ "$QMETHOD" != squeezellm ] && [ "${qargs[3]}" != 0 ] && extra+=(--sensitive 0)
      if [ -n "${CKPT:-}" ] && [ -f "$CKPT/$m/manifest.json" ]; then  # quantized already (gpu_quality.sh)
        src=(--from-checkpoint "$CKPT/$m")
      else
        src=("${qargs[@]}" $CALIB "${extra[@]}")
      fi
      run "export-$m" "$(export_limit)" "$PY" -m sqllm_onnx.cli export --model "$MODEL" --dtype fp16 --overwrite "${src[@]}" --out "$WORK/$tag-$m" \
        && dirs+=("$WORK/$tag-$m") ;;
  esac
done
echo "exported: ${dirs[*]}" | tee -a "$LOG"
du -sh "${dirs[@]}" 2>/dev/null | tee -a "$LOG"

if [ ${#dirs[@]} -gt 0 ] && [ "${BENCH:-1}" = 1 ]; then
  run bench "${BENCH_S:-240}" "$PY" -m sqllm_onnx.cli bench "${dirs[@]}" --provider cuda --prompt-len 128 --new-tokens 128 --repeats 2 \
    --json "$OUT/e2e_bench_$tag.json" --markdown "$OUT/e2e_bench_$tag.md"
  cat "$OUT/e2e_bench_$tag.md" 2>/dev/null | tee -a "$LOG"
  if [[ "$MODEL" != random:* ]]; then
    for d in "${dirs[@]}"; do
      run "ppl-$(basename "$d")" 90 "$PY" -m sqllm_onnx.cli eval "$d" --provider cuda --max-windows "$EVAL_WINDOWS" \
        --json "$WORK/ppl-$(basename "$d").json"
    done
    "$PY" - "$WORK" "$OUT/e2e_ppl_$tag.json" <<'EOF' | tee -a "$LOG"
import glob, json, os, sys
rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(sys.argv[1], "ppl-*.json")))]
json.dump(rows, open(sys.argv[2], "w"), indent=2)
for r in rows:
    print(f"{os.path.basename(r['model_dir'])}: ppl {r['perplexity']:.4f} ({r['windows']} windows, {r['seconds']} s)")
EOF
  fi
fi
echo "total $(elapsed)s" | tee -a "$LOG"

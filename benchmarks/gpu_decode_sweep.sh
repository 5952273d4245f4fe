#!/usr/bin/env bash
# One-shot sweep of the tensor-core decode variants (ops/cuda/decode_*.cu, docs/cuda-kernels.md
# "Decode variants") on the H100 machine. Run from the repo root:
#
#   ORT_INCLUDE_DIR=<carried ORT headers> PYTHONPATH=<site with onnxruntime-gpu + torch> \
#     bash benchmarks/gpu_decode_sweep.sh
#
# Steps, each under its own time limit (the whole script stops itself before BUDGET_S, default 450 s;
# typical: 40 + 70 + 45 + 3 x 35 + 60 s):
#   1. build      libsqllm_ops.so for sm_90a into build/gpu (reused when already configured)
#   2. variants   tests/test_op_cuda.py::test_decode_variant for every variant (failed ones rerun alone, so
#                 that a faulting kernel cannot take the others down); only the variants that pass are timed
#   3. defaults   the decode-path tests of tests/test_op_cuda.py with the library's default policy
#   4. sweep      kernel-only time (CUDA graph of a rotation over distinct layers, CUDA events) of every
#                 passing variant: 3 and 4 bits at 4096x4096, 4096x11008, 11008x4096, 4096x32000 (M = 1),
#                 4096x11008 at M = 4, and 4096x11008 / 11008x4096 3-bit 0.45% sparse; table with GB/s
#                 and % of copy bandwidth, the winner per row, and suggested kPolicy rows
#   5. ncu        Nsight Compute (targeted sections) on 2 launches each of: base and the fastest variant
#                 at 4096x11008 3-bit, and the fastest 4-bit variant at 4096x11008 (ncu locks clocks to
#                 base: compare its durations with each other, not with the sweep)
#   6. prefill    M = 512 (the fixed harness: 4 ops, CUDA-graph sessions only): fp16 MatMul vs
#                 SqueezeMatMul 3b / 4b at the three shapes, then 3b / 4b again with 24 MiB chunks
# STEPS selects steps (default "build variants defaults sweep ncu prefill").
# Files under $OUT (8): sweep.log (everything printed), sweep.json, sweep.md, ncu_base_3b.txt,
# ncu_best_3b.txt, ncu_best_4b.txt, prefill.json, prefill.md.
set -u -o pipefail

START=$(date +%s)
BUDGET_S=${BUDGET_S:-450}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
BUILD=build/gpu
LIB=$PWD/$BUILD/libsqllm_ops.so
PY=${PYTHON:-python3}
STEPS=${STEPS-build variants defaults sweep ncu prefill}
LOG=$OUT/sweep.log
declare -A STATUS=()
want() { [[ " $STEPS " == *" $1 "* ]]; }

for d in /usr/local/cuda/bin /usr/local/cuda-13.0/bin /usr/local/cuda-12/bin; do [ -d "$d" ] && PATH="$PATH:$d"; done
export PATH
elapsed() { echo $(( $(date +%s) - START )); }
# limit CAP RESERVE: seconds for the next step: at most CAP, leaving RESERVE for the steps after it.
limit() { local left=$(( BUDGET_S - $(elapsed) - $2 )); (( left > $1 )) && left=$1; (( left < 0 )) && left=0; echo $left; }
step() {  # step NAME SECONDS CMD...: runs CMD with a time limit, output to the log, records the status
  local name=$1 secs=$2; shift 2
  if (( secs < 10 )); then echo "== $name: skipped (time budget spent)" | tee -a "$LOG"; STATUS[$name]=skipped; return 1; fi
  echo "== $name (limit ${secs}s, at $(elapsed)s): $*" | tee -a "$LOG"
  timeout -k 10 "$secs" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  case $rc in 0) STATUS[$name]=ok ;; 124|137) STATUS[$name]="timeout (${secs}s)" ;; *) STATUS[$name]="failed (rc $rc)" ;; esac
  echo "== $name: ${STATUS[$name]} after $(elapsed)s" | tee -a "$LOG"
  [ "${STATUS[$name]}" = ok ]
}

: > "$LOG"
{
  echo "host $(hostname)  date $(date -Is)"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,memory.total --format=csv,noheader 2>&1 || true
  nvcc --version 2>&1 | tail -1 || true
  command -v ncu >/dev/null && ncu --version 2>&1 | tail -1 || echo "ncu not found"
  "$PY" -c "import onnxruntime as o, numpy; print('onnxruntime', o.__version__, o.get_available_providers(), 'numpy', numpy.__version__)" 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, torch.version.cuda)" 2>&1 || true
} | tee -a "$LOG"

# ---- 1. build ----------------------------------------------------------------------------------------------
if want build; then
  if [ ! -f "$BUILD/build.ninja" ]; then
    step configure "$(limit 60 380)" cmake -S . -B "$BUILD" -G Ninja -DSQLLM_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90a-real -DCMAKE_BUILD_TYPE=Release ${ORT_INCLUDE_DIR:+-DORT_INCLUDE_DIR="$ORT_INCLUDE_DIR"}
  fi
  step build "$(limit 180 330)" cmake --build "$BUILD" -j "$(nproc)"
  if [ ! -f "$LIB" ] || [ "${STATUS[build]:-}" != ok ]; then echo "build failed: see $LOG"; exit 1; fi
  command -v cuobjdump >/dev/null && cuobjdump --dump-resource-usage "$LIB" 2>&1 | grep -E "Function|REG" \
    | sed -E 's/.*(Decode[A-Za-z]*Kernel[A-Za-z0-9_]*|Dequantize[A-Za-z]*|BiasFill[A-Za-z]*).*/  \1/' | tee -a "$LOG"
fi
[ -f "$LIB" ] && export SQLLM_OPS_LIBRARY=$LIB  # else the installed library (sqllm_onnx/_lib)

# ---- 2. every variant against the reference -------------------------------------------------------------------------
ALL_VARIANTS=$("$PY" -c "import sys; sys.path.insert(0, 'tests'); import test_op_cuda as t; print(' '.join(t.DECODE_VARIANTS))" 2>>"$LOG")
echo "decode variants: ${ALL_VARIANTS:-<none: library without the CUDA decode hooks?>}" | tee -a "$LOG"
PASSED=()
if want variants; then
  # All variants in one process; if some fail, each failed one again alone (a kernel fault poisons the
  # CUDA context of its process, so the variants after it would fail too).
  step variants "$(limit 90 300)" "$PY" -m pytest -q -p no:cacheprovider -rfE tests/test_op_cuda.py -k test_decode_variant
  if ! sed -n '/== variants (limit/,$p' "$LOG" | grep -qE "[0-9]+ passed"; then
    echo "no variant test ran (skipped: no CUDAExecutionProvider?): nothing will be timed" | tee -a "$LOG"
    STATUS[variants]="no test ran"
  elif [ "${STATUS[variants]}" = ok ]; then
    PASSED=($ALL_VARIANTS)
  else
    FAILED_LINES=$(sed -n '/== variants (limit/,$p' "$LOG" | grep -E "^(FAILED|ERROR) .*test_decode_variant" || true)
    for v in $ALL_VARIANTS; do
      if [ -n "$FAILED_LINES" ] && ! grep -q "test_decode_variant\[$v-" <<< "$FAILED_LINES"; then
        PASSED+=("$v")  # the run reported its failures and this variant is not among them
      elif step "variant_$v" "$(limit 40 300)" "$PY" -m pytest -q -p no:cacheprovider -rfE tests/test_op_cuda.py \
          -k "test_decode_variant and $v"; then
        PASSED+=("$v")
      fi
    done
  fi
else
  PASSED=($ALL_VARIANTS)
fi
echo "variants that passed: ${PASSED[*]:-none}" | tee -a "$LOG"

# ---- 3. the default policy through ORT (decode-path tests) -------------------------------------------------------
want defaults && step defaults "$(limit 100 240)" "$PY" -m pytest -q -p no:cacheprovider -rfE tests/test_op_cuda.py \
  -k "decode_rows or bench_shapes or cuda_graph or heavy_sparse or all_bit_widths or random_shapes or large_layer"

# ---- 4. the sweep ------------------------------------------------------------------------------------------------------
if want sweep && [ ${#PASSED[@]} -gt 0 ]; then
  VARS=$(IFS=,; echo "${PASSED[*]}")
  step sweep "$(limit 150 180)" "$PY" -m sqllm_onnx.bench.cuda_events sweep --variants "$VARS" \
    --shapes 4096x4096,4096x11008,11008x4096,4096x32000 --bits 3,4 --m 1 \
    --extra 4096x11008x3x4,4096x11008x4x4,4096x11008x3x1x0.45,11008x4096x3x1x0.45 \
    --json "$OUT/sweep.json" --markdown "$OUT/sweep.md"
fi

# ---- 5. Nsight Compute ----------------------------------------------------------------------------------------------
best() {  # best BITS: the fastest variant at 4096x11008, M = 1, dense (from sweep.json), else ""
  "$PY" - "$OUT/sweep.json" "$1" <<'EOF' 2>/dev/null
import json, math, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if (r["K"], r["N"], r["M"], r["bits"]) == (4096, 11008, 1, int(sys.argv[2]))
        and not r["sparsity"] and not math.isnan(r["us"])]
print(min(rows, key=lambda r: r["us"])["variant"] if rows else "")
EOF
}
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
SECTIONS=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables
          --section ComputeWorkloadAnalysis --section Occupancy --section WarpStateStats --section SchedulerStats
          --section LaunchStats)
profile() {  # profile NAME VARIANT BITS
  local out=$OUT/ncu_$1.txt secs
  secs=$(limit 70 60)
  if (( secs < 20 )); then echo "== ncu $1: skipped (time budget spent)" | tee -a "$LOG"; STATUS[ncu_$1]=skipped; return; fi
  echo "== ncu $1: variant $2, 4096x11008 ${3}-bit, M = 1 (limit ${secs}s, at $(elapsed)s)" | tee -a "$LOG"
  timeout -k 10 "$secs" "$NCU" --target-processes all -k regex:Decode --launch-skip 2 --launch-count 2 "${SECTIONS[@]}" \
    "$PY" -m sqllm_onnx.bench.cuda_events profile --variant "$2" --shape 4096x11008 --bits "$3" --warmup 2 --launches 2 \
    > "$out" 2>&1
  local rc=$?
  STATUS[ncu_$1]=$([ $rc = 0 ] && echo ok || echo "rc $rc")
  grep -E "^  [A-Za-z].*Kernel|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|No Eligible|Shared.*Bank|L1/TEX Hit|Compute \(SM\) Throughput" "$out" \
    | head -40 | sed 's/^/    /' | tee -a "$LOG"
  echo "== ncu $1: ${STATUS[ncu_$1]} after $(elapsed)s" | tee -a "$LOG"
}
if want ncu && [ -x "$NCU" ] && [ -f "$OUT/sweep.json" ]; then
  B3=$(best 3); B4=$(best 4)
  [ " ${PASSED[*]} " == *" base "* ] && profile base_3b base 3
  if [ -n "$B3" ] && [ "$B3" != base ]; then profile best_3b "$B3" 3
  elif [ " ${PASSED[*]} " == *" pipe "* ]; then profile best_3b pipe 3; fi
  [ -n "$B4" ] && profile best_4b "$B4" 4
elif want ncu; then
  echo "== ncu: skipped (no ncu at $NCU, or no sweep.json)" | tee -a "$LOG"; STATUS[ncu]=skipped
fi

# ---- 6. prefill, M = 512 ------------------------------------------------------------------------------------------------
PBENCH=("$PY" -m sqllm_onnx.cli bench kernel --provider cuda --m 512 --ops 4 --repeats 10 --no-kernel-only --graph-modes graph
        --shapes 4096x4096,4096x11008,11008x4096)
if want prefill; then
  step prefill "$(limit 90 35)" "${PBENCH[@]}" --methods "ORT MatMul (float),SqueezeMatMul 3b,SqueezeMatMul 4b" \
    --json "$OUT/prefill.json" --markdown "$OUT/prefill.md"
  step prefill_chunks "$(limit 45 5)" env SQLLM_CUDA_PREFILL_CHUNK_MB=24 "${PBENCH[@]}" \
    --methods "SqueezeMatMul 3b,SqueezeMatMul 4b" --json "$OUT/prefill_chunks.json" --markdown "$OUT/prefill_chunks.md"
fi

# ---- summary ------------------------------------------------------------------------------------------------------------------
SUMMARY_PY=$(cat <<'EOF'
import json, math, os, sys
out, passed = sys.argv[1], sys.argv[2].split()
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else None
sw = load("sweep.json")
if sw:
    copy = sw["copy_gbps"]
    print(f"device {sw['device']}, copy bandwidth {copy:.0f} GB/s; variants timed: {', '.join(sw['variants'])}")
    def t(K, N, bits, v, M=1, sp=0.0):
        for r in sw["rows"]:
            if (r["K"], r["N"], r["bits"], r["M"], r["variant"], r["sparsity"]) == (K, N, bits, M, v, sp) and not math.isnan(r["us"]):
                return r["us"]
    # kernel-only targets (the CUDA-graph per-op targets add ~0.6 us of ORT/graph overhead per op, as measured)
    nbits = {(4096, 4096): 7.7, (4096, 11008): 14.3, (11008, 4096): 16.9}  # ORT MatMulNBits 4b g128, graph us
    for bits, lim in ((3, {(4096, 4096): 0.6, (4096, 11008): 0.5, (11008, 4096): 0.5}), (4, {k: 0.7 for k in nbits})):
        for (K, N), f in lim.items():
            times = {v: t(K, N, bits, v) for v in sw["variants"]}
            times = {v: x for v, x in times.items() if x}
            if not times:
                continue
            v = min(times, key=times.get)
            need = f * nbits[(K, N)] - 0.6
            print(f"  {bits}b {K}x{N}: best {v} {times[v]:.2f} us kernel (base {times.get('base', float('nan')):.2f}); "
                  f"target per-op {f} x {nbits[(K, N)]} us -> kernel <= ~{need:.1f} us: {'PASS' if times[v] <= need else 'MISS'}")
    times = {v: t(4096, 11008, 3, v) for v in sw["variants"]}
    times = {v: x for v, x in times.items() if x}
    if times:
        v = min(times, key=times.get)
        wb = next(r["weight_bytes"] for r in sw["rows"] if (r["K"], r["N"], r["bits"]) == (4096, 11008, 3))
        pct = 100 * wb / (times[v] * 1e-6) / 1e9 / copy
        print(f"  3b 4096x11008 kernel-only: {pct:.0f}% of copy bandwidth ({v}); target >= 75%: {'PASS' if pct >= 75 else 'MISS'}")
    for K, N in ((4096, 11008), (11008, 4096)):
        for v in sw["variants"]:
            d, s = t(K, N, 3, v), t(K, N, 3, v, sp=0.45)
            if d and s:
                print(f"  3b 0.45% / dense {K}x{N} {v}: {s / d:.2f} (target <= 1.15)")
pre, chunks = load("prefill.json"), load("prefill_chunks.json")
if pre:
    def g(res, K, N, name):
        for r in (res or {}).get("rows", []):
            if (r["K"], r["N"], r["method"]) == (K, N, name) and "graph_us" in r:
                return r["graph_us"]
    for bits in (3, 4):
        for K, N in ((4096, 4096), (4096, 11008), (11008, 4096)):
            s, m, c = g(pre, K, N, f"SqueezeMatMul {bits}b"), g(pre, K, N, "ORT MatMul (float)"), g(chunks, K, N, f"SqueezeMatMul {bits}b")
            if s and m:
                print(f"  prefill M=512 {bits}b {K}x{N}: {s:.1f} us vs fp16 {m:.1f} us = {s / m:.2f}x"
                      + (f" (24 MiB chunks: {c:.1f} us = {c / m:.2f}x)" if c else "") + " (target <= 1.3x)")
    if chunks:
        pre["rows"] += [dict(r, method=r["method"] + " (24 MiB chunks)") for r in chunks["rows"]]
        json.dump(pre, open(os.path.join(out, "prefill.json"), "w"), indent=2)
        from sqllm_onnx.bench import kernel
        open(os.path.join(out, "prefill.md"), "w").write(kernel.to_markdown(pre, "bash benchmarks/gpu_decode_sweep.sh "
            "(bench kernel --m 512 --ops 4 --repeats 10 --no-kernel-only --graph-modes graph; chunked rows: "
            "SQLLM_CUDA_PREFILL_CHUNK_MB=24)"))
for f in ("prefill_chunks.json", "prefill_chunks.md"):
    if os.path.exists(os.path.join(out, f)):
        os.remove(os.path.join(out, f))
EOF
)
{
  echo; echo "==== summary ($(elapsed)s) ===="
  for s in configure build variants defaults sweep prefill prefill_chunks; do [ -n "${STATUS[$s]:-}" ] && printf '  %-16s %s\n' "$s" "${STATUS[$s]}"; done
  for v in $ALL_VARIANTS; do [ -n "${STATUS[variant_$v]:-}" ] && printf '  %-16s %s\n' "variant_$v" "${STATUS[variant_$v]}"; done
  echo "  variants passed: ${PASSED[*]:-none}"
  for s in ncu_base_3b ncu_best_3b ncu_best_4b; do [ -n "${STATUS[$s]:-}" ] && printf '  %-16s %s\n' "$s" "${STATUS[$s]}"; done
  [ -f "$OUT/sweep.md" ] && cat "$OUT/sweep.md"
  "$PY" -c "$SUMMARY_PY" "$OUT" "${PASSED[*]}" 2>&1
  ls "$OUT"
} | tee -a "$LOG"
[ "${STATUS[build]:-ok}" = ok ] && [ ${#PASSED[@]} -gt 0 ] && [ "${STATUS[sweep]:-ok}" = ok ]

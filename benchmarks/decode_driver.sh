#!/usr/bin/env bash
# One GPU call of kernel work on the tensor-core decode kernel (benchmarks/decode_driver.cu): build
# the driver for each variant in VARIANTS (name=nvcc -D flags), check the first against the float64
# reference, time them (MODE=quick: six key rows; bench: every model shape), and profile the first
# with Nsight Compute. Needs only the CUDA toolkit (no onnxruntime-gpu). SRC_<name>=FILE builds
# variant <name> from another kernel source (e.g. the committed one, to compare in one call).
# CHECK="a b": check only these variants (timing-only variants of one source need no check).
# Outputs (logs, JSON) under ${OUT:-/tmp/decode_driver}; binaries under /tmp/decode_driver_bin.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/decode_driver}; mkdir -p "$OUT"
BIN=/tmp/decode_driver_bin; mkdir -p "$BIN"
VARIANTS=${VARIANTS:-"base="}
STEPS=${STEPS:-"build check bench ncu"}
MODE=${MODE:-quick}
ARCH=${ARCH:-"-gencode=arch=compute_90a,code=sm_90a"}
has() { [[ " $STEPS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader || true
names=()
for v in $VARIANTS; do names+=("${v%%=*}"); done
if has build; then
  for v in $VARIANTS; do
    name=${v%%=*}; flags=${v#*=}; flags=${flags//,/ }
    src_var="SRC_$name"; src=${!src_var:-ops/cuda/decode_tc.cu}  # SRC_<name>=file: another kernel source
    nvcc -std=c++17 -O3 --expt-relaxed-constexpr $ARCH -lineinfo $flags -Iops/include -Iops -Iops/cuda \
      benchmarks/decode_driver.cu "$src" ops/cuda/device_info.cc -lcublas -o "$BIN/$name" \
      > "$BIN/build_$name.log" 2>&1 &
  done
  wait
  for n in "${names[@]}"; do [ -x "$BIN/$n" ] || { echo "build failed: $n"; cat "$BIN/build_$n.log"; exit 1; }; done
  echo "built: ${names[*]}"
fi
first=${names[0]}
if has check; then  # every variant (or those in CHECK) against the float64 reference
  for n in ${CHECK:-${names[@]}}; do
    "$BIN/$n" check > "$OUT/check_$n.log" 2>&1; rc=$?
    echo "check $n: $(grep -E "checks failed" "$OUT/check_$n.log" | tail -1)"
    grep -E "FAIL" "$OUT/check_$n.log" | head -10
    [ $rc -eq 0 ] || echo "check $n rc=$rc"
  done
fi
if has bench; then
  for n in "${names[@]}"; do
    echo "== $n"
    "$BIN/$n" "$MODE" "$OUT/bench_$n.json" 2>&1 | tail -n +2 | tee "$OUT/bench_$n.log"
  done
fi
if has ncu; then
  ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section Occupancy --section SchedulerStats --section LaunchStats --section ComputeWorkloadAnalysis \
    --section InstructionStats --section SourceCounters \
    -k regex:DecodeTc --launch-skip 3 --launch-count 1 "$BIN/$first" one 1 4096 11008 3 0 6 > "$OUT/ncu_3b.txt" 2>&1
  grep -E "Duration|DRAM Throughput|Issue Slots Busy|No Eligible|Achieved Occupancy|Warp Cycles Per Issued|Executed Instructions  " "$OUT/ncu_3b.txt" | head -12
  # every metric of the stall and shared-memory sections, raw (stall reasons per issued instruction)
  ncu --clock-control none --section WarpStateStats --section MemoryWorkloadAnalysis_Tables --page raw \
    -k regex:DecodeTc --launch-skip 3 --launch-count 1 "$BIN/$first" one 1 4096 11008 3 0 6 > "$OUT/ncu_3b_raw.txt" 2>&1
  grep -E "issue_stalled|shared.*wavefronts|shared.*bank_conflict" "$OUT/ncu_3b_raw.txt" | awk '$NF+0 > 0.05' | head -40
fi
# everything in one file (a call returns at most 8 files)
tar czf /tmp/decode_driver_logs.tgz -C "$OUT" . && find "$OUT" -maxdepth 1 -type f -delete && mv /tmp/decode_driver_logs.tgz "$OUT/logs.tgz"

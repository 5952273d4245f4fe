#!/usr/bin/env bash
# GPU decode speed of FineQuant (issue 9) against fixed-block RTN and SqueezeLLM, for the H100 machine.
# Run from the repo root, with onnxruntime-gpu on PYTHONPATH and the op library installed (SqueezeLLM
# rows need it; MatMulNBits is ORT's own op):
#
#   PYTHONPATH=<site with onnxruntime-gpu> bash benchmarks/finequant_gpu.sh
#
# 1. exports SmolLM2-135M (the embedded model), dtype fp16, in parallel (OMP threads split between them):
#      fp16 (unquantized, the speed-up baseline), FineQuant int4 (adaptive blocks), fixed-block RTN int4
#      with block 32 and 128 (--method finequant --block-size B), SqueezeLLM 4-bit 0 % (calibration
#      16 x 256 tokens, as in docs/results.md); FQ8=1 adds FineQuant int8
# 2. checks that ORT put every MatMulNBits node of the FineQuant export on the CUDA EP (node profile)
# 3. python3 -m sqllm_onnx.cli bench DIR... --provider cuda (batch 1, prompt 128, 128 new tokens,
#    KV cache on the device); rows labelled from the manifests (bench.decode.describe)
# Files under $OUT: finequant_bench.json finequant_bench.md export-*.log placement.txt
# Typical time on the H100 machine (16 cores): ~1.5-3 min, mostly the exports.
set -u -o pipefail
START=$(date +%s)
OUT=${OUT:-$PWD/gpu-out}
WORK=${WORK:-$PWD/build/finequant-gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
CLI=("$PY" -m sqllm_onnx.cli)
{
  echo "host $(hostname)  date $(date -Is)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 || true
} | tee "$OUT/env.txt"

export_one() {  # export_one NAME ARGS... (an unquantized export when ARGS is "none")
  local name=$1; shift
  local dir=$WORK/$name
  if [ -f "$dir/model.onnx" ]; then echo "$name: exists"; return 0; fi
  if [ "$1" = none ]; then
    "$PY" -c "from sqllm_onnx.export.exporter import export; export('$dir', None, None, dtype='fp16', progress=False)" \
      > "$OUT/export-$name.log" 2>&1
  else
    "${CLI[@]}" export --dtype fp16 --out "$dir" "$@" > "$OUT/export-$name.log" 2>&1
  fi
  local rc=$?
  echo "$name: rc $rc after $(( $(date +%s) - START ))s"
  return $rc
}

THREADS=$(( $(nproc) / 5 )); (( THREADS < 1 )) && THREADS=1
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
NAMES=(fp16 fq-int4 rtn-int4-b32 rtn-int4-b128 sqllm-4b-0)
export_one fp16 none &
export_one fq-int4 --method finequant --bits 4 &
export_one rtn-int4-b32 --method finequant --bits 4 --block-size 32 &
export_one rtn-int4-b128 --method finequant --bits 4 --block-size 128 &
export_one sqllm-4b-0 --bits 4 --sparsity 0 --calib-samples 16 --calib-seq-len 256 &
if [ "${FQ8:-0}" = 1 ]; then export_one fq-int8 --method finequant --bits 8 & NAMES+=(fq-int8); fi
FAILED=0
for job in $(jobs -p); do wait "$job" || FAILED=1; done
echo "exports done after $(( $(date +%s) - START ))s (failed: $FAILED)"
DIRS=()
for n in "${NAMES[@]}"; do [ -f "$WORK/$n/model.onnx" ] && DIRS+=("$WORK/$n") || echo "missing export: $n (see $OUT/export-$n.log)"; done
unset OMP_NUM_THREADS MKL_NUM_THREADS

# 2. node placement of the FineQuant export on the CUDA EP (ORT's profiler records each node's provider)
"$PY" - "$WORK/fq-int4" > "$OUT/placement.txt" 2>&1 <<'EOF'
import collections, json, os, sys
import numpy as np, onnxruntime as ort
import sqllm_onnx
from sqllm_onnx.runtime.session import Decoder
ort.preload_dlls() if hasattr(ort, "preload_dlls") else None
so = ort.SessionOptions()
so.enable_profiling = True
so.profile_file_prefix = os.path.join(os.environ.get("OUT", "."), "fq_profile")
sqllm_onnx.register(so)
s = ort.InferenceSession(os.path.join(sys.argv[1], "model.onnx"), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
d = Decoder(s)
d.step(np.arange(3, 19)); d.step([5])
events = json.load(open(s.end_profiling()))
where = collections.Counter((e["args"].get("op_name"), e["args"].get("provider")) for e in events
                            if e.get("cat") == "Node" and "op_name" in e.get("args", {}))
for (op, provider), n in sorted(where.items(), key=str):
    print(f"{op:40s} {provider:28s} {n}")
cpu = [op for (op, p) in where if op == "MatMulNBits" and p != "CUDAExecutionProvider"]
print("MatMulNBits on CUDA only:", not cpu)
EOF
grep -E "MatMulNBits" "$OUT/placement.txt" || tail -5 "$OUT/placement.txt"
rm -f "$OUT"/fq_profile*.json

# 3. decode speed, one harness, one process
"${CLI[@]}" bench "${DIRS[@]}" --provider cuda --json "$OUT/finequant_bench.json" --markdown "$OUT/finequant_bench.md"
RC=$?
cat "$OUT/finequant_bench.md" 2>/dev/null
echo "total $(( $(date +%s) - START ))s"
exit $(( RC || FAILED ))

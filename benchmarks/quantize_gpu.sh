#!/usr/bin/env bash
# Quantization wall time of SmolLM2-135M on the GPU machine (docs/results.md, "Quantization wall time").
# Needs python3 with torch (CUDA), transformers and onnx, and the repository on PYTHONPATH; the op
# library is not used. Run from the repository root:
#     bash benchmarks/quantize_gpu.sh            # (PYTHONPATH=$PWD is set here)
# Prints one JSON line about the machine, then one per configuration (Fisher 100 x 512 tokens +
# clustering + packing, from scratch, no checkpoint folder).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
date -u +"date: %Y-%m-%dT%H:%M:%SZ"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
nproc
# clustering in torch on the GPU (the default for --device cuda) ...
python3 benchmarks/quantize_time.py --device cuda --configs 3:0 3:0.45 4:0.45
# ... and with the exact k-means in C on the host CPU (needs cc; otherwise it says native_kmeans false)
SQLLM_ONNX_NATIVE_KMEANS=1 python3 benchmarks/quantize_time.py --device cuda --configs 3:0.45 4:0.45

// Host-callable entry points of the CUDA SqueezeMatMul (ops/cuda/*). Pointers are device pointers;
// every launch goes on `stream`; nothing here synchronises the host, allocates device memory or
// creates library handles, so all of it may be captured into a CUDA graph. Return values are "" or
// an error message starting with "SqueezeMatMul (CUDA)".
//
// Paths (docs/cuda-kernels.md):
//   decode  (fp16 bits 3/4: M <= Tuning::decode_max_m; otherwise M <= 8)
//           LUT GEMV with the sparse part, the K tail and the bias fused; no scratch
//           (decode_tc.cu on sm_90+, else decode_generic.cu).
//   prefill (larger M) W (dense + sparse) dequantized into a scratch buffer, chunk by chunk of
//           rows of W, then one cuBLAS GEMM per chunk on tensor cores (fp32 compute).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "sqllm/contract.h"

namespace sqllm::cuda {

struct DeviceArgs {
  const void* a;            // T [M, K]
  const uint32_t* qweight;  // tiled, [ceil(N/16), words] (sqllm/layout.h)
  const void* lut;          // T [N, 2^bits]
  const int32_t* indptr;    // [N+1] or null
  const int32_t* indices;   // [nnz]
  const void* values;       // T [nnz]
  const void* bias;         // T [N] or null
  void* y;                  // T [M, N]
  bool half;                // T = float16 (else float32)
};

struct LaunchOptions {
  // qweight / the LUT are constant for the lifetime of the kernel (initializers): with PDL the
  // decode kernel may then start reading them before the previous kernel on the stream finished.
  bool qweight_constant = false;
  bool lut_constant = false;
  // Use the CUDA-core kernel even where the tensor-core kernel would run (tests, benchmarks).
  bool force_generic = false;
};

// Whether `p` takes the decode path (else the prefill path).
bool UsesDecodePath(const Problem& p);

// The decode path (requires UsesDecodePath(p)).
std::string LaunchDecode(const Problem& p, const DeviceArgs& args, cudaStream_t stream, const LaunchOptions& options);

// The prefill path needs a scratch buffer of PrefillScratchBytes(p) bytes (256-byte aligned) and a
// cuBLAS handle (cublas_lib.h) for the current device.
size_t PrefillScratchBytes(const Problem& p);
std::string LaunchPrefill(const Problem& p, const DeviceArgs& args, cudaStream_t stream, void* scratch,
                          void* cublas_handle);

}  // namespace sqllm::cuda

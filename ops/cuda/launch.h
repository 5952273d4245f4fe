// Host-callable launchers of the CUDA kernels (ops/cuda/*.cu). Pointers are device pointers;
// every launch goes on `stream`, and the return value is "" or a CUDA error message.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "sqllm/contract.h"

namespace sqllm::cuda {

struct DeviceArgs {
  const void* a;          // T [M, K]
  const uint32_t* qweight;  // [N, words]
  const void* lut;        // T [N, 2^bits]
  const int32_t* indptr;  // [N+1] or null
  const int32_t* indices;
  const void* values;  // T [nnz]
  const void* bias;    // T [N] or null
  void* y;             // T [M, N]
  bool half;
};

std::string LaunchSqueezeMatMul(const Problem& p, const DeviceArgs& args, cudaStream_t stream);

}  // namespace sqllm::cuda

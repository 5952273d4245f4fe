// cuBLAS loaded at run time with dlopen (never a link-time dependency, so libsqllm_ops.so still
// loads on machines without CUDA). onnxruntime's CUDA execution provider links libcublas, so in a
// CUDA session the library is already in the process and is picked up with RTLD_NOLOAD first.
#pragma once

#include <cuda_runtime.h>

#include <string>

namespace sqllm::cuda {

// The process-wide cuBLAS handle of `device`, created on first request (call at kernel creation:
// creating a handle allocates memory and must not happen during graph capture). Handles are never
// destroyed (CUDA may already be torn down when static destructors run). "" or an error message.
std::string AcquireCublasHandle(int device, void** handle);

// Column-major C[m, n] = op_T(A)[m, k] * B[k, n] + beta * C, A stored k x m (lda), B k x n (ldb),
// T = fp16 (half) or fp32, fp32 compute (CUBLAS_COMPUTE_32F: no TF32, no fp16 accumulation),
// alpha = 1, enqueued on `stream`. Serialised by a mutex (the handle is shared).
std::string CublasGemmTN(void* handle, cudaStream_t stream, bool half, int m, int n, int k, const void* A, int lda,
                         const void* B, int ldb, float beta, void* C, int ldc);

}  // namespace sqllm::cuda

// Kernel-only benchmark hook, exported from libsqllm_ops.so in CUDA builds only (used through
// ctypes by sqllm_onnx/bench/cuda_events.py and tests/test_op_cuda.py; no ONNX Runtime involved):
//
//   const char* SqllmCudaLaunchDecode(const void* a, const int32_t* qweight, const void* lut,
//                                     const int32_t* indptr, const int32_t* indices,
//                                     const void* values, const void* bias, void* y,
//                                     int64_t M, int64_t K, int64_t N, int64_t bits, int64_t nnz,
//                                     int32_t is_half, void* stream);
//
// Launches the decode path (exactly what the CUDA EP kernel launches for this problem) on `stream`
// (a cudaStream_t; null = legacy default stream) for device pointers on the current device:
// a [M, K], qweight [N, ceil(K*bits/32)], lut [N, 2^bits], indptr [N+1] / indices [nnz] /
// values [nnz] (all three null for no sparse part), bias [N] or null, y [M, N]; T = fp16 when
// is_half != 0, else fp32. qweight and the LUT are treated as constant (PDL prefetch allowed).
// Nothing is validated beyond the dimensions (the CSR content must be well formed). Requires
// M >= 1 and M within the decode path (M <= 8, or fp16 bits 3/4 with M <= SQLLM_CUDA_DECODE_MAX_M).
// Returns nullptr on success, else a message valid until the next call on the same thread.
//
//   const char* SqllmCudaLaunchDecodeVariant(<the same arguments>, int32_t variant);
//
// The same with the tensor-core decode variant forced (kernels.h DecodeVariant; -1 = the policy,
// as above): an error if that variant cannot take the problem, no fallback.
//
//   const char* SqllmCudaDecodeVariantName(int32_t variant);   // null past the last variant
//   int32_t SqllmCudaDecodeDefaultVariant(int64_t M, int64_t K, int64_t N, int64_t bits);
//
// The variants' names, and the variant the policy picks for an fp16 problem (decode_policy.cc;
// the baseline may still run if the pick declines the problem).
//
//   const char* SqllmCudaSynchronize(void);   // cudaDeviceSynchronize: null or a message (tests)
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels.h"
#include "launch.h"

#define SQLLM_EXPORT extern "C" __attribute__((visibility("default")))

SQLLM_EXPORT const char* SqllmCudaLaunchDecodeVariant(const void* a, const int32_t* qweight, const void* lut,
                                                      const int32_t* indptr, const int32_t* indices,
                                                      const void* values, const void* bias, void* y, int64_t M,
                                                      int64_t K, int64_t N, int64_t bits, int64_t nnz, int32_t is_half,
                                                      void* stream, int32_t variant) {
  static thread_local std::string message;
  using sqllm::Problem;
  Problem p;
  p.M = M;
  p.K = K;
  p.N = N;
  p.bits = static_cast<int>(bits);
  p.has_sparse = indptr != nullptr;
  p.nnz = p.has_sparse ? nnz : 0;
  p.has_bias = bias != nullptr;
  p.elem_type = is_half ? sqllm::kFloat16 : sqllm::kFloat32;
  if (K < 1 || N < 1 || K > 0x7fffffff || N > 0x7fffffff || !(bits == 2 || bits == 3 || bits == 4 || bits == 8)) {
    message = "SqllmCudaLaunchDecode: bad K, N or bits";
    return message.c_str();
  }
  p.words = sqllm::WordsPerRow(K, bits);
  if (M < 1 || !sqllm::cuda::UsesDecodePath(p)) {
    message = "SqllmCudaLaunchDecode: M = " + std::to_string(M) + " is not on the decode path";
    return message.c_str();
  }
  if (!a || !qweight || !lut || !y || (p.has_sparse && (!indices || !values) && nnz > 0)) {
    message = "SqllmCudaLaunchDecode: null pointer";
    return message.c_str();
  }
  const sqllm::cuda::DeviceArgs args{a, reinterpret_cast<const uint32_t*>(qweight), lut, indptr, indices, values,
                                     bias, y, is_half != 0};
  sqllm::cuda::LaunchOptions options;
  options.qweight_constant = true;
  options.lut_constant = true;
  if (variant >= 0 && !sqllm::cuda::DecodeVariantName(variant)) {
    message = "SqllmCudaLaunchDecodeVariant: no decode variant " + std::to_string(variant);
    return message.c_str();
  }
  options.variant = variant < 0 ? -1 : variant;
  message = sqllm::cuda::LaunchDecode(p, args, static_cast<cudaStream_t>(stream), options);
  return message.empty() ? nullptr : message.c_str();
}

SQLLM_EXPORT const char* SqllmCudaLaunchDecode(const void* a, const int32_t* qweight, const void* lut,
                                               const int32_t* indptr, const int32_t* indices, const void* values,
                                               const void* bias, void* y, int64_t M, int64_t K, int64_t N,
                                               int64_t bits, int64_t nnz, int32_t is_half, void* stream) {
  return SqllmCudaLaunchDecodeVariant(a, qweight, lut, indptr, indices, values, bias, y, M, K, N, bits, nnz, is_half,
                                      stream, -1);
}

SQLLM_EXPORT const char* SqllmCudaDecodeVariantName(int32_t variant) {
  return sqllm::cuda::DecodeVariantName(variant);
}

SQLLM_EXPORT int32_t SqllmCudaDecodeDefaultVariant(int64_t M, int64_t K, int64_t N, int64_t bits) {
  sqllm::Problem p;
  p.M = M;
  p.K = K;
  p.N = N;
  p.bits = static_cast<int>(bits);
  p.elem_type = sqllm::kFloat16;
  return sqllm::cuda::ChooseDecodeVariant(p);
}

SQLLM_EXPORT const char* SqllmCudaSynchronize() {
  static thread_local std::string message;
  const cudaError_t e = cudaDeviceSynchronize();
  if (e == cudaSuccess) return nullptr;
  message = std::string("cudaDeviceSynchronize: ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
  return message.c_str();
}

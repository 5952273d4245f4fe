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
// a [M, K], qweight [ceil(N/16), 32*ceil(K/64)*bits] (tiled), lut [N, 2^bits], indptr [N+1] / indices [nnz] /
// values [nnz] (all three null for no sparse part), bias [N] or null, y [M, N]; T = fp16 when
// is_half != 0, else fp32. qweight and the LUT are treated as constant (PDL prefetch allowed).
// Nothing is validated beyond the dimensions (the CSR content must be well formed). Requires
// M >= 1 and M within the decode path (M <= 8, or fp16 bits 3/4 with M <= SQLLM_CUDA_DECODE_MAX_M).
// Returns nullptr on success, else a message valid until the next call on the same thread.
//
//   const char* SqllmCudaLaunchDecodeKernel(<the same arguments>, int32_t kernel);
//
// The same with the kernel chosen: 0 = as the EP kernel would (tensor cores where they apply),
// 1 = the CUDA-core kernel (decode_generic.cu) even where the tensor-core kernel would run.
//
//   const char* SqllmCudaSynchronize(void);   // cudaDeviceSynchronize: null or a message (tests)
//
//   const char* SqllmCudaProbe(void);   // JSON: can this build's kernels run on the current device?
//
// (The probe lives here with the other CUDA-only exports; sqllm_onnx.cuda_probe() calls it before a
// CUDA session is opened.)
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels.h"
#include "launch.h"

#define SQLLM_EXPORT extern "C" __attribute__((visibility("default")))

SQLLM_EXPORT const char* SqllmCudaLaunchDecodeKernel(const void* a, const int32_t* qweight, const void* lut,
                                                     const int32_t* indptr, const int32_t* indices, const void* values,
                                                     const void* bias, void* y, int64_t M, int64_t K, int64_t N,
                                                     int64_t bits, int64_t nnz, int32_t is_half, void* stream,
                                                     int32_t kernel) {
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
  if (kernel != 0 && kernel != 1) {
    message = "SqllmCudaLaunchDecodeKernel: kernel must be 0 (default) or 1 (CUDA cores), got " + std::to_string(kernel);
    return message.c_str();
  }
  p.words = sqllm::WordsPerTile(K, bits);
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
  options.force_generic = kernel == 1;
  message = sqllm::cuda::LaunchDecode(p, args, static_cast<cudaStream_t>(stream), options);
  return message.empty() ? nullptr : message.c_str();
}

SQLLM_EXPORT const char* SqllmCudaLaunchDecode(const void* a, const int32_t* qweight, const void* lut,
                                               const int32_t* indptr, const int32_t* indices, const void* values,
                                               const void* bias, void* y, int64_t M, int64_t K, int64_t N,
                                               int64_t bits, int64_t nnz, int32_t is_half, void* stream) {
  return SqllmCudaLaunchDecodeKernel(a, qweight, lut, indptr, indices, values, bias, y, M, K, N, bits, nnz, is_half,
                                     stream, 0);
}

SQLLM_EXPORT const char* SqllmCudaSynchronize() {
  static thread_local std::string message;
  const cudaError_t e = cudaDeviceSynchronize();
  if (e == cudaSuccess) return nullptr;
  message = std::string("cudaDeviceSynchronize: ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
  return message.c_str();
}

// Whether the CUDA kernels of this build can run here, as JSON (sqllm_onnx.cuda_probe()):
// {"devices": n, "name": ..., "cc": "9.0", "runs": true|false, "error": "..."} for the current device.
SQLLM_EXPORT const char* SqllmCudaProbe() {
  static thread_local std::string out;
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    out = std::string("{\"devices\": 0, \"runs\": false, \"error\": \"") +
          (e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device") + "\"}";
    return out.c_str();
  }
  int device = 0;
  cudaDeviceProp prop{};
  if ((e = cudaGetDevice(&device)) == cudaSuccess) e = cudaGetDeviceProperties(&prop, device);
  if (e == cudaSuccess) e = sqllm::cuda::CheckKernelImage();
  std::string name(prop.name);
  for (char& c : name)
    if (c == '"' || c == '\\') c = ' ';
  out = "{\"devices\": " + std::to_string(n) + ", \"name\": \"" + name + "\", \"cc\": \"" +
        std::to_string(prop.major) + "." + std::to_string(prop.minor) + "\", \"runs\": " +
        (e == cudaSuccess ? "true" : "false") + ", \"error\": \"" + (e == cudaSuccess ? "" : cudaGetErrorString(e)) +
        "\"}";
  cudaGetLastError();  // leave no sticky error behind for the next CUDA call
  return out.c_str();
}

#include "cublas_lib.h"

#include <dlfcn.h>

#include <mutex>

namespace sqllm::cuda {
namespace {

// The few declarations we need, from NVIDIA's public cuBLAS API (cublas_api.h, library_types.h).
// Enums are passed as int (same size and calling convention on every supported platform).
using cublasStatus = int;
using cublasHandle = void*;
constexpr int kCublasStatusSuccess = 0;  // CUBLAS_STATUS_SUCCESS
constexpr int kOpN = 0;                  // CUBLAS_OP_N
constexpr int kOpT = 1;                  // CUBLAS_OP_T
constexpr int kCudaR16F = 2;             // CUDA_R_16F
constexpr int kCudaR32F = 0;             // CUDA_R_32F
constexpr int kComputeF32 = 68;          // CUBLAS_COMPUTE_32F
constexpr int kGemmDefault = -1;         // CUBLAS_GEMM_DEFAULT
static_assert(kOpN != kOpT, "");

using CreateFn = cublasStatus (*)(cublasHandle*);                         // cublasCreate_v2
using SetStreamFn = cublasStatus (*)(cublasHandle, cudaStream_t);          // cublasSetStream_v2
using GemmExFn = cublasStatus (*)(cublasHandle, int transa, int transb, int m, int n, int k, const void* alpha,
                                  const void* A, int Atype, int lda, const void* B, int Btype, int ldb,
                                  const void* beta, void* C, int Ctype, int ldc, int computeType,
                                  int algo);                                 // cublasGemmEx
using StatusStringFn = const char* (*)(cublasStatus);                       // cublasGetStatusString

struct Library {
  void* so = nullptr;
  CreateFn create = nullptr;
  SetStreamFn set_stream = nullptr;
  GemmExFn gemm_ex = nullptr;
  StatusStringFn status_string = nullptr;  // optional
  std::string error;
};

const Library& GetLibrary() {
  static const Library library = [] {
    Library l;
    const char* names[] = {"libcublas.so.13", "libcublas.so.12", "libcublas.so"};
    std::string tried;
    for (int flags : {RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD, RTLD_NOW | RTLD_LOCAL}) {
      for (const char* name : names) {
        l.so = dlopen(name, flags);
        if (l.so) break;
        if (!(flags & RTLD_NOLOAD)) {
          const char* e = dlerror();
          tried += std::string(tried.empty() ? "" : "; ") + (e ? e : name);
        }
      }
      if (l.so) break;
    }
    if (!l.so) {
      l.error = "could not load cuBLAS (" + tried + ")";
      return l;
    }
    l.create = reinterpret_cast<CreateFn>(dlsym(l.so, "cublasCreate_v2"));
    l.set_stream = reinterpret_cast<SetStreamFn>(dlsym(l.so, "cublasSetStream_v2"));
    l.gemm_ex = reinterpret_cast<GemmExFn>(dlsym(l.so, "cublasGemmEx"));
    l.status_string = reinterpret_cast<StatusStringFn>(dlsym(l.so, "cublasGetStatusString"));
    if (!l.create || !l.set_stream || !l.gemm_ex) {
      l.error = "the cuBLAS library found lacks cublasCreate_v2, cublasSetStream_v2 or cublasGemmEx";
      l.so = nullptr;  // not closed: other users in the process may hold it
    }
    return l;
  }();
  return library;
}

std::mutex& HandleMutex() {
  static std::mutex mutex;
  return mutex;
}

std::string StatusMessage(const Library& l, cublasStatus s, const char* what) {
  std::string msg = std::string("SqueezeMatMul (CUDA): ") + what + " failed: cuBLAS status " + std::to_string(s);
  if (l.status_string)
    if (const char* text = l.status_string(s)) msg += std::string(" (") + text + ")";
  return msg;
}

}  // namespace

std::string AcquireCublasHandle(int device, void** handle) {
  constexpr int kMaxDevices = 64;
  static cublasHandle handles[kMaxDevices] = {};
  *handle = nullptr;
  const Library& l = GetLibrary();
  if (!l.so) return "SqueezeMatMul (CUDA): " + l.error;
  if (device < 0 || device >= kMaxDevices) return "SqueezeMatMul (CUDA): device ordinal out of range";
  std::lock_guard<std::mutex> lock(HandleMutex());
  if (!handles[device]) {
    int previous = 0;
    if (cudaGetDevice(&previous) != cudaSuccess) previous = device;
    if (previous != device && cudaSetDevice(device) != cudaSuccess)
      return "SqueezeMatMul (CUDA): cudaSetDevice failed while creating the cuBLAS handle";
    cublasHandle h = nullptr;
    const cublasStatus s = l.create(&h);
    if (previous != device) cudaSetDevice(previous);
    if (s != kCublasStatusSuccess || !h) return StatusMessage(l, s, "cublasCreate");
    handles[device] = h;
  }
  *handle = handles[device];
  return "";
}

std::string CublasGemmTN(void* handle, cudaStream_t stream, bool half, int m, int n, int k, const void* A, int lda,
                         const void* B, int ldb, float beta, void* C, int ldc) {
  const Library& l = GetLibrary();
  if (!l.so || !handle) return "SqueezeMatMul (CUDA): no cuBLAS handle";
  const float alpha = 1.f;
  const int type = half ? kCudaR16F : kCudaR32F;
  std::lock_guard<std::mutex> lock(HandleMutex());
  cublasStatus s = l.set_stream(handle, stream);
  if (s != kCublasStatusSuccess) return StatusMessage(l, s, "cublasSetStream");
  s = l.gemm_ex(handle, kOpT, kOpN, m, n, k, &alpha, A, type, lda, B, type, ldb, &beta, C, type, ldc, kComputeF32,
                kGemmDefault);
  if (s != kCublasStatusSuccess) return StatusMessage(l, s, "cublasGemmEx");
  return "";
}

}  // namespace sqllm::cuda

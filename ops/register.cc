// Entry point of libsqllm_ops.so: onnxruntime calls RegisterCustomOps when a session options
// object registers the library. One registration table for every execution provider.
#include <mutex>
#include <string>

#include "cpu/cpu_kernel.h"
#include "sqllm/ort_glue.h"
#ifdef SQLLM_WITH_CUDA
#include "cuda/cuda_kernel.h"
#endif

#define SQLLM_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using sqllm::kFloat16;
using sqllm::kFloat32;

// The op objects and the domain must outlive every session that uses them: they are static.
Ort::CustomOpDomain* Domain() {
  static sqllm::SqueezeMatMulOp<sqllm::CpuKernel, kFloat32> cpu_f32("CPUExecutionProvider");
  static sqllm::SqueezeMatMulOp<sqllm::CpuKernel, kFloat16> cpu_f16("CPUExecutionProvider");
#ifdef SQLLM_WITH_CUDA
  static sqllm::SqueezeMatMulOp<sqllm::CudaKernel, kFloat32> cuda_f32("CUDAExecutionProvider");
  static sqllm::SqueezeMatMulOp<sqllm::CudaKernel, kFloat16> cuda_f16("CUDAExecutionProvider");
#endif
  static Ort::CustomOpDomain* domain = [] {
    auto* d = new Ort::CustomOpDomain("sqllm");
    d->Add(&cpu_f32);
    d->Add(&cpu_f16);
#ifdef SQLLM_WITH_CUDA
    d->Add(&cuda_f32);
    d->Add(&cuda_f16);
#endif
    return d;
  }();
  return domain;
}

}  // namespace

SQLLM_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    // An onnxruntime older than our headers: answer through the oldest API, which every version has.
    const std::string msg = std::string("libsqllm_ops needs onnxruntime >= 1.") + std::to_string(ORT_API_VERSION) +
                            " (ORT API version " + std::to_string(ORT_API_VERSION) + "); this process runs onnxruntime " +
                            api_base->GetVersionString();
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, msg.c_str());
  }
  static std::once_flag init;
  std::call_once(init, [api] { Ort::InitApi(api); });
  try {
    return api->AddCustomOpDomain(options, *Domain());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, (std::string("libsqllm_ops: ") + e.what()).c_str());
  }
}

// The library version, for manifests and version-skew checks.
SQLLM_EXPORT const char* SqllmOpsVersion() { return SQLLM_VERSION; }

// Entry point of libsqllm_ops.so: onnxruntime calls RegisterCustomOps when a session options
// object registers the library. One registration table for every execution provider.
#include <algorithm>
#include <mutex>
#include <string>

#include "cpu/cpu_kernel.h"
#include "cpu/lut_int8.h"
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

// Kernels created so far in this process, per execution provider (ORT creates a node's kernel when
// a session is initialized): sqllm_onnx.runtime.session checks where ORT placed SqueezeMatMul.
SQLLM_EXPORT void SqllmKernelCounts(int64_t* cpu, int64_t* cuda) {
  *cpu = sqllm::KernelCount(false);
  *cuda = sqllm::KernelCount(true);
}

// What this build holds, as JSON (sqllm_onnx.library_info()): the version, the ORT API version it
// asks for, the CUDA architectures compiled in (empty without CUDA), and the CPU paths this CPU runs
// (docs/op-spec.md: "int8-avx512-vnni" for bits 3/4 at M <= 8 where available, else exact).
SQLLM_EXPORT const char* SqllmLibraryInfo() {
  static const std::string info = [] {
    std::string cpu = "\"exact-portable\"";
#if defined(__x86_64__) || defined(_M_X64)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) cpu = "\"exact-avx2\"";
#endif
    if (sqllm::cpu::HasInt8Kernel()) cpu += ", \"int8-avx512-vnni\"";
#ifdef SQLLM_WITH_CUDA
    const std::string archs = SQLLM_CUDA_ARCHS;
#else
    const std::string archs;
#endif
    std::string list;  // "80-real,90-virtual" -> ["80-real", "90-virtual"]
    for (size_t i = 0; i < archs.size();) {
      const size_t j = std::min(archs.find(',', i), archs.size());
      list += (list.empty() ? "\"" : ", \"") + archs.substr(i, j - i) + "\"";
      i = j + 1;
    }
    return std::string("{\"version\": \"") + SQLLM_VERSION + "\", \"ort_api_version\": " +
           std::to_string(ORT_API_VERSION) + ", \"cuda_archs\": [" + list + "], \"cpu_paths\": [" + cpu + "]}";
  }();
  return info.c_str();
}

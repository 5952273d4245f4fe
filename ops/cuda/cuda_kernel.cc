// ORT glue of the CUDA SqueezeMatMul kernel.
#include "cuda_kernel.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "launch.h"

namespace sqllm {
namespace {

std::string CudaError(cudaError_t e, const char* what) {
  return std::string("SqueezeMatMul (CUDA): ") + what + ": " + cudaGetErrorString(e);
}

bool OnDevice(const OrtValue* value) {
  const OrtMemoryInfo* info = nullptr;
  OrtMemoryInfoDeviceType type = OrtMemoryInfoDeviceType_CPU;
  const OrtApi& api = Ort::GetApi();
  if (OrtStatus* s = api.GetTensorMemoryInfo(value, &info)) {
    api.ReleaseStatus(s);
    return true;  // CUDA EP inputs live on the device unless ORT says otherwise
  }
  api.MemoryInfoGetDeviceType(info, &type);
  return type == OrtMemoryInfoDeviceType_GPU;
}

cudaStream_t Stream(OrtKernelContext* context) {
  void* stream = nullptr;
  if (context) {
    if (OrtStatus* s = Ort::GetApi().KernelContext_GetGPUComputeStream(context, &stream))
      Ort::GetApi().ReleaseStatus(s);
  }
  return static_cast<cudaStream_t>(stream);
}

}  // namespace

std::string CudaKernel::ReadInt32(const OrtValue* value, OrtKernelContext* context, int64_t count,
                                  std::vector<int32_t>* out) {
  void* data = nullptr;
  if (OrtStatus* s = Ort::GetApi().GetTensorMutableData(const_cast<OrtValue*>(value), &data)) {
    std::string msg = Ort::GetApi().GetErrorMessage(s);
    Ort::GetApi().ReleaseStatus(s);
    return msg;
  }
  out->resize(static_cast<size_t>(count));
  if (!count) return "";
  const size_t bytes = static_cast<size_t>(count) * sizeof(int32_t);
  if (!OnDevice(value)) {
    std::copy_n(static_cast<const int32_t*>(data), count, out->data());
    return "";
  }
  // Only reached for constant inputs at session creation (no stream yet) or for non-constant
  // sparse inputs, where validation requires the values on the host: a synchronous copy.
  cudaStream_t stream = Stream(context);
  cudaError_t e = cudaMemcpyAsync(out->data(), data, bytes, cudaMemcpyDeviceToHost, stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  return e == cudaSuccess ? "" : CudaError(e, "copying a sparse input to the host for validation");
}

std::string CudaKernel::Run(OrtKernelContext* context, const Problem& p, const Inputs& in, void* y) {
  cuda::DeviceArgs args{in.Data(kA),       static_cast<const uint32_t*>(in.Data(kQWeight)),
                        in.Data(kLut),     static_cast<const int32_t*>(in.Data(kIndptr)),
                        static_cast<const int32_t*>(in.Data(kIndices)),
                        in.Data(kValues),  in.Data(kBias),
                        y,                 p.elem_type == kFloat16};
  return cuda::LaunchSqueezeMatMul(p, args, Stream(context));
}

}  // namespace sqllm

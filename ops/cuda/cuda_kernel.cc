// ORT glue of the CUDA SqueezeMatMul kernel.
#include "cuda_kernel.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "cublas_lib.h"
#include "launch.h"

namespace sqllm {
namespace {

const OrtApi& Api() { return Ort::GetApi(); }

std::string TakeMessage(OrtStatus* s) {
  if (!s) return "";
  std::string msg = Api().GetErrorMessage(s);
  Api().ReleaseStatus(s);
  return msg;
}

std::string CudaError(cudaError_t e, const char* what) {
  return std::string("SqueezeMatMul (CUDA): ") + what + ": " + cudaGetErrorString(e);
}

bool OnDevice(const OrtValue* value) {
  const OrtMemoryInfo* info = nullptr;
  OrtMemoryInfoDeviceType type = OrtMemoryInfoDeviceType_CPU;
  if (OrtStatus* s = Api().GetTensorMemoryInfo(value, &info)) {
    Api().ReleaseStatus(s);
    return true;  // CUDA EP inputs live on the device unless ORT says otherwise
  }
  Api().MemoryInfoGetDeviceType(info, &type);
  return type == OrtMemoryInfoDeviceType_GPU;
}

cudaStream_t Stream(OrtKernelContext* context) {
  void* stream = nullptr;
  if (context) {
    if (OrtStatus* s = Api().KernelContext_GetGPUComputeStream(context, &stream)) Api().ReleaseStatus(s);
  }
  return static_cast<cudaStream_t>(stream);
}

}  // namespace

CudaKernel::~CudaKernel() {
  if (allocator_) Api().ReleaseAllocator(allocator_);
}

std::string CudaKernel::Init(const OrtKernelInfo* info) {
  if (auto err = KernelBase::Init(info); !err.empty()) return err;
  const OrtApi& api = Api();
  int is_constant = 0;
  const OrtValue* value = nullptr;
  if (TakeMessage(api.KernelInfoGetConstantInput_tensor(info, kQWeight, &is_constant, &value)).empty())
    qweight_constant_ = is_constant != 0 && value != nullptr;
  is_constant = 0;
  value = nullptr;
  if (TakeMessage(api.KernelInfoGetConstantInput_tensor(info, kLut, &is_constant, &value)).empty())
    lut_constant_ = is_constant != 0 && value != nullptr;

  // The device: the one of the EP's allocator (which the prefill scratch comes from).
  if (!TakeMessage(api.KernelInfoGetAllocator(info, OrtMemTypeDefault, &allocator_)).empty()) allocator_ = nullptr;
  bool have_device = false;
  if (allocator_) {
    const OrtMemoryInfo* mem_info = allocator_->Info(allocator_);
    have_device = mem_info && TakeMessage(api.MemoryInfoGetId(mem_info, &device_)).empty();
  }
  if (!have_device && cudaGetDevice(&device_) != cudaSuccess) device_ = 0;

  // cuBLAS for the prefill path. Its absence is reported only if a prefill-sized input arrives.
  cublas_error_ = cuda::AcquireCublasHandle(device_, &cublas_);
  return "";
}

std::string CudaKernel::ReadInt32(const OrtValue* value, OrtKernelContext* context, int64_t count,
                                  std::vector<int32_t>* out) {
  void* data = nullptr;
  if (auto err = TakeMessage(Api().GetTensorMutableData(const_cast<OrtValue*>(value), &data)); !err.empty()) return err;
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
  cuda::DeviceArgs args{in.Data(kA),
                        static_cast<const uint32_t*>(in.Data(kQWeight)),
                        in.Data(kLut),
                        static_cast<const int32_t*>(in.Data(kIndptr)),
                        static_cast<const int32_t*>(in.Data(kIndices)),
                        in.Data(kValues),
                        in.Data(kBias),
                        y,
                        p.elem_type == kFloat16};
  cudaStream_t stream = Stream(context);
  if (cuda::UsesDecodePath(p)) {
    cuda::LaunchOptions options;
    options.qweight_constant = qweight_constant_;
    options.lut_constant = lut_constant_;
    return cuda::LaunchDecode(p, args, stream, options);
  }

  // Prefill: scratch from ORT's (stream-aware, arena) allocator, released before returning; the
  // arena hands the block out again only in stream order, and under CUDA graphs the captured
  // kernels keep the address the warm-up runs had.
  if (!cublas_)
    return "SqueezeMatMul (CUDA): M = " + std::to_string(p.M) + " takes the prefill path, which needs cuBLAS: " +
           cublas_error_;
  if (!allocator_) return "SqueezeMatMul (CUDA): the CUDA execution provider gave no device allocator";
  const size_t bytes = cuda::PrefillScratchBytes(p);
  void* scratch = nullptr;
  if (auto err = TakeMessage(Api().KernelContext_GetScratchBuffer(context, allocator_->Info(allocator_), bytes, &scratch));
      !err.empty() || !scratch)
    scratch = allocator_->Alloc(allocator_, bytes);
  if (!scratch) return "SqueezeMatMul (CUDA): could not allocate " + std::to_string(bytes) + " bytes of scratch";
  std::string err = cuda::LaunchPrefill(p, args, stream, scratch, cublas_);
  allocator_->Free(allocator_, scratch);
  return err;
}

}  // namespace sqllm

// SqueezeMatMul kernel for ORT's CUDAExecutionProvider (fp32 and fp16). All device work goes on
// ORT's compute stream; nothing here synchronises the host, allocates with cudaMalloc or creates
// library handles inside Compute (except validating CSR inputs that are not constant: exported
// models carry them as initializers, validated once at creation), so sessions with
// enable_cuda_graph capture the op. The kernels are described in docs/cuda-kernels.md.
#pragma once

#include "sqllm/ort_glue.h"

namespace sqllm {

class CudaKernel : public KernelBase {
 public:
  ~CudaKernel() override;
  // Called by SqueezeMatMulOp::CreateKernelV2 (on the Kernel type, so it hides KernelBase::Init):
  // the common checks, then the device allocator for prefill scratch buffers, whether qweight and
  // the LUT are constant, and the shared cuBLAS handle of the device (created here, never inside Compute).
  std::string Init(const OrtKernelInfo* info);

 protected:
  std::string ReadInt32(const OrtValue* value, OrtKernelContext* context, int64_t count,
                        std::vector<int32_t>* out) override;
  std::string Run(OrtKernelContext* context, const Problem& problem, const Inputs& in, void* y) override;

 private:
  OrtAllocator* allocator_ = nullptr;  // the EP's default (device) allocator
  int device_ = 0;
  bool qweight_constant_ = false;
  bool lut_constant_ = false;
  void* cublas_ = nullptr;  // shared per device, not owned
  std::string cublas_error_;
};

}  // namespace sqllm

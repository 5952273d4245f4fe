// SqueezeMatMul kernel for ORT's CPUExecutionProvider (fp32 and fp16).
#pragma once

#include "lut_int8.h"
#include "sqllm/ort_glue.h"

namespace sqllm {

class CpuKernel : public KernelBase {
 public:
  CpuKernel();

 protected:
  std::string ReadInt32(const OrtValue* value, OrtKernelContext* context, int64_t count,
                        std::vector<int32_t>* out) override;
  std::string Run(OrtKernelContext* context, const Problem& problem, const Inputs& in, void* y) override;
  // Quantizes a constant LUT for the int8 path once, instead of on every call.
  std::string Prepare(const OrtKernelInfo* info) override;

 private:
  int choice_;  // cpu::KernelChoice, fixed when the session creates the kernel
  cpu::Int8Luts int8_luts_;
  bool have_int8_luts_ = false;
};

}  // namespace sqllm

// SqueezeMatMul kernel for ORT's CPUExecutionProvider (fp32 and fp16).
#pragma once

#include "sqllm/ort_glue.h"

namespace sqllm {

class CpuKernel : public KernelBase {
 public:
  CpuKernel();

 protected:
  std::string ReadInt32(const OrtValue* value, OrtKernelContext* context, int64_t count,
                        std::vector<int32_t>* out) override;
  std::string Run(OrtKernelContext* context, const Problem& problem, const Inputs& in, void* y) override;

 private:
  int choice_;  // cpu::KernelChoice, fixed when the session creates the kernel
};

}  // namespace sqllm

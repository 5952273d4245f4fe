// SqueezeMatMul kernel for ORT's CPUExecutionProvider (fp32 and fp16).
#pragma once

#include "sqllm/ort_glue.h"

namespace sqllm {

class CpuKernel : public KernelBase {
 protected:
  std::string ReadInt32(const OrtValue* value, OrtKernelContext* context, int64_t count,
                        std::vector<int32_t>* out) override;
  std::string Run(OrtKernelContext* context, const Problem& problem, const Inputs& in, void* y) override;
};

}  // namespace sqllm

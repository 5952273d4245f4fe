// SqueezeMatMul kernel for ORT's CUDAExecutionProvider (fp32 and fp16). All device work goes on
// ORT's compute stream; nothing here synchronises the host except when validating CSR inputs that
// are not constant (exported models carry them as initializers, validated once at creation).
#pragma once

#include "sqllm/ort_glue.h"

namespace sqllm {

class CudaKernel : public KernelBase {
 protected:
  std::string ReadInt32(const OrtValue* value, OrtKernelContext* context, int64_t count,
                        std::vector<int32_t>* out) override;
  std::string Run(OrtKernelContext* context, const Problem& problem, const Inputs& in, void* y) override;
};

}  // namespace sqllm

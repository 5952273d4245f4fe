// The part of every SqueezeMatMul kernel that talks to ONNX Runtime: attributes, input
// descriptions, validation (once for constant inputs), the output, and errors as OrtStatus.
// Execution-provider kernels derive from KernelBase and implement Run() and ReadCsr().
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <string>
#include <vector>

#include "sqllm/contract.h"

namespace sqllm {

OrtStatusPtr MakeStatus(const std::string& message, OrtErrorCode code = ORT_INVALID_ARGUMENT);

// The inputs of one call as ORT values (nullptr when an optional input is absent).
struct Inputs {
  const OrtValue* value[kNumInputs] = {};
  TensorDesc desc[kNumInputs];
  const void* Data(int i) const;
};

class KernelBase {
 public:
  virtual ~KernelBase() = default;
  // Reads attributes, validates constant CSR inputs and lets the kernel Prepare; "" on success.
  std::string Init(const OrtKernelInfo* info);
  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept;

 protected:
  // Copies `count` int32 values of a CSR input to the host (it may live in device memory).
  virtual std::string ReadInt32(const OrtValue* value, OrtKernelContext* context, int64_t count,
                                std::vector<int32_t>* out) = 0;
  virtual std::string Run(OrtKernelContext* context, const Problem& problem, const Inputs& in, void* y) = 0;
  // Work done once per session from constant inputs (after the attributes are read); "" or an error.
  virtual std::string Prepare(const OrtKernelInfo*) { return ""; }
  // Input i when it is a constant initializer (else nullptr), with its type and shape in *desc.
  static const OrtValue* ConstantInput(const OrtKernelInfo* info, int i, TensorDesc* desc);

  Attributes attrs_;
  bool csr_validated_ = false;  // constant CSR inputs already checked at session creation

 private:
  std::string ValidateCsr(const Inputs& in, const Problem& p, OrtKernelContext* context);
  std::string ValidateConstantCsr(const OrtKernelInfo* info);
};

// Counts the kernels created per execution provider (SqllmKernelCounts): the Python session code
// compares the counts before and after a session is created to see where ORT placed our nodes.
void CountKernel(const char* provider);
int64_t KernelCount(bool cuda);

// The OrtCustomOp that creates Kernel for element type T (ONNX enum) on the given provider.
// A is typed T so that ORT picks the fp16 or fp32 kernel; the other inputs are declared with an
// undefined type so that a wrong dtype reaches our own check, whose message names the input.
template <typename Kernel, int T>
struct SqueezeMatMulOp : Ort::CustomOpBase<SqueezeMatMulOp<Kernel, T>, Kernel, true> {
  explicit SqueezeMatMulOp(const char* provider) : provider_(provider) {
    OrtCustomOp::InferOutputShapeFn = &InferOutputShape;
  }
  const char* GetName() const { return "SqueezeMatMul"; }
  const char* GetExecutionProviderType() const { return provider_; }
  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == kA ? static_cast<ONNXTensorElementDataType>(T) : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i <= kLut ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return static_cast<ONNXTensorElementDataType>(T); }

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** op_kernel) const {
    auto* kernel = new Kernel();
    std::string err;
    try {
      err = kernel->Init(info);
    } catch (const std::exception& e) {
      err = std::string("SqueezeMatMul: ") + e.what();
    }
    if (!err.empty()) {
      delete kernel;
      return MakeStatus(err);
    }
    *op_kernel = kernel;
    CountKernel(provider_);
    return nullptr;
  }

 private:
  static OrtStatusPtr InferOutputShape(const OrtCustomOp*, OrtShapeInferContext* ctx);
  const char* provider_;
};

// Output type and shape from A: Y is A's shape with the last dim replaced by attribute N.
OrtStatusPtr InferSqueezeMatMulShape(OrtShapeInferContext* ctx);

template <typename Kernel, int T>
OrtStatusPtr SqueezeMatMulOp<Kernel, T>::InferOutputShape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  return InferSqueezeMatMulShape(ctx);
}

}  // namespace sqllm

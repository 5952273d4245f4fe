// SqueezeMatMul on ORT's CPU execution provider.
#include "cpu_kernel.h"

#include <cstring>
#include <vector>

#include "lut_matmul.h"
#include "sqllm/half.h"

namespace sqllm {
namespace {

// Runs tasks on the session's intra-op thread pool.
class OrtParallelFor : public cpu::ParallelFor {
 public:
  explicit OrtParallelFor(OrtKernelContext* context) : context_(context) {}
  void operator()(size_t total, void (*fn)(void*, size_t), void* data) const override {
    if (total == 1) return fn(data, 0);
    if (OrtStatus* s = Ort::GetApi().KernelContext_ParallelFor(context_, fn, total, 0, data)) {
      Ort::GetApi().ReleaseStatus(s);  // no pool available: run inline
      for (size_t i = 0; i < total; ++i) fn(data, i);
    }
  }

 private:
  OrtKernelContext* context_;
};

}  // namespace

CpuKernel::CpuKernel() : choice_(static_cast<int>(cpu::DefaultKernelChoice())) {}

std::string CpuKernel::Prepare(const OrtKernelInfo* info) {
  if (static_cast<cpu::KernelChoice>(choice_) == cpu::KernelChoice::kExact || !cpu::HasInt8Kernel() ||
      (attrs_.bits != 3 && attrs_.bits != 4))
    return "";
  TensorDesc desc;
  const OrtValue* lut = ConstantInput(info, kLut, &desc);
  // A LUT of another type or shape is left to CheckInputs, which reports it on the first run.
  if (!lut || (desc.elem_type != kFloat32 && desc.elem_type != kFloat16) ||
      desc.shape != std::vector<int64_t>{attrs_.N, int64_t{1} << attrs_.bits})
    return "";
  void* data = nullptr;
  if (OrtStatus* s = Ort::GetApi().GetTensorMutableData(const_cast<OrtValue*>(lut), &data)) {
    Ort::GetApi().ReleaseStatus(s);
    return "";
  }
  cpu::QuantizeAllLuts(data, desc.elem_type == kFloat16, static_cast<int>(attrs_.bits), attrs_.N, &int8_luts_);
  have_int8_luts_ = true;
  return "";
}

std::string CpuKernel::ReadInt32(const OrtValue* value, OrtKernelContext*, int64_t count, std::vector<int32_t>* out) {
  void* data = nullptr;
  if (OrtStatus* s = Ort::GetApi().GetTensorMutableData(const_cast<OrtValue*>(value), &data)) {
    std::string msg = Ort::GetApi().GetErrorMessage(s);
    Ort::GetApi().ReleaseStatus(s);
    return msg;
  }
  out->resize(static_cast<size_t>(count));
  if (count) std::memcpy(out->data(), data, static_cast<size_t>(count) * sizeof(int32_t));
  return "";
}

std::string CpuKernel::Run(OrtKernelContext* context, const Problem& p, const Inputs& in, void* y) {
  cpu::Args args;
  args.half = p.elem_type == kFloat16;
  std::vector<float> a_wide;
  if (args.half) {  // widen A once; the kernels work in fp32
    const auto* a = static_cast<const uint16_t*>(in.Data(kA));
    a_wide.resize(static_cast<size_t>(p.M * p.K));
    for (size_t i = 0; i < a_wide.size(); ++i) a_wide[i] = HalfToFloat(a[i]);
    args.a = a_wide.data();
  } else {
    args.a = static_cast<const float*>(in.Data(kA));
  }
  args.qweight = static_cast<const uint32_t*>(in.Data(kQWeight));
  args.lut = in.Data(kLut);
  args.indptr = static_cast<const int32_t*>(in.Data(kIndptr));
  args.indices = static_cast<const int32_t*>(in.Data(kIndices));
  args.values = in.Data(kValues);
  args.bias = in.Data(kBias);
  args.y = y;
  args.int8_luts = have_int8_luts_ ? &int8_luts_ : nullptr;
  cpu::LutMatmul(p, args, OrtParallelFor(context), static_cast<cpu::KernelChoice>(choice_));
  return "";
}

}  // namespace sqllm

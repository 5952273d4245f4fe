// ORT plumbing shared by the CPU and CUDA kernels. Only the C API is used here, with every status
// checked, so that no exception crosses into ONNX Runtime.
#include "sqllm/ort_glue.h"

#include <atomic>
#include <exception>

namespace sqllm {
namespace {

const OrtApi& Api() { return Ort::GetApi(); }

// Turns an OrtStatus into a message ("" for success) and releases it.
std::string Consume(OrtStatus* status, const std::string& context = "") {
  if (!status) return "";
  std::string msg = context + Api().GetErrorMessage(status);
  Api().ReleaseStatus(status);
  return msg;
}

std::string Describe(const OrtValue* value, TensorDesc* desc) {
  desc->present = value != nullptr;
  if (!value) return "";
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (auto err = Consume(Api().GetTensorTypeAndShape(value, &info)); !err.empty()) return err;
  ONNXTensorElementDataType type{};
  size_t rank = 0;
  std::string err = Consume(Api().GetTensorElementType(info, &type));
  if (err.empty()) err = Consume(Api().GetDimensionsCount(info, &rank));
  desc->shape.assign(rank, 0);
  if (err.empty() && rank) err = Consume(Api().GetDimensions(info, desc->shape.data(), rank));
  desc->elem_type = static_cast<int>(type);
  Api().ReleaseTensorTypeAndShapeInfo(info);
  return err;
}

std::atomic<int64_t> g_cpu_kernels{0}, g_cuda_kernels{0};

}  // namespace

OrtStatusPtr MakeStatus(const std::string& message, OrtErrorCode code) {
  return Api().CreateStatus(code, message.c_str());
}

const void* Inputs::Data(int i) const {
  if (!value[i]) return nullptr;
  void* data = nullptr;
  // GetTensorMutableData only reads the pointer; inputs are never written.
  if (OrtStatus* s = Api().GetTensorMutableData(const_cast<OrtValue*>(value[i]), &data)) Consume(s);
  return data;
}

std::string KernelBase::Init(const OrtKernelInfo* info) {
  for (auto [name, dst] : {std::pair<const char*, int64_t*>{"K", &attrs_.K}, {"N", &attrs_.N}, {"bits", &attrs_.bits}}) {
    if (OrtStatus* s = Api().KernelInfoGetAttribute_int64(info, name, dst)) {
      Consume(s);
      return std::string("SqueezeMatMul: attribute '") + name + "' (int) is required";
    }
  }
  // optional: exports before code layout 2 do not carry it
  if (OrtStatus* s = Api().KernelInfoGetAttribute_int64(info, "layout", &attrs_.layout)) Consume(s), attrs_.layout = 1;
  if (auto err = CheckAttributes(attrs_); !err.empty()) return err;
  if (auto err = ValidateConstantCsr(info); !err.empty()) return err;
  return Prepare(info);
}

const OrtValue* KernelBase::ConstantInput(const OrtKernelInfo* info, int i, TensorDesc* desc) {
  size_t count = 0;
  if (Consume(Api().KernelInfo_GetInputCount(info, &count)).size() || static_cast<size_t>(i) >= count) return nullptr;
  int is_constant = 0;
  const OrtValue* value = nullptr;
  if (Consume(Api().KernelInfoGetConstantInput_tensor(info, i, &is_constant, &value)).size() || !is_constant || !value)
    return nullptr;
  return Describe(value, desc).empty() ? value : nullptr;
}

std::string KernelBase::ValidateConstantCsr(const OrtKernelInfo* info) {
  // Constant CSR inputs (the exported case) are validated here, once, instead of on every run.
  TensorDesc dp, di;
  const OrtValue* indptr_value = ConstantInput(info, kIndptr, &dp);
  const OrtValue* indices_value = ConstantInput(info, kIndices, &di);
  if (!indptr_value || !indices_value) return "";
  // Malformed shapes or types are reported by CheckInputs on the first run, with the same messages.
  if (dp.elem_type != kInt32 || di.elem_type != kInt32 || dp.shape != std::vector<int64_t>{attrs_.N + 1} ||
      di.shape.size() != 1)
    return "";
  std::vector<int32_t> indptr, indices;
  if (auto err = ReadInt32(indptr_value, nullptr, attrs_.N + 1, &indptr); !err.empty()) return err;
  if (auto err = ReadInt32(indices_value, nullptr, di.shape[0], &indices); !err.empty()) return err;
  if (auto err = CheckCsr(indptr.data(), indices.data(), attrs_.N, attrs_.K, di.shape[0]); !err.empty()) return err;
  csr_validated_ = true;
  return "";
}

std::string KernelBase::ValidateCsr(const Inputs& in, const Problem& p, OrtKernelContext* context) {
  std::vector<int32_t> indptr, indices;
  if (auto err = ReadInt32(in.value[kIndptr], context, p.N + 1, &indptr); !err.empty()) return err;
  if (auto err = ReadInt32(in.value[kIndices], context, p.nnz, &indices); !err.empty()) return err;
  return CheckCsr(indptr.data(), indices.data(), p.N, p.K, p.nnz);
}

OrtStatusPtr KernelBase::ComputeV2(OrtKernelContext* context) noexcept {
  try {
    Inputs in;
    size_t count = 0;
    if (auto err = Consume(Api().KernelContext_GetInputCount(context, &count)); !err.empty()) return MakeStatus(err);
    for (size_t i = 0; i < count && i < kNumInputs; ++i) {
      if (auto err = Consume(Api().KernelContext_GetInput(context, i, &in.value[i])); !err.empty())
        return MakeStatus(err);
      if (auto err = Describe(in.value[i], &in.desc[i]); !err.empty()) return MakeStatus(err);
    }
    Problem p;
    if (auto err = CheckInputs(attrs_, in.desc, &p); !err.empty()) return MakeStatus(err);
    if (p.has_sparse && !csr_validated_)
      if (auto err = ValidateCsr(in, p, context); !err.empty()) return MakeStatus(err);

    OrtValue* y = nullptr;
    if (auto err = Consume(Api().KernelContext_GetOutput(context, 0, p.y_shape.data(), p.y_shape.size(), &y));
        !err.empty())
      return MakeStatus(err, ORT_FAIL);
    if (p.M == 0) return nullptr;
    void* y_data = nullptr;
    if (auto err = Consume(Api().GetTensorMutableData(y, &y_data)); !err.empty()) return MakeStatus(err, ORT_FAIL);
    if (auto err = Run(context, p, in, y_data); !err.empty()) return MakeStatus(err, ORT_FAIL);
    return nullptr;
  } catch (const std::exception& e) {
    return MakeStatus(std::string("SqueezeMatMul: ") + e.what(), ORT_FAIL);
  } catch (...) {
    return MakeStatus("SqueezeMatMul: unknown error", ORT_FAIL);
  }
}

OrtStatusPtr InferSqueezeMatMulShape(OrtShapeInferContext* ctx) {
  // Shape inference must never fail loudly: ORT ignores its status, and a malformed model is
  // reported with a precise message when the kernel is created or run.
  const OrtApi& api = Api();
  OrtTensorTypeAndShapeInfo* a = nullptr;
  const OrtOpAttr* attr = nullptr;
  if (Consume(api.ShapeInferContext_GetInputTypeShape(ctx, 0, &a)).size() || !a) return nullptr;
  ONNXTensorElementDataType type{};
  size_t rank = 0;
  int64_t n = -1;
  size_t attr_len = 0;
  std::vector<int64_t> dims;
  std::vector<const char*> syms;
  OrtTensorTypeAndShapeInfo* y = nullptr;
  bool ok = Consume(api.GetTensorElementType(a, &type)).empty() && Consume(api.GetDimensionsCount(a, &rank)).empty() &&
            rank >= 1 && Consume(api.ShapeInferContext_GetAttribute(ctx, "N", &attr)).empty() && attr &&
            Consume(api.ReadOpAttr(attr, ORT_OP_ATTR_INT, &n, sizeof(n), &attr_len)).empty() && n >= 1;
  if (ok) {
    dims.resize(rank);
    syms.resize(rank);
    ok = Consume(api.GetDimensions(a, dims.data(), rank)).empty() &&
         Consume(api.GetSymbolicDimensions(a, syms.data(), rank)).empty();
  }
  std::vector<std::string> fresh(rank);
  if (ok) {
    // ORT writes a dim without a symbol as dim_value, so an unknown dim (-1) would become a
    // static -1 and break shape inference downstream: give each one a fresh symbol instead.
    static std::atomic<uint64_t> counter{0};
    for (size_t i = 0; i + 1 < rank; ++i)
      if (dims[i] < 0 && (!syms[i] || !*syms[i])) {
        fresh[i] = "sqllm_unk_" + std::to_string(counter++);
        syms[i] = fresh[i].c_str();
      }
    dims.back() = n;
    syms.back() = "";
    ok = Consume(api.CreateTensorTypeAndShapeInfo(&y)).empty() && Consume(api.SetTensorElementType(y, type)).empty() &&
         Consume(api.SetDimensions(y, dims.data(), rank)).empty() &&
         Consume(api.SetSymbolicDimensions(y, syms.data(), rank)).empty();
    if (ok) Consume(api.ShapeInferContext_SetOutputTypeShape(ctx, 0, y));
  }
  if (y) api.ReleaseTensorTypeAndShapeInfo(y);
  return nullptr;  // `a` belongs to the context (as in ORT's own C++ wrapper): not released here
}

void CountKernel(const char* provider) {
  (std::string(provider) == "CUDAExecutionProvider" ? g_cuda_kernels : g_cpu_kernels)++;
}
int64_t KernelCount(bool cuda) { return (cuda ? g_cuda_kernels : g_cpu_kernels).load(); }

}  // namespace sqllm

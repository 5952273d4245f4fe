// Checks of the SqueezeMatMul contract; messages name the offending input (docs/op-spec.md).
#include "sqllm/contract.h"
#include "sqllm/layout.h"

#include <sstream>

namespace sqllm {

const char* const kInputNames[kNumInputs] = {"A",           "qweight",        "lut", "sparse_indptr",
                                             "sparse_indices", "sparse_values", "bias"};

namespace {

constexpr int64_t kMaxDim = (int64_t{1} << 31) - 1;  // indices and indptr are int32

template <typename... Args>
std::string Msg(Args&&... args) {
  std::ostringstream os;
  os << "SqueezeMatMul: ";
  (os << ... << args);
  return os.str();
}

std::string InputName(int i) { return std::string("'") + kInputNames[i] + "'"; }

}  // namespace

std::string ElemTypeName(int elem_type) {
  switch (elem_type) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kInt32: return "int32";
    case 7: return "int64";
    case 11: return "float64";
    case 16: return "bfloat16";
    case 2: return "uint8";
    case 3: return "int8";
    default: return "element type " + std::to_string(elem_type);
  }
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

std::string CheckAttributes(const Attributes& a) {
  if (a.K < 1 || a.K > kMaxDim) return Msg("attribute 'K' must be in [1, 2^31) (got ", a.K, ")");
  if (a.N < 1 || a.N > kMaxDim) return Msg("attribute 'N' must be in [1, 2^31) (got ", a.N, ")");
  if (a.bits != 2 && a.bits != 3 && a.bits != 4 && a.bits != 8)
    return Msg("attribute 'bits' must be one of 2, 3, 4, 8 (got ", a.bits, ")");
  if (a.layout != 1 && a.layout != layout::kCodeLayout)
    return Msg("attribute 'layout' must be 1 or ", layout::kCodeLayout, " (got ", a.layout, ")");
  // 3-bit codes moved into nibble planes in code layout 2; the other widths are the same in both.
  if (a.bits == 3 && a.layout != layout::kCodeLayout)
    return Msg("attribute 'layout' is ", a.layout, a.layout == 1 ? " (absent)" : "",
               ": this 3-bit model packs its codes in code layout 1 of earlier sqllm-onnx exports; this library reads "
               "3-bit codes in layout ", layout::kCodeLayout, ": re-export the model with this version (docs/op-spec.md)");
  return "";
}

std::string CheckInputs(const Attributes& a, const TensorDesc (&in)[kNumInputs], Problem* p) {
  if (auto err = CheckAttributes(a); !err.empty()) return err;
  for (int i : {kA, kQWeight, kLut})
    if (!in[i].present) return Msg("required input ", InputName(i), " is missing");

  // Element types: T for the float inputs, int32 for the integer ones.
  const int T = in[kA].elem_type;
  if (T != kFloat32 && T != kFloat16)
    return Msg("input 'A' must be float32 or float16, got ", ElemTypeName(T));
  for (int i : {kLut, kValues, kBias})
    if (in[i].present && in[i].elem_type != T)
      return Msg("input ", InputName(i), " must have the same element type as 'A' (", ElemTypeName(T), "), got ",
                 ElemTypeName(in[i].elem_type));
  for (int i : {kQWeight, kIndptr, kIndices})
    if (in[i].present && in[i].elem_type != kInt32)
      return Msg("input ", InputName(i), " must be int32, got ", ElemTypeName(in[i].elem_type));

  // A: [..., K]
  const auto& as = in[kA].shape;
  if (as.empty()) return Msg("input 'A' must have rank >= 1 (got a scalar)");
  if (as.back() != a.K) return Msg("input 'A' last dimension is ", as.back(), " but attribute K is ", a.K);
  int64_t M = 1;
  for (size_t i = 0; i + 1 < as.size(); ++i) {
    if (as[i] < 0) return Msg("input 'A' has a negative dimension ", ShapeString(as));
    M *= as[i];
  }

  const int64_t words = WordsPerTile(a.K, a.bits);
  const std::vector<int64_t> qshape{TileCount(a.N), words};
  if (in[kQWeight].shape != qshape) {
    // sqllm-onnx 0.1 stored qweight row-major, [N, ceil(K*bits/32)]; the layout is tiled since 0.2.
    if (in[kQWeight].shape == std::vector<int64_t>{a.N, (a.K * a.bits + 31) / 32})
      return Msg("input 'qweight' has the row-major layout [N, ceil(K*bits/32)] = ", ShapeString(in[kQWeight].shape),
                 " of sqllm-onnx 0.1 exports; this library reads the tiled layout [ceil(N/16), 32*ceil(K/64)*bits] = ",
                 ShapeString(qshape), ": re-export the model with this version (docs/op-spec.md)");
    return Msg("input 'qweight' must have shape [ceil(N/16), 32*ceil(K/64)*bits] = ", ShapeString(qshape), ", got ",
               ShapeString(in[kQWeight].shape));
  }
  const std::vector<int64_t> lshape{a.N, int64_t{1} << a.bits};
  if (in[kLut].shape != lshape)
    return Msg("input 'lut' must have shape [N, 2^bits] = ", ShapeString(lshape), ", got ",
               ShapeString(in[kLut].shape));

  const bool any_sparse = in[kIndptr].present || in[kIndices].present || in[kValues].present;
  const bool all_sparse = in[kIndptr].present && in[kIndices].present && in[kValues].present;
  if (any_sparse && !all_sparse)
    return Msg("inputs 'sparse_indptr', 'sparse_indices' and 'sparse_values' must be given together");
  int64_t nnz = 0;
  if (all_sparse) {
    const std::vector<int64_t> pshape{a.N + 1};
    if (in[kIndptr].shape != pshape)
      return Msg("input 'sparse_indptr' must have shape [N+1] = ", ShapeString(pshape), ", got ",
                 ShapeString(in[kIndptr].shape));
    if (in[kIndices].shape.size() != 1)
      return Msg("input 'sparse_indices' must be 1-D [nnz], got ", ShapeString(in[kIndices].shape));
    nnz = in[kIndices].shape[0];
    if (nnz > kMaxDim) return Msg("input 'sparse_indices' has ", nnz, " entries; at most 2^31-1 are supported");
    if (in[kValues].shape != std::vector<int64_t>{nnz})
      return Msg("input 'sparse_values' must have shape [nnz] = [", nnz, "] like 'sparse_indices', got ",
                 ShapeString(in[kValues].shape));
  }
  if (in[kBias].present && in[kBias].shape != std::vector<int64_t>{a.N})
    return Msg("input 'bias' must have shape [N] = [", a.N, "], got ", ShapeString(in[kBias].shape));

  p->M = M;
  p->K = a.K;
  p->N = a.N;
  p->bits = static_cast<int>(a.bits);
  p->words = words;
  p->nnz = nnz;
  p->has_sparse = all_sparse;
  p->has_bias = in[kBias].present;
  p->elem_type = T;
  p->y_shape = as;
  p->y_shape.back() = a.N;
  return "";
}

std::string CheckCsr(const int32_t* indptr, const int32_t* indices, int64_t N, int64_t K, int64_t nnz) {
  if (indptr[0] != 0) return Msg("input 'sparse_indptr' must start at 0 (got ", indptr[0], ")");
  for (int64_t n = 0; n < N; ++n)
    if (indptr[n + 1] < indptr[n])
      return Msg("input 'sparse_indptr' must be non-decreasing (sparse_indptr[", n, "] = ", indptr[n],
                 " > sparse_indptr[", n + 1, "] = ", indptr[n + 1], ")");
  if (indptr[N] != nnz)
    return Msg("input 'sparse_indptr' must end at nnz = len(sparse_indices) = ", nnz, " (got ", indptr[N], ")");
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = indptr[n]; j < indptr[n + 1]; ++j)
      if (indices[j] < 0 || indices[j] >= K)
        return Msg("input 'sparse_indices' entry ", j, " (row ", n, ") is ", indices[j], ", outside [0, K=", K, ")");
  return "";
}

}  // namespace sqllm

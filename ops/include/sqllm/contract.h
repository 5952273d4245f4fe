// The SqueezeMatMul contract (docs/op-spec.md) as checks shared by every kernel.
//
// Nothing here knows about ONNX Runtime or CUDA: the checks take plain descriptions of the inputs
// and return an error message ("" when the input is valid), which the ORT glue turns into a status.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sqllm {

// ONNX element types used by the op (values of ONNXTensorElementDataType).
enum ElemType : int { kFloat32 = 1, kInt32 = 6, kFloat16 = 10 };

enum Input : int { kA = 0, kQWeight, kLut, kIndptr, kIndices, kValues, kBias, kNumInputs };
extern const char* const kInputNames[kNumInputs];

struct Attributes {
  int64_t K = 0, N = 0, bits = 0;
  int64_t layout = 1;  // the qweight code layout (optional attribute; absent = 1, sqllm/layout.h)
};

// What the kernels need to know about one input, read from ORT before any data is touched.
struct TensorDesc {
  bool present = false;
  int elem_type = 0;
  std::vector<int64_t> shape;
};

// The validated problem: Y[M, N] = A[M, K] * W^T.
struct Problem {
  int64_t M = 0, K = 0, N = 0;
  int bits = 0;
  int64_t words = 0;  // int32 words per qweight row (= per 16-row tile, sqllm/layout.h)
  int64_t nnz = 0;
  bool has_sparse = false, has_bias = false;
  int elem_type = 0;  // T
  std::vector<int64_t> y_shape;
};

// Words per 16-row tile of W: the second dimension of qweight (sqllm/layout.h).
inline int64_t WordsPerTile(int64_t K, int64_t bits) { return 32 * ((K + 63) / 64) * bits; }
inline int64_t TileCount(int64_t N) { return (N + 15) / 16; }

// "" when attributes are valid.
std::string CheckAttributes(const Attributes& attrs);

// "" when types and shapes of all inputs match the contract; fills *problem.
std::string CheckInputs(const Attributes& attrs, const TensorDesc (&in)[kNumInputs], Problem* problem);

// "" when the CSR arrays (host memory) are well formed for an N x K matrix with nnz entries.
std::string CheckCsr(const int32_t* indptr, const int32_t* indices, int64_t N, int64_t K, int64_t nnz);

std::string ElemTypeName(int elem_type);
std::string ShapeString(const std::vector<int64_t>& shape);

}  // namespace sqllm

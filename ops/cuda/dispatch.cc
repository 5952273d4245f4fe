// Path selection and the prefill orchestration (launch.h).
#include <algorithm>
#include <climits>
#include <cstdint>

#include "cublas_lib.h"
#include "device_info.h"
#include "kernels.h"
#include "launch.h"

namespace sqllm::cuda {
namespace {

int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

size_t ElemSize(const Problem& p) { return p.elem_type == kFloat16 ? 2 : 4; }

// Prefill scratch geometry: ldw = K rounded up to 8 elements; rows of W per chunk.
void PrefillGeometry(const Problem& p, int64_t* ldw, int64_t* rows) {
  *ldw = RoundUp(p.K, 8);
  const int64_t row_bytes = *ldw * static_cast<int64_t>(ElemSize(p));
  *rows = std::clamp<int64_t>(GetTuning().prefill_chunk_bytes / row_bytes, 1, p.N);
}

// Preconditions every path relies on (CheckInputs guarantees them for ORT calls; the benchmark hook
// passes raw pointers).
std::string CheckArgs(const Problem& p, const DeviceArgs& d) {
  const auto misaligned = [](const void* ptr, uintptr_t a) { return reinterpret_cast<uintptr_t>(ptr) % a != 0; };
  if (p.M < 1 || p.K < 1 || p.N < 1 || p.K > INT_MAX || p.N > INT_MAX)
    return "SqueezeMatMul (CUDA): internal error: bad dimensions";
  if (!(p.bits == 2 || p.bits == 3 || p.bits == 4 || p.bits == 8) || p.words != WordsPerTile(p.K, p.bits))
    return "SqueezeMatMul (CUDA): internal error: bad bits or qweight tile length";
  if (d.half != (p.elem_type == kFloat16)) return "SqueezeMatMul (CUDA): internal error: element type mismatch";
  if (!d.a || !d.qweight || !d.lut || !d.y) return "SqueezeMatMul (CUDA): internal error: null input or output";
  if (p.has_sparse && (!d.indptr || (p.nnz > 0 && (!d.indices || !d.values))))
    return "SqueezeMatMul (CUDA): internal error: null sparse input";
  if (p.has_bias && !d.bias) return "SqueezeMatMul (CUDA): internal error: null bias";
  const uintptr_t t = ElemSize(p);
  if (misaligned(d.qweight, 4) || misaligned(d.a, t) || misaligned(d.lut, t) || misaligned(d.y, t) ||
      (p.has_sparse && (misaligned(d.indptr, 4) || misaligned(d.indices, 4) || misaligned(d.values, t))) ||
      (p.has_bias && misaligned(d.bias, t)))
    return "SqueezeMatMul (CUDA): misaligned input or output buffer";
  return "";
}

}  // namespace

bool UsesDecodePath(const Problem& p) {
  if (p.M <= 8) return true;
  return p.elem_type == kFloat16 && (p.bits == 3 || p.bits == 4) && p.M <= GetTuning().decode_max_m;
}

std::string LaunchDecode(const Problem& p, const DeviceArgs& args, cudaStream_t stream, const LaunchOptions& options) {
  if (p.M < 1 || !UsesDecodePath(p)) return "SqueezeMatMul (CUDA): internal error: decode path called for M = " + std::to_string(p.M);
  if (auto err = CheckArgs(p, args); !err.empty()) return err;
  DeviceInfo dev;
  if (auto err = CurrentDevice(&dev); !err.empty()) return err;
  const bool pdl = GetTuning().pdl && dev.cc_major >= 9;
  if (!options.force_generic) {
    bool launched = false;
    if (auto err = LaunchDecodeTc(p, args, stream, pdl, options.qweight_constant && options.lut_constant, dev, &launched);
        !err.empty() || launched)
      return err;
  }
  // The CUDA-core kernel, 8 rows of A at a time (each chunk re-reads W, from L2 when it fits).
  const int64_t esize = static_cast<int64_t>(ElemSize(p));
  for (int64_t m0 = 0; m0 < p.M; m0 += 8) {
    Problem chunk = p;
    chunk.M = std::min<int64_t>(8, p.M - m0);
    DeviceArgs d = args;
    d.a = static_cast<const char*>(args.a) + m0 * p.K * esize;
    d.y = static_cast<char*>(args.y) + m0 * p.N * esize;
    if (auto err = LaunchDecodeGeneric(chunk, d, stream, dev); !err.empty()) return err;
  }
  return "";
}

size_t PrefillScratchBytes(const Problem& p) {
  int64_t ldw = 0, rows = 0;
  PrefillGeometry(p, &ldw, &rows);
  return static_cast<size_t>(RoundUp(rows * ldw * static_cast<int64_t>(ElemSize(p)), 256));
}

std::string LaunchPrefill(const Problem& p, const DeviceArgs& args, cudaStream_t stream, void* scratch,
                          void* cublas_handle) {
  if (auto err = CheckArgs(p, args); !err.empty()) return err;
  if (!scratch || !cublas_handle) return "SqueezeMatMul (CUDA): internal error: no scratch buffer or cuBLAS handle";
  DeviceInfo dev;
  if (auto err = CurrentDevice(&dev); !err.empty()) return err;
  int64_t ldw = 0, rows = 0;
  PrefillGeometry(p, &ldw, &rows);
  if (ldw > INT_MAX) return "SqueezeMatMul (CUDA): K too large for the cuBLAS prefill path";
  if (reinterpret_cast<uintptr_t>(scratch) % 256 != 0) return "SqueezeMatMul (CUDA): misaligned scratch buffer";
  const int64_t esize = static_cast<int64_t>(ElemSize(p));
  float beta = 0.f;
  if (p.has_bias) {
    if (auto err = LaunchBiasFill(p, args, stream, dev); !err.empty()) return err;
    beta = 1.f;
  }
  // Y[M, N] = A[M, K] W[N, K]^T, row-major. In cuBLAS's column-major terms Y is Y^T [N, M] with
  // leading dimension N, A is A^T [K, M] (ld K) and a chunk of W rows is W^T [K, rows] (ld ldw):
  // Y^T[n0 : n0 + rows, :] = (W^T)^T A^T, i.e. GemmEx(op_T on the scratch, op_N on A).
  constexpr int64_t kMaxGemmM = int64_t{1} << 30;
  for (int64_t n0 = 0; n0 < p.N; n0 += rows) {
    const int64_t nc = std::min(rows, p.N - n0);
    if (auto err = LaunchDequantize(p, args, n0, nc, scratch, ldw, stream, dev); !err.empty()) return err;
    for (int64_t m0 = 0; m0 < p.M; m0 += kMaxGemmM) {
      const int64_t mc = std::min(kMaxGemmM, p.M - m0);
      const void* a = static_cast<const char*>(args.a) + m0 * p.K * esize;
      void* y = static_cast<char*>(args.y) + (m0 * p.N + n0) * esize;
      if (auto err = CublasGemmTN(cublas_handle, stream, args.half, static_cast<int>(nc), static_cast<int>(mc),
                                  static_cast<int>(p.K), scratch, static_cast<int>(ldw), a, static_cast<int>(p.K),
                                  beta, y, static_cast<int>(p.N));
          !err.empty())
        return err;
    }
  }
  return "";
}

}  // namespace sqllm::cuda

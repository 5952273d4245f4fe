// CPU LUT matmul: Y[M, N] = A[M, K] * W^T (+ bias), W = lut[code] + CSR, accumulated in fp32.
// Pure compute on raw pointers; ops/cpu/cpu_kernel.cc connects it to ONNX Runtime.
#pragma once

#include <cstddef>
#include <cstdint>

#include "sqllm/contract.h"

namespace sqllm::cpu {

struct Int8Luts;  // lut_int8.h

struct Args {
  const float* a = nullptr;          // [M, K], fp32 (fp16 inputs are widened once per call)
  const uint32_t* qweight = nullptr;  // tiled, [ceil(N/16), words] (sqllm/layout.h)
  const void* lut = nullptr;         // T [N, 2^bits]
  const int32_t* indptr = nullptr;   // [N+1] or null
  const int32_t* indices = nullptr;  // [nnz]
  const void* values = nullptr;      // T [nnz]
  const void* bias = nullptr;        // T [N] or null
  void* y = nullptr;                 // T [M, N]
  bool half = false;                 // T is float16 (else float32)
  const Int8Luts* int8_luts = nullptr;  // the LUT quantized for the int8 path once per session, or null
};

// Runs fn(data, i) for i in [0, total), possibly in parallel (ORT's intra-op pool).
struct ParallelFor {
  virtual void operator()(size_t total, void (*fn)(void*, size_t), void* data) const = 0;
  virtual ~ParallelFor() = default;
};

// Which path runs (lut_matmul.cc): kAuto = the int8 path where it applies (bits 3/4, M <= 8, AVX-512
// VBMI + VNNI, finite A and LUT), else exact; kExact = always the exact fp32 path; kInt8 = the int8
// path at every M too (prefill included: for measuring what the int8 path does to a model).
enum class KernelChoice { kAuto, kExact, kInt8 };
// SQLLM_CPU_KERNEL=auto|exact|int8 (the kernel reads it when a session creates it).
KernelChoice DefaultKernelChoice();
// The path `choice` runs for `p` on this CPU: "int8-avx512-vnni", "exact-avx2" or "exact-portable".
const char* CpuPathName(const Problem& p, KernelChoice choice);

void LutMatmul(const Problem& p, const Args& args, const ParallelFor& parallel_for, KernelChoice choice);

}  // namespace sqllm::cpu

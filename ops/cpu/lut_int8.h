// The int8 path of the CPU LUT matmul (lut_int8.cc): bits 3 and 4, M <= 8, AVX-512 VBMI + VNNI.
#pragma once

#include <cstdint>
#include <vector>

#include "lut_matmul.h"

namespace sqllm::cpu {

// A quantized to int8 plus an int8 residual per row and unit of 256 k (A ~= scale * (qa + qr / 127)),
// in the byte order the decoded codes come in.
struct Int8Plan {
  int64_t units = 0;            // full units of K (the partial last unit is computed exactly)
  std::vector<int8_t> a;        // [M][units][2][256]: qa, qr, in the permuted order of lut_int8.cc
  std::vector<float> scale;     // [M][units]
  std::vector<float> base;      // [M]: sum over full units of scale * sum(a)
};

bool HasInt8Kernel();  // AVX-512 F, BW, VBMI and VNNI at run time
// Whether the int8 path takes `p` under `choice`.
bool Int8Applies(const Problem& p, KernelChoice choice);
// Quantizes A (fp32 [M, K]); false when A holds NaN or Inf (then the exact path runs).
bool PrepareInt8(const Problem& p, const float* a, Int8Plan* plan);
// acc[m * rows + r] += the dense part of rows r < rows of `tile`; false (nothing added) when a
// LUT row of the tile is not finite, so that the exact path runs for it.
bool Int8Tile(const Problem& p, const Args& args, const Int8Plan& plan, int64_t tile, int64_t rows, float* acc);

// Defined in lut_matmul.cc, used for the partial last unit.
void ExactUnit(const Problem& p, const Args& args, int64_t tile, int64_t rows, int64_t unit, float* acc);

}  // namespace sqllm::cpu

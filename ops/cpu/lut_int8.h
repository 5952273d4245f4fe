// The int8 path of the CPU LUT matmul (lut_int8.cc): bits 3 and 4, any M, AVX-512 VBMI + VNNI.
#pragma once

#include <cstdint>
#include <vector>

#include "lut_matmul.h"

namespace sqllm::cpu {

// Every row's LUT quantized to unsigned 8 bits over its range: lut[n][e] ~= lo[n] + step[n] * q[n][e].
// Made once per session when the LUT is a constant initializer (CpuKernel::Prepare), else per tile.
struct Int8Luts {
  std::vector<uint8_t> q;        // [16 * tiles][16] (entries past 2^bits, and padding rows, are 0)
  std::vector<float> lo, step;   // [16 * tiles]
  std::vector<uint8_t> tile_ok;  // [tiles]: 0 where a row of the tile holds Inf or NaN (the exact path runs)
};

// A quantized per row and unit of 256 k (the partial last unit too) to int8 plus an int8 residual,
// A ~= scale * (qa + qr / 127), in the byte order the decoded codes come in.
struct Int8Plan {
  int64_t full_units = 0, units = 0;  // units = full_units + 1 when K has a partial last unit
  int64_t row_bytes = 0;              // bytes of `a` per row of A
  std::vector<int8_t> a;              // [M][row_bytes]: per full unit qa[256], qr[256]; then per step
                                      // of the partial unit qa[16], qr[16]
  std::vector<float> scale;           // [M][units]
  std::vector<float> base;            // [M]: sum over units of scale * sum(qa + qr / 127)
};

bool HasInt8Kernel();  // AVX-512 F, BW, DQ, VL, VBMI and VNNI at run time
// Whether the int8 path takes `p` under `choice`.
bool Int8Applies(const Problem& p, KernelChoice choice);
// The quantized LUT of all N rows (needs HasInt8Kernel()).
void QuantizeAllLuts(const void* lut, bool half, int bits, int64_t N, Int8Luts* out);
// Quantizes A (fp32 [M, K]); false when A holds NaN or Inf (then the exact path runs).
bool PrepareInt8(const Problem& p, const float* a, Int8Plan* plan);
// acc[m * rows + r] = the dense part of rows r < rows of `tile`; false (acc untouched) when a
// LUT row of the tile is not finite, so that the exact path runs for it.
bool Int8Tile(const Problem& p, const Args& args, const Int8Plan& plan, int64_t tile, int64_t rows, float* acc);

}  // namespace sqllm::cpu

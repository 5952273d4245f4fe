// The tiled `qweight` layout of SqueezeMatMul (docs/op-spec.md, "qweight layout"): where code (n, k)
// of W lives. This one header is the layout for every kernel (CPU and CUDA); the numpy reference
// (sqllm_onnx/reference.py, pack_codes / unpack_codes) implements the same formula.
//
// Why tiles: the CUDA decode kernel feeds W to mma.m16n8k16 as the 16-row A operand, looked up
// code by code from per-row tables. In this layout every 16-row tile is one contiguous block that
// a copy engine streams as it is, every lane of a warp reads its own 16 bytes (conflict free), and
// the codes a lane needs for one mma step sit next to each other. The CPU kernel reads it as well
// as a row-major stream (ops/cpu/lut_matmul.cc).
//
//   n = 16 * tile + 8 * h + g          (h = 0, 1;  g = 0 .. 7)
//   k = 256 * unit + 64 * i + 32 * p + 8 * t + 4 * q + j
//                                       (group i = 0 .. 3, p, q = 0, 1, t = 0 .. 3, j = 0 .. 3)
//   lane = 4 * g + t,  step s = 2 * p + q
//
// Rows are padded to a multiple of 16 and K to a multiple of 64 with code 0. A tile holds
// ceil(K / 64) groups, four to a unit; the last unit of a tile holds the remaining ng = 1..3 groups
// when the count is not a multiple of 4 (else ng = 4 for every unit). Per lane, a unit of ng groups
// is ng * bits lane-local words holding the lane's 32 ng codes as an LSB-first bit stream:
//     code (h, i, s, j) at stream bit ((h * ng + i) * 16 + 4 * s + j) * bits
// (row g's codes first, then row g + 8's; a 3-bit code may straddle two words). Lane-local word w
// of a unit is stored at word
//     full unit (4 groups):  (w / 4) * 128 + 4 * lane + w % 4     (lane L's 16-byte vectors)
//     last, partial unit:    w * 32 + lane
// from the unit's start, unit * 128 * bits words from the tile's start; a tile takes
// 32 * ceil(K / 64) * bits words, and qweight is int32 [ceil(N / 16), 32 * ceil(K / 64) * bits].
// So in a full unit, rows g and g + 8 of lanes 4g .. 4g + 3 are 2 * bits consecutive quads each
// (4 bits: quads 2h, 2h + 1), which is what the CPU kernel reads as one row's 256 codes.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SQLLM_HD __host__ __device__ __forceinline__
#else
#define SQLLM_HD inline
#endif

namespace sqllm::layout {

constexpr int kTileRows = 16;    // rows of W per tile
constexpr int kGroupCodes = 64;  // codes of each row per group
constexpr int kUnitGroups = 4;   // groups per (full) unit
constexpr int kUnitCodes = kGroupCodes * kUnitGroups;
constexpr int kLanes = 32;

SQLLM_HD int64_t Tiles(int64_t N) { return (N + kTileRows - 1) / kTileRows; }
SQLLM_HD int64_t Groups(int64_t K) { return (K + kGroupCodes - 1) / kGroupCodes; }
// int32 words of one tile (the second dimension of qweight).
SQLLM_HD int64_t TileWords(int64_t K, int64_t bits) { return kLanes * Groups(K) * bits; }
// Full units per tile, and the groups of the last, partial unit (0: every unit is full).
SQLLM_HD int64_t FullUnits(int64_t K) { return Groups(K) / kUnitGroups; }
SQLLM_HD int PartialGroups(int64_t K) { return static_cast<int>(Groups(K) % kUnitGroups); }

// Word offset, from the start of its tile, of lane-local word u of `lane` in unit `unit`.
SQLLM_HD int64_t UnitWord(int64_t unit, int u, int lane, int64_t full_units, int bits) {
  const int64_t base = unit * 128 * bits;
  return unit < full_units ? base + (u >> 2) * 128 + 4 * lane + (u & 3) : base + u * 32 + lane;
}

// Groups of unit `unit` (4, or the partial unit's 1..3).
SQLLM_HD int UnitGroups(int64_t unit, int64_t K) {
  return unit < FullUnits(K) ? kUnitGroups : PartialGroups(K);
}

// Where code (r, k) of a tile sits (r = n % 16): its lane, unit, and lane-local stream bit.
struct CodePos {
  int lane;
  int64_t unit;
  int stream_bit;  // lane-local bit within the unit: word stream_bit / 32, bit stream_bit % 32
};

SQLLM_HD CodePos Locate(int r, int64_t k, int64_t K, int bits) {
  const int g = r & 7, h = r >> 3;
  const int kk = static_cast<int>(k & (kUnitCodes - 1));
  const int i = kk >> 6, p = (kk >> 5) & 1, t = (kk >> 3) & 3, q = (kk >> 2) & 1, j = kk & 3;
  const int s = 2 * p + q;
  const int64_t unit = k >> 8;
  const int ng = UnitGroups(unit, K);
  return CodePos{4 * g + t, unit, ((h * ng + i) * 16 + 4 * s + j) * bits};
}

// Code (r, k) of the tile starting at `tile` (words).
SQLLM_HD uint32_t CodeAt(const uint32_t* tile, int r, int64_t k, int64_t K, int bits) {
  const int64_t full_units = FullUnits(K);
  const CodePos c = Locate(r, k, K, bits);
  const int u = c.stream_bit >> 5, bit = c.stream_bit & 31;
  uint64_t v = tile[UnitWord(c.unit, u, c.lane, full_units, bits)];
  if (bit + bits > 32) v |= static_cast<uint64_t>(tile[UnitWord(c.unit, u + 1, c.lane, full_units, bits)]) << 32;
  return static_cast<uint32_t>(v >> bit) & ((1u << bits) - 1u);
}

}  // namespace sqllm::layout

// The tiled `qweight` layout of SqueezeMatMul (docs/op-spec.md, "qweight layout"): where code (n, k)
// of W lives. This one header is the layout for every kernel (CPU and CUDA); the numpy reference
// (sqllm_onnx/reference.py, pack_codes / unpack_codes) implements the same formula.
//
// Why tiles: the CUDA decode kernel feeds W to mma.m16n8k32 as the 16-row A operand, each lane's
// codes turned into table values by byte permutes (PRMT) whose selectors are the code words
// themselves. In this layout every 16-row tile is one contiguous block that a copy engine streams
// as it is, every lane of a warp reads its own 16 bytes (conflict free), and the codes of one A
// register (4 codes of one row) are the nibbles of one half word. The CPU kernels read it too.
//
//   n = 16 * tile + 8 * h + g          (h = 0, 1;  g = 0 .. 7)
//   k = 256 * unit + 64 * i + 32 * p + 8 * t + 4 * q + j
//                                       (group i = 0 .. 3, p, q = 0, 1, t = 0 .. 3, j = 0 .. 3)
//   lane = 4 * g + t,  step s = 2 * p + q,  nibble = 4 * q + j
//
// Rows are padded to a multiple of 16 and K to a multiple of 64 with code 0. A tile holds
// ceil(K / 64) groups, four to a unit; the last unit of a tile holds the remaining ng = 1..3 groups
// when the count is not a multiple of 4 (else ng = 4 for every unit). Per lane, a unit of ng groups
// is ng * bits lane-local words holding the lane's 32 ng codes; bit b of code (h, i, s, j) is at
// lane-local stream bit (word * 32 + bit)
//     bits 2, 4, 8:  ((h * ng + i) * 16 + 4 * s + j) * bits + b        (an LSB-first stream)
//     bits 3 (code layout 2), in three planes of ng words, plane 0 = (h, p) = (0, 0),
//                  plane 1 = (1, 0), plane 2 = (0, 1):
//       (h, p) != (1, 1):  word plane * ng + i, bit 4 * nibble + b      (the nibble's low 3 bits)
//       (h, p) == (1, 1):  word b * ng + i,     bit 4 * nibble + 3      (bit b in plane b's 4th bits)
// Lane-local word w of a unit is stored at word
//     full unit (4 groups):  (w / 4) * 128 + 4 * lane + w % 4     (lane L's 16-byte vectors)
//     last, partial unit:    w * 32 + lane
// from the unit's start, unit * 128 * bits words from the tile's start; a tile takes
// 32 * ceil(K / 64) * bits words, and qweight is int32 [ceil(N / 16), 32 * ceil(K / 64) * bits].
// So in a full unit, 4 bits: rows g and g + 8 of lanes 4g .. 4g + 3 are quads 2h, 2h + 1; 3 bits:
// quad v of lanes 4g .. 4g + 3 is plane v (the 3-bit planes are what the CPU kernel decodes).
//
// Code layout 1 (sqllm-onnx exports before the `layout` attribute) stored 3-bit codes as the same
// LSB-first stream as the other widths; those exports are refused (contract.cc), and checkpoints of
// that layout are repacked when loaded (reference.repack_layout1).
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

// The code layout revision this library reads (the op's `layout` attribute, docs/op-spec.md).
constexpr int kCodeLayout = 2;

// Lane-local stream bit (word * 32 + bit) of bit b of code (h, i, s, j) in a unit of ng groups.
SQLLM_HD int StreamBit(int h, int i, int s, int j, int b, int ng, int bits) {
  if (bits == 3) {
    const int p = s >> 1, nibble = 4 * (s & 1) + j;
    if (h == 1 && p == 1) return 32 * (b * ng + i) + 4 * nibble + 3;
    return 32 * ((p ? 2 : h) * ng + i) + 4 * nibble + b;
  }
  return ((h * ng + i) * 16 + 4 * s + j) * bits + b;
}

// Code (h, i, s, j) of a unit of ng groups, its lane-local words read through word(u).
template <typename Word>
SQLLM_HD uint32_t CodeFromWords(Word word, int h, int i, int s, int j, int ng, int bits) {
  if (bits == 3 && h == 1 && s >= 2) {  // one bit in each plane
    uint32_t c = 0;
    for (int b = 0; b < 3; ++b) {
      const int sb = StreamBit(h, i, s, j, b, ng, bits);
      c |= ((word(sb >> 5) >> (sb & 31)) & 1u) << b;
    }
    return c;
  }
  const int sb = StreamBit(h, i, s, j, 0, ng, bits);  // otherwise the code's bits are adjacent in one word
  return (word(sb >> 5) >> (sb & 31)) & ((1u << bits) - 1u);
}

// Code (h, i, s, j) from a lane's unit words w[0 .. ng * bits).
SQLLM_HD uint32_t LaneCode(const uint32_t* w, int h, int i, int s, int j, int ng, int bits) {
  return CodeFromWords([w](int u) { return w[u]; }, h, i, s, j, ng, bits);
}

// Where code (r, k) of a tile sits (r = n % 16): its lane, unit and (h, i, s, j).
struct CodePos {
  int lane;
  int64_t unit;
  int h, i, s, j, ng;
};

SQLLM_HD CodePos Locate(int r, int64_t k, int64_t K) {
  const int kk = static_cast<int>(k & (kUnitCodes - 1));
  const int i = kk >> 6, p = (kk >> 5) & 1, t = (kk >> 3) & 3, q = (kk >> 2) & 1, j = kk & 3;
  const int64_t unit = k >> 8;
  return CodePos{4 * (r & 7) + t, unit, r >> 3, i, 2 * p + q, j, UnitGroups(unit, K)};
}

// Code (r, k) of the tile starting at `tile` (words).
SQLLM_HD uint32_t CodeAt(const uint32_t* tile, int r, int64_t k, int64_t K, int bits) {
  const int64_t full_units = FullUnits(K);
  const CodePos c = Locate(r, k, K);
  const auto word = [&](int u) { return tile[UnitWord(c.unit, u, c.lane, full_units, bits)]; };
  return CodeFromWords(word, c.h, c.i, c.s, c.j, c.ng, bits);
}

}  // namespace sqllm::layout

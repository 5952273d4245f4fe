// Pieces shared by the tensor-core decode kernels (decode_mma.cu: the baseline kernel;
// decode_pipe.cu: the pipelined variants): the work split, the code-fragment mapping, the lookup
// tables, the layout of A in shared memory, the epilogue (partials + K tail + sparse + bias), and
// the host-side parameter setup. decode_mma.cu's header comment derives all of it.
//
// Naming: a "row tile" is 16 rows of W; a "k-tile" is 256 codes of those rows; an "item" is one
// warp's share of a row tile: one k-tile (16 mma steps). Warp w of a CTA takes the k-tiles
// w, w + 8, w + 16, ... of every row tile; `ItemsPerWarp` counts them.
#pragma once

#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "common.cuh"
#include "kernels.h"

namespace sqllm::cuda::mma {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTileRows = 16;
constexpr int kKTile = 256;  // codes per k-tile (per row): 4 lanes x 64 codes
constexpr int kRedBytes = kWarps * kTileRows * 8 * 4;  // float [warp][row][m]: one set of warp partials
constexpr int kRowsPerWarp = kTileRows / kWarps;       // in the epilogue
static_assert(kRowsPerWarp == 2, "the epilogue is written for 2 rows per warp");

template <int BITS>
struct Cfg;
template <>
struct Cfg<3> {
  static constexpr int kBlockCodes = 64;  // contiguous codes per lane block
  static constexpr int kBlocks = 1;       // lane blocks per k-tile
  static constexpr int kEntries = 64;     // pair table
  static constexpr int kMaxVec = 2;       // a block is 6 words: 8-byte loads at most
};
template <>
struct Cfg<4> {
  static constexpr int kBlockCodes = 32;
  static constexpr int kBlocks = 2;
  static constexpr int kEntries = 16;  // single-code table
  static constexpr int kMaxVec = 4;
};

// Codes of one item in a lane's registers, and the single-layout lookup tables.
template <int BITS>
struct Codes {
  using C = Cfg<BITS>;
  static constexpr int kBlockWords = C::kBlockCodes * BITS / 32;
  static constexpr int kLaneWords = C::kBlocks * kBlockWords;  // per row (slot); a lane has 2 rows
  static constexpr int kStepsPerBlock = C::kBlockCodes / 4;
  // Tables: lane L's copy of entry e of slot s (row g + 8 s) is word (s * kEntries + e) * 32 + L.
  static constexpr int kSlotBytes = C::kEntries * 32 * 4;
  static constexpr int kTabBytes = 2 * kSlotBytes;
  static_assert(kBlockWords * 32 == C::kBlockCodes * BITS, "blocks must end on word boundaries");
  static_assert(C::kBlocks * C::kBlockCodes * 4 == kKTile, "4 lanes x blocks x block codes = k-tile");
  static_assert(kStepsPerBlock * C::kBlocks == 16, "16 mma steps per k-tile");
  static_assert(kSlotBytes == (BITS == 3 ? 64 * 32 * 4 : 16 * 32 * 4), "Lookup3/Lookup4 slot offsets");
};

// A (fp16) in shared memory: byte offset of (m, k) = m * RS + 2k + PAD * (k / kBlockCodes), i.e. PAD
// bytes after every lane block. RS = kRsMod (mod 128). PAD 8 / RS 32 mod 128 (baseline): the 8-byte
// B-fragment loads of the 32 lanes hit distinct banks; PAD 16 / RS 64 mod 128 (pipelined kernels):
// 16-byte loads of two steps' B fragments, conflict free per quarter warp (decode_pipe.cu).
template <int BITS, int PAD>
struct ASmem {
  using C = Cfg<BITS>;
  static constexpr int kPad = PAD;
  static constexpr int kRsMod = PAD == 8 ? 32 : 64;
  static constexpr int kLaneBytes = 2 * C::kBlockCodes + PAD;  // lane t -> t + 1 (one block)
  static constexpr int kBlockBytes = 4 * kLaneBytes;             // block b -> b + 1 of a lane
  static constexpr int kKTileBytes = 2 * kKTile + PAD * (kKTile / C::kBlockCodes);
  static_assert(PAD == 8 || PAD == 16, "A padding");
  static_assert(kLaneBytes * 4 * C::kBlocks == kKTileBytes, "k-tile stride of A in shared memory");
  static __device__ __forceinline__ uint32_t Offset(uint32_t rs, int m, int k) {
    return m * rs + 2 * k + PAD * (k / C::kBlockCodes);
  }
};

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Row stride RS of A in shared memory for ASmem<BITS, PAD>.
template <int BITS, int PAD>
int64_t ARowStride(int64_t K) {
  using A = ASmem<BITS, PAD>;
  const int64_t bl = Cfg<BITS>::kBlockCodes;
  const int64_t kp = RoundUp(K, bl);
  int64_t rs = RoundUp(2 * kp + PAD * (kp / bl), 32);
  while (rs % 128 != A::kRsMod) rs += 32;
  return rs;
}

struct MmaParams {
  const __half* a;          // [M, K]
  const uint32_t* q;        // [N, words]
  const __half* lut;        // [N, 2^BITS]
  const int32_t* indptr;    // [N + 1] or null
  const int32_t* indices;   // [nnz]
  const __half* values;     // [nnz]
  const __half* bias;       // [N] or null
  __half* y;                // [M, N]
  int64_t N, words, n_tiles, tiles_per_cta;  // tiles_per_cta: baseline (pipelined: balanced split)
  int64_t nnz;              // entries of the CSR part (0 without)
  int32_t K, M, k_tiles;
  int32_t qvec;             // qweight load width in words: 4, 2 or 1 (alignment of rows)
  uint32_t a_row_bytes;     // RS
  int32_t a_vec;            // A rows can be read 4 halves (8 bytes) at a time
  int32_t a_async;          // pipelined: A rows can be copied 8 halves (16 bytes) at a time (cp.async)
  int32_t lut_vec;          // pipelined: LUT rows can be read 16 bytes at a time (lut 16-byte aligned)
  int32_t q_before_wait;    // prefetch qweight before griddepcontrol.wait (qweight constant)
  int32_t lut_before_wait;  // pipelined: load the first tile's LUT before the wait (LUT constant)
};

// Everything read after griddepcontrol.wait uses plain (coherent) loads: non-coherent __ldg loads
// may be treated as invariant by the compiler and hoisted above the wait.
__device__ __forceinline__ uint32_t LoadU16(const __half* p) { return *reinterpret_cast<const unsigned short*>(p); }

__device__ __forceinline__ int64_t MinI64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename V>
__device__ __forceinline__ V Lds(const unsigned char* smem, uint32_t offset) {
  return *reinterpret_cast<const V*>(smem + offset);
}
template <typename V>
__device__ __forceinline__ void Sts(unsigned char* smem, uint32_t offset, V v) {
  *reinterpret_cast<V*>(smem + offset) = v;
}

// The `width`-bit field at stream bit `bit` of a lane's words, shifted to bit 7 (bits above the
// field are garbage, bits below are garbage too: the caller masks). `bit` is a compile-time
// constant after unrolling, so this is one SHF (or one funnel shift for a straddling field).
template <int N>
__device__ __forceinline__ uint32_t FieldAt7(const uint32_t (&w)[N], int bit, int width) {
  const int i = bit >> 5, o = bit & 31;
  if (o + width > 32) return __funnelshift_r(w[i], w[i + 1], o - 7);
  if (o >= 7) return w[i] >> (o - 7);
  return w[i] << (7 - o);
}

__device__ __forceinline__ void Mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The 3-bit pair lookups of mma step j (codes 4j .. 4j+3 of the lane's 64-code block, stream bits
// 12j and 12j + 6): a0/a2 of slot 0 (row g), a1/a3 of slot 1 (row g + 8). tab0: byte offset of
// this lane's slot-0 table copy with entry 0 (entry e at + e * 128); slot 1 is at + kSlotBytes,
// a bit that is clear in (field | tab0), so it is added as an immediate (no second register).
__device__ __forceinline__ void Lookup3(const unsigned char* smem, const uint32_t (&w)[2][6], int j, uint32_t tab0,
                                        uint32_t (&a)[4]) {
  constexpr uint32_t kMask = 63u << 7, kSlot1 = 64 * 32 * 4;
  a[0] = Lds<uint32_t>(smem, (FieldAt7(w[0], 12 * j, 6) & kMask) | tab0);
  a[1] = Lds<uint32_t>(smem, ((FieldAt7(w[1], 12 * j, 6) & kMask) | tab0) + kSlot1);
  a[2] = Lds<uint32_t>(smem, (FieldAt7(w[0], 12 * j + 6, 6) & kMask) | tab0);
  a[3] = Lds<uint32_t>(smem, ((FieldAt7(w[1], 12 * j + 6, 6) & kMask) | tab0) + kSlot1);
}

// The 4-bit single-code lookups of step jj of block b (codes 4jj .. 4jj+3 of the block: word
// 4b + jj/2, nibbles 4 (jj & 1) .. + 3), two per A-fragment register joined with a PRMT. tab0 as
// in Lookup3 (slot 1 at + kSlotBytes).
__device__ __forceinline__ void Lookup4(const unsigned char* smem, const uint32_t (&w)[2][8], int b, int jj,
                                        uint32_t tab0, uint32_t (&a)[4]) {
  constexpr uint32_t kMask = 15u << 7, kSlot1 = 16 * 32 * 4;
  const int bit = 32 * (4 * b) + 16 * jj;
  uint32_t v[2][4];
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      v[s][i] = Lds<uint32_t>(smem, ((FieldAt7(w[s], bit + 4 * i, 4) & kMask) | tab0) + (s ? kSlot1 : 0u));
  a[0] = __byte_perm(v[0][0], v[0][1], 0x5410);
  a[1] = __byte_perm(v[1][0], v[1][1], 0x5410);
  a[2] = __byte_perm(v[0][2], v[0][3], 0x5410);
  a[3] = __byte_perm(v[1][2], v[1][3], 0x5410);
}

// Codes of k-tile `kt` of rows tile*16 + g (slot 0) and + 8 (slot 1) for lane t, into registers.
// Rows >= N read nothing and give code 0.
template <int BITS>
__device__ __forceinline__ void LoadItem(const MmaParams& p, int64_t tile, int kt, int g, int t,
                                         uint32_t (&w)[2][Codes<BITS>::kLaneWords]) {
  using L = Codes<BITS>;
  using C = Cfg<BITS>;
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int64_t row = tile * kTileRows + g + 8 * s;
    const bool ok = row < p.N;
    const uint32_t* base = p.q + (ok ? row : 0) * p.words + static_cast<int64_t>(kt) * (8 * BITS);
#pragma unroll
    for (int b = 0; b < C::kBlocks; ++b) {
      const uint32_t* src = base + (4 * b + t) * L::kBlockWords;
      uint32_t* dst = &w[s][b * L::kBlockWords];
      if (!ok) {
#pragma unroll
        for (int i = 0; i < L::kBlockWords; ++i) dst[i] = 0;
      } else if (C::kMaxVec >= 4 && p.qvec == 4) {
#pragma unroll
        for (int i = 0; i < L::kBlockWords / 4; ++i) {
          const uint4 v = reinterpret_cast<const uint4*>(src)[i];
          dst[4 * i] = v.x, dst[4 * i + 1] = v.y, dst[4 * i + 2] = v.z, dst[4 * i + 3] = v.w;
        }
      } else if (p.qvec >= 2) {
#pragma unroll
        for (int i = 0; i < L::kBlockWords / 2; ++i) {
          const uint2 v = reinterpret_cast<const uint2*>(src)[i];
          dst[2 * i] = v.x, dst[2 * i + 1] = v.y;
        }
      } else {
#pragma unroll
        for (int i = 0; i < L::kBlockWords; ++i) dst[i] = src[i];
      }
    }
  }
}

// Per-thread lut values for building the tables of one row tile: row r = tid % 16 of the tile;
// 3 bits: v[0] = lut[r][e0 % 8], v[1 + i] = lut[r][e0 / 8 + 2 i] for the pair entries
// e0 + 16 i (i < 4), e0 = tid / 16; 4 bits: v[0] = lut[r][tid / 16].
struct LutRegs {
  uint32_t v[5];
};

template <int BITS>
__device__ __forceinline__ void LoadLut(const MmaParams& p, int64_t tile, int tid, LutRegs& r) {
  const int64_t n = tile * kTileRows + (tid & 15);
  const int e0 = tid >> 4;
#pragma unroll
  for (int i = 0; i < 5; ++i) r.v[i] = 0;
  if (n >= p.N) return;
  const __half* row = p.lut + (n << BITS);
  if constexpr (BITS == 3) {
    r.v[0] = LoadU16(row + (e0 & 7));
#pragma unroll
    for (int i = 0; i < 4; ++i) r.v[1 + i] = LoadU16(row + (e0 >> 3) + 2 * i);
  } else {
    r.v[0] = LoadU16(row + e0);
  }
}

// Writes the 4 lane copies (lanes 4g .. 4g+3: 16 contiguous bytes) of this thread's entries into
// the single-layout tables at byte offset `tab` (Codes<BITS>: slot s at + s * kSlotBytes).
template <int BITS>
__device__ __forceinline__ void BuildTables(unsigned char* smem, uint32_t tab, int tid, const LutRegs& r) {
  using L = Codes<BITS>;
  const int row = tid & 15, e0 = tid >> 4;
  const uint32_t base = tab + (row >> 3) * L::kSlotBytes + (row & 7) * 16;
  if constexpr (BITS == 3) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t v = r.v[0] | (r.v[1 + i] << 16);  // half2(lut[c_lo], lut[c_hi])
      Sts(smem, base + (e0 + 16 * i) * 128, make_uint4(v, v, v, v));
    }
  } else {
    Sts(smem, base + e0 * 128, make_uint4(r.v[0], r.v[0], r.v[0], r.v[0]));
  }
}

// CSR bounds of a warp's 2 rows: lanes 0..2 hold indptr[min(n_first + lane, N)].
__device__ __forceinline__ int LoadIndptr(const MmaParams& p, int64_t tile, int warp, int lane) {
  if (!p.indptr || lane > kRowsPerWarp) return 0;
  const int64_t n = MinI64(tile * kTileRows + kRowsPerWarp * warp + lane, p.N);
  return p.indptr[n];
}

struct Sparse {
  int s0, b1, s1;  // entries [s0, s1) of the warp's rows; the second row starts at b1
  int idx[2];      // prefetched entries s0 + lane and s0 + 32 + lane
  uint32_t vals;   // their values (fp16 bits): entry s0 + lane in the low half
};

__device__ __forceinline__ void PrefetchSparse(const MmaParams& p, int ip, int lane, Sparse& sp) {
  sp.s0 = __shfl_sync(0xffffffffu, ip, 0);
  sp.b1 = __shfl_sync(0xffffffffu, ip, 1);
  sp.s1 = __shfl_sync(0xffffffffu, ip, 2);
  uint32_t v[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t e = static_cast<int64_t>(sp.s0) + 32 * i + lane;
    sp.idx[i] = e < sp.s1 ? p.indices[e] : 0;
    v[i] = e < sp.s1 ? LoadU16(p.values + e) : 0;
  }
  sp.vals = v[0] | (v[1] << 16);
}

template <int BITS, int PAD>
__device__ __forceinline__ float ALoad(const unsigned char* smem, uint32_t a_off, uint32_t rs, int m, int k) {
  return __half2float(Lds<__half>(smem, a_off + ASmem<BITS, PAD>::Offset(rs, m, k)));
}

template <int BITS, int PAD>
__device__ __forceinline__ void AddSparseEntry(const unsigned char* smem, uint32_t a_off, const MmaParams& p,
                                               const Sparse& sp, int64_t e, int idx, uint32_t val,
                                               float (&acc)[kRowsPerWarp][8]) {
  if (e >= sp.s1) return;
  const bool second = e >= sp.b1;
  const float v = HalfBitsToFloat(val);
#pragma unroll
  for (int m = 0; m < 8; ++m) {
    if (m < p.M) {
      const float x = v * ALoad<BITS, PAD>(smem, a_off, p.a_row_bytes, m, idx);
      if (second) acc[1][m] += x;
      else acc[0][m] += x;
    }
  }
}

// Rows 2 * warp and 2 * warp + 1 of the tile: warp partials (float [8][16][8] at byte offset
// red_off) + K tail + sparse + bias -> Y. A is at byte offset a_off, laid out as ASmem<BITS, PAD>.
template <int BITS, int PAD>
__device__ __forceinline__ void Epilogue(const unsigned char* smem, uint32_t red_off, uint32_t a_off,
                                         const MmaParams& p, int64_t tile, int warp, int lane, const Sparse& sp) {
  const float* red = reinterpret_cast<const float*>(smem + red_off);
  const int64_t n_first = tile * kTileRows + kRowsPerWarp * warp;
  const int k_main = p.k_tiles * kKTile;
  float acc[kRowsPerWarp][8];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int m = 0; m < 8; ++m) acc[r][m] = 0.f;
  bool extra = false;  // warp-uniform
  if (k_main < p.K) {
    extra = true;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t n = n_first + r;
      if (n >= p.N) break;
      const uint32_t* qrow = p.q + n * p.words;
      const __half* lrow = p.lut + (n << BITS);
      for (int k = k_main + lane; k < p.K; k += 32) {
        const float wv = __half2float(lrow[CodeAt(qrow, k, BITS)]);
#pragma unroll
        for (int m = 0; m < 8; ++m)
          if (m < p.M) acc[r][m] += wv * ALoad<BITS, PAD>(smem, a_off, p.a_row_bytes, m, k);
      }
    }
  }
  if (p.indptr && sp.s1 > sp.s0) {
    extra = true;
    const int64_t s0 = sp.s0;
    AddSparseEntry<BITS, PAD>(smem, a_off, p, sp, s0 + lane, sp.idx[0], sp.vals & 0xFFFFu, acc);
    AddSparseEntry<BITS, PAD>(smem, a_off, p, sp, s0 + 32 + lane, sp.idx[1], sp.vals >> 16, acc);
    for (int64_t e = s0 + 64 + lane; e < sp.s1; e += 32)
      AddSparseEntry<BITS, PAD>(smem, a_off, p, sp, e, p.indices[e], LoadU16(p.values + e), acc);
  }
  if (extra) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int m = 0; m < 8; ++m)
        if (m < p.M) acc[r][m] = WarpSum(acc[r][m]);
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t n = n_first + r;
    if (n >= p.N) break;
    if (lane < p.M) {
      const int row = kRowsPerWarp * warp + r;
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += red[(w * kTileRows + row) * 8 + lane];
      float x = 0.f;
#pragma unroll
      for (int m = 0; m < 8; ++m)
        if (m == lane) x = acc[r][m];
      s += x;
      if (p.bias) s += __half2float(p.bias[n]);
      p.y[lane * p.N + n] = __float2half_rn(s);
    }
  }
}

// Warp partials (mma C fragment) of one tile into red[warp][row][m] at byte offset red_off.
__device__ __forceinline__ void StorePartials(unsigned char* smem, uint32_t red_off, int warp, int g, int t,
                                              const float (&c)[4]) {
  float* red = reinterpret_cast<float*>(smem + red_off);
  *reinterpret_cast<float2*>(&red[(warp * kTileRows + g) * 8 + 2 * t]) = make_float2(c[0], c[1]);
  *reinterpret_cast<float2*>(&red[(warp * kTileRows + g + 8) * 8 + 2 * t]) = make_float2(c[2], c[3]);
}

// ---- host side ---------------------------------------------------------------------------------------

// The parameters every tensor-core decode kernel shares ("" or an error message). Leaves the
// launch-specific fields (tiles_per_cta, a_row_bytes, q/lut_before_wait) to the caller.
template <int BITS>
std::string CommonParams(const Problem& p, const DeviceArgs& d, MmaParams* m) {
  const auto addr = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); };
  if (addr(d.qweight) % 4 != 0 || addr(d.a) % 2 != 0 || addr(d.lut) % 2 != 0)
    return "SqueezeMatMul (CUDA): misaligned input buffer";
  *m = MmaParams{};
  m->a = static_cast<const __half*>(d.a);
  m->q = d.qweight;
  m->lut = static_cast<const __half*>(d.lut);
  m->indptr = p.has_sparse ? d.indptr : nullptr;
  m->indices = d.indices;
  m->values = static_cast<const __half*>(d.values);
  m->bias = p.has_bias ? static_cast<const __half*>(d.bias) : nullptr;
  m->y = static_cast<__half*>(d.y);
  m->N = p.N;
  m->nnz = p.has_sparse ? p.nnz : 0;
  m->words = p.words;
  m->n_tiles = (p.N + kTileRows - 1) / kTileRows;
  m->K = static_cast<int32_t>(p.K);
  m->M = static_cast<int32_t>(p.M);
  m->k_tiles = static_cast<int32_t>(p.K / kKTile);
  m->qvec = 1;
  for (int v : {4, 2})
    if (v <= Cfg<BITS>::kMaxVec && p.words % v == 0 && addr(d.qweight) % (4 * v) == 0) {
      m->qvec = v;
      break;
    }
  m->a_vec = (p.K % 4 == 0 && addr(d.a) % 8 == 0) ? 1 : 0;
  m->a_async = (p.K % 8 == 0 && addr(d.a) % 16 == 0) ? 1 : 0;
  m->lut_vec = (addr(d.lut) % 16 == 0) ? 1 : 0;
  return "";
}

// Opts `kernel` in to the device's shared-memory maximum (once per kernel and device) and returns
// its occupancy (CTAs per SM) for `smem` bytes of dynamic shared memory, cached per size.
template <typename Kernel>
std::string KernelOccupancy(Kernel kernel, const DeviceInfo& dev, int64_t smem, int* blocks_per_sm) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int64_t>, int> occupancy;
  static std::map<std::tuple<const void*, int>, bool> opted_in;
  std::lock_guard<std::mutex> lock(mutex);
  const void* key = reinterpret_cast<const void*>(kernel);
  if (!opted_in[{key, dev.device}]) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(dev.smem_optin));
    if (e != cudaSuccess) return CudaMessage(e, "cudaFuncSetAttribute (decode kernel shared memory)");
    opted_in[{key, dev.device}] = true;
  }
  auto it = occupancy.find({key, dev.device, smem});
  if (it == occupancy.end()) {
    int blocks = 0;
    const cudaError_t e =
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, static_cast<size_t>(smem));
    if (e != cudaSuccess) return CudaMessage(e, "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    it = occupancy.emplace(std::make_tuple(key, dev.device, smem), blocks).first;
  }
  *blocks_per_sm = it->second;
  return "";
}

}  // namespace sqllm::cuda::mma

// Decode path for fp16, bits 3 and 4, M <= 8: a LUT "GEMV" that dequantizes in shared-memory
// lookup tables and multiplies on tensor cores (mma.sync m16n8k16, fp32 accumulation).
//
// Why tensor cores for a GEMV. At 3 bits the H100 must consume ~25-30 codes per clock per SM to
// stream the codes at full HBM bandwidth. One FFMA per code per row of A leaves no issue slots for
// extracting the codes and looking them up, and M up to 8 multiplies that. With mma.sync the
// multiply-add is free (one instruction per 16 rows x 16 k x 8 rows of A); what remains per code
// is the lookup, so the kernel is built around making that cheap:
//
// Work decomposition
//   CTA = 8 warps (256 threads). Row tile = 16 consecutive rows of W (output features). A CTA
//   handles tiles_per_cta consecutive row tiles, one after the other (the host picks it so that
//   the grid is one wave). Within a tile the 8 warps split K: K is cut into k-tiles of 256 codes,
//   warp w takes k-tiles w, w+8, w+16, ... and accumulates a 16 x 8 fp32 partial in mma
//   registers; the 8 partials are summed through shared memory at the end of the tile. The part
//   of K after the last whole k-tile (K % 256 codes) is done on CUDA cores in the epilogue.
//   (8 warps so that at K = 4096 every warp has 2 k-tiles, both in flight from the start: a
//   4096 x 4096 layer is only ~48 KB of codes per SM, so latency, not issue, is what matters.)
//
// mma fragment mapping (PTX ISA, m16n8k16 .f16): lane = 4*g + t (g = groupID, t = thread in
// group). The A operand (16 x 16, row-major) is W: rows g and g+8 of the tile, columns (k)
// {2t, 2t+1, 2t+8, 2t+9}. The B operand (16 x 8) is A^T: column n = g is row m = g of A, rows
// (k) {2t, 2t+1, 2t+8, 2t+9}. C (16 x 8 fp32): c0,c1 = (row g, m 2t, 2t+1), c2,c3 = (row g+8,
// m 2t, 2t+1). The order of k inside a dot product is free, so each mma's 16 k indices are mapped
// to physical k such that every lane reads CONTIGUOUS codes of its two rows:
//   mma step j of a k-tile: lane t's k indices {2t, 2t+1} -> codes 4j', 4j'+1 of its block and
//   {2t+8, 2t+9} -> codes 4j'+2, 4j'+3, where a lane's 64 codes per row per k-tile are
//     3 bits: one block of 64 contiguous codes, block index t      (6 words = 3 x 8-byte loads)
//     4 bits: two blocks of 32 contiguous codes, block indices t and 4+t (4 words = one 16-byte
//             load each; the 4 lanes of a row read 64 contiguous bytes per instruction)
//   and the B fragment uses the same map, so each step's B is 4 consecutive halves of A row g.
//
// Lookup tables (shared memory, rebuilt per row tile; bank-conflict free by construction)
//   Lane L of every warp reads only its own copy of the tables of its two rows (g and g+8), and
//   its copy lives entirely in bank L: word (slot * ENTRIES + e) * 32 + L, slot 0 = row g,
//   slot 1 = row g+8. Whatever codes the 32 lanes hold, one lookup instruction is one wavefront.
//     3 bits: ENTRIES = 64 pair entries: e = c(k) | c(k+1) << 3 -> half2(lut[c(k)], lut[c(k+1)]),
//             which IS the mma A-fragment register; one lookup per two codes; 16 KiB.
//     4 bits: ENTRIES = 16 single entries (fp16 in the low half of the word); two lookups and one
//             PRMT per A-fragment register; 4 KiB.
//   The address of a lookup is (field << 7) | (slot * ENTRIES * 128 + L * 4): one funnel/shift
//   and one LOP3 per lookup, no multiply.
//
// A (the activations) is staged once per CTA in shared memory as fp16 with 8 bytes of padding
// after every block of BL = 64 (3 bits) / 32 (4 bits) halves and a row stride RS = 32 (mod 128)
// bytes: the B-fragment loads (8 bytes per lane, lanes (g, t)) then hit 64 distinct banks over the
// two half-warp wavefronts: bank(g, t) = 8g + (2 BL + 8) t / 4 (mod 32), conflict free for both
// block sizes. Lanes with g >= M load nothing (B = 0, their C columns are discarded).
//
// Loads in flight: each warp prefetches the codes of its next k-tile (possibly of the next row
// tile) into registers while it computes the current one. With PDL (sm_90+), the first k-tile's
// codes are requested before griddepcontrol.wait when qweight is constant (an initializer), so
// the kernel streams weights while the previous kernel on the stream finishes.
//
// Epilogue per tile (warp w owns rows 2w, 2w+1): sum of the 8 warp partials + K tail (CUDA cores)
// + sparse part + bias, rounded once to fp16. The sparse part is fused: the warp strides over the
// CSR entries of its 2 rows (contiguous in CSR order) 32 at a time, gathers A from shared memory,
// and adds into per-row registers; no atomics, and the work per warp is proportional to the
// entries of its rows. The first 64 entries of the 2 rows are loaded before the tile's mma loop
// (their row bounds were read during the previous tile) so their latency is hidden.
//
// Table build (per tile, all 256 threads): thread -> row r = tid % 16, entries tid / 16 + 16 i;
// it writes the 4 lane copies of an entry (16 contiguous bytes, banks 4g .. 4g+3 of its row's
// group g) with one 16-byte store; the 8 lanes of a quarter warp are 8 different groups, so the
// stores are conflict free.
//
// Shared memory (bytes): [0, TAB) tables | [TAB, TAB + 4096) warp partials, float [8][16][8] |
// [TAB + 4096, + M * RS) A.
#include <cuda_fp16.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"
#include "kernels.h"

namespace sqllm::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTileRows = 16;
constexpr int kKTile = 256;  // codes per k-tile (per row): 4 lanes x 64 codes
constexpr int kRedBytes = kWarps * kTileRows * 8 * 4;
constexpr int kRowsPerWarp = kTileRows / kWarps;  // in the epilogue
static_assert(kRowsPerWarp == 2, "the epilogue is written for 2 rows per warp");

template <int BITS>
struct Cfg;
template <>
struct Cfg<3> {
  static constexpr int kBlockCodes = 64;  // contiguous codes per lane block
  static constexpr int kBlocks = 1;       // lane blocks per k-tile
  static constexpr int kEntries = 64;     // pair table
  static constexpr int kMaxVec = 2;       // a block is 6 words: 8-byte loads at most
  static constexpr int kMinBlocks = 3;    // CTAs per SM the register budget is cut for (<= 85 regs)
};
template <>
struct Cfg<4> {
  static constexpr int kBlockCodes = 32;
  static constexpr int kBlocks = 2;
  static constexpr int kEntries = 16;  // single-code table
  static constexpr int kMaxVec = 4;
  static constexpr int kMinBlocks = 3;  // (<= 85 regs)
};

template <int BITS>
struct Layout {
  using C = Cfg<BITS>;
  static constexpr int kBlockWords = C::kBlockCodes * BITS / 32;
  static constexpr int kLaneWords = C::kBlocks * kBlockWords;
  static constexpr int kSlotBytes = C::kEntries * 32 * 4;
  static constexpr int kTabBytes = 2 * kSlotBytes;
  static constexpr int kRedOffset = kTabBytes;
  static constexpr int kAOffset = kTabBytes + kRedBytes;
  // A in shared memory: byte offset of (m, k) = m * RS + 2k + 8 * (k / kBlockCodes).
  static constexpr int kALaneBytes = 2 * C::kBlockCodes + 8;  // lane t -> t + 1 (one block)
  static constexpr int kABlockBytes = 4 * kALaneBytes;          // block b -> b + 1 of a lane
  static constexpr int kAKTileBytes = 2 * kKTile + 8 * (kKTile / C::kBlockCodes);
  static constexpr int kStepsPerBlock = C::kBlockCodes / 4;
  static_assert(kBlockWords * 32 == C::kBlockCodes * BITS, "blocks must end on word boundaries");
  static_assert(C::kBlocks * C::kBlockCodes * 4 == kKTile, "4 lanes x blocks x block codes = k-tile");
  static_assert(kStepsPerBlock * C::kBlocks == 16, "16 mma steps per k-tile");
  static_assert(kALaneBytes * 4 * C::kBlocks == kAKTileBytes, "k-tile stride of A in shared memory");
};

struct MmaParams {
  const __half* a;          // [M, K]
  const uint32_t* q;        // [N, words]
  const __half* lut;        // [N, 2^BITS]
  const int32_t* indptr;    // [N + 1] or null
  const int32_t* indices;   // [nnz]
  const __half* values;     // [nnz]
  const __half* bias;       // [N] or null
  __half* y;                // [M, N]
  int64_t N, words, n_tiles, tiles_per_cta;
  int32_t K, M, k_tiles;
  int32_t qvec;             // qweight load width in words: 4, 2 or 1 (alignment of rows)
  uint32_t a_row_bytes;     // RS
  int32_t a_vec;            // A rows can be read 4 halves (8 bytes) at a time
  int32_t q_before_wait;    // prefetch qweight before griddepcontrol.wait (qweight constant)
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

// Codes of k-tile `kt` of rows tile*16 + g (slot 0) and + 8 (slot 1) for lane t, into registers.
// Rows >= N read nothing and give code 0.
template <int BITS>
__device__ __forceinline__ void LoadItem(const MmaParams& p, int64_t tile, int kt, int g, int t,
                                         uint32_t (&w)[2][Layout<BITS>::kLaneWords]) {
  using L = Layout<BITS>;
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

// One k-tile: 16 mma steps. tab0/tab1: byte offsets of this lane's table copies (slot 0 / 1)
// with entry 0; a_addr: byte offset of A(g, first k of this lane's block 0 in this k-tile).
template <int BITS>
__device__ __forceinline__ void ComputeItem(const unsigned char* smem, const uint32_t (&w)[2][Layout<BITS>::kLaneWords],
                                            uint32_t tab0, uint32_t tab1, uint32_t a_addr, bool b_on,
                                            float (&c)[4]) {
  using L = Layout<BITS>;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int b = j / L::kStepsPerBlock, jj = j % L::kStepsPerBlock;
    uint32_t b0 = 0, b1 = 0;
    if (b_on) {
      const uint2 v = Lds<uint2>(smem, a_addr + b * L::kABlockBytes + 8 * jj);
      b0 = v.x, b1 = v.y;
    }
    uint32_t a0, a1, a2, a3;
    if constexpr (BITS == 3) {
      // Pairs (codes 4j, 4j+1) and (4j+2, 4j+3) of the lane's 64-code block: stream bits 12j, 12j+6.
      constexpr uint32_t kMask = 63u << 7;
      a0 = Lds<uint32_t>(smem, (FieldAt7(w[0], 12 * j, 6) & kMask) | tab0);
      a1 = Lds<uint32_t>(smem, (FieldAt7(w[1], 12 * j, 6) & kMask) | tab1);
      a2 = Lds<uint32_t>(smem, (FieldAt7(w[0], 12 * j + 6, 6) & kMask) | tab0);
      a3 = Lds<uint32_t>(smem, (FieldAt7(w[1], 12 * j + 6, 6) & kMask) | tab1);
    } else {
      // Codes 4jj .. 4jj+3 of block b: words 4b + jj/2, nibbles 4 (jj & 1) .. + 3.
      constexpr uint32_t kMask = 15u << 7;
      const int bit = 32 * (4 * b) + 16 * jj;
      uint32_t v[2][4];
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          v[s][i] = Lds<uint32_t>(smem, (FieldAt7(w[s], bit + 4 * i, 4) & kMask) | (s ? tab1 : tab0));
      a0 = __byte_perm(v[0][0], v[0][1], 0x5410);
      a1 = __byte_perm(v[1][0], v[1][1], 0x5410);
      a2 = __byte_perm(v[0][2], v[0][3], 0x5410);
      a3 = __byte_perm(v[1][2], v[1][3], 0x5410);
    }
    Mma16816(c, a0, a1, a2, a3, b0, b1);
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

// Writes the 4 lane copies (lanes 4g .. 4g+3: 16 contiguous bytes) of this thread's entries.
template <int BITS>
__device__ __forceinline__ void BuildTables(unsigned char* smem, int tid, const LutRegs& r) {
  using L = Layout<BITS>;
  const int row = tid & 15, e0 = tid >> 4;
  const uint32_t base = (row >> 3) * L::kSlotBytes + (row & 7) * 16;
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
  uint32_t val[2];
};

__device__ __forceinline__ void PrefetchSparse(const MmaParams& p, int ip, int lane, Sparse& sp) {
  sp.s0 = __shfl_sync(0xffffffffu, ip, 0);
  sp.b1 = __shfl_sync(0xffffffffu, ip, 1);
  sp.s1 = __shfl_sync(0xffffffffu, ip, 2);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t e = static_cast<int64_t>(sp.s0) + 32 * i + lane;
    sp.idx[i] = e < sp.s1 ? p.indices[e] : 0;
    sp.val[i] = e < sp.s1 ? LoadU16(p.values + e) : 0;
  }
}

template <int BITS>
__device__ __forceinline__ float ALoad(const unsigned char* smem, uint32_t rs, int m, int k) {
  using L = Layout<BITS>;
  const uint32_t off = L::kAOffset + m * rs + 2 * k + 8 * (k / Cfg<BITS>::kBlockCodes);
  return __half2float(Lds<__half>(smem, off));
}

template <int BITS>
__device__ __forceinline__ void AddSparseEntry(const unsigned char* smem, const MmaParams& p, const Sparse& sp,
                                               int64_t e, int idx, uint32_t val, float (&acc)[kRowsPerWarp][8]) {
  if (e >= sp.s1) return;
  const bool second = e >= sp.b1;
  const float v = HalfBitsToFloat(val);
#pragma unroll
  for (int m = 0; m < 8; ++m) {
    if (m < p.M) {
      const float x = v * ALoad<BITS>(smem, p.a_row_bytes, m, idx);
      if (second) acc[1][m] += x;
      else acc[0][m] += x;
    }
  }
}

// Rows 2 * warp and 2 * warp + 1 of the tile: warp partials + K tail + sparse + bias -> Y.
template <int BITS>
__device__ __forceinline__ void Epilogue(const unsigned char* smem, const MmaParams& p, int64_t tile, int warp,
                                         int lane, const Sparse& sp) {
  const float* red = reinterpret_cast<const float*>(smem + Layout<BITS>::kRedOffset);
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
          if (m < p.M) acc[r][m] += wv * ALoad<BITS>(smem, p.a_row_bytes, m, k);
      }
    }
  }
  if (p.indptr && sp.s1 > sp.s0) {
    extra = true;
    const int64_t s0 = sp.s0;
    AddSparseEntry<BITS>(smem, p, sp, s0 + lane, sp.idx[0], sp.val[0], acc);
    AddSparseEntry<BITS>(smem, p, sp, s0 + 32 + lane, sp.idx[1], sp.val[1], acc);
    for (int64_t e = s0 + 64 + lane; e < sp.s1; e += 32)
      AddSparseEntry<BITS>(smem, p, sp, e, p.indices[e], LoadU16(p.values + e), acc);
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

template <int BITS>
__global__ void __launch_bounds__(kThreads, Cfg<BITS>::kMinBlocks) DecodeMmaKernel(const MmaParams p) {
  using L = Layout<BITS>;
  using C = Cfg<BITS>;
  extern __shared__ __align__(16) unsigned char smem[];

  PdlTrigger();

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.x) * p.tiles_per_cta;
  const int64_t tile_end = MinI64(tile_begin + p.tiles_per_cta, p.n_tiles);
  // This warp's k-tiles: warp + kWarps * i for i < count.
  const int count = p.k_tiles > warp ? (p.k_tiles - warp + kWarps - 1) / kWarps : 0;

  uint32_t cur[2][L::kLaneWords];
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int i = 0; i < L::kLaneWords; ++i) cur[s][i] = 0;
  if (count > 0 && p.q_before_wait) LoadItem<BITS>(p, tile_begin, warp, g, t, cur);
  PdlWait();  // everything below may read what the previous kernel on the stream wrote
  if (count > 0 && !p.q_before_wait) LoadItem<BITS>(p, tile_begin, warp, g, t, cur);

  // Prologue: A into shared memory, the first tile's tables and CSR bounds.
  LutRegs lut_regs;
  LoadLut<BITS>(p, tile_begin, tid, lut_regs);
  int ip = LoadIndptr(p, tile_begin, warp, lane);
  {
    const int K = p.K, k4 = (K + 3) >> 2, total = p.M * k4;
    for (int i = tid; i < total; i += kThreads) {
      const int m = i / k4, k0 = (i - m * k4) * 4;
      const __half* src = p.a + static_cast<int64_t>(m) * K + k0;
      uint2 v;
      if (p.a_vec) {
        v = *reinterpret_cast<const uint2*>(src);
      } else {
        uint32_t h[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) h[j] = k0 + j < K ? LoadU16(src + j) : 0u;
        v = make_uint2(h[0] | (h[1] << 16), h[2] | (h[3] << 16));
      }
      Sts(smem, L::kAOffset + m * p.a_row_bytes + 2 * k0 + 8 * (k0 / C::kBlockCodes), v);
    }
  }
  BuildTables<BITS>(smem, tid, lut_regs);
  __syncthreads();

  // Per-lane constants: table copies (bank = lane) and the B-fragment address base.
  const uint32_t tab0 = lane * 4, tab1 = L::kSlotBytes + lane * 4;
  const bool b_on = g < p.M;
  const uint32_t a_lane = L::kAOffset + (b_on ? g : 0) * p.a_row_bytes + t * L::kALaneBytes;

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const bool has_next = tile + 1 < tile_end;
    // Next tile's lut values and CSR bounds: requested now, used after this tile's mma loop.
    if (has_next) LoadLut<BITS>(p, tile + 1, tid, lut_regs);
    const int ip_next = has_next ? LoadIndptr(p, tile + 1, warp, lane) : 0;
    Sparse sp;
    PrefetchSparse(p, ip, lane, sp);

    float c[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < count; ++i) {
      int64_t next_tile = tile;
      int next_i = i + 1;
      if (next_i == count) next_tile = tile + 1, next_i = 0;
      const bool prefetch = next_tile < tile_end;
      uint32_t nxt[2][L::kLaneWords];
      if (prefetch) LoadItem<BITS>(p, next_tile, warp + kWarps * next_i, g, t, nxt);
      const int kt = warp + kWarps * i;
      ComputeItem<BITS>(smem, cur, tab0, tab1, a_lane + kt * L::kAKTileBytes, b_on, c);
      if (prefetch) {
#pragma unroll
        for (int s = 0; s < 2; ++s)
#pragma unroll
          for (int j = 0; j < L::kLaneWords; ++j) cur[s][j] = nxt[s][j];
      }
    }
    float* red = reinterpret_cast<float*>(smem + L::kRedOffset);
    *reinterpret_cast<float2*>(&red[(warp * kTileRows + g) * 8 + 2 * t]) = make_float2(c[0], c[1]);
    *reinterpret_cast<float2*>(&red[(warp * kTileRows + g + 8) * 8 + 2 * t]) = make_float2(c[2], c[3]);
    __syncthreads();  // partials complete; tables no longer read
    Epilogue<BITS>(smem, p, tile, warp, lane, sp);
    if (has_next) {
      BuildTables<BITS>(smem, tid, lut_regs);
      ip = ip_next;
    }
    __syncthreads();  // next tables built; partials consumed
  }
}

int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <int BITS>
std::string Launch(const Problem& p, const DeviceArgs& d, cudaStream_t stream, bool pdl, bool qweight_constant,
                   const DeviceInfo& dev, bool* launched) {
  using L = Layout<BITS>;
  using C = Cfg<BITS>;
  *launched = false;
  // A row stride in shared memory: >= 2 Kp + 8 Kp / BL bytes, and = 32 (mod 128) (bank map above).
  const int64_t kp = RoundUp(p.K, C::kBlockCodes);
  int64_t rs = RoundUp(2 * kp + 8 * (kp / C::kBlockCodes), 32);
  while (rs % 128 != 32) rs += 32;
  const int64_t smem = L::kAOffset + p.M * rs;
  if (smem > dev.smem_optin) return "";  // A does not fit: the generic kernel takes it

  auto kernel = &DecodeMmaKernel<BITS>;
  // Opt in to the device's shared-memory maximum once per device; cache the occupancy per size.
  static std::mutex mutex;
  static std::map<std::tuple<int, int64_t>, int> occupancy;
  static bool opted_in[64] = {};
  int blocks_per_sm = 0;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (dev.device < 0 || dev.device >= 64) return "SqueezeMatMul (CUDA): device ordinal out of range";
    if (!opted_in[dev.device]) {
      const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(dev.smem_optin));
      if (e != cudaSuccess) return CudaMessage(e, "cudaFuncSetAttribute (decode kernel shared memory)");
      opted_in[dev.device] = true;
    }
    auto it = occupancy.find({dev.device, smem});
    if (it == occupancy.end()) {
      const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads,
                                                                          static_cast<size_t>(smem));
      if (e != cudaSuccess) return CudaMessage(e, "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
      it = occupancy.emplace(std::make_tuple(dev.device, smem), blocks_per_sm).first;
    }
    blocks_per_sm = it->second;
  }
  if (blocks_per_sm < 1) return "";  // cannot run: the generic kernel takes it

  const auto addr = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); };
  MmaParams m{};
  m.a = static_cast<const __half*>(d.a);
  m.q = d.qweight;
  m.lut = static_cast<const __half*>(d.lut);
  m.indptr = p.has_sparse ? d.indptr : nullptr;
  m.indices = d.indices;
  m.values = static_cast<const __half*>(d.values);
  m.bias = p.has_bias ? static_cast<const __half*>(d.bias) : nullptr;
  m.y = static_cast<__half*>(d.y);
  m.N = p.N;
  m.words = p.words;
  m.n_tiles = (p.N + kTileRows - 1) / kTileRows;
  const int64_t slots = static_cast<int64_t>(dev.sms) * blocks_per_sm;
  m.tiles_per_cta = std::max<int64_t>(1, (m.n_tiles + slots - 1) / slots);
  m.K = static_cast<int32_t>(p.K);
  m.M = static_cast<int32_t>(p.M);
  m.k_tiles = static_cast<int32_t>(p.K / kKTile);
  m.qvec = 1;
  for (int v : {4, 2})
    if (v <= C::kMaxVec && p.words % v == 0 && addr(d.qweight) % (4 * v) == 0) {
      m.qvec = v;
      break;
    }
  if (addr(d.qweight) % 4 != 0 || addr(d.a) % 2 != 0 || addr(d.lut) % 2 != 0)
    return "SqueezeMatMul (CUDA): misaligned input buffer";
  m.a_row_bytes = static_cast<uint32_t>(rs);
  m.a_vec = (p.K % 4 == 0 && addr(d.a) % 8 == 0) ? 1 : 0;
  m.q_before_wait = (pdl && qweight_constant) ? 1 : 0;

  const int64_t grid = (m.n_tiles + m.tiles_per_cta - 1) / m.tiles_per_cta;
  if (grid > 0x7fffffff) return "SqueezeMatMul (CUDA): N too large for the decode grid";
  cudaError_t e = LaunchKernel(kernel, dim3(static_cast<unsigned>(grid)), dim3(kThreads), static_cast<size_t>(smem),
                               stream, pdl, m);
  const cudaError_t last = cudaGetLastError();
  if (e == cudaSuccess) e = last;
  if (e != cudaSuccess) return CudaMessage(e, "launching the decode (mma) kernel");
  *launched = true;
  return "";
}

}  // namespace

std::string LaunchDecodeMma(const Problem& p, const DeviceArgs& args, cudaStream_t stream, bool pdl,
                            bool qweight_constant, const DeviceInfo& dev, bool* launched) {
  *launched = false;
  if (!args.half || p.M < 1 || p.M > 8 || dev.cc_major < 8 || p.K > 0x7fffffff) return "";
  if (p.bits == 3) return Launch<3>(p, args, stream, pdl, qweight_constant, dev, launched);
  if (p.bits == 4) return Launch<4>(p, args, stream, pdl, qweight_constant, dev, launched);
  return "";
}

}  // namespace sqllm::cuda

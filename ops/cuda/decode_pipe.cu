// Pipelined tensor-core decode kernels: decode variants "pipe", "room", "deep", "dual" and "pair"
// (decode_policy.cc picks one per problem; "base" is decode_mma.cu). Same math, fragment mapping,
// code layout and epilogue as the baseline (decode_mma.cu's header derives them); what changes is
// how the loads are kept in flight, how little a row tile serialises, and (dual, pair) how the
// 4-bit codes are looked up.
//
// What limits the baseline (H100 measurements in docs/cuda-kernels.md: 31-47% of copy bandwidth):
// at K = 4096 a warp has only 2 k-tiles per row tile, and it requests its second one only after
// the CTA's prologue (A staged with one blocking L2 round trip per 256 x 4 halves: 4 round trips at
// K = 4096, 11 at K = 11008), the table build and a __syncthreads; each row tile then costs about
// one memory latency per k-tile plus two __syncthreads. The loads come in bursts separated by
// latencies instead of a stream. Here:
//
// 1. A ring of D item buffers per warp (registers; D = 2, "deep": D = 4). Slot s holds items s,
//    s + D, s + 2D, ... of the current row tile (item j = k-tile warp + 8 j). Right after an item
//    is computed, its slot is refilled with the next item that uses the slot: j + D of this tile,
//    or item s of the NEXT row tile. So a warp always has up to min(D, items) loads in flight, and
//    the next tile's loads overlap this tile's end (partials, barrier, epilogue). At K = 4096 (2
//    items per warp) D = 2 puts a whole row tile in flight, and the next one follows item by item.
//    Slot indices are compile-time constants (the slot loop is unrolled; the ring restarts at slot
//    0 with every tile), so the ring stays in registers.
// 2. The first tile's ring and LUT are requested before griddepcontrol.wait when qweight / the LUT
//    are constant (initializers), i.e. while the previous kernel on the stream finishes (PDL).
// 3. A is staged with cp.async (16-byte copies, all in flight at once; no registers) when K % 8 == 0
//    and A is 16-byte aligned: one L2 round trip instead of ceil(M K / 1024). The CSR entries the
//    epilogue prefetches go to shared memory with cp.async too (registers are the budget).
// 4. Tables and warp partials are double buffered, so a row tile needs ONE __syncthreads: the
//    tables of tile T + 1 are built (into the other buffer) before the barrier that ends tile T,
//    and the epilogue of tile T reads its partials after it. Hazards: buffer b is rewritten (tables
//    in tile T + 1, partials in tile T + 2) only by warps that passed the barrier of the tile that
//    last read it, i.e. after every warp finished those reads. ("pair": one table buffer, 64 KiB,
//    and a second barrier per tile between the build and the next tile's lookups.)
// 5. The B fragments (A^T) of two mma steps come from one 16-byte LDS: A is laid out with 16 bytes
//    of padding per lane block and a row stride = 64 (mod 128) bytes (ASmem<BITS, 16>). The 8
//    lanes of a quarter warp (g in {2q, 2q+1}, t = 0..3) then read 8 distinct 16-byte bank groups:
//    (4g + t (3 bits) / 4g + 5t (4 bits)) mod 8. At M <= 4 that halves the B wavefronts.
// 6. Row tiles are split evenly over the CTAs (CTA c takes [c n / G, (c + 1) n / G)), G = SMs x
//    (occupancy - spare): spare = 0 fills the GPU; spare = 1 ("room") leaves a CTA slot per SM
//    free so that the NEXT kernel's CTAs become resident under PDL and stream their first weights
//    while this one finishes.
// 7. 4-bit lookups. The baseline's 4-bit step (8 single-code lookups, 2 per A register, joined by a
//    PRMT) is ALU- and shared-memory-bound at once: 19 ALU instructions (9.5 SM cycles at 2 ALU
//    instructions per cycle) and 9 wavefronts per 256 codes, ~90% of the HBM time of its bytes.
//    "dual": two single-code table layouts, so that one shift serves two lookups and no PRMT is
//    needed. Layout L holds lut[e] in the low half of a word, entry at address bits 7-10; layout H
//    holds lut[e] in the high half, entry at bits 11-14. With x = a step's 16 code bits shifted so
//    that code 0 sits at bit 7 (code 1 then sits at bit 11): a0 = L[x 7-10] + H[x 11-14]
//    (add.f16x2: v + 0 = v exactly), codes 2, 3 likewise from the next byte. Per step and lane: 4
//    shifts + 8 LOP3 (ALU) + 4 HADD2 (FMA pipe): ~5.5 SM cycles of ALU, still 8.5 wavefronts.
//    Address bits: L = 1 << 15 | buf << 12 | slot << 11 | e << 7 | lane << 2 (8 KiB at 32 KiB),
//    H = e << 11 | buf << 8 | slot << 7 | lane << 2 (within [0, 32 KiB)); 40 KiB for both buffers.
//    "pair": a pair table as for 3 bits: entry e = c(k) | c(k+1) << 4 (one byte of the code
//    stream) -> half2(lut[c(k)], lut[c(k+1)]), one lookup per A register: per step 4 lookups +
//    4 shifts + 4 LOP3, like 3 bits. 256 entries x 32 lane copies x 2 slots = 64 KiB, rebuilt per
//    row tile (16 STS.128 per thread: 512 wavefronts, vs 1152 for the tile's lookups at K = 4096),
//    single buffered; 2 CTAs per SM. Address: slot << 15 | e << 7 | lane << 2.
//
// Shared memory (bytes): [0, TAB) tables | [TAB, TAB + 8192) warp partials, 2 x float [8][16][8] |
// [TAB + 8192, + 4096) prefetched CSR entries, [8 warps][64 columns + 64 value words] |
// [TAB + 12288, + M * RS) A (ASmem<BITS, 16>). TAB = 32 KiB (3 bits), 8 KiB (4 bits), 40 KiB ("dual"), 64 KiB ("pair").
#include <type_traits>

#include "decode_mma_common.cuh"

namespace sqllm::cuda {
namespace {

using namespace mma;

constexpr int kPad = 16;  // A layout: ASmem<BITS, 16>

enum TableKind : int {
  kSingle = 0,  // Codes<BITS> tables (3 bits: pairs, 4 bits: single codes), 2 buffers
  kDual = 1,    // 4 bits: layouts L and H, 2 buffers
  kPair = 2,    // 4 bits: pair table, 1 buffer
};

template <int BITS, int TAB>
struct PipeLayout {
  static_assert(TAB == kSingle || BITS == 4, "the dual and pair tables are for 4 bits");
  static constexpr int kTabBufBytes = Codes<BITS>::kTabBytes;  // kSingle: buffer b at b * this
  static constexpr int kTabBytes = TAB == kDual ? 40 * 1024 : TAB == kPair ? 64 * 1024 : 2 * kTabBufBytes;
  static constexpr bool kOneBuffer = TAB == kPair;
  static constexpr int kRedOffset = kTabBytes;
  static constexpr int kIdxOffset = kRedOffset + 2 * kRedBytes;  // [8 warps][512 bytes]: prefetched CSR entries
  static constexpr int kAOffset = kIdxOffset + kWarps * 512;
};

// This lane's slot-0 table bases for buffer `buf`: t (single, pair, or dual layout L) and h (dual
// layout H). Slot 1 is at a constant offset whose bit is clear in (field | base), added as an LDS
// immediate: + kSlotBytes (single), + 2048 (L), + 128 (H), + 32768 (pair).
struct Tabs {
  uint32_t t, h;
};

// x, as a value the compiler cannot see through: it would otherwise fold the known bit pattern of
// lane << 2 into every lookup and split (field & mask) | base into two LOP3s.
__device__ __forceinline__ uint32_t Opaque(uint32_t x) {
  uint32_t y;
  asm("mov.b32 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

template <int BITS, int TAB>
__device__ __forceinline__ Tabs LaneTables(uint32_t buf, int lane) {
  const uint32_t l4 = Opaque(static_cast<uint32_t>(lane) << 2);
  if constexpr (TAB == kDual) return Tabs{(1u << 15) | (buf << 12) | l4, (buf << 8) | l4};
  if constexpr (TAB == kPair) return Tabs{l4, 0u};
  return Tabs{buf * PipeLayout<BITS, TAB>::kTabBufBytes + l4, 0u};
}

// LUT values a thread needs to build its part of one tile's tables: LutRegs (decode_mma_common.cuh)
// for the single and dual tables; for the pair table the thread's code c0 = tid / 16 of row
// r = tid % 16 (v0) and the whole row, 16 halves in 8 words.
struct LutPairRegs {
  uint32_t v0;
  uint32_t row[8];
};

template <int TAB>
using LutOf = std::conditional_t<TAB == kPair, LutPairRegs, LutRegs>;

__device__ __forceinline__ void LoadLutPair(const MmaParams& p, int64_t tile, int tid, LutPairRegs& r) {
  const int64_t n = tile * kTileRows + (tid & 15);
  r.v0 = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) r.row[i] = 0;
  if (n >= p.N) return;
  const __half* row = p.lut + (n << 4);
  r.v0 = LoadU16(row + (tid >> 4));
  if (p.lut_vec) {  // the row is 32 bytes, 16-byte aligned
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(row)[i];
      r.row[4 * i] = v.x, r.row[4 * i + 1] = v.y, r.row[4 * i + 2] = v.z, r.row[4 * i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) r.row[i] = LoadU16(row + 2 * i) | (LoadU16(row + 2 * i + 1) << 16);
  }
}

template <int BITS, int TAB>
__device__ __forceinline__ void LoadPipeLut(const MmaParams& p, int64_t tile, int tid, LutOf<TAB>& r) {
  if constexpr (TAB == kPair) LoadLutPair(p, tile, tid, r);
  else LoadLut<BITS>(p, tile, tid, r);
}

// The tables of one tile into buffer `buf` (kPair: the only buffer). Every store writes the 4 lane
// copies of one entry (16 bytes); the 8 threads of a quarter warp are 8 rows of one slot with the
// same entry: 128 contiguous bytes, conflict free.
template <int BITS, int TAB>
__device__ __forceinline__ void BuildPipeTables(unsigned char* smem, uint32_t buf, int tid, const LutOf<TAB>& r) {
  const uint32_t row = tid & 15, c0 = tid >> 4, slot = row >> 3, g16 = (row & 7) << 4;
  if constexpr (TAB == kDual) {
    const uint32_t lo = r.v[0], hi = r.v[0] << 16;
    Sts(smem, (1u << 15) | (buf << 12) | (slot << 11) | (c0 << 7) | g16, make_uint4(lo, lo, lo, lo));
    Sts(smem, (c0 << 11) | (buf << 8) | (slot << 7) | g16, make_uint4(hi, hi, hi, hi));
  } else if constexpr (TAB == kPair) {
#pragma unroll
    for (uint32_t i = 0; i < 16; ++i) {  // entry c0 | i << 4 = half2(lut[c0], lut[i])
      const uint32_t hi = (i & 1) ? (r.row[i / 2] & 0xFFFF0000u) : (r.row[i / 2] << 16);
      const uint32_t v = (r.v0 & 0xFFFFu) | hi;
      Sts(smem, (slot << 15) | ((c0 | (i << 4)) << 7) | g16, make_uint4(v, v, v, v));
    }
  } else {
    BuildTables<BITS>(smem, buf * PipeLayout<BITS, TAB>::kTabBufBytes, tid, r);
  }
}

__device__ __forceinline__ uint32_t HAdd2Bits(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("add.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// 4-bit lookups of step jj of block b (codes 4jj .. 4jj+3 of the block: word 4b + jj/2, bits
// h .. h + 15 with h = 16 (jj & 1)), dual layout or pair table.
template <int TAB>
__device__ __forceinline__ void Lookup4Pipe(const unsigned char* smem, const uint32_t (&w)[2][8], int b, int jj,
                                            const Tabs& tb, uint32_t (&a)[4]) {
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const uint32_t word = w[s][4 * b + jj / 2];
    const uint32_t x = (jj & 1) ? word >> 9 : word << 7;  // codes 0, 1 at bits 7-10, 11-14
    const uint32_t y = word >> ((jj & 1) ? 17 : 1);       // codes 2, 3 at bits 7-10, 11-14
    if constexpr (TAB == kDual) {
      constexpr uint32_t kLow = 15u << 7, kHigh = 15u << 11;
      const uint32_t sl = s ? 2048u : 0u, sh = s ? 128u : 0u;  // slot 1 of L / H
      a[s] = HAdd2Bits(Lds<uint32_t>(smem, ((x & kLow) | tb.t) + sl), Lds<uint32_t>(smem, ((x & kHigh) | tb.h) + sh));
      a[s + 2] =
          HAdd2Bits(Lds<uint32_t>(smem, ((y & kLow) | tb.t) + sl), Lds<uint32_t>(smem, ((y & kHigh) | tb.h) + sh));
    } else {
      constexpr uint32_t kMask = 255u << 7, kSlot1 = 1u << 15;
      a[s] = Lds<uint32_t>(smem, ((x & kMask) | tb.t) + (s ? kSlot1 : 0u));
      a[s + 2] = Lds<uint32_t>(smem, ((y & kMask) | tb.t) + (s ? kSlot1 : 0u));
    }
  }
}

// One item: 16 mma steps. a_addr: byte offset of A(g, first k of this lane's block 0 in this
// k-tile); lanes with g >= M load no B (their C columns are discarded) and keep B = 0.
template <int BITS, int TAB>
__device__ __forceinline__ void ComputeItem(const unsigned char* smem, const uint32_t (&w)[2][Codes<BITS>::kLaneWords],
                                            const Tabs& tb, uint32_t a_addr, bool b_on, float (&c)[4]) {
  using L = Codes<BITS>;
  using A = ASmem<BITS, kPad>;
  static_assert(L::kStepsPerBlock % 2 == 0, "B fragments are loaded two steps at a time");
  uint4 bv = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int b = j / L::kStepsPerBlock, jj = j % L::kStepsPerBlock;
    if ((jj & 1) == 0 && b_on) bv = Lds<uint4>(smem, a_addr + b * A::kBlockBytes + 8 * jj);
    const uint32_t b0 = (jj & 1) ? bv.z : bv.x, b1 = (jj & 1) ? bv.w : bv.y;
    uint32_t a[4];
    if constexpr (BITS == 3) Lookup3(smem, w, j, tb.t, a);
    else if constexpr (TAB == kSingle) Lookup4(smem, w, b, jj, tb.t, a);
    else Lookup4Pipe<TAB>(smem, w, b, jj, tb, a);
    Mma16816(c, a[0], a[1], a[2], a[3], b0, b1);
  }
}

__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void CpAsync4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void CpAsyncWaitAll() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// A [M, K] into shared memory at a_off (ASmem<BITS, 16>). Called after griddepcontrol.wait.
template <int BITS>
__device__ __forceinline__ void StageA(unsigned char* smem, uint32_t a_off, const MmaParams& p, int tid) {
  using A = ASmem<BITS, kPad>;
  const int K = p.K;
  if (p.a_async) {  // K % 8 == 0, A 16-byte aligned: 8-half chunks never straddle a lane block
    const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem)) + a_off;
    const int k8 = K >> 3, total = p.M * k8;
    for (int i = tid; i < total; i += kThreads) {
      const int m = i / k8, k0 = (i - m * k8) * 8;
      CpAsync16(base + A::Offset(p.a_row_bytes, m, k0), p.a + static_cast<int64_t>(m) * K + k0);
    }
    return;
  }
  const int k4 = (K + 3) >> 2, total = p.M * k4;
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
    Sts(smem, a_off + A::Offset(p.a_row_bytes, m, k0), v);
  }
}

// The first 64 CSR entries of the warp's 2 rows (bounds: lanes 0..2 of `ip`), requested at the
// start of a tile for its epilogue into the warp's 512-byte area of shared memory at shared address
// `area` with cp.async, so that no register is held through the mma loop: the column indices
// (int [64] at + 0) and the aligned 4-byte words holding the fp16 values ([64] at + 256; a word
// that would reach outside the values array is skipped and that value is read from global memory
// in SparseFromSmem). Each lane copies the entries it reads back (s0 + lane, s0 + 32 + lane), so
// its own cp.async.wait_all makes them visible.
__device__ __forceinline__ bool ValueWordInside(const MmaParams& p, int64_t e) {
  const uintptr_t base = reinterpret_cast<uintptr_t>(p.values), word = (base + 2 * e) & ~uintptr_t{3};
  return word >= base && word + 4 <= base + 2 * static_cast<uintptr_t>(p.nnz);
}

__device__ __forceinline__ void PrefetchSparseAsync(const MmaParams& p, int ip, int lane, uint32_t area) {
  const int64_t s0 = __shfl_sync(0xffffffffu, ip, 0), s1 = __shfl_sync(0xffffffffu, ip, 2);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t e = s0 + 32 * i + lane;
    if (e < s1) {
      CpAsync4(area + (32 * i + lane) * 4, p.indices + e);
      if (ValueWordInside(p, e))
        CpAsync4(area + 256 + (32 * i + lane) * 4,
                 reinterpret_cast<const void*>((reinterpret_cast<uintptr_t>(p.values) + 2 * e) & ~uintptr_t{3}));
    }
  }
}

// The epilogue's Sparse for the same tile (after the barrier), from `ip` and the prefetched area at
// byte offset `off`.
__device__ __forceinline__ Sparse SparseFromSmem(const MmaParams& p, int ip, int lane, const unsigned char* smem,
                                                 uint32_t off) {
  CpAsyncWaitAll();
  Sparse sp;
  sp.s0 = __shfl_sync(0xffffffffu, ip, 0);
  sp.b1 = __shfl_sync(0xffffffffu, ip, 1);
  sp.s1 = __shfl_sync(0xffffffffu, ip, 2);
  uint32_t v[2] = {0u, 0u};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t e = static_cast<int64_t>(sp.s0) + 32 * i + lane;
    sp.idx[i] = 0;
    if (e < sp.s1) {
      sp.idx[i] = Lds<int>(smem, off + (32 * i + lane) * 4);
      if (ValueWordInside(p, e)) {
        const uint32_t word = Lds<uint32_t>(smem, off + 256 + (32 * i + lane) * 4);
        v[i] = ((reinterpret_cast<uintptr_t>(p.values) + 2 * e) & 2) ? word >> 16 : word & 0xFFFFu;
      } else {
        v[i] = LoadU16(p.values + e);
      }
    }
  }
  sp.vals = v[0] | (v[1] << 16);
  return sp;
}

// CTAs per SM the register budget is cut for: MINB on sm_90+ (the target: 3 -> 80 registers, 2 ->
// 128); sm_80-89 always 2, where ptxas spills a few registers at 80 for these kernels.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define SQLLM_PIPE_MIN_CTAS(minb) 2
#else
#define SQLLM_PIPE_MIN_CTAS(minb) (minb)
#endif

template <int BITS, int D, int MINB, int TAB>
__global__ void __launch_bounds__(kThreads, SQLLM_PIPE_MIN_CTAS(MINB)) DecodePipeKernel(const MmaParams p) {
  using L = Codes<BITS>;
  using Lay = PipeLayout<BITS, TAB>;
  using A = ASmem<BITS, kPad>;
  extern __shared__ __align__(16) unsigned char smem[];

  PdlTrigger();

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  // Row tiles [tile_begin, tile_end) (int: n_tiles < 2^28); never empty since gridDim.x <= n_tiles.
  const int tile_begin = static_cast<int>(static_cast<int64_t>(blockIdx.x) * p.n_tiles / gridDim.x);
  const int tile_end = static_cast<int>(static_cast<int64_t>(blockIdx.x + 1) * p.n_tiles / gridDim.x);
  // Items of this warp per row tile: k-tiles warp + kWarps * j for j < count.
  const int count = p.k_tiles > warp ? (p.k_tiles - warp + kWarps - 1) / kWarps : 0;

  // The ring: slot s holds items s, s + D, ... of the current tile (only slots s < count are used).
  uint32_t ring[D][2][L::kLaneWords];
  LutOf<TAB> lut_regs;
  if (p.q_before_wait) {
#pragma unroll
    for (int s = 0; s < D; ++s)
      if (s < count) LoadItem<BITS>(p, tile_begin, warp + kWarps * s, g, t, ring[s]);
  }
  if (p.lut_before_wait) LoadPipeLut<BITS, TAB>(p, tile_begin, tid, lut_regs);
  PdlWait();  // everything below may read what the previous kernel on the stream wrote
  if (!p.q_before_wait) {
#pragma unroll
    for (int s = 0; s < D; ++s)
      if (s < count) LoadItem<BITS>(p, tile_begin, warp + kWarps * s, g, t, ring[s]);
  }
  if (!p.lut_before_wait) LoadPipeLut<BITS, TAB>(p, tile_begin, tid, lut_regs);
  StageA<BITS>(smem, Lay::kAOffset, p, tid);
  int ip = LoadIndptr(p, tile_begin, warp, lane);
  BuildPipeTables<BITS, TAB>(smem, 0u, tid, lut_regs);
  CpAsyncWaitAll();
  __syncthreads();  // A, the first tables

  const bool b_on = g < p.M;
  const uint32_t a_lane = Lay::kAOffset + (b_on ? g : 0) * p.a_row_bytes + t * A::kLaneBytes;
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t idx_off = Lay::kIdxOffset + warp * 512;  // this warp's prefetched CSR entries

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const uint32_t buf = Lay::kOneBuffer ? 0u : static_cast<uint32_t>(tile - tile_begin) & 1u;
    const uint32_t red = Lay::kRedOffset + (static_cast<uint32_t>(tile - tile_begin) & 1u) * kRedBytes;
    const bool has_next = tile + 1 < tile_end;
    // Next tile's lut values: requested now, used at the end of this tile.
    if (has_next) LoadPipeLut<BITS, TAB>(p, tile + 1, tid, lut_regs);
    PrefetchSparseAsync(p, ip, lane, smem_base + idx_off);
    const Tabs tb = LaneTables<BITS, TAB>(buf, lane);

    float c[4] = {0.f, 0.f, 0.f, 0.f};
    for (int r = 0; r * D < count; ++r) {
#pragma unroll
      for (int s = 0; s < D; ++s) {
        const int j = r * D + s;
        if (j < count) {
          ComputeItem<BITS, TAB>(smem, ring[s], tb, a_lane + (warp + kWarps * j) * A::kKTileBytes, b_on, c);
          // Refill the slot with its next item: j + D of this tile, else item s of the next tile.
          if (j + D < count) LoadItem<BITS>(p, tile, warp + kWarps * (j + D), g, t, ring[s]);
          else if (has_next) LoadItem<BITS>(p, tile + 1, warp + kWarps * s, g, t, ring[s]);
        }
      }
    }
    // Next tile's CSR bounds (not held in a register through the mma loop: register budget).
    const int ip_next = has_next ? LoadIndptr(p, tile + 1, warp, lane) : 0;
    StorePartials(smem, red, warp, g, t, c);
    if constexpr (Lay::kOneBuffer) {
      __syncthreads();  // partials complete; the tables are free
      if (has_next) BuildPipeTables<BITS, TAB>(smem, 0u, tid, lut_regs);
      Epilogue<BITS, kPad>(smem, red, Lay::kAOffset, p, tile, warp, lane, SparseFromSmem(p, ip, lane, smem, idx_off));
      if (has_next) __syncthreads();  // (CTA-uniform) the next tile's tables are built
    } else {
      if (has_next) BuildPipeTables<BITS, TAB>(smem, buf ^ 1u, tid, lut_regs);
      __syncthreads();  // partials complete; next tables built; this tile's tables free
      Epilogue<BITS, kPad>(smem, red, Lay::kAOffset, p, tile, warp, lane, SparseFromSmem(p, ip, lane, smem, idx_off));
    }
    ip = ip_next;
  }
}

struct PipeSpec {
  int depth;     // ring slots per warp
  int min_ctas;  // __launch_bounds__ min blocks per SM (register budget: 3 -> 80, 2 -> 128)
  int spare;     // CTA slots per SM left free by the grid (see 6. above)
  int table;     // TableKind (4 bits; 3 bits always kSingle)
};

PipeSpec SpecOf(int variant) {
  switch (variant) {
    case kDecodePipe: return {2, 3, 0, kSingle};
    case kDecodeRoom: return {2, 3, 1, kSingle};
    case kDecodeDeep: return {4, 2, 0, kSingle};
    case kDecodeDual: return {2, 3, 0, kDual};
    case kDecodePair: return {2, 2, 0, kPair};
    default: return {0, 0, 0, kSingle};
  }
}

template <int BITS, int D, int MINB, int TAB>
std::string Launch(const Problem& p, const DeviceArgs& d, cudaStream_t stream, int spare, bool pdl,
                   bool qweight_constant, bool lut_constant, const DeviceInfo& dev, bool* launched) {
  using Lay = PipeLayout<BITS, TAB>;
  *launched = false;
  const int64_t rs = ARowStride<BITS, kPad>(p.K);
  const int64_t smem = Lay::kAOffset + p.M * rs;
  if (smem > dev.smem_optin) return "";  // A does not fit: another kernel takes it

  auto kernel = &DecodePipeKernel<BITS, D, MINB, TAB>;
  int blocks_per_sm = 0;
  if (auto err = KernelOccupancy(kernel, dev, smem, &blocks_per_sm); !err.empty()) return err;
  if (blocks_per_sm < 1) return "";

  MmaParams m;
  if (auto err = CommonParams<BITS>(p, d, &m); !err.empty()) return err;
  m.tiles_per_cta = 0;  // unused: balanced split over the grid
  m.a_row_bytes = static_cast<uint32_t>(rs);
  m.q_before_wait = (pdl && qweight_constant) ? 1 : 0;
  m.lut_before_wait = (pdl && lut_constant) ? 1 : 0;

  const int64_t per_sm = std::max(1, blocks_per_sm - spare);
  const int64_t grid = std::min<int64_t>(m.n_tiles, static_cast<int64_t>(dev.sms) * per_sm);
  cudaError_t e = LaunchKernel(kernel, dim3(static_cast<unsigned>(grid)), dim3(kThreads), static_cast<size_t>(smem),
                               stream, pdl, m);
  const cudaError_t last = cudaGetLastError();
  if (e == cudaSuccess) e = last;
  if (e != cudaSuccess) return CudaMessage(e, "launching the decode (pipelined mma) kernel");
  *launched = true;
  return "";
}

}  // namespace

std::string LaunchDecodePipe(int variant, const Problem& p, const DeviceArgs& args, cudaStream_t stream, bool pdl,
                             bool qweight_constant, bool lut_constant, const DeviceInfo& dev, bool* launched) {
  *launched = false;
  if (!args.half || p.M < 1 || p.M > 8 || dev.cc_major < 8 || p.K > 0x7fffffff) return "";
  const PipeSpec s = SpecOf(variant);
  const auto go = [&](auto launch) {
    return launch(p, args, stream, s.spare, pdl, qweight_constant, lut_constant, dev, launched);
  };
  if (p.bits == 3 && s.table == kSingle) {  // dual and pair: 4 bits only
    if (s.depth == 2 && s.min_ctas == 3) return go(&Launch<3, 2, 3, kSingle>);
    if (s.depth == 4 && s.min_ctas == 2) return go(&Launch<3, 4, 2, kSingle>);
  } else if (p.bits == 4) {
    if (s.depth == 2 && s.min_ctas == 3 && s.table == kSingle) return go(&Launch<4, 2, 3, kSingle>);
    if (s.depth == 2 && s.min_ctas == 3 && s.table == kDual) return go(&Launch<4, 2, 3, kDual>);
    if (s.depth == 2 && s.min_ctas == 2 && s.table == kPair) return go(&Launch<4, 2, 2, kPair>);
    if (s.depth == 4 && s.min_ctas == 2 && s.table == kSingle) return go(&Launch<4, 4, 2, kSingle>);
  }
  return "";
}

}  // namespace sqllm::cuda

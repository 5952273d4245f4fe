// The decode kernel of SqueezeMatMul on tensor cores: Y[M, N] = A[M, K] W^T (+ bias) for fp16,
// bits 3 and 4, 1 <= M <= 8, sm_90 (the bulk copy engine). docs/cuda-kernels.md has the numbers.
//
// Why it looks like this. At batch 1 the op is a GEMV bound by the bytes of W, and on an H200 the
// codes arrive at ~30 per SM clock: too fast for a lookup plus an FMA per code on CUDA cores. So
// each code is only looked up (a shared-memory table per row of W), and mma.m16n8k16 does the
// multiply-adds: W is its 16-row A operand, A^T its B operand (M <= 8 of its 8 columns). What
// limits such a kernel is keeping enough bytes in flight from the first cycle to the last, so:
//
//   * Persistent CTAs, one per SM, each owning a contiguous run of 16-row tiles of W (balanced to
//     within one tile). In the tiled qweight layout (sqllm/layout.h) that run is one contiguous
//     block of memory.
//   * A producer warp streams the block through a ring of kStages shared-memory stages with the
//     bulk copy engine (cp.async.bulk, completion counted in bytes on an mbarrier per stage); it
//     needs no registers for data in flight and never waits for the math. A stage is up to 8
//     units (256 codes x 16 rows each) of one tile, plus the tile's 16 LUT rows with its first
//     stage. qweight and the LUT are constants, so with programmatic dependent launch (PDL) the
//     first stages are requested before griddepcontrol.wait, under the previous kernel's tail.
//   * 8 consumer warps: warp w decodes unit w of each stage. Lane (g, t) reads its 16-byte vectors
//     of the unit (the layout puts them side by side: conflict free), and for every mma step looks
//     up its 8 A-operand halves (rows g and g + 8, 4 codes each) in tables with a private copy per
//     lane (word e * 32 + lane: one wavefront per lookup, whatever the codes):
//       3 bits: 64-entry pair tables half2(lut[c0], lut[c1]): one lookup per A register;
//       4 bits: 16-entry tables with the value in the low half (lo) or the high half (hi):
//               two lookups and one HADD2 (FMA pipe) per A register.
//     A lookup address is one shift and one LOP3 of the code word. B (A^T) comes from A staged in
//     shared memory (row stride = 64 mod 128 bytes: the 16-byte B loads of two steps are conflict
//     free). fp32 accumulation, two accumulator sets to halve the mma dependency chain.
//   * Per tile: each warp's 16 x 8 partial sum goes to shared memory, one named barrier among the
//     consumers, then 16 M threads add the 8 partials, the sparse part and the bias and store Y
//     (one rounding). The tables of the next tile are built (double buffered) before that barrier,
//     so it is the only one per tile; the ring keeps streaming through it.
//   * The sparse part is loaded under the dense stream: at a tile's start every consumer thread
//     loads up to kSparsePrefetch CSR entries of the tile (its indptr slice was fetched one tile
//     earlier), and at the tile's end adds value * A[m][index] into a per-tile fp32 accumulator in
//     shared memory (atomics, duplicates add). Entries beyond 256 * kSparsePrefetch per tile are
//     read directly (slower, still correct). Bias values are prefetched the same way.
//   * K padding (K % 64 != 0): the layout pads with code 0 and A is zero padded in shared memory;
//     the unit holding the last group also zeroes the looked-up values past K, so a LUT entry of
//     Inf or NaN cannot leak into Y through a padded code.
//
// Shared memory. Static: the tables, 2 buffers (the next tile's is built while this one is used);
// static so that a lookup is LDS [register + immediate]. Dynamic (bytes from its base):
//   [0, 128)              mbarriers: full[kStages], empty[kStages], a_ready
//   kRingOff              ring: kStages x (8 units + 16 LUT rows)
//   kRedOff               per-warp partials [2][8 warps][16 rows][8] fp32
//   kSaccOff              sparse partials [2][16 rows][8] fp32
//   kPtrOff, kBiasOff     indptr slices [2][17], bias values [2][16]
//   kAOff                 A [M][rs] fp16, zero padded to 64 * ceil(K / 64) columns
#include <cuda_fp16.h>

#include <algorithm>
#include <mutex>

#include "common.cuh"
#include "kernels.h"
#include "sqllm/layout.h"

#ifndef SQLLM_TC_STAGES
#define SQLLM_TC_STAGES 3
#endif
#ifndef SQLLM_TC_WARPS
#define SQLLM_TC_WARPS 8
#endif
#ifndef SQLLM_TC_CTAS
#define SQLLM_TC_CTAS 2
#endif
// Experiments (benchmarks/decode_driver.sh): 1 = stream only (no decode), 2 = decode only (the
// first ring of stages reused, no further copies), 3 = no table lookups (timing only).
#ifndef SQLLM_TC_EXPERIMENT
#define SQLLM_TC_EXPERIMENT 0
#endif
#ifndef SQLLM_TC_PROFILE
#define SQLLM_TC_PROFILE 0
#endif

namespace sqllm::cuda {

#if SQLLM_TC_PROFILE  // kernel work only (benchmarks/decode_driver.sh): per-CTA clocks of the last launch
// per CTA: clock64 at entry, after PdlWait, at the loop start, at the end; globaltimer at entry and end
__device__ unsigned long long g_tc_profile[2048][6];
std::string ReadDecodeTcProfile(unsigned long long (*out)[6], int ctas) {  // and clears it for the next run
  cudaError_t e = cudaMemcpyFromSymbol(out, g_tc_profile, sizeof(unsigned long long) * 6 * ctas);
  static const unsigned long long zeros[2048][6] = {};
  if (e == cudaSuccess) e = cudaMemcpyToSymbol(g_tc_profile, zeros, sizeof(zeros));
  return e == cudaSuccess ? "" : cudaGetErrorString(e);
}
__device__ __forceinline__ unsigned long long GlobalTimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#define SQLLM_PROFILE_MARK(i)                                    \
  if (tid == 0 && blockIdx.x < 2048) {                           \
    g_tc_profile[blockIdx.x][i] = clock64();                     \
    if (i == 0) g_tc_profile[blockIdx.x][4] = GlobalTimer();     \
    if (i == 3) g_tc_profile[blockIdx.x][5] = GlobalTimer();     \
  }
#else
#define SQLLM_PROFILE_MARK(i)
#endif

namespace {

constexpr int kConsumerWarps = SQLLM_TC_WARPS;
constexpr int kCtasPerSm = SQLLM_TC_CTAS;
constexpr int kConsumers = kConsumerWarps * 32;
constexpr int kThreads = kConsumers + 32;  // + the producer warp
constexpr int kUnitsPerStage = kConsumerWarps;
constexpr int kStages = SQLLM_TC_STAGES;
constexpr int kSparsePrefetch = 4;
constexpr int kMaxM = 8;

template <int BITS>
struct Cfg {
  static constexpr int kUnitBytes = 512 * BITS;  // 16 rows x 256 codes
  static constexpr int kStageBytes = kUnitsPerStage * kUnitBytes;
  static constexpr int kLutRowBytes = (1 << BITS) * 2;
  static constexpr int kSlotBytes = kStageBytes + 16 * kLutRowBytes;
  // 3 bits: 2 row slots x 64 pair entries x 32 lanes x 4 B; 4 bits: 2 slots x (lo, hi) x 16 x 32 x 4.
  static constexpr int kTableBytes = BITS == 3 ? 2 * 64 * 128 : 2 * 2 * 16 * 128;
  static constexpr int kRingOff = 128;
  static constexpr int kRedOff = kRingOff + kStages * kSlotBytes;
  static constexpr int kRedBytes = kConsumerWarps * 16 * kMaxM * 4;
  static constexpr int kSaccOff = kRedOff + 2 * kRedBytes;
  static constexpr int kPtrOff = kSaccOff + 2 * 16 * kMaxM * 4;  // int32 [2][17]
  static constexpr int kBiasOff = kPtrOff + 256;                  // fp32 [2][16]
  static constexpr int kAOff = kBiasOff + 128;
  static_assert((kTableBytes & (kTableBytes - 1)) == 0 && kTableBytes >= (BITS == 3 ? 8192 : 2048),
                "the table buffer bit lies above the entry bits");
  static_assert(kRingOff % 128 == 0 && kRedOff % 16 == 0 && kAOff % 128 == 0, "alignment");
  static_assert(8 * (2 * kStages + 1) <= kRingOff, "mbarriers fit before the ring");
};

struct TcParams {
  const __half* a;
  const uint32_t* q;
  const __half* lut;
  const int32_t* indptr;
  const int32_t* indices;
  const __half* values;
  const __half* bias;
  __half* y;
  int M, K, N;
  int groups;         // ceil(K / 64)
  int units;          // units per tile (ceil(groups / 4))
  int full_units;     // groups / 4
  int tiles;          // ceil(N / 16)
  int rs;             // A row stride in shared memory (bytes)
  int a_bulk;         // A rows are copied by the bulk engine (K % 8 == 0, 16-byte aligned)
  int weights_const;  // qweight and lut may be read before griddepcontrol.wait
};

// ---- PTX helpers -------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void MbarInit(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void MbarExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` of the barrier has completed.
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// Global -> shared bulk copy (16-byte aligned addresses, size a multiple of 16), completing
// `bytes` of the barrier's transaction count.
__device__ __forceinline__ void BulkCopy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}
__device__ __forceinline__ void ConsumerBarrier() { asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory"); }

__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t Hadd2(uint32_t x, uint32_t y) {
  const __half2 r = __hadd2(*reinterpret_cast<const __half2*>(&x), *reinterpret_cast<const __half2*>(&y));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// (x >> shift) for a compile-time shift that may be negative (a left shift).
template <int SHIFT>
__device__ __forceinline__ uint32_t ShiftRight(uint32_t x) {
  if constexpr (SHIFT >= 0)
    return x >> SHIFT;
  else
    return x << (-SHIFT);
}

// ---- lookups -------------------------------------------------------------------------------------

// 3 bits: byte offset (within a table slot) of the pair entry held by 6-bit field F of a lane's
// unit words x[]: entry e at e * 128 + lane * 4, i.e. (field << 7) | lanebuf.
template <int F>
__device__ __forceinline__ uint32_t PairAddr(const uint32_t* x, uint32_t lanebuf) {
  constexpr int kBit = 6 * F, kWord = kBit / 32, kOff = kBit % 32;
  uint32_t v;
  if constexpr (kOff + 6 <= 32)
    v = ShiftRight<kOff - 7>(x[kWord]);
  else
    v = __funnelshift_r(x[kWord], x[kWord + 1], kOff - 7);
  return (v & 0x1F80u) | lanebuf;
}

// 4 bits: byte offset of the entry held by the nibble at bit B of word x: (nibble << 7) | lanebuf.
template <int B>
__device__ __forceinline__ uint32_t NibbleAddr(uint32_t x, uint32_t lanebuf) {
  return (ShiftRight<B - 7>(x) & 0x780u) | lanebuf;
}

// A table lookup: ld.shared at a 32-bit shared address (LDS [R + imm]: the slot offset is the immediate).
__device__ __forceinline__ uint32_t Lds32(uint32_t addr) {
#if SQLLM_TC_EXPERIMENT == 3  // no lookups: the address stands in for the table entry
  return addr;
#else
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
#endif
}

// Zeroes the halves of A register `reg` (codes j = 2 (reg >> 1), + 1) whose k is >= K.
__device__ __forceinline__ uint32_t MaskPastK(uint32_t v, int reg, int valid) {
  const int j = 2 * (reg >> 1);
  const uint32_t lo = valid > j ? 0x0000FFFFu : 0u, hi = valid > j + 1 ? 0xFFFF0000u : 0u;
  return v & (lo | hi);
}

// The A registers of mma step S of group I of a unit of NG groups, from the lane's unit words x.
// Register r holds codes (h = r & 1, s = S, j = 2 jp, 2 jp + 1) with jp = r >> 1; in the lane's
// stream they are the pair F = (h * NG + I) * 8 + 2 S + jp (layout.h: 2 codes = 2 * BITS bits).
template <int BITS, int NG, int I, int S>
__device__ __forceinline__ void LookupStep(const uint32_t* x, uint32_t lanebuf, uint32_t (&a)[4]) {
  if constexpr (BITS == 3) {  // one 64-entry pair table per row slot (h): 8 KiB apart
    a[0] = Lds32(PairAddr<I * 8 + 2 * S>(x, lanebuf));
    a[1] = Lds32(PairAddr<(NG + I) * 8 + 2 * S>(x, lanebuf) + 8192);
    a[2] = Lds32(PairAddr<I * 8 + 2 * S + 1>(x, lanebuf));
    a[3] = Lds32(PairAddr<(NG + I) * 8 + 2 * S + 1>(x, lanebuf) + 8192);
  } else {  // per row slot (4 KiB apart) a lo and a hi table (2 KiB apart); the low nibble is the even code
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int h = r & 1, F = ((h * NG + I) * 8 + 2 * S + (r >> 1));
      const uint32_t w = x[F >> 2];
      const uint32_t slot = h * 4096;
      uint32_t lo, hi;
      switch (F & 3) {  // compile-time after unrolling
        case 0: lo = Lds32(NibbleAddr<0>(w, lanebuf) + slot); hi = Lds32(NibbleAddr<4>(w, lanebuf) + slot + 2048); break;
        case 1: lo = Lds32(NibbleAddr<8>(w, lanebuf) + slot); hi = Lds32(NibbleAddr<12>(w, lanebuf) + slot + 2048); break;
        case 2: lo = Lds32(NibbleAddr<16>(w, lanebuf) + slot); hi = Lds32(NibbleAddr<20>(w, lanebuf) + slot + 2048); break;
        default: lo = Lds32(NibbleAddr<24>(w, lanebuf) + slot); hi = Lds32(NibbleAddr<28>(w, lanebuf) + slot + 2048); break;
      }
      a[r] = Hadd2(lo, hi);
    }
  }
}

template <int BITS, int NG, int I>
__device__ __forceinline__ void DecodeGroup(const uint32_t* x, uint32_t lanebuf, const unsigned char* a_lane, int kg,
                                            int K, int t, bool mask, float (&acc)[2][4]) {
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const int kb = kg + 32 * p + 8 * t;  // this lane's 8 k of steps 2p, 2p + 1
    const uint4 b = *reinterpret_cast<const uint4*>(a_lane + 2 * kb);
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      uint32_t a[4];
      if (p == 0 && q == 0) LookupStep<BITS, NG, I, 0>(x, lanebuf, a);
      if (p == 0 && q == 1) LookupStep<BITS, NG, I, 1>(x, lanebuf, a);
      if (p == 1 && q == 0) LookupStep<BITS, NG, I, 2>(x, lanebuf, a);
      if (p == 1 && q == 1) LookupStep<BITS, NG, I, 3>(x, lanebuf, a);
      if (mask) {
        const int valid = K - (kb + 4 * q);
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = MaskPastK(a[r], r, valid);
      }
      Mma(acc[q], a, q ? b.z : b.x, q ? b.w : b.y);
    }
  }
}

// Decodes one unit of NG groups (NG < 4: the partial last unit of a tile) into acc. MASK: the unit
// holds the last group and K % 64 != 0. a_lane: this lane's row of A in shared memory (row g, or
// row 0 for g >= M: those B columns only reach outputs m >= M, which are never stored).
template <int BITS, int NG, bool MASK>
__device__ __forceinline__ void DecodeUnit(const unsigned char* unit, uint32_t lanebuf, const unsigned char* a_lane,
                                           int k0, int K, int lane, float (&acc)[2][4]) {
  constexpr int kWords = NG * BITS;
  uint32_t w[kWords];
  if constexpr (NG == 4) {
#pragma unroll
    for (int v = 0; v < BITS; ++v) {
      const uint4 x = *reinterpret_cast<const uint4*>(unit + v * 512 + lane * 16);
      w[4 * v] = x.x;
      w[4 * v + 1] = x.y;
      w[4 * v + 2] = x.z;
      w[4 * v + 3] = x.w;
    }
  } else {
#pragma unroll
    for (int u = 0; u < kWords; ++u) w[u] = *reinterpret_cast<const uint32_t*>(unit + (u * 32 + lane) * 4);
  }
  const int t = lane & 3;
  DecodeGroup<BITS, NG, 0>(w, lanebuf, a_lane, k0, K, t, MASK && NG == 1, acc);
  if constexpr (NG > 1) DecodeGroup<BITS, NG, 1>(w, lanebuf, a_lane, k0 + 64, K, t, MASK && NG == 2, acc);
  if constexpr (NG > 2) DecodeGroup<BITS, NG, 2>(w, lanebuf, a_lane, k0 + 128, K, t, MASK && NG == 3, acc);
  if constexpr (NG > 3) DecodeGroup<BITS, NG, 3>(w, lanebuf, a_lane, k0 + 192, K, t, MASK, acc);
}

// Adds the CSR entries e (one per lane, `valid`) of a tile to its sparse partials sacc[row][m]. The
// warp's entries are consecutive in CSR order, so their rows are non-decreasing across lanes: a
// segmented sum over the lanes of one row, then one shared atomic per row segment (32 lanes
// hitting one address would serialize). ptr: the tile's 17 indptr values.
__device__ __forceinline__ void AddSparse(bool valid, int e, int k, float v, const int32_t* ptr,
                                          const unsigned char* a_smem, int rs, int M, int lane, float* sacc) {
  int r = 16;  // invalid lanes: a row of their own, after every real one
  if (valid) {
    r = 0;
#pragma unroll
    for (int step = 8; step; step >>= 1)
      if (ptr[r + step] <= e) r += step;
  }
  const unsigned peers = __match_any_sync(0xffffffffu, r);
  const int first = __ffs(peers) - 1, last = 31 - __clz(peers);
  for (int m = 0; m < M; ++m) {
    float x = valid ? v * __half2float(*reinterpret_cast<const __half*>(a_smem + m * rs + 2 * k)) : 0.f;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const float y = __shfl_up_sync(0xffffffffu, x, d);
      if (lane - d >= first) x += y;
    }
    if (lane == last && r < 16) atomicAdd(sacc + r * 8 + m, x);
  }
}

// Builds the lookup tables of one tile (buffer `tables`) from its LUT rows in a ring slot.
template <int BITS>
__device__ __forceinline__ void BuildTables(unsigned char* tables, const unsigned char* lut_rows, int valid_rows,
                                            int tid) {
  const __half* lut = reinterpret_cast<const __half*>(lut_rows);
  if constexpr (BITS == 3) {
    // quad Q = (h * 64 + e) * 8 + g holds entry e of row 8 h + g for lanes 4 g .. 4 g + 3
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int Q = tid + kConsumers * i;
      if (Q >= 1024) break;
      const int g = Q & 7, e = (Q >> 3) & 63, h = Q >> 9, row = 8 * h + g;
      uint32_t v = 0;
      if (row < valid_rows) {
        const __half2 pair = __halves2half2(lut[row * 8 + (e & 7)], lut[row * 8 + (e >> 3)]);
        v = *reinterpret_cast<const uint32_t*>(&pair);
      }
      *reinterpret_cast<uint4*>(tables + Q * 16) = make_uint4(v, v, v, v);
    }
  } else {
    // quad Q = ((h * 2 + hi) * 16 + e) * 8 + g
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int Q = tid + kConsumers * i;
      if (Q >= 512) break;
      const int g = Q & 7, e = (Q >> 3) & 15, hi = (Q >> 7) & 1, h = Q >> 8, row = 8 * h + g;
      uint32_t v = 0;
      if (row < valid_rows) {
        v = __half_as_ushort(lut[row * 16 + e]);
        if (hi) v <<= 16;
      }
      *reinterpret_cast<uint4*>(tables + Q * 16) = make_uint4(v, v, v, v);
    }
  }
}

// GENERAL: K % 256 != 0, so tiles end in a partial or masked unit; otherwise every unit is full and
// unmasked, and the kernel carries no code for the other cases.
template <int BITS, bool GENERAL>
__global__ void __launch_bounds__(kThreads, kCtasPerSm) DecodeTcKernel(const __grid_constant__ TcParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // the bulk copy engine; the launcher requires sm_90
  using C = Cfg<BITS>;
  extern __shared__ __align__(128) unsigned char smem[];
  // The tables' shared address is aligned to 8 KiB, so that its bits are disjoint from the entry
  // bits (7 .. 12) and one LOP3 forms a whole lookup address (8 KiB of slack).
  __shared__ __align__(128) unsigned char tables_raw[2 * C::kTableBytes + 8192];
  const uint32_t tables_addr = (SmemAddr(tables_raw) + 8191u) & ~8191u;
  unsigned char* const tables = tables_raw + (tables_addr - SmemAddr(tables_raw));
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const uint32_t bars = SmemAddr(smem);
  const auto full = [&](int s) { return bars + 8 * s; };
  const auto empty = [&](int s) { return bars + 8 * (kStages + s); };
  const uint32_t a_ready = bars + 8 * (2 * kStages);

  // This CTA's tiles [t0, t1).
  const int t0 = static_cast<int>(static_cast<int64_t>(blockIdx.x) * p.tiles / gridDim.x);
  const int t1 = static_cast<int>(static_cast<int64_t>(blockIdx.x + 1) * p.tiles / gridDim.x);
  const int stages_per_tile = (p.units + kUnitsPerStage - 1) / kUnitsPerStage;
  const int64_t tile_bytes = static_cast<int64_t>(p.groups) * 128 * BITS;
  const int partial_groups = p.groups - 4 * p.full_units;

  PdlTrigger();
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      MbarInit(full(s), 1);
      MbarInit(empty(s), kConsumerWarps);
    }
    MbarInit(a_ready, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == kConsumerWarps) {  // ---- producer ----
    if (lane != 0) return;
    const auto issue_a = [&] {
      if (p.weights_const) PdlWait();
      if (p.a_bulk) {
        MbarExpectTx(a_ready, static_cast<uint32_t>(p.M * p.K * 2));
        for (int m = 0; m < p.M; ++m)
          BulkCopy(SmemAddr(smem + C::kAOff + m * p.rs), p.a + static_cast<int64_t>(m) * p.K,
                   static_cast<uint32_t>(p.K * 2), a_ready);
      }
    };
    if (!p.weights_const) PdlWait();
    int q = 0;
    bool a_issued = false;
    for (int tile = t0; tile < t1; ++tile) {
      const unsigned char* tile_src = reinterpret_cast<const unsigned char*>(p.q) + tile * tile_bytes;
      for (int j = 0; j < stages_per_tile; ++j, ++q) {
        if (q == kStages) {  // the ring is full: now A, which may wait for the previous kernel
          issue_a();
          a_issued = true;
        }
        const int slot = q % kStages;
        if (SQLLM_TC_EXPERIMENT == 2 && q >= kStages) continue;
        if (q >= kStages) MbarWait(empty(slot), ((q / kStages) & 1) ^ 1);
        const int u0 = j * kUnitsPerStage, u1 = min(p.units, u0 + kUnitsPerStage);
        const int full_in_stage = max(0, min(u1, p.full_units) - u0);
        const uint32_t bytes = full_in_stage * C::kUnitBytes + (u1 > p.full_units ? partial_groups * 128 * BITS : 0);
        const int valid_rows = min(16, p.N - 16 * tile);
        const uint32_t lut_bytes = j == 0 ? valid_rows * C::kLutRowBytes : 0;
        const uint32_t dst = SmemAddr(smem + C::kRingOff + slot * C::kSlotBytes);
        MbarExpectTx(full(slot), bytes + lut_bytes);
        BulkCopy(dst, tile_src + static_cast<int64_t>(u0) * C::kUnitBytes, bytes, full(slot));
        if (lut_bytes)
          BulkCopy(dst + C::kStageBytes,
                   reinterpret_cast<const unsigned char*>(p.lut) + static_cast<int64_t>(tile) * 16 * C::kLutRowBytes,
                   lut_bytes, full(slot));
      }
    }
    if (!a_issued) issue_a();
    return;
  }

  // ---- consumers ----
  SQLLM_PROFILE_MARK(0);
  PdlWait();  // A, the CSR and the bias may come from the previous kernel, and Y may be its input
  SQLLM_PROFILE_MARK(1);
  const int Kp = p.groups * 64;
  for (int m = 0; m < p.M; ++m) {
    __half* row = reinterpret_cast<__half*>(smem + C::kAOff + m * p.rs);
    if (!p.a_bulk)
      for (int k = tid; k < p.K; k += kConsumers) row[k] = p.a[static_cast<int64_t>(m) * p.K + k];
    for (int k = p.K + tid; k < Kp; k += kConsumers) row[k] = __float2half(0.f);
  }
  float* const sacc = reinterpret_cast<float*>(smem + C::kSaccOff);  // [2][16][8]
  int32_t* const ptr_s = reinterpret_cast<int32_t*>(smem + C::kPtrOff);  // [2][17]
  if (tid < 2 * 16 * kMaxM) sacc[tid] = 0.f;
  const bool sparse = p.indptr != nullptr;
  if (sparse && tid <= 16) ptr_s[tid] = p.indptr[min(16 * t0 + tid, p.N)];
  MbarWait(full(0), 0);
  BuildTables<BITS>(tables, smem + C::kRingOff + C::kStageBytes, min(16, p.N - 16 * t0), tid);
  ConsumerBarrier();
  if (p.a_bulk) MbarWait(a_ready, 0);
  SQLLM_PROFILE_MARK(2);

  const int g = lane >> 2, t = lane & 3;
  const unsigned char* a_lane = smem + C::kAOff + (g < p.M ? g : 0) * p.rs;
  const bool mask_tail = (p.K & 63) != 0;
  const int last_unit = (p.groups - 1) / 4;
  int q = 0;
  for (int tile = t0, lt = 0; tile < t1; ++tile, ++lt) {
    const int b = lt & 1;
    const int32_t* ptr = ptr_s + 17 * b;
    // Prefetch this tile's CSR entries and bias, and the next tile's indptr slice.
    int32_t idx[kSparsePrefetch];
    float val[kSparsePrefetch];
    int e0 = 0, e1 = 0, next_ptr = 0;
    if (sparse) {
      e0 = ptr[0];
      e1 = ptr[16];
#pragma unroll
      for (int i = 0; i < kSparsePrefetch; ++i) {
        const int e = e0 + tid + kConsumers * i;
        idx[i] = e < e1 ? __ldg(p.indices + e) : -1;
        val[i] = e < e1 ? __half2float(p.values[e]) : 0.f;
      }
      if (tid <= 16 && tile + 1 < t1) next_ptr = __ldg(p.indptr + min(16 * (tile + 1) + tid, p.N));
    }
    float bias = 0.f;
    if (p.bias && tid < 16 && 16 * tile + tid < p.N) bias = __half2float(p.bias[16 * tile + tid]);
    float* const bias_b = reinterpret_cast<float*>(smem + C::kBiasOff) + 16 * b;

    float acc[2][4] = {};
    // Lookups address (lanebuf | entry << 7) + slot (immediate): lanebuf = the 8 KiB-aligned tables,
    // this buffer and this lane, all disjoint from the entry bits.
    const uint32_t lanebuf = tables_addr + b * C::kTableBytes + lane * 4;
    for (int j = 0; j < stages_per_tile; ++j, ++q) {
      const int slot = q % kStages;
      if (SQLLM_TC_EXPERIMENT != 2 || q < kStages) MbarWait(full(slot), (q / kStages) & 1);
      const int u = j * kUnitsPerStage + warp;
      if (SQLLM_TC_EXPERIMENT != 1 && u < p.units) {
        const unsigned char* unit = smem + C::kRingOff + slot * C::kSlotBytes + warp * C::kUnitBytes;
        const bool masked = mask_tail && u == last_unit;
        const int ng = u < p.full_units ? 4 : partial_groups;
        const int k0 = 256 * u;
#define SQLLM_UNIT(NG, MASK) DecodeUnit<BITS, NG, MASK>(unit, lanebuf, a_lane, k0, p.K, lane, acc)
        if (!GENERAL) {
          SQLLM_UNIT(4, false);
        } else switch (ng * 2 + masked) {
          case 8: SQLLM_UNIT(4, false); break;
          case 9: SQLLM_UNIT(4, true); break;
          case 6: SQLLM_UNIT(3, false); break;
          case 7: SQLLM_UNIT(3, true); break;
          case 4: SQLLM_UNIT(2, false); break;
          case 5: SQLLM_UNIT(2, true); break;
          case 2: SQLLM_UNIT(1, false); break;
          default: SQLLM_UNIT(1, true); break;
        }
#undef SQLLM_UNIT
      }
      if (j == stages_per_tile - 1 && tile + 1 < t1) {  // the next tile's tables, from its first stage
        const int q1 = q + 1, slot1 = q1 % kStages;
        if (SQLLM_TC_EXPERIMENT != 2 || q1 < kStages) MbarWait(full(slot1), (q1 / kStages) & 1);
        BuildTables<BITS>(tables + (b ^ 1) * C::kTableBytes,
                          smem + C::kRingOff + slot1 * C::kSlotBytes + C::kStageBytes, min(16, p.N - 16 * (tile + 1)),
                          tid);
      }
      __syncwarp();
      if (lane == 0 && (SQLLM_TC_EXPERIMENT != 2 || q < kStages)) MbarArrive(empty(slot));
    }

    float* const sacc_b = sacc + 128 * b;
    if (sparse) {
#pragma unroll
      for (int i = 0; i < kSparsePrefetch; ++i) {
        const int e = e0 + tid + kConsumers * i;
        if (__any_sync(0xffffffffu, idx[i] >= 0))
          AddSparse(idx[i] >= 0, e, idx[i], val[i], ptr, smem + C::kAOff, p.rs, p.M, lane, sacc_b);
      }
      for (int e0w = e0 + kConsumers * kSparsePrefetch + warp * 32; e0w < e1; e0w += kConsumers) {
        const int e = e0w + lane;  // beyond the prefetch: read directly
        const bool ok = e < e1;
        AddSparse(ok, e, ok ? p.indices[e] : 0, ok ? __half2float(p.values[e]) : 0.f, ptr, smem + C::kAOff, p.rs, p.M,
                  lane, sacc_b);
      }
      if (tid <= 16 && tile + 1 < t1) ptr_s[17 * (b ^ 1) + tid] = next_ptr;
    }
    if (tid < 16) bias_b[tid] = bias;
    // Partials: lane (g, t) holds rows g, g + 8 and columns (m) 2t, 2t + 1.
    float* const red = reinterpret_cast<float*>(smem + C::kRedOff + b * C::kRedBytes) + warp * 128;
    *reinterpret_cast<float2*>(red + g * 8 + 2 * t) = make_float2(acc[0][0] + acc[1][0], acc[0][1] + acc[1][1]);
    *reinterpret_cast<float2*>(red + (g + 8) * 8 + 2 * t) =
        make_float2(acc[0][2] + acc[1][2], acc[0][3] + acc[1][3]);
    ConsumerBarrier();
    if (tid < 16 * p.M) {
      const int r = tid & 15, m = tid >> 4, n = 16 * tile + r;
      const float* red_b = reinterpret_cast<const float*>(smem + C::kRedOff + b * C::kRedBytes);
      float s = sacc_b[r * 8 + m];
#pragma unroll
      for (int w = 0; w < kConsumerWarps; ++w) s += red_b[w * 128 + r * 8 + m];
      s += bias_b[r];
      if (n < p.N) p.y[static_cast<int64_t>(m) * p.N + n] = __float2half_rn(s);
      sacc_b[r * 8 + m] = 0.f;
    }
  }
  SQLLM_PROFILE_MARK(3);
#endif
}

// Dynamic shared memory, and all of it (the tables are static, with 8 KiB of alignment slack).
template <int BITS>
int64_t SmemBytes(int M, int rs) {
  return Cfg<BITS>::kAOff + static_cast<int64_t>(M) * rs;
}
template <int BITS>
constexpr int64_t kStaticSmem = 2 * Cfg<BITS>::kTableBytes + 8192;
template <int BITS>
int64_t TotalSmemBytes(int M, int rs) {
  return SmemBytes<BITS>(M, rs) + kStaticSmem<BITS>;
}

template <int BITS>
std::string Launch(const Problem& p, const DeviceArgs& d, cudaStream_t stream, bool pdl, bool weights_const,
                   const DeviceInfo& dev, bool* launched) {
  const int64_t groups = layout::Groups(p.K);
  const int rs = static_cast<int>((groups * 128 + 127) / 128 * 128 + 64);  // >= 2 * 64 * groups, = 64 mod 128
  const int64_t fixed = TotalSmemBytes<BITS>(0, rs);
  const int64_t m_fit = (dev.smem_optin - fixed) / rs;
  if (m_fit < 1) return "";  // A does not fit in shared memory: the CUDA-core kernel takes it
  const int chunks = static_cast<int>((p.M + std::min<int64_t>(m_fit, kMaxM) - 1) / std::min<int64_t>(m_fit, kMaxM));
  const int m_chunk = static_cast<int>((p.M + chunks - 1) / chunks);
  const size_t smem = static_cast<size_t>(SmemBytes<BITS>(m_chunk, rs));
  const bool general = p.K % layout::kUnitCodes != 0;
  const auto kernel = general ? &DecodeTcKernel<BITS, true> : &DecodeTcKernel<BITS, false>;
  {
    static std::mutex mutex;
    static bool configured[64] = {};
    std::lock_guard<std::mutex> lock(mutex);
    if (dev.device < 0 || dev.device >= 64) return "SqueezeMatMul (CUDA): device ordinal out of range";
    if (!configured[dev.device]) {  // both kernels may use all the dynamic shared memory a block can have
      for (auto* f : {&DecodeTcKernel<BITS, true>, &DecodeTcKernel<BITS, false>})
        if (const cudaError_t e = cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                       static_cast<int>(dev.smem_optin - kStaticSmem<BITS>));
            e != cudaSuccess)
          return CudaMessage(e, "configuring the tensor-core decode kernel");
      configured[dev.device] = true;
    }
  }
  TcParams k{};
  k.q = d.qweight;
  k.lut = static_cast<const __half*>(d.lut);
  k.indptr = p.has_sparse ? d.indptr : nullptr;
  k.indices = d.indices;
  k.values = static_cast<const __half*>(d.values);
  k.bias = p.has_bias ? static_cast<const __half*>(d.bias) : nullptr;
  k.K = static_cast<int>(p.K);
  k.N = static_cast<int>(p.N);
  k.groups = static_cast<int>(groups);
  k.full_units = static_cast<int>(layout::FullUnits(p.K));
  k.units = static_cast<int>((groups + 3) / 4);
  k.tiles = static_cast<int>(layout::Tiles(p.N));
  k.rs = rs;
  k.weights_const = weights_const ? 1 : 0;
  // Persistent: as many CTAs as fit on the GPU at once (up to kCtasPerSm per SM; 1 KiB of shared
  // memory per block is reserved by the system).
  const int64_t per_sm = std::clamp<int64_t>(dev.smem_per_sm / (TotalSmemBytes<BITS>(m_chunk, rs) + 1024), 1, kCtasPerSm);
  const int grid = static_cast<int>(std::min<int64_t>(k.tiles, dev.sms * per_sm));
  for (int64_t m0 = 0; m0 < p.M; m0 += m_chunk) {
    k.M = static_cast<int>(std::min<int64_t>(m_chunk, p.M - m0));
    k.a = static_cast<const __half*>(d.a) + m0 * p.K;
    k.y = static_cast<__half*>(d.y) + m0 * p.N;
    k.a_bulk = (p.K % 8 == 0 && reinterpret_cast<uintptr_t>(k.a) % 16 == 0) ? 1 : 0;
    cudaError_t e = LaunchKernel(kernel, dim3(grid), dim3(kThreads), smem, stream, pdl, k);
    const cudaError_t last = cudaGetLastError();
    if (e == cudaSuccess) e = last;
    if (e != cudaSuccess) return CudaMessage(e, "launching the tensor-core decode kernel");
  }
  *launched = true;
  return "";
}

}  // namespace

std::string LaunchDecodeTc(const Problem& p, const DeviceArgs& args, cudaStream_t stream, bool pdl,
                           bool weights_constant, const DeviceInfo& dev, bool* launched) {
  *launched = false;
  const auto aligned = [](const void* ptr, uintptr_t a) { return reinterpret_cast<uintptr_t>(ptr) % a == 0; };
  if (!args.half || (p.bits != 3 && p.bits != 4) || p.M < 1 || dev.cc_major < 9 || p.K > (1 << 30) ||
      p.N > (1 << 30) || !aligned(args.qweight, 16) || !aligned(args.lut, 16))
    return "";
  return p.bits == 3 ? Launch<3>(p, args, stream, pdl, weights_constant, dev, launched)
                     : Launch<4>(p, args, stream, pdl, weights_constant, dev, launched);
}

}  // namespace sqllm::cuda

// The decode kernel of SqueezeMatMul on tensor cores: Y[M, N] = A[M, K] W^T (+ bias) for fp16,
// bits 3 and 4, 1 <= M <= 8 per launch, sm_90 (the bulk copy engine). docs/cuda-kernels.md has
// the numbers and the log of what was tried.
//
// Why it looks like this. At batch 1 the op is a GEMV bound by the bytes of W: on an H200 the codes
// arrive at ~30 per SM clock at 70% of the copy bandwidth. A code must therefore cost a fraction of
// one instruction. Per row of W the LUT is quantized to unsigned 8 bits over its range and per row
// of A and unit of 256 k, A to int8 plus an int8 residual (the CPU int8 path's contract,
// docs/op-spec.md), so that
//   * four codes of one row become four u8 table values with ONE byte permute (PRMT), whose
//     selector is the half word of codes itself (code layout 2, sqllm/layout.h: 4 codes = the low
//     3 bits of 4 nibbles; 4 bits: two permutes and a select), the row's table in 2 (3 bits) or
//     4 (4 bits) registers;
//   * mma.m16n8k32 (u8 x s8 -> s32, exact) does the multiply-adds: W is its 16-row A operand, the
//     quantized A^T its B operand (M <= 8 of its 8 columns), once for the int8 part of A and once
//     for the residual; per unit the two int32 sums are scaled into fp32.
//   sum_k lut[c_k] a_k ~= step * sum_units sa * (sum q[c_k] qa_k + sum q[c_k] qr_k / 127)
//                         + lo * sum_k (qa_k + qr_k / 127) sa
// No shared-memory lookups and no per-lane tables: the decode of a 4096-code unit is ~100
// instructions per warp. Around it:
//   * Persistent CTAs (2 per SM), each owning a contiguous run of 16-row tiles of W (balanced to
//     within one tile). In the tiled qweight layout that run is one contiguous block of memory.
//   * A producer warp streams the block through a ring of kStages shared-memory stages with the
//     bulk copy engine (cp.async.bulk, completion counted in bytes on an mbarrier per stage); it
//     needs no registers for data in flight and never waits for the math. A stage is up to 8
//     units (256 codes x 16 rows each) of one tile. qweight and the LUT are constants, so with
//     programmatic dependent launch (PDL) the first stages are requested, and the CTA's LUT rows
//     quantized (all of its tiles, from global memory), before griddepcontrol.wait, under the
//     previous kernel's tail; no tile waits for the next one's tables.
//   * 8 consumer warps: warp w decodes unit w of each stage, so a warp's units are the same k
//     range in every tile, and it quantizes the A of exactly those units once, in the prologue
//     (no barrier). Lane (g, t) reads its 16-byte vectors of the unit (conflict free), and per mma
//     step its B operand (8 k of int8 A and 8 of the residual, one 16-byte load).
//   * Per tile: each warp's 16 x 8 partial sum (step * dot + lo * base) goes to shared memory,
//     one named barrier among the consumers, then 16 M threads add the 8 partials, the sparse part
//     and the bias and store Y (one rounding).
//   * The sparse part (exact, fp32) is loaded under the dense stream: at a tile's start every
//     consumer thread loads up to kSparsePrefetch CSR entries of the tile (its indptr slice was
//     fetched one tile earlier), and at the tile's end adds value * A[m][index] into a per-tile
//     fp32 accumulator in shared memory. Entries beyond 256 * kSparsePrefetch per tile are read
//     directly (slower, still correct). Bias values are prefetched the same way.
//   * Inf and NaN: a LUT row that holds one, or a row of A that does, is computed exactly by the
//     threads that store Y (a scalar loop over k; rare, slow, and what a plain product gives).
//     Padding codes meet zero A, so they contribute exactly nothing.
//
// Shared memory, all dynamic (bytes from its base):
//   [0, 128)              mbarriers: full[kStages], empty[kStages], a_ready
//   kRingOff              ring: kStages x 8 units
//   kRedOff               per-warp partials [2][8 warps][16 rows][8] fp32
//   kSaccOff              sparse partials [2][16 rows][8] fp32
//   kPtrOff, kBiasOff     indptr slices [2][17], bias values [2][16]
//   kFlagOff              row m of A not finite [8] int32
//   kAOff                 A [M][units * 256] fp16, zero padded
//   + M * a_bytes         quantized A [M][units][8 steps][4 t][qa 8, qr 8] (row stride = 64 mod 128:
//                         the B loads of 8 rows are 4 wavefronts)
//   + M * aq_bytes        per unit u the scales sa[u][8 m] / 127 (fp32)
//   lut_off               the quantized LUTs of the CTA's tiles (LutTiles)
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
#ifndef SQLLM_TC_CHAINS
#define SQLLM_TC_CHAINS 2
#endif
// Experiments (benchmarks/decode_driver.sh): 1 = stream only (no decode), 2 = decode only (the
// first ring of stages reused, no further copies); timing only.
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
constexpr int kChains = SQLLM_TC_CHAINS;  // independent mma accumulator chains per unit

template <int BITS>
struct Cfg {
  static constexpr int kUnitBytes = 512 * BITS;  // 16 rows x 256 codes
  static constexpr int kStageBytes = kUnitsPerStage * kUnitBytes;
  static constexpr int kSlotBytes = kStageBytes;
  static constexpr int kRingOff = 128;
  static constexpr int kRedOff = kRingOff + kStages * kSlotBytes;
  static constexpr int kRedBytes = kConsumerWarps * 16 * kMaxM * 4;
  static constexpr int kSaccOff = kRedOff + 2 * kRedBytes;
  static constexpr int kPtrOff = kSaccOff + 2 * 16 * kMaxM * 4;  // int32 [2][17]
  static constexpr int kBiasOff = kPtrOff + 256;                  // fp32 [2][16]
  static constexpr int kFlagOff = kBiasOff + 128;                 // int32 [8]
  static constexpr int kAOff = kFlagOff + 128;
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
  int a_bytes;        // bytes per row of A in shared memory (units * 512: fp16, zero padded)
  int aq_bytes;       // bytes per row of quantized A (units * 512 + 64)
  int lut_off;        // shared-memory offset of the quantized LUTs of the CTA's tiles (LutTiles)
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

// D += A (u8, 16 x 32) * B (s8, 32 x 8), int32 accumulation (exact).
__device__ __forceinline__ void MmaU8S8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Byte permute: byte n of the result is byte (sel >> 4n) & 15 of {hi, lo} (0-3: lo, 4-7: hi); the
// selector nibbles must have bit 3 clear (set means "replicate the sign" in PRMT).
__device__ __forceinline__ uint32_t Prmt(uint32_t lo, uint32_t hi, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(lo), "r"(hi), "r"(sel));
  return d;
}

// ---- quantization ------------------------------------------------------------------------------

// Rounds to the nearest integer (ties to even) for |v| < 2^22: the integer's two's complement is
// in the low bits of the result's bit pattern.
__device__ __forceinline__ float RoundMagic(float v) { return v + 12582912.f; }  // 1.5 * 2^23

// The low bytes of four words, packed.
__device__ __forceinline__ uint32_t LowBytes(uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  return Prmt(Prmt(a, b, 0x0040u), Prmt(c, d, 0x0040u), 0x5410u);
}

// Quantizes unit u of row m of A (fp16 in shared memory, zero padded) into the B operand layout:
// lane L takes k = 256 u + 8 L .. + 7 (= step 2i + p, t = L % 4 of the unit) and writes
// qa[8], qr[8] at 16 L. Returns this lane's part of scale * sum(qa + qr / 127), and writes
// sa = scale / 127 (lane 0). A unit holding Inf or NaN becomes zeros and flags the row.
__device__ __forceinline__ float QuantizeAUnit(const unsigned char* a_row, unsigned char* aq_row, float* sa, int u,
                                               int lane, int* row_not_finite) {
  const uint4 x = *reinterpret_cast<const uint4*>(a_row + 512 * u + 16 * lane);
  const uint32_t w[4] = {x.x, x.y, x.z, x.w};
  uint32_t mx = 0;  // max |a| as bits: finite halves are below 0x7C00
#pragma unroll
  for (int i = 0; i < 4; ++i) mx = max(mx, max(w[i] & 0x7FFFu, (w[i] >> 16) & 0x7FFFu));
  mx = __reduce_max_sync(0xffffffffu, mx);
  uint4 out = make_uint4(0, 0, 0, 0);
  float part = 0.f, scale = 0.f;
  if (mx >= 0x7C00u) {
    if (lane == 0) *row_not_finite = 1;
  } else if (mx) {
    const float amax = HalfBitsToFloat(mx);
    const float inv = 127.f / amax;
    scale = amax / 127.f;
    uint32_t qa[8], qr[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float v = HalfBitsToFloat(w[e >> 1] >> (16 * (e & 1))) * inv;
      const float va_m = RoundMagic(v), va = va_m - 12582912.f;
      qa[e] = __float_as_uint(va_m);
      qr[e] = __float_as_uint(RoundMagic((v - va) * 127.f));
    }
    out = make_uint4(LowBytes(qa[0], qa[1], qa[2], qa[3]), LowBytes(qa[4], qa[5], qa[6], qa[7]),
                     LowBytes(qr[0], qr[1], qr[2], qr[3]), LowBytes(qr[4], qr[5], qr[6], qr[7]));
    const int sum_a = __dp4a(static_cast<int>(out.x), 0x01010101, __dp4a(static_cast<int>(out.y), 0x01010101, 0));
    const int sum_r = __dp4a(static_cast<int>(out.z), 0x01010101, __dp4a(static_cast<int>(out.w), 0x01010101, 0));
    part = scale * (static_cast<float>(sum_a) + static_cast<float>(sum_r) * (1.f / 127.f));
  }
  *reinterpret_cast<uint4*>(aq_row + 512 * u + 16 * lane) = out;
  if (lane == 0) *sa = scale * (1.f / 127.f);
  return part;
}

// The quantized LUTs of a CTA's tiles, in shared memory at lut_off: per tile lt (from t0) the u8
// rows q[lt][16][16], their (lo, step) [lt][16] and whether a row holds Inf or NaN [lt][16].
constexpr int kLutTileBytes = 256 + 128 + 16;
struct LutTiles {
  unsigned char* q;
  float2* scale;
  unsigned char* not_finite;
  __device__ LutTiles(unsigned char* base, int tiles)
      : q(base), scale(reinterpret_cast<float2*>(base + 256 * tiles)), not_finite(base + 384 * tiles) {}
};

// The consumers quantize the LUT rows of tiles [t0, t1) to u8 over each row's range,
// lut ~= lo + step * q (as the CPU int8 path: docs/op-spec.md), one entry per thread and round.
// Rows past N, and rows holding Inf or NaN (flagged: the exact path takes them), become q = 0,
// lo = step = 0. Done once, in the prologue: qlut and the LUT are constants, read from global
// memory before griddepcontrol.wait when they are initializers.
template <int BITS>
__device__ __forceinline__ void QuantizeLuts(const __half* lut, int N, int t0, int t1, LutTiles out, int tid) {
  constexpr int E = 1 << BITS;
  const int total = (t1 - t0) * 16 * E;
  for (int i0 = 0; i0 < total; i0 += kConsumers) {  // warp-uniform: a row's E entries share a warp
    const int i = i0 + tid, lr = i / E, e = i % E, n = 16 * t0 + lr;
    const float v = i < total && n < N ? __half2float(lut[static_cast<int64_t>(n) * E + e]) : 0.f;
    float lo = v, hi = v;
#pragma unroll
    for (int off = E / 2; off; off >>= 1) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
    }
    const unsigned bad_lanes = __ballot_sync(0xffffffffu, !isfinite(v));
    const bool bad = (bad_lanes >> (tid & 31 & ~(E - 1))) & ((1u << E) - 1u);
    const float inv = hi > lo ? 255.f / (hi - lo) : 0.f;
    if (i < total) {
      out.q[16 * lr + e] = bad ? 0 : static_cast<unsigned char>(min(max(__float2int_rn((v - lo) * inv), 0), 255));
      if (e == 0) {
        out.scale[lr] = bad ? make_float2(0.f, 0.f) : make_float2(lo, (hi - lo) * (1.f / 255.f));
        out.not_finite[lr] = bad;
      }
    }
  }
}

// ---- decoding ------------------------------------------------------------------------------------

// The lane's table registers: row g (T[0]) and row g + 8 (T[1]), 4 u8 entries per register.
template <int BITS>
struct Tables {
  uint32_t t[2][BITS == 3 ? 2 : 4];
};

// 4 bits: the u8 values of the 4 codes in the low 16 bits of `sel` (bit 3 of each nibble clear)
// and of their top bits `top` (0x32103210 | bit 3 at bit 2 of each nibble): two lookups of 8
// entries and a select.
__device__ __forceinline__ uint32_t Lookup16(const uint32_t (&t)[4], uint32_t sel, uint32_t top) {
  return Prmt(Prmt(t[0], t[1], sel), Prmt(t[2], t[3], sel), top);
}

// The A registers of mma step (i, p) from the lane's unit words w (layout.h): a[0] row g, k
// 8t + 0..3 (q = 0); a[1] row g + 8; a[2] row g, q = 1; a[3] row g + 8, q = 1.
template <int BITS, int NG>
__device__ __forceinline__ void StepOperand(const uint32_t* w, const Tables<BITS>& tb, int i, int p, uint32_t (&a)[4]) {
  constexpr uint32_t kLow = 0x77777777u, kTop = 0x88888888u;
  if constexpr (BITS == 3) {
    const uint32_t x0 = w[i], x1 = w[NG + i], x2 = w[2 * NG + i];  // planes 0, 1, 2 of group i
    uint32_t s0, s1;  // selectors of row g and row g + 8
    if (p == 0) {
      s0 = x0 & kLow;
      s1 = x1 & kLow;
    } else {  // row g + 8's codes are the planes' top bits
      s0 = x2 & kLow;
      s1 = ((x0 & kTop) >> 3) | ((x1 & kTop) >> 2) | ((x2 & kTop) >> 1);
    }
    a[0] = Prmt(tb.t[0][0], tb.t[0][1], s0);
    a[2] = Prmt(tb.t[0][0], tb.t[0][1], s0 >> 16);
    a[1] = Prmt(tb.t[1][0], tb.t[1][1], s1);
    a[3] = Prmt(tb.t[1][0], tb.t[1][1], s1 >> 16);
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t x = w[(h * NG + i) * 2 + p];
      const uint32_t sel = x & kLow, top = ((x >> 1) & 0x44444444u) | 0x32103210u;
      a[h] = Lookup16(tb.t[h], sel, top);
      a[h + 2] = Lookup16(tb.t[h], sel >> 16, top >> 16);
    }
  }
}

// Decodes one unit of NG groups (NG < 4: the partial last unit of a tile) into acc (rows g, g + 8
// x columns 2t, 2t + 1 of the mma fragment). b_lane: this lane's B operands of the unit (row g of
// the quantized A, or row 0 for g >= M: those columns only reach outputs m >= M, never stored);
// sa: the unit's scales / 127 of columns 2t, 2t + 1.
template <int BITS, int NG>
__device__ __forceinline__ void DecodeUnit(const unsigned char* unit, const Tables<BITS>& tb,
                                           const unsigned char* b_lane, float2 sa, int lane, float (&acc)[4]) {
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
  // with the int8 part of A, with its residual; kChains / 2 sets each, to shorten the mma chains
  int dot[kChains / 2][4] = {}, res[kChains / 2][4] = {};
#pragma unroll
  for (int i = 0; i < NG; ++i)
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      uint32_t a[4];
      StepOperand<BITS, NG>(w, tb, i, p, a);
      const uint4 b = *reinterpret_cast<const uint4*>(b_lane + (2 * i + p) * 64);
      const int c = (2 * i + p) % (kChains / 2);
      MmaU8S8(dot[c], a, b.x, b.y);
      MmaU8S8(res[c], a, b.z, b.w);
    }
  // |dot| <= 256 * 255 * 127 and |res| <= 256 * 255 * 64: 127 dot + res fits int32
#pragma unroll
  for (int c = 1; c < kChains / 2; ++c)
#pragma unroll
    for (int r = 0; r < 4; ++r) dot[0][r] += dot[c][r], res[0][r] += res[c][r];
  acc[0] += sa.x * static_cast<float>(127 * dot[0][0] + res[0][0]);
  acc[1] += sa.y * static_cast<float>(127 * dot[0][1] + res[0][1]);
  acc[2] += sa.x * static_cast<float>(127 * dot[0][2] + res[0][2]);
  acc[3] += sa.y * static_cast<float>(127 * dot[0][3] + res[0][3]);
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

// The exact dense part of row n (= 16 tile + r) of W against row m of A (fp16 in shared memory), for
// the rows the int8 path cannot take: over every k when the LUT row holds Inf or NaN, else only
// over the k where A is not finite (those terms alone decide the sum: +-Inf or NaN).
template <int BITS>
__device__ float ExactDot(const TcParams& p, int tile, int r, int m, bool every_k, const unsigned char* a_smem) {
  const uint32_t* q = p.q + static_cast<int64_t>(tile) * p.groups * 32 * BITS;
  const __half* lut = p.lut + (static_cast<int64_t>(16 * tile + r) << BITS);
  const __half* a = reinterpret_cast<const __half*>(a_smem + static_cast<int64_t>(m) * p.a_bytes);
  float s = 0.f;
  for (int k = 0; k < p.K; ++k) {
    const float x = __half2float(a[k]);
    if (!every_k && isfinite(x)) continue;
    s += __half2float(lut[layout::CodeAt(q, r, k, p.K, BITS)]) * x;
  }
  return s;
}

// GENERAL: K % 256 != 0, so tiles end in a partial unit; otherwise every unit is full, and the
// kernel carries no code for the other case. SPARSE: the op has a CSR part (a dense kernel carries
// none of its code: at 2 units per warp and tile, every instruction outside the units counts).
template <int BITS, bool GENERAL, bool SPARSE>
__global__ void __launch_bounds__(kThreads, kCtasPerSm) DecodeTcKernel(const __grid_constant__ TcParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // the bulk copy engine; the launcher requires sm_90
  using C = Cfg<BITS>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const uint32_t bars = SmemAddr(smem);
  const auto full = [&](int s) { return bars + 8 * s; };
  const auto empty = [&](int s) { return bars + 8 * (kStages + s); };
  const uint32_t a_ready = bars + 8 * (2 * kStages);
  unsigned char* const a_smem = smem + C::kAOff;
  unsigned char* const aq_smem = a_smem + p.M * p.a_bytes;
  float* const sa_smem = reinterpret_cast<float*>(aq_smem + p.M * p.aq_bytes);  // [units][8]
  int* const a_flags = reinterpret_cast<int*>(smem + C::kFlagOff);  // [8]: row m of A not finite

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
          BulkCopy(SmemAddr(a_smem + m * p.a_bytes), p.a + static_cast<int64_t>(m) * p.K,
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
        const uint32_t dst = SmemAddr(smem + C::kRingOff + slot * C::kSlotBytes);
        MbarExpectTx(full(slot), bytes);
        BulkCopy(dst, tile_src + static_cast<int64_t>(u0) * C::kUnitBytes, bytes, full(slot));
      }
    }
    if (!a_issued) issue_a();
    return;
  }

  // ---- consumers ----
  SQLLM_PROFILE_MARK(0);
  const LutTiles luts(smem + p.lut_off, t1 - t0);
  if (p.weights_const) QuantizeLuts<BITS>(p.lut, p.N, t0, t1, luts, tid);  // under the previous kernel's tail
  PdlWait();  // A, the CSR and the bias may come from the previous kernel, and Y may be its input
  if (!p.weights_const) QuantizeLuts<BITS>(p.lut, p.N, t0, t1, luts, tid);
  SQLLM_PROFILE_MARK(1);
  const int Kp = p.units * 256;
  for (int m = 0; m < p.M; ++m) {
    __half* row = reinterpret_cast<__half*>(a_smem + m * p.a_bytes);
    if (!p.a_bulk)
      for (int k = tid; k < p.K; k += kConsumers) row[k] = p.a[static_cast<int64_t>(m) * p.K + k];
    for (int k = p.K + tid; k < Kp; k += kConsumers) row[k] = __float2half(0.f);
  }
  float* const sacc = reinterpret_cast<float*>(smem + C::kSaccOff);  // [2][16][8]
  int32_t* const ptr_s = reinterpret_cast<int32_t*>(smem + C::kPtrOff);  // [2][17]
  if (tid < 2 * 16 * kMaxM) sacc[tid] = 0.f;
  if (tid < kMaxM) a_flags[tid] = 0;
  if (SPARSE && tid <= 16) ptr_s[tid] = p.indptr[min(16 * t0 + tid, p.N)];
  ConsumerBarrier();  // the zero padding of A, the quantized LUTs, the flags
  if (p.a_bulk) MbarWait(a_ready, 0);
  // Quantize the A of this warp's units (the same in every tile), two units at a time (independent
  // chains); base = sum over them of scale * sum(qa + qr / 127) for columns m = 2t, 2t + 1.
  const int g = lane >> 2, t = lane & 3;
  float base0 = 0.f, base1 = 0.f;
  for (int m = 0; m < p.M; ++m) {
    float part = 0.f;
    for (int u = warp; u < p.units; u += 2 * kUnitsPerStage) {
      const int u2 = u + kUnitsPerStage;
      part += QuantizeAUnit(a_smem + m * p.a_bytes, aq_smem + m * p.aq_bytes, sa_smem + 8 * u + m, u, lane,
                            a_flags + m);
      if (u2 < p.units)
        part += QuantizeAUnit(a_smem + m * p.a_bytes, aq_smem + m * p.aq_bytes, sa_smem + 8 * u2 + m, u2, lane,
                              a_flags + m);
    }
    part = WarpSum(part);
    if (m == 2 * t) base0 = part;
    if (m == 2 * t + 1) base1 = part;
  }
  __syncwarp();
  SQLLM_PROFILE_MARK(2);

  const unsigned char* b_row = aq_smem + (g < p.M ? g : 0) * p.aq_bytes + 16 * t;
  const unsigned char* const ring_warp = smem + C::kRingOff + warp * C::kUnitBytes;
  int q = 0, slot = 0;  // stage count, its ring slot
  uint32_t phase = 0;   // and the parity of its fill
  for (int tile = t0, lt = 0; tile < t1; ++tile, ++lt) {
    const int b = lt & 1;
    const int32_t* ptr = ptr_s + 17 * b;
    // Prefetch this tile's CSR entries and bias, and the next tile's indptr slice.
    int32_t idx[kSparsePrefetch];
    float val[kSparsePrefetch];
    int e0 = 0, e1 = 0, next_ptr = 0;
    if constexpr (SPARSE) {
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
    // This tile's tables and scales, in registers.
    Tables<BITS> tb;
    const unsigned char* qb = luts.q + 256 * lt;
    if constexpr (BITS == 3) {
      const uint2 x = *reinterpret_cast<const uint2*>(qb + 16 * g), y = *reinterpret_cast<const uint2*>(qb + 16 * (g + 8));
      tb.t[0][0] = x.x, tb.t[0][1] = x.y, tb.t[1][0] = y.x, tb.t[1][1] = y.y;
    } else {
      const uint4 x = *reinterpret_cast<const uint4*>(qb + 16 * g), y = *reinterpret_cast<const uint4*>(qb + 16 * (g + 8));
      tb.t[0][0] = x.x, tb.t[0][1] = x.y, tb.t[0][2] = x.z, tb.t[0][3] = x.w;
      tb.t[1][0] = y.x, tb.t[1][1] = y.y, tb.t[1][2] = y.z, tb.t[1][3] = y.w;
    }
    const float2 sc0 = luts.scale[16 * lt + g], sc1 = luts.scale[16 * lt + g + 8];  // (lo, step): rows g, g + 8

    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    // this warp's unit u = warp + 8 j of stage j, its B operands and scales (pointers stepped per stage)
    const unsigned char* b_lane = b_row + 512 * warp;
    const float* sa_u = sa_smem + 8 * warp + 2 * t;
    for (int u = warp; u < kUnitsPerStage * stages_per_tile; u += kUnitsPerStage, ++q) {
      if (SQLLM_TC_EXPERIMENT != 2 || q < kStages) MbarWait(full(slot), phase);
      if (SQLLM_TC_EXPERIMENT != 1 && u < p.units) {
        const unsigned char* unit = ring_warp + slot * C::kSlotBytes;
        const float2 sa = *reinterpret_cast<const float2*>(sa_u);
        if (!GENERAL || u < p.full_units) {
          DecodeUnit<BITS, 4>(unit, tb, b_lane, sa, lane, acc);
        } else if constexpr (GENERAL) {
          switch (partial_groups) {
            case 1: DecodeUnit<BITS, 1>(unit, tb, b_lane, sa, lane, acc); break;
            case 2: DecodeUnit<BITS, 2>(unit, tb, b_lane, sa, lane, acc); break;
            default: DecodeUnit<BITS, 3>(unit, tb, b_lane, sa, lane, acc); break;
          }
        }
      }
      __syncwarp();
      if (lane == 0 && (SQLLM_TC_EXPERIMENT != 2 || q < kStages)) MbarArrive(empty(slot));
      b_lane += 512 * kUnitsPerStage;
      sa_u += 8 * kUnitsPerStage;
      if (++slot == kStages) slot = 0, phase ^= 1;
    }

    float* const sacc_b = sacc + 128 * b;
    if constexpr (SPARSE) {
#pragma unroll
      for (int i = 0; i < kSparsePrefetch; ++i) {
        const int e = e0 + tid + kConsumers * i;
        if (__any_sync(0xffffffffu, idx[i] >= 0))
          AddSparse(idx[i] >= 0, e, idx[i], val[i], ptr, a_smem, p.a_bytes, p.M, lane, sacc_b);
      }
      for (int e0w = e0 + kConsumers * kSparsePrefetch + warp * 32; e0w < e1; e0w += kConsumers) {
        const int e = e0w + lane;  // beyond the prefetch: read directly
        const bool ok = e < e1;
        AddSparse(ok, e, ok ? p.indices[e] : 0, ok ? __half2float(p.values[e]) : 0.f, ptr, a_smem, p.a_bytes, p.M,
                  lane, sacc_b);
      }
      if (tid <= 16 && tile + 1 < t1) ptr_s[17 * (b ^ 1) + tid] = next_ptr;
    }
    if (tid < 16) bias_b[tid] = bias;
    // Partials: lane (g, t) holds rows g, g + 8 and columns (m) 2t, 2t + 1.
    float* const red = reinterpret_cast<float*>(smem + C::kRedOff + b * C::kRedBytes) + warp * 128;
    *reinterpret_cast<float2*>(red + g * 8 + 2 * t) =
        make_float2(sc0.y * acc[0] + sc0.x * base0, sc0.y * acc[1] + sc0.x * base1);
    *reinterpret_cast<float2*>(red + (g + 8) * 8 + 2 * t) =
        make_float2(sc1.y * acc[2] + sc1.x * base0, sc1.y * acc[3] + sc1.x * base1);
    ConsumerBarrier();
    if (tid < 16 * p.M) {
      const int r = tid & 15, m = tid >> 4, n = 16 * tile + r;
      const float* red_b = reinterpret_cast<const float*>(smem + C::kRedOff + b * C::kRedBytes);
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kConsumerWarps; ++w) s += red_b[w * 128 + r * 8 + m];
      const bool lut_bad = luts.not_finite[16 * lt + r];
      if (n < p.N && (lut_bad || a_flags[m])) s = ExactDot<BITS>(p, tile, r, m, lut_bad, a_smem);
      s += sacc_b[r * 8 + m] + bias_b[r];
      if (n < p.N) p.y[static_cast<int64_t>(m) * p.N + n] = __float2half_rn(s);
      sacc_b[r * 8 + m] = 0.f;
    }
  }
  SQLLM_PROFILE_MARK(3);
#endif
}

// Shared memory of a CTA with M rows of A and `tiles` tiles.
template <int BITS>
int64_t SmemBytes(int M, int tiles, const TcParams& k) {
  return Cfg<BITS>::kAOff + static_cast<int64_t>(M) * (k.a_bytes + k.aq_bytes) + static_cast<int64_t>(k.units) * 32 +
         static_cast<int64_t>(tiles) * kLutTileBytes;
}

template <int BITS>
std::string Launch(const Problem& p, const DeviceArgs& d, cudaStream_t stream, bool pdl, bool weights_const,
                   const DeviceInfo& dev, bool* launched) {
  TcParams k{};
  k.groups = static_cast<int>(layout::Groups(p.K));
  k.full_units = static_cast<int>(layout::FullUnits(p.K));
  k.units = (k.groups + 3) / 4;
  k.a_bytes = k.units * 512;
  k.aq_bytes = k.units * 512 + 64;
  k.tiles = static_cast<int>(layout::Tiles(p.N));
  // Persistent CTAs: kCtasPerSm per SM where they fit (1 KiB of shared memory per block is reserved
  // by the system), else one; a CTA holds the quantized LUTs of its ceil(tiles / grid) tiles.
  const auto tiles_per_cta = [&](int64_t per_sm) {
    const int64_t grid = std::min<int64_t>(k.tiles, dev.sms * per_sm);
    return static_cast<int>((k.tiles + grid - 1) / grid);
  };
  const int64_t per_row = k.a_bytes + k.aq_bytes;
  const int64_t m_fit = (dev.smem_optin - SmemBytes<BITS>(0, tiles_per_cta(1), k)) / per_row;
  if (m_fit < 1) return "";  // A does not fit in shared memory: the CUDA-core kernel takes it
  const int chunks = static_cast<int>((p.M + std::min<int64_t>(m_fit, kMaxM) - 1) / std::min<int64_t>(m_fit, kMaxM));
  const int m_chunk = static_cast<int>((p.M + chunks - 1) / chunks);
  int64_t per_sm = kCtasPerSm;
  while (per_sm > 1 && per_sm * (SmemBytes<BITS>(m_chunk, tiles_per_cta(per_sm), k) + 1024) > dev.smem_per_sm) --per_sm;
  const int grid = static_cast<int>(std::min<int64_t>(k.tiles, dev.sms * per_sm));
  // Shared memory enough that no more than per_sm CTAs share an SM: with PDL the next launch's CTAs
  // would otherwise fill spare room early and crowd some SMs (3 CTAs on one, measured slower).
  const size_t smem = static_cast<size_t>(
      std::max<int64_t>(SmemBytes<BITS>(m_chunk, tiles_per_cta(per_sm), k),
                        std::min<int64_t>(dev.smem_optin, dev.smem_per_sm / (per_sm + 1) - 1024 + 128)));
  k.lut_off = static_cast<int>(SmemBytes<BITS>(m_chunk, 0, k));
  const bool general = p.K % layout::kUnitCodes != 0;
  const auto kernel = general ? (p.has_sparse ? &DecodeTcKernel<BITS, true, true> : &DecodeTcKernel<BITS, true, false>)
                              : (p.has_sparse ? &DecodeTcKernel<BITS, false, true> : &DecodeTcKernel<BITS, false, false>);
  {
    static std::mutex mutex;
    static bool configured[64] = {};
    std::lock_guard<std::mutex> lock(mutex);
    if (dev.device < 0 || dev.device >= 64) return "SqueezeMatMul (CUDA): device ordinal out of range";
    if (!configured[dev.device]) {  // both kernels may use all the shared memory a block can have
      for (auto* f : {&DecodeTcKernel<BITS, true, true>, &DecodeTcKernel<BITS, true, false>,
                      &DecodeTcKernel<BITS, false, true>, &DecodeTcKernel<BITS, false, false>})
        if (const cudaError_t e =
                cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dev.smem_optin));
            e != cudaSuccess)
          return CudaMessage(e, "configuring the tensor-core decode kernel");
      configured[dev.device] = true;
    }
  }
  k.q = d.qweight;
  k.lut = static_cast<const __half*>(d.lut);
  k.indptr = p.has_sparse ? d.indptr : nullptr;
  k.indices = d.indices;
  k.values = static_cast<const __half*>(d.values);
  k.bias = p.has_bias ? static_cast<const __half*>(d.bias) : nullptr;
  k.K = static_cast<int>(p.K);
  k.N = static_cast<int>(p.N);
  k.weights_const = weights_const ? 1 : 0;
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

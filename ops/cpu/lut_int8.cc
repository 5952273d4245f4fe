// The int8 path of the CPU LUT matmul: bits 3 and 4, any M (8 rows of A at a time), x86-64 with
// AVX-512 VBMI + VNNI.
//
// Why: the exact path spends a gather per code; here a code costs a fraction of one instruction.
// Per row of W, the LUT is quantized to unsigned 8 bits (lut ~= lo + sw * q, q in [0, 255]: once
// per session when the LUT is constant); per row of A and unit of 256 k, A is quantized to int8
// plus an int8 residual,
//     a ~= sa * (qa + qr / 127)        (|a / sa - qa| <= 1/2, so qr lies in [-64, 64]),
// because int8 alone costs ~1% relative error on Gaussian activations and ~3% with outlier
// channels, the residual brings that under 3e-4, and the u8 LUT's ~3e-3 is what remains. Then
//     sum_k lut[c_k] a_k ~= sw * sum_units sa * (sum_k q[c_k] qa_k + sum_k q[c_k] qr_k / 127)
//                           + lo * sum_units sa * sum_k (qa_k + qr_k / 127)
// where the inner sums are exact int32 VNNI dot products (vpdpbusd: u8 x s8, 4 products per lane)
// and the last term is one number per row of A (Int8Plan::base). Decoding, from the tiled layout
// (sqllm/layout.h):
//  - a full unit: 4 bits, per row: the row's 256 codes are the 2 quads of its four lanes, two
//    64-byte loads; nibbles by and/shift; vpshufb against the 16-entry u8 LUT.
//    3 bits (code layout 2): plane v of the four lanes of rows g, g + 8 is one 64-byte load Xv; the
//    low 3 bits of the nibbles of X0, X1, X2 are the codes of (row, p) = (g, 0), (g + 8, 0), (g, 1),
//    their top bits those of (g + 8, 1) (bit b in Xb). vpermb of each byte (low nibble) and of its
//    16-bit shift right by 4 (high nibble) against the 8-entry LUT repeated 8 times: vpermb reads
//    index bits 0..5, and the junk in bits 3..5 selects the same entry, so no and. For (g + 8, 1),
//    three shifts and two vpternlogd first gather bit 3 of X0, X1, X2 to bits 0, 1, 2 (bit 7 to
//    4, 5, 6) of one vector. Rows 0..7 read X0 and X2; rows 8..15 X1, and X0 and X2 again (TileDot).
//  - the partial last unit (K % 256 != 0), per tile: see PartialProgram (4 bits), PartialDot3.
// The codes then come in a fixed order that depends only on k, so A is permuted into the same
// order once per call (Int8Plan::a). The sparse part and bias stay exact (lut_matmul.cc).
// Accuracy contract: docs/op-spec.md ("CPU int8 path").
#include "lut_int8.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "sqllm/half.h"
#include "sqllm/layout.h"

#if defined(__x86_64__) || defined(_M_X64)
// GCC 12's AVX-512 headers trip -Wuninitialized inside their own intrinsics (_mm512_undefined_*).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define SQLLM_INT8_X86 1
#define SQLLM_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,avx512vnni")))
#endif

namespace sqllm::cpu {
namespace {

constexpr int kUnit = layout::kUnitCodes;

// k within a unit of lane t's c-th code of its row (stream order i, s, j; layout.h).
int LaneK(int t, int c) {
  const int i = c >> 4, s = (c >> 2) & 3, j = c & 3;
  return 64 * i + 32 * (s >> 1) + 8 * t + 4 * (s & 1) + j;
}

// Byte position P (0..63) of decoded vector v (0..3) of a row's unit -> k within the unit.
struct Order {
  uint8_t k[4][64];
};

Order MakeOrder(int bits) {
  Order o{};
  for (int v = 0; v < 4; ++v)
    for (int P = 0; P < 64; ++P) {
      if (bits == 4) {  // v = (chunk v >> 1, nibble v & 1); P = 16 t + byte y
        const int t = P >> 4, y = P & 15;
        o.k[v][P] = static_cast<uint8_t>(LaneK(t, 32 * (v >> 1) + 2 * y + (v & 1)));
      } else {  // v = 2 p + nibble half; P = 16 t + 4 i + byte y of plane word i (nibble 2 y + (v & 1))
        const int t = P >> 4, i = (P >> 2) & 3, y = P & 3;
        o.k[v][P] = static_cast<uint8_t>(LaneK(t, 16 * i + 8 * (v >> 1) + 2 * y + (v & 1)));
      }
    }
  return o;
}

const Order& OrderFor(int bits) {
  static const Order o3 = MakeOrder(3), o4 = MakeOrder(4);
  return bits == 3 ? o3 : o4;
}

// The partial last unit of ng = 1..3 groups (layout.h): per lane ng * bits lane-local words at word
// w * 32 + lane, so the 32 lanes' word w are 128 bytes, two vectors: z = 0 (lanes 0..15) and z = 1
// (lanes 16..31), whose 128-bit lane gg holds the four lanes t of row g = 4 z + gg (and 8 + g).
// 4 bits: per lane, row half h holds 16 ng consecutive stream codes; they are decoded 8 at a time (a
// step): unpacklo/hi_epi32 of words w and w + 1 makes, per lane t = 0, 1 (lo) or 2, 3 (hi), a qword
// that holds the 8 codes, vpmultishiftqb takes them to bytes, an and drops the neighbours' bits and
// vpshufb against the four rows' LUTs (one per 128-bit lane) gives u8 values. 3 bits: PartialDot3.
// A step's A is the same 16 bytes for every 128-bit lane, broadcast.
struct PartialStep {
  int w, hi, h;
  uint64_t ctrl;  // vpmultishiftqb: bit offsets of the step's 8 codes in the qword of words (w, w + 1)
  int k[16];      // k within the unit of byte P of a 128-bit lane (P / 8: lane t = 2 hi + P / 8)
};

struct PartialProgram {
  int words = 0;
  std::vector<PartialStep> steps;
};

PartialProgram MakeProgram(int ng) {  // 4 bits
  PartialProgram prog;
  prog.words = ng * 4;
  const int seg = 16 * ng;  // codes per lane and row half
  for (int h = 0; h < 2; ++h)
    for (int c0 = 0; c0 < seg; c0 += 8) {
      const int w = (h * seg + c0) * 4 / 32;  // the word holding the first code's first bit
      uint64_t ctrl = 0;
      for (int j = 0; j < 8; ++j) ctrl |= static_cast<uint64_t>((h * seg + c0 + j) * 4 - 32 * w) << (8 * j);
      for (int hi = 0; hi < 2; ++hi) {
        PartialStep st{w, hi, h, ctrl, {}};
        for (int P = 0; P < 16; ++P) st.k[P] = LaneK(2 * hi + P / 8, c0 + P % 8);
        prog.steps.push_back(st);
      }
    }
  return prog;
}

const PartialProgram& ProgramFor(int ng) {
  static const PartialProgram p[3] = {MakeProgram(1), MakeProgram(2), MakeProgram(3)};
  return p[ng - 1];
}

// Steps of the partial unit; 3 bits: step 4 i + v is vector v of group i in the full unit's order
// (Order), byte P = 4 t + y of each 128-bit lane, for both row halves.
int PartialSteps(int bits, int ng) {
  return bits == 3 ? 4 * ng : static_cast<int>(ProgramFor(ng).steps.size());
}

int PartialK(int bits, int ng, int s, int P) {  // k within the partial unit of byte P of step s
  if (bits == 4) return ProgramFor(ng).steps[s].k[P];
  return LaneK(P >> 2, 16 * (s >> 2) + 8 * ((s >> 1) & 1) + 2 * (P & 3) + (s & 1));
}

int64_t PartialBytes(const Problem& p) {  // bytes of A per row for the partial unit (qa and qr per step)
  const int ng = layout::PartialGroups(p.K);
  return ng ? 32 * static_cast<int64_t>(PartialSteps(p.bits, ng)) : 0;
}

#ifdef SQLLM_INT8_X86
#define SQLLM_VNNI_INLINE SQLLM_VNNI inline __attribute__((always_inline))

// 3 bits: the codes of row half h = 1, p = 1 (bit b of each in bit 3 or 7 of plane b's nibbles) as
// bits 0..2 and 4..6 of each byte (bits 3 and 7 are junk): (x0 >> 3) at m11, (x2 >> 1) at m44, else
// (x1 >> 2). Immediate 0xD8 is c ? b : a, so that a temporary, not a mask, is overwritten.
SQLLM_VNNI_INLINE __m512i Spread3(__m512i x0, __m512i x1, __m512i x2, __m512i m11, __m512i m44) {
  const __m512i t = _mm512_ternarylogic_epi32(_mm512_srli_epi16(x1, 2), _mm512_srli_epi16(x0, 3), m11, 0xD8);
  return _mm512_ternarylogic_epi32(t, _mm512_srli_epi16(x2, 1), m44, 0xD8);
}

// acc[m] += sa[m] * (w . qa[m]) + sr[m] * (w . qr[m]) for one row's 4 vectors w of a unit.
template <int M>
SQLLM_VNNI_INLINE void RowDot(const __m512i (&w)[4], const __m512i (*qa)[4], const __m512i (*qr)[4],
                              const __m512* sa, const __m512* sr, __m512* acc) {
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], qa[m][0]);
    __m512i res = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], qr[m][0]);
#pragma GCC unroll 3
    for (int v = 1; v < 4; ++v) {
      dot = _mm512_dpbusd_epi32(dot, w[v], qa[m][v]);
      res = _mm512_dpbusd_epi32(res, w[v], qr[m][v]);
    }
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sa[m], acc[m]);
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(res), sr[m], acc[m]);
  }
}

// 3 bits: w = Order's vectors 0..3, the u8 values of the codes in the nibbles of c0 (p = 0) and c1
// (p = 1); `table` repeats the 8 entries, so the junk in index bits 3..5 is harmless.
SQLLM_VNNI_INLINE void Lookup3(__m512i c0, __m512i c1, __m512i table, __m512i (&w)[4]) {
  w[0] = _mm512_permutexvar_epi8(c0, table);
  w[1] = _mm512_permutexvar_epi8(_mm512_srli_epi16(c0, 4), table);
  w[2] = _mm512_permutexvar_epi8(c1, table);
  w[3] = _mm512_permutexvar_epi8(_mm512_srli_epi16(c1, 4), table);
}

// The full units of a tile, unit by unit (so that each unit's 512 * BITS bytes stream in order,
// prefetched two units ahead): per row and unit, decode the row's 256 codes into 4 vectors of u8
// LUT values, then per row m of A two dot products per vector (qa and qr) and two FMAs into
// acc[r][m] (fp32, 16 lanes). ROWS = 16 (a full tile: the row loop is unrolled, so addresses are
// constants) or 0 (`rows` at run time, the last tile). sums[r][m] =.
template <int BITS, int M, int ROWS>
SQLLM_VNNI void TileDot(const uint8_t* tile, int rows, const uint8_t (*qlut)[16], const Int8Plan& plan, int m0,
                        float (*sums)[8]) {
  if constexpr (ROWS) rows = ROWS;
  const int64_t units = plan.full_units;
  __m512i table[16];
  for (int r = 0; r < rows; ++r) {
    if constexpr (BITS == 4) {
      table[r] = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qlut[r])));
    } else {
      uint64_t q8;
      std::memcpy(&q8, qlut[r], 8);
      table[r] = _mm512_set1_epi64(static_cast<long long>(q8));
    }
  }
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i m11 = _mm512_set1_epi8(0x11), m44 = _mm512_set1_epi8(0x44);
  __m512 acc[16][M];
  for (int r = 0; r < rows; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  constexpr int64_t kUnitBytes = 512 * BITS;
  for (int64_t u = 0; u < units; ++u) {
    const uint8_t* unit = tile + u * kUnitBytes;
    for (int64_t off = 0; off < kUnitBytes; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(unit + 2 * kUnitBytes + off), _MM_HINT_T0);
    // this unit's A, shared by the 16 rows: qa then qr, 4 vectors each, per row m of A
    __m512i qa[M][4], qr[M][4];
    __m512 sa[M], sr[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const int8_t* am = plan.a.data() + (m0 + m) * plan.row_bytes + u * 2 * kUnit;
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        qa[m][v] = _mm512_loadu_si512(am + 64 * v);
        qr[m][v] = _mm512_loadu_si512(am + kUnit + 64 * v);
      }
      sa[m] = _mm512_set1_ps(plan.scale[(m0 + m) * plan.units + u]);
      sr[m] = _mm512_set1_ps(plan.scale[(m0 + m) * plan.units + u] / 127.f);
    }
    __m512i w[4];
    if constexpr (BITS == 4) {
#pragma GCC unroll 16
      for (int r = 0; r < (ROWS ? ROWS : rows); ++r) {
        const uint8_t* base = unit + (r >> 3) * 1024 + 64 * (r & 7);  // the row's first quad
        const __m512i c0 = _mm512_loadu_si512(base), c1 = _mm512_loadu_si512(base + 512);
        w[0] = _mm512_shuffle_epi8(table[r], _mm512_and_si512(c0, nibble));
        w[1] = _mm512_shuffle_epi8(table[r], _mm512_and_si512(_mm512_srli_epi16(c0, 4), nibble));
        w[2] = _mm512_shuffle_epi8(table[r], _mm512_and_si512(c1, nibble));
        w[3] = _mm512_shuffle_epi8(table[r], _mm512_and_si512(_mm512_srli_epi16(c1, 4), nibble));
        RowDot<M>(w, qa, qr, sa, sr, acc[r]);
      }
    } else {
      // Rows g < 8 (planes 0 and 2 of lanes 4g .. 4g + 3) in one loop, then rows g + 8 (plane 1, and
      // planes 0 and 2 again from L1): measured from DRAM on Zen 4, ~15% faster than one loop over row
      // pairs (both rows from one set of loads) or over rows.
      const int low = ROWS ? 8 : std::min(rows, 8), high = ROWS ? 8 : rows - 8;
#pragma GCC unroll 8
      for (int g = 0; g < low; ++g) {
        Lookup3(_mm512_loadu_si512(unit + 64 * g), _mm512_loadu_si512(unit + 1024 + 64 * g), table[g], w);
        RowDot<M>(w, qa, qr, sa, sr, acc[g]);
      }
#pragma GCC unroll 8
      for (int g = 0; g < high; ++g) {
        const uint8_t* base = unit + 64 * g;
        const __m512i x0 = _mm512_loadu_si512(base), x1 = _mm512_loadu_si512(base + 512),
                      x2 = _mm512_loadu_si512(base + 1024);
        Lookup3(x1, Spread3(x0, x1, x2, m11, m44), table[g + 8], w);
        RowDot<M>(w, qa, qr, sa, sr, acc[g + 8]);
      }
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int m = 0; m < M; ++m) sums[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}

// The partial unit's dot products of lane half z: sums[8 h + 4 z + gg][m] += 128-bit lane gg of
// sa * (dot[h][m] + res[h][m] / 127).
template <int M>
SQLLM_VNNI_INLINE void PartialSums(const __m512i (*dot)[M], const __m512i (*res)[M], const float* sa, int z,
                                   float (*sums)[8]) {
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < M; ++m) {
      alignas(64) float f[16];
      _mm512_store_ps(f, _mm512_fmadd_ps(_mm512_cvtepi32_ps(res[h][m]), _mm512_set1_ps(sa[m] / 127.f),
                                         _mm512_mul_ps(_mm512_cvtepi32_ps(dot[h][m]), _mm512_set1_ps(sa[m]))));
      for (int gg = 0; gg < 4; ++gg)
        sums[8 * h + 4 * z + gg][m] += (f[4 * gg] + f[4 * gg + 1]) + (f[4 * gg + 2] + f[4 * gg + 3]);
    }
}

// The partial last unit of a tile, 4 bits (PartialProgram): sums[r][m] +=.
template <int M>
SQLLM_VNNI void PartialDot(const uint8_t* unit, const PartialProgram& prog, const uint8_t (*qlut)[16],
                           const Int8Plan& plan, int m0, float (*sums)[8]) {
  const __m512i keep = _mm512_set1_epi8(0x0F);
  const int64_t a_off = plan.full_units * 2 * kUnit;
  float sa[M];
  for (int m = 0; m < M; ++m) sa[m] = plan.scale[(m0 + m) * plan.units + plan.full_units];
  for (int z = 0; z < 2; ++z) {
    __m512i word[4 * 3 + 1];
    for (int w = 0; w < prog.words; ++w) word[w] = _mm512_loadu_si512(unit + (w * 32 + 16 * z) * 4);
    word[prog.words] = _mm512_setzero_si512();
    // 128-bit lane gg of table[h]: the LUT of row 8 h + 4 z + gg (qlut rows are 16 bytes each)
    const __m512i table[2] = {_mm512_loadu_si512(qlut[4 * z]), _mm512_loadu_si512(qlut[8 + 4 * z])};
    __m512i dot[2][M], res[2][M];
    for (int h = 0; h < 2; ++h)
      for (int m = 0; m < M; ++m) dot[h][m] = res[h][m] = _mm512_setzero_si512();
    for (size_t s = 0; s < prog.steps.size(); ++s) {
      const PartialStep& st = prog.steps[s];
      const __m512i x = st.hi ? _mm512_unpackhi_epi32(word[st.w], word[st.w + 1])
                              : _mm512_unpacklo_epi32(word[st.w], word[st.w + 1]);
      const __m512i codes = _mm512_and_si512(
          _mm512_multishift_epi64_epi8(_mm512_set1_epi64(static_cast<long long>(st.ctrl)), x), keep);
      const __m512i v = _mm512_shuffle_epi8(table[st.h], codes);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const int8_t* am = plan.a.data() + (m0 + m) * plan.row_bytes + a_off + 32 * s;
        const __m512i qa = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(am)));
        const __m512i qr = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(am + 16)));
        dot[st.h][m] = _mm512_dpbusd_epi32(dot[st.h][m], v, qa);
        res[st.h][m] = _mm512_dpbusd_epi32(res[st.h][m], v, qr);
      }
    }
    PartialSums<M>(dot, res, sa, z, sums);
  }
}

// The partial last unit of a tile, 3 bits: per half z of the lanes and group i, the plane words
// x0, x1, x2 (word v * ng + i) and their spread top bits are the codes of (h, p) = (0, 0), (1, 0),
// (0, 1), (1, 1), in nibbles; and/shift to 3-bit indices, vpshufb against the four rows' LUTs (one
// per 128-bit lane). Step 4 i + v (PartialK) is shared by both row halves. sums[r][m] +=.
template <int M>
SQLLM_VNNI void PartialDot3(const uint8_t* unit, int ng, const uint8_t (*qlut)[16], const Int8Plan& plan, int m0,
                            float (*sums)[8]) {
  const __m512i keep = _mm512_set1_epi8(0x07);
  const __m512i m11 = _mm512_set1_epi8(0x11), m44 = _mm512_set1_epi8(0x44);
  const int64_t a_off = plan.full_units * 2 * kUnit;
  float sa[M];
  for (int m = 0; m < M; ++m) sa[m] = plan.scale[(m0 + m) * plan.units + plan.full_units];
  for (int z = 0; z < 2; ++z) {
    const uint8_t* half = unit + 64 * z;  // word w of lanes 16 z .. 16 z + 15 at half + 128 w
    // 128-bit lane gg of table[h]: the LUT of row 8 h + 4 z + gg (qlut rows are 16 bytes each)
    const __m512i table[2] = {_mm512_loadu_si512(qlut[4 * z]), _mm512_loadu_si512(qlut[8 + 4 * z])};
    __m512i dot[2][M], res[2][M];
    for (int h = 0; h < 2; ++h)
      for (int m = 0; m < M; ++m) dot[h][m] = res[h][m] = _mm512_setzero_si512();
    for (int i = 0; i < ng; ++i) {
      const __m512i x0 = _mm512_loadu_si512(half + 128 * i), x1 = _mm512_loadu_si512(half + 128 * (ng + i)),
                    x2 = _mm512_loadu_si512(half + 128 * (2 * ng + i));
      const __m512i src[2][2] = {{x0, x2}, {x1, Spread3(x0, x1, x2, m11, m44)}};  // [h][p]
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        __m512i val[2];
        for (int h = 0; h < 2; ++h) {
          const __m512i c = v & 1 ? _mm512_srli_epi16(src[h][v >> 1], 4) : src[h][v >> 1];
          val[h] = _mm512_shuffle_epi8(table[h], _mm512_and_si512(c, keep));
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const int8_t* am = plan.a.data() + (m0 + m) * plan.row_bytes + a_off + 32 * (4 * i + v);
          const __m512i qa = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(am)));
          const __m512i qr = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(am + 16)));
          for (int h = 0; h < 2; ++h) {
            dot[h][m] = _mm512_dpbusd_epi32(dot[h][m], val[h], qa);
            res[h][m] = _mm512_dpbusd_epi32(res[h][m], val[h], qr);
          }
        }
      }
    }
    PartialSums<M>(dot, res, sa, z, sums);
  }
}

// Rows m0 .. m0 + M - 1 of A (M <= 8): sums[r][m] = the dense part of tile row r.
template <int BITS, int M>
void TileSums(const uint8_t* tile, int rows, const uint8_t (*qlut)[16], const Int8Plan& plan, int ng, int m0,
              float (*sums)[8]) {
  if (plan.full_units && rows == 16)
    TileDot<BITS, M, 16>(tile, rows, qlut, plan, m0, sums);
  else if (plan.full_units)
    TileDot<BITS, M, 0>(tile, rows, qlut, plan, m0, sums);
  else
    std::memset(sums, 0, 16 * sizeof(*sums));
  if (!ng) return;
  const uint8_t* unit = tile + plan.full_units * 512 * BITS;
  if constexpr (BITS == 3)
    PartialDot3<M>(unit, ng, qlut, plan, m0, sums);
  else
    PartialDot<M>(unit, ProgramFor(ng), qlut, plan, m0, sums);
}

template <int BITS>
void TileSumsM(int M, const uint8_t* tile, int rows, const uint8_t (*qlut)[16], const Int8Plan& plan, int ng, int m0,
               float (*sums)[8]) {
  switch (M) {
    case 1: return TileSums<BITS, 1>(tile, rows, qlut, plan, ng, m0, sums);
    case 2: return TileSums<BITS, 2>(tile, rows, qlut, plan, ng, m0, sums);
    case 3: return TileSums<BITS, 3>(tile, rows, qlut, plan, ng, m0, sums);
    case 4: return TileSums<BITS, 4>(tile, rows, qlut, plan, ng, m0, sums);
    case 5: return TileSums<BITS, 5>(tile, rows, qlut, plan, ng, m0, sums);
    case 6: return TileSums<BITS, 6>(tile, rows, qlut, plan, ng, m0, sums);
    case 7: return TileSums<BITS, 7>(tile, rows, qlut, plan, ng, m0, sums);
    default: return TileSums<BITS, 8>(tile, rows, qlut, plan, ng, m0, sums);
  }
}

// LUT rows [n0, n0 + rows) to u8 over their range; false when one holds Inf or NaN.
SQLLM_VNNI bool QuantizeLutRows(const void* lut, bool half, int bits, int64_t n0, int64_t rows, uint8_t (*q)[16],
                                float* lo, float* step) {
  const int entries = 1 << bits;
  const __mmask16 mask = static_cast<__mmask16>((1u << entries) - 1u);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = (n0 + r) * entries;
    const __m512 v = half ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(lut) + i))
                          : _mm512_maskz_loadu_ps(mask, static_cast<const float*>(lut) + i);
    if (_mm512_mask_fpclass_ps_mask(mask, v, 0x99)) return false;  // QNaN, SNaN, +Inf, -Inf
    const float l = _mm512_mask_reduce_min_ps(mask, v), hi = _mm512_mask_reduce_max_ps(mask, v);
    const float inv = hi > l ? 255.f / (hi - l) : 0.f;
    __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(v, _mm512_set1_ps(l)), _mm512_set1_ps(inv)));
    qi = _mm512_maskz_min_epi32(mask, _mm512_max_epi32(qi, _mm512_setzero_si512()), _mm512_set1_epi32(255));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q[r]), _mm512_cvtepi32_epi8(qi));
    lo[r] = l;
    step[r] = (hi - l) / 255.f;
  }
  return true;
}

// One unit of A (n <= 256 values; the rest of the unit is 0): qa, qr [256] and the unit's scale and
// sum(qa + qr / 127); false when a value is Inf or NaN.
SQLLM_VNNI bool QuantizeUnitA(const float* x, int64_t n, int8_t* qa, int8_t* qr, float* scale, double* sum) {
  const auto mask = [n](int64_t i) {
    return static_cast<__mmask16>(n - i >= 16 ? 0xFFFF : n > i ? (1u << (n - i)) - 1u : 0u);
  };
  __m512 amax = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(mask(i), x + i);
    if (_mm512_fpclass_ps_mask(v, 0x99)) return false;
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
  }
  const float am = _mm512_reduce_max_ps(amax);
  const __m512 inv = _mm512_set1_ps(am > 0.f ? 127.f / am : 0.f), lim = _mm512_set1_ps(127.f);
  __m512i s = _mm512_setzero_si512(), rs = _mm512_setzero_si512();
  for (int64_t i = 0; i < kUnit; i += 16) {
    const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask(i), x + i), inv),
                                                 _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
    const __m512 va = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i a8 = _mm512_cvtps_epi32(va), r8 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(v, va), lim));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qa + i), _mm512_cvtsepi32_epi8(a8));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + i), _mm512_cvtsepi32_epi8(r8));
    s = _mm512_add_epi32(s, a8);
    rs = _mm512_add_epi32(rs, r8);
  }
  *scale = am / 127.f;
  *sum = _mm512_reduce_add_epi32(s) + _mm512_reduce_add_epi32(rs) / 127.0;
  return true;
}

// dst[64 v + P] = src[order.k[v][P]] for the 4 vectors of a full unit.
SQLLM_VNNI void PermuteUnit(const int8_t* src, const Order& order, int8_t* dst) {
  const __m512i q0 = _mm512_loadu_si512(src), q1 = _mm512_loadu_si512(src + 64);
  const __m512i q2 = _mm512_loadu_si512(src + 128), q3 = _mm512_loadu_si512(src + 192);
  for (int v = 0; v < 4; ++v) {
    const __m512i idx = _mm512_loadu_si512(order.k[v]);
    const __m512i lo = _mm512_permutex2var_epi8(q0, idx, q1), hi = _mm512_permutex2var_epi8(q2, idx, q3);
    _mm512_storeu_si512(dst + 64 * v, _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hi));
  }
}
#endif

}  // namespace

bool HasInt8Kernel() {
#ifdef SQLLM_INT8_X86
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

bool Int8Applies(const Problem& p, KernelChoice choice) {
  if (choice == KernelChoice::kExact || !HasInt8Kernel() || (p.bits != 3 && p.bits != 4)) return false;
  // Every M, 8 rows of A at a time: at M = 128 (4096x4096, 2 Zen 4 cores) 23 ms against the exact
  // path's 61 ms, which decodes each tile once but multiplies in fp32 (2026-12-04).
  return true;
}

void QuantizeAllLuts(const void* lut, bool half, int bits, int64_t N, Int8Luts* out) {
#ifdef SQLLM_INT8_X86
  const int64_t tiles = layout::Tiles(N);
  out->q.assign(static_cast<size_t>(16 * tiles * 16), 0);
  out->lo.assign(static_cast<size_t>(16 * tiles), 0.f);
  out->step.assign(static_cast<size_t>(16 * tiles), 0.f);
  out->tile_ok.assign(static_cast<size_t>(tiles), 1);
  auto* q = reinterpret_cast<uint8_t(*)[16]>(out->q.data());
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t rows = std::min<int64_t>(16, N - 16 * t);
    out->tile_ok[t] = QuantizeLutRows(lut, half, bits, 16 * t, rows, q + 16 * t, &out->lo[16 * t], &out->step[16 * t]);
  }
#else
  (void)lut, (void)half, (void)bits, (void)N, (void)out;
#endif
}

bool PrepareInt8(const Problem& p, const float* a, Int8Plan* plan) {
#ifdef SQLLM_INT8_X86
  const Order& order = OrderFor(p.bits);
  const int ng = layout::PartialGroups(p.K);
  plan->full_units = layout::FullUnits(p.K);
  plan->units = plan->full_units + (ng ? 1 : 0);
  plan->row_bytes = plan->full_units * 2 * kUnit + PartialBytes(p);
  plan->a.assign(static_cast<size_t>(p.M * plan->row_bytes), 0);
  plan->scale.assign(static_cast<size_t>(p.M * plan->units), 0.f);
  plan->base.assign(static_cast<size_t>(p.M), 0.f);
  alignas(64) int8_t qa[kUnit], qr[kUnit];
  for (int64_t m = 0; m < p.M; ++m) {
    const float* row = a + m * p.K;
    int8_t* dst = plan->a.data() + m * plan->row_bytes;
    double base = 0;
    for (int64_t u = 0; u < plan->units; ++u) {
      double sum = 0;
      float& scale = plan->scale[m * plan->units + u];
      const int64_t k0 = u * kUnit;
      if (!QuantizeUnitA(row + k0, std::min<int64_t>(kUnit, p.K - k0), qa, qr, &scale, &sum)) return false;
      base += static_cast<double>(scale) * sum;
      if (u < plan->full_units) {
        PermuteUnit(qa, order, dst + u * 2 * kUnit);
        PermuteUnit(qr, order, dst + u * 2 * kUnit + kUnit);
      } else {  // the partial unit: 16 bytes of qa, then of qr, per step
        int8_t* part = dst + plan->full_units * 2 * kUnit;
        for (int s = 0; s < PartialSteps(p.bits, ng); ++s)
          for (int P = 0; P < 16; ++P) {
            const int k = PartialK(p.bits, ng, s, P);
            part[32 * s + P] = qa[k];
            part[32 * s + 16 + P] = qr[k];
          }
      }
    }
    plan->base[m] = static_cast<float>(base);
  }
  return true;
#else
  (void)p, (void)a, (void)plan;
  return false;
#endif
}

bool Int8Tile(const Problem& p, const Args& args, const Int8Plan& plan, int64_t tile, int64_t rows, float* acc) {
#ifdef SQLLM_INT8_X86
  alignas(64) uint8_t local_q[16][16];
  float local_lo[16], local_step[16];
  const uint8_t (*qlut)[16] = local_q;
  const float *lo = local_lo, *sw = local_step;
  if (const Int8Luts* luts = args.int8_luts) {
    if (!luts->tile_ok[tile]) return false;
    qlut = reinterpret_cast<const uint8_t(*)[16]>(luts->q.data()) + 16 * tile;
    lo = &luts->lo[16 * tile];
    sw = &luts->step[16 * tile];
  } else {
    if (!QuantizeLutRows(args.lut, args.half, p.bits, 16 * tile, rows, local_q, local_lo, local_step)) return false;
    std::memset(local_q[rows], 0, static_cast<size_t>(16 - rows) * 16);  // padding rows (read, never used)
  }
  const int ng = layout::PartialGroups(p.K);
  float sums[16][8];
  const auto* q = reinterpret_cast<const uint8_t*>(args.qweight + tile * p.words);
  for (int64_t m0 = 0; m0 < p.M; m0 += 8) {  // 8 rows of A at a time
    const int mc = static_cast<int>(std::min<int64_t>(8, p.M - m0));
    if (p.bits == 3)
      TileSumsM<3>(mc, q, static_cast<int>(rows), qlut, plan, ng, static_cast<int>(m0), sums);
    else
      TileSumsM<4>(mc, q, static_cast<int>(rows), qlut, plan, ng, static_cast<int>(m0), sums);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t m = 0; m < mc; ++m) acc[(m0 + m) * rows + r] = sw[r] * sums[r][m] + lo[r] * plan.base[m0 + m];
  }
  return true;
#else
  (void)p, (void)args, (void)plan, (void)tile, (void)rows, (void)acc;
  return false;
#endif
}

}  // namespace sqllm::cpu

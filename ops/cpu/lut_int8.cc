// The int8 path of the CPU LUT matmul: bits 3 and 4, M <= 8, x86-64 with AVX-512 VBMI + VNNI.
//
// Why: the exact path spends a gather per code; here a code costs a fraction of one instruction.
// Per row of W, the LUT is quantized to unsigned 8 bits (lut ~= lo + sw * q, q in [0, 255]); per
// row of A and unit of 256 k, A is quantized to int8 plus an int8 residual,
//     a ~= sa * (qa + qr / 127)        (|a / sa - qa| <= 1/2, so qr lies in [-64, 64]),
// because int8 alone costs ~1% relative error on Gaussian activations and ~3% with outlier
// channels, the residual brings that under 3e-4, and the u8 LUT's ~3e-3 is what remains. Then
//     sum_k lut[c_k] a_k ~= sw * sum_units sa * (sum_k q[c_k] qa_k + sum_k q[c_k] qr_k / 127)
//                           + lo * sum_units sa * sum_k (qa_k + qr_k / 127)
// where the inner sums are exact int32 VNNI dot products (vpdpbusd: u8 x s8, 4 products per lane)
// and the last term is one number per row of A (Int8Plan::base). Decoding, per row and unit, from
// the tiled layout (sqllm/layout.h), where a row's 256 codes of a full unit are 2 * bits 16-byte
// vectors of its four lanes:
//   4 bits: two 64-byte loads; nibbles by and/shift; vpshufb against the 16-entry u8 LUT.
//   3 bits: two 64-byte loads; vpermi2b puts each run of 16 codes (6 bytes) into a qword (two
//           permutes per row and unit); two vpmultishiftqb per permute spread codes 0-7 and 8-15
//           of each run to bytes (junk above bit 2); vpermb against the 8-entry LUT repeated 8
//           times (so the junk bits select the same entry).
// The codes then come in a fixed order that depends only on k, so A is permuted into the same
// order once per call (Int8Plan::a). The sparse part and bias stay exact (lut_matmul.cc), as does
// the partial last unit of a tile (K % 256 != 0 with fewer than 4 groups). Accuracy contract:
// docs/op-spec.md ("CPU int8 path").
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
#define SQLLM_VNNI __attribute__((target("avx512f,avx512bw,avx512vbmi,avx512vnni")))
#endif

namespace sqllm::cpu {
namespace {

constexpr int kUnit = layout::kUnitCodes;

// Byte position P (0..63) of decoded vector v (0..3) of a row's unit -> k within the unit.
struct Order {
  uint8_t k[4][64];
  uint8_t gather3[2][2][64];  // 3 bits, row half h, permute G: vpermi2b indices into [A | B]
};

Order MakeOrder(int bits) {
  Order o{};
  const auto k_of = [](int t, int c) {  // lane t's c-th code of its row (stream order i, s, j)
    const int i = c >> 4, s = (c >> 2) & 3, j = c & 3;
    return 64 * i + 32 * (s >> 1) + 8 * t + 4 * (s & 1) + j;
  };
  for (int v = 0; v < 4; ++v)
    for (int P = 0; P < 64; ++P) {
      if (bits == 4) {  // v = (chunk v >> 1, nibble v & 1); P = 16 t + byte y
        const int t = P >> 4, y = P & 15;
        o.k[v][P] = static_cast<uint8_t>(k_of(t, 32 * (v >> 1) + 2 * y + (v & 1)));
      } else {  // v = 2 G + S; P = 8 z + f: qword z of permute G holds lane 2G + z / 4's run z % 4 of
                // 16 codes, and multishift S takes codes 8 S .. 8 S + 7 of it
        const int z = P >> 3, f = P & 7, G = v >> 1, S = v & 1;
        o.k[v][P] = static_cast<uint8_t>(k_of(2 * G + (z >> 2), 16 * (z & 3) + 8 * S + f));
      }
    }
  if (bits == 3)
    for (int h = 0; h < 2; ++h)
      for (int G = 0; G < 2; ++G)
        for (int P = 0; P < 64; ++P) {
          // qword z of permute G holds stream bytes 6 (z % 4) .. + 6 of lane t = 2G + z / 4 (row half
          // h); byte b of the lane's 24 row-h bytes is lane-local word 6h + b / 4 = quad (6h + b / 4) / 4.
          const int z = P >> 3, y = P & 7;
          const int t = 2 * G + (z >> 2), b = 6 * (z & 3) + y;
          if (y > 6 || b >= 24) continue;  // not read by the multishifts
          const int word = 6 * h + b / 4;
          const int quad = word / 4 - h;     // 0: A (quad h), 1: B (quad h + 1)
          const int pos = 16 * t + 4 * (word % 4) + b % 4;
          o.gather3[h][G][P] = static_cast<uint8_t>(64 * quad + pos);
        }
  return o;
}

const Order& OrderFor(int bits) {
  static const Order o3 = MakeOrder(3), o4 = MakeOrder(4);
  return bits == 3 ? o3 : o4;
}

inline float LutAt(const Args& args, int64_t i) {
  return args.half ? HalfToFloat(static_cast<const uint16_t*>(args.lut)[i]) : static_cast<const float*>(args.lut)[i];
}

#ifdef SQLLM_INT8_X86
// A tile's rows, unit by unit (so that each unit's 512 * BITS bytes stream in order): per row and
// full unit, decode its 256 codes into 4 vectors of u8 LUT values, then for each row m of A two
// dot products per vector (qa and qr) and two FMAs into acc[r][m] (fp32, 16 lanes).
template <int BITS, int M>
SQLLM_VNNI void TileDot(const uint8_t* tile, int rows, int64_t units, const uint8_t (*qlut)[16], const Int8Plan& plan,
                        int m0, float (*sums)[8]) {
  const Order& order = OrderFor(BITS);
  __m512i table[16], gather[2][2];
  for (int r = 0; r < rows; ++r) {
    if constexpr (BITS == 4) {
      table[r] = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qlut[r])));
    } else {
      uint64_t q8;
      std::memcpy(&q8, qlut[r], 8);
      table[r] = _mm512_set1_epi64(static_cast<long long>(q8));
    }
  }
  if constexpr (BITS == 3)
    for (int h = 0; h < 2; ++h)
      for (int G = 0; G < 2; ++G) gather[h][G] = _mm512_loadu_si512(order.gather3[h][G]);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i spread0 = _mm512_set1_epi64(0x15120F0C09060300LL);  // code f of a qword at bit 3 f
  const __m512i spread1 = _mm512_set1_epi64(0x2D2A2724211E1B18LL);  // code 8 + f at bit 24 + 3 f
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
      const int8_t* am = plan.a.data() + ((m0 + m) * plan.units + u) * 2 * kUnit;
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        qa[m][v] = _mm512_loadu_si512(am + 64 * v);
        qr[m][v] = _mm512_loadu_si512(am + kUnit + 64 * v);
      }
      sa[m] = _mm512_set1_ps(plan.scale[(m0 + m) * plan.units + u]);
      sr[m] = _mm512_set1_ps(plan.scale[(m0 + m) * plan.units + u] / 127.f);
    }
    for (int r = 0; r < rows; ++r) {
      const int g = r & 7, h = r >> 3;
      const uint8_t* base = unit + (BITS == 4 ? 2 * h : h) * 512 + 64 * g;  // the row's first quad
      const __m512i c0 = _mm512_loadu_si512(base), c1 = _mm512_loadu_si512(base + 512);
      __m512i w[4];
      if constexpr (BITS == 4) {
        w[0] = _mm512_shuffle_epi8(table[r], _mm512_and_si512(c0, nibble));
        w[1] = _mm512_shuffle_epi8(table[r], _mm512_and_si512(_mm512_srli_epi16(c0, 4), nibble));
        w[2] = _mm512_shuffle_epi8(table[r], _mm512_and_si512(c1, nibble));
        w[3] = _mm512_shuffle_epi8(table[r], _mm512_and_si512(_mm512_srli_epi16(c1, 4), nibble));
      } else {
#pragma GCC unroll 2
        for (int G = 0; G < 2; ++G) {
          const __m512i x = _mm512_permutex2var_epi8(c0, gather[h][G], c1);
          w[2 * G] = _mm512_permutexvar_epi8(_mm512_multishift_epi64_epi8(spread0, x), table[r]);
          w[2 * G + 1] = _mm512_permutexvar_epi8(_mm512_multishift_epi64_epi8(spread1, x), table[r]);
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], qa[m][0]);
        __m512i res = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], qr[m][0]);
#pragma GCC unroll 3
        for (int v = 1; v < 4; ++v) {
          dot = _mm512_dpbusd_epi32(dot, w[v], qa[m][v]);
          res = _mm512_dpbusd_epi32(res, w[v], qr[m][v]);
        }
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sa[m], acc[r][m]);
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(res), sr[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int m = 0; m < M; ++m) sums[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}

// Rows m0 .. m0 + M - 1 of A (M <= 8).
template <int BITS>
void TileDotM(int M, const uint8_t* tile, int rows, int64_t units, const uint8_t (*qlut)[16], const Int8Plan& plan,
              int m0, float (*sums)[8]) {
  switch (M) {
    case 1: return TileDot<BITS, 1>(tile, rows, units, qlut, plan, m0, sums);
    case 2: return TileDot<BITS, 2>(tile, rows, units, qlut, plan, m0, sums);
    case 3: return TileDot<BITS, 3>(tile, rows, units, qlut, plan, m0, sums);
    case 4: return TileDot<BITS, 4>(tile, rows, units, qlut, plan, m0, sums);
    case 5: return TileDot<BITS, 5>(tile, rows, units, qlut, plan, m0, sums);
    case 6: return TileDot<BITS, 6>(tile, rows, units, qlut, plan, m0, sums);
    case 7: return TileDot<BITS, 7>(tile, rows, units, qlut, plan, m0, sums);
    default: return TileDot<BITS, 8>(tile, rows, units, qlut, plan, m0, sums);
  }
}
#endif

}  // namespace

bool HasInt8Kernel() {
#ifdef SQLLM_INT8_X86
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

bool Int8Applies(const Problem& p, KernelChoice choice) {
  if (choice == KernelChoice::kExact || !HasInt8Kernel() || (p.bits != 3 && p.bits != 4)) return false;
  return p.M <= 8 || choice == KernelChoice::kInt8;  // kInt8: every M (to measure the path's accuracy)
}

bool PrepareInt8(const Problem& p, const float* a, Int8Plan* plan) {
  const Order& order = OrderFor(p.bits);
  const int64_t units = layout::FullUnits(p.K);
  plan->units = units;
  plan->a.assign(static_cast<size_t>(p.M * units * 2 * kUnit), 0);
  plan->scale.assign(static_cast<size_t>(p.M * units), 0.f);
  plan->base.assign(static_cast<size_t>(p.M), 0.f);
  int8_t qa[kUnit], qr[kUnit];
  for (int64_t m = 0; m < p.M; ++m) {
    const float* row = a + m * p.K;
    double base = 0;
    for (int64_t u = 0; u < units; ++u) {
      const int64_t k0 = u * kUnit, n = std::min<int64_t>(kUnit, p.K - k0);
      float amax = 0.f;
      for (int64_t k = 0; k < n; ++k) {
        if (!std::isfinite(row[k0 + k])) return false;
        amax = std::max(amax, std::fabs(row[k0 + k]));
      }
      const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int sum = 0, rsum = 0;
      for (int64_t k = 0; k < kUnit; ++k) {
        const float x = k < n ? std::clamp(row[k0 + k] * inv, -127.f, 127.f) : 0.f;
        const float xa = std::nearbyint(x);
        qa[k] = static_cast<int8_t>(xa);
        qr[k] = static_cast<int8_t>(std::nearbyint((x - xa) * 127.f));
        sum += qa[k];
        rsum += qr[k];
      }
      int8_t* dst = plan->a.data() + (m * units + u) * 2 * kUnit;
      for (int v = 0; v < 4; ++v)
        for (int P = 0; P < 64; ++P) {
          dst[64 * v + P] = qa[order.k[v][P]];
          dst[kUnit + 64 * v + P] = qr[order.k[v][P]];
        }
      plan->scale[m * units + u] = scale;
      base += static_cast<double>(scale) * (sum + rsum / 127.0);
    }
    plan->base[m] = static_cast<float>(base);
  }
  return true;
}

bool Int8Tile(const Problem& p, const Args& args, const Int8Plan& plan, int64_t tile, int64_t rows, float* acc) {
#ifdef SQLLM_INT8_X86
  const int entries = 1 << p.bits;
  float lut[16][16];
  for (int64_t r = 0; r < rows; ++r)
    for (int e = 0; e < entries; ++e) {
      lut[r][e] = LutAt(args, (16 * tile + r) * entries + e);
      if (!std::isfinite(lut[r][e])) return false;
    }
  uint8_t qlut[16][16] = {};
  float lo[16], sw[16];
  for (int64_t r = 0; r < rows; ++r) {
    lo[r] = *std::min_element(lut[r], lut[r] + entries);
    const float hi = *std::max_element(lut[r], lut[r] + entries);
    sw[r] = (hi - lo[r]) / 255.f;
    const float inv = hi > lo[r] ? 255.f / (hi - lo[r]) : 0.f;
    for (int e = 0; e < entries; ++e)
      qlut[r][e] = static_cast<uint8_t>(std::lrint(std::clamp((lut[r][e] - lo[r]) * inv, 0.f, 255.f)));
  }
  float sums[16][8];
  const auto* q = reinterpret_cast<const uint8_t*>(args.qweight + tile * p.words);
  for (int64_t m0 = 0; m0 < p.M; m0 += 8) {  // 8 rows of A at a time (M > 8 only under SQLLM_CPU_KERNEL=int8)
    const int mc = static_cast<int>(std::min<int64_t>(8, p.M - m0));
    if (p.bits == 3)
      TileDotM<3>(mc, q, static_cast<int>(rows), plan.units, qlut, plan, static_cast<int>(m0), sums);
    else
      TileDotM<4>(mc, q, static_cast<int>(rows), plan.units, qlut, plan, static_cast<int>(m0), sums);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t m = 0; m < mc; ++m) acc[(m0 + m) * rows + r] += sw[r] * sums[r][m] + lo[r] * plan.base[m0 + m];
  }
  if (layout::PartialGroups(p.K)) ExactUnit(p, args, tile, rows, plan.units, acc);
  return true;
#else
  (void)p, (void)args, (void)plan, (void)tile, (void)rows, (void)acc;
  return false;
#endif
}

}  // namespace sqllm::cpu

// CPU LUT matmul. Two paths:
//  - M == 1 (decode): per output row, decode 32 codes at a time and look them up in the row's LUT
//    held in registers (AVX2: one vpermps per 8 codes for 3 bits, two plus a blend for 4 bits),
//    multiplying with A as it goes; the packed weights are read exactly once.
//  - M > 1 (prefill): per block of 16 rows, dequantize a 16 x 512 tile to fp32 once and reuse it
//    for all M rows of A (a 2 x 4 register-blocked dot-product micro kernel).
// Work is split over output rows, so the sparse part and bias of a row are added by the task that
// owns it, without atomics. x86-64 gets AVX2 code chosen at run time; other CPUs the scalar code.
#include "lut_matmul.h"

#include <algorithm>
#include <vector>

#include "sqllm/half.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SQLLM_X86 1
#define SQLLM_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace sqllm::cpu {
namespace {

constexpr int64_t kGemvRows = 16;  // output rows per task when M == 1
constexpr int64_t kTileRows = 16;  // output rows per task when M > 1 (multiple of 4)
constexpr int64_t kTileK = 512;    // K per dequantized tile (multiple of 32: tiles start on a word)

inline float LoadT(const void* p, int64_t i, bool half) {
  return half ? HalfToFloat(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

inline void StoreT(void* p, int64_t i, float v, bool half) {
  if (half)
    static_cast<uint16_t*>(p)[i] = FloatToHalf(v);
  else
    static_cast<float*>(p)[i] = v;
}

// Code k of a row: `bits` bits at stream position k*bits (may straddle two words).
inline uint32_t CodeAt(const uint32_t* w, int64_t k, int bits) {
  const int64_t pos = k * bits;
  const int64_t i = pos >> 5;
  const int s = static_cast<int>(pos & 31);
  uint64_t v = w[i];
  if (s + bits > 32) v |= static_cast<uint64_t>(w[i + 1]) << 32;
  return static_cast<uint32_t>(v >> s) & ((1u << bits) - 1);
}

// The row's LUT in fp32, padded with zeros to at least 8 entries (a full AVX2 permute).
inline void LoadLut(const Args& args, int64_t n, int bits, float* out) {
  const int64_t size = int64_t{1} << bits;
  for (int64_t c = 0; c < size; ++c) out[c] = LoadT(args.lut, n * size + c, args.half);
  for (int64_t c = size; c < 8; ++c) out[c] = 0.f;
}

// ---- portable kernels --------------------------------------------------------------------------

float DotScalar(const uint32_t* w, const float* lut, const float* a, int64_t k0, int64_t k1, int bits) {
  float acc = 0.f;
  for (int64_t k = k0; k < k1; ++k) acc += lut[CodeAt(w, k, bits)] * a[k];
  return acc;
}

void DequantScalar(const uint32_t* w, const float* lut, int64_t k0, int64_t k1, int bits, float* out) {
  for (int64_t k = k0; k < k1; ++k) out[k - k0] = lut[CodeAt(w, k, bits)];
}

// acc[r] += dot(a, t + r*stride) for r < rows, over n values.
void DotRowsScalar(const float* a, const float* t, int64_t stride, int64_t n, int rows, float* acc) {
  for (int r = 0; r < rows; ++r) {
    float s = 0.f;
    for (int64_t k = 0; k < n; ++k) s += a[k] * t[r * stride + k];
    acc[r] += s;
  }
}

#ifdef SQLLM_X86
// ---- AVX2 kernels ------------------------------------------------------------------------------

// Decodes the 32 codes stored in the BITS words at w into four vectors of 8 indices.
template <int BITS>
SQLLM_AVX2 inline void Decode32(const uint32_t* w, __m256i idx[4]) {
  const __m256i step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i shifts = _mm256_mullo_epi32(step, _mm256_set1_epi32(BITS));
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  if constexpr (BITS == 8) {
    const auto* b = reinterpret_cast<const unsigned char*>(w);
    for (int j = 0; j < 4; ++j)
      idx[j] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8 * j)));
    return;
  }
  uint32_t chunk[4];  // 8 consecutive codes each, starting at bit 0
  if constexpr (BITS == 4) {
    for (int j = 0; j < 4; ++j) chunk[j] = w[j];
  } else if constexpr (BITS == 3) {  // 96 bits: codes 8j.. start at bit 24j
    chunk[0] = w[0];
    chunk[1] = (w[0] >> 24) | (w[1] << 8);
    chunk[2] = (w[1] >> 16) | (w[2] << 16);
    chunk[3] = w[2] >> 8;
  } else {  // BITS == 2
    chunk[0] = w[0];
    chunk[1] = w[0] >> 16;
    chunk[2] = w[1];
    chunk[3] = w[1] >> 16;
  }
  for (int j = 0; j < 4; ++j)
    idx[j] = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(chunk[j])), shifts), mask);
}

// LUT held in registers: entries 0-7 and 8-15 (BITS == 8 gathers from memory instead).
struct LutRegs {
  __m256 lo, hi;
  const float* mem;
};

template <int BITS>
SQLLM_AVX2 inline __m256 Lookup(const LutRegs& lut, __m256i idx) {
  if constexpr (BITS <= 3) {
    return _mm256_permutevar8x32_ps(lut.lo, idx);
  } else if constexpr (BITS == 4) {
    const __m256 lo = _mm256_permutevar8x32_ps(lut.lo, idx);
    const __m256 hi = _mm256_permutevar8x32_ps(lut.hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 -> sign
  } else {
    return _mm256_i32gather_ps(lut.mem, idx, 4);
  }
}

SQLLM_AVX2 inline LutRegs MakeLutRegs(const float* lut) {
  return {_mm256_loadu_ps(lut), _mm256_loadu_ps(lut + 8), lut};
}

SQLLM_AVX2 inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <int BITS>
SQLLM_AVX2 float DotAvx2(const uint32_t* w, const float* lut, const float* a, int64_t K) {
  const LutRegs regs = MakeLutRegs(lut);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const int64_t full = K / 32 * 32;
  __m256i idx[4];
  for (int64_t k = 0; k < full; k += 32) {
    Decode32<BITS>(w + k / 32 * BITS, idx);
    for (int j = 0; j < 4; ++j)
      acc[j] = _mm256_fmadd_ps(Lookup<BITS>(regs, idx[j]), _mm256_loadu_ps(a + k + 8 * j), acc[j]);
  }
  const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  return HorizontalSum(sum) + DotScalar(w, lut, a, full, K, BITS);
}

template <int BITS>
SQLLM_AVX2 void DequantAvx2(const uint32_t* w, const float* lut, int64_t k0, int64_t k1, float* out) {
  const LutRegs regs = MakeLutRegs(lut);
  const int64_t full = k0 + (k1 - k0) / 32 * 32;
  __m256i idx[4];
  for (int64_t k = k0; k < full; k += 32) {
    Decode32<BITS>(w + k / 32 * BITS, idx);
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + (k - k0) + 8 * j, Lookup<BITS>(regs, idx[j]));
  }
  DequantScalar(w, lut, full, k1, BITS, out + (full - k0));
}

// acc[m*acc_stride + r] += dot(a + m*a_stride, t + r*t_stride) for a block of 2 rows of A and
// 4 tile rows: 8 accumulators, 6 loads per 8 FMAs.
SQLLM_AVX2 void Dot2x4Avx2(const float* a, int64_t a_stride, const float* t, int64_t t_stride, int64_t n,
                           float* acc, int64_t acc_stride) {
  __m256 s[2][4];
  for (auto& row : s)
    for (auto& v : row) v = _mm256_setzero_ps();
  const int64_t full = n / 8 * 8;
  for (int64_t k = 0; k < full; k += 8) {
    const __m256 a0 = _mm256_loadu_ps(a + k), a1 = _mm256_loadu_ps(a + a_stride + k);
    for (int r = 0; r < 4; ++r) {
      const __m256 tv = _mm256_loadu_ps(t + r * t_stride + k);
      s[0][r] = _mm256_fmadd_ps(a0, tv, s[0][r]);
      s[1][r] = _mm256_fmadd_ps(a1, tv, s[1][r]);
    }
  }
  for (int m = 0; m < 2; ++m)
    for (int r = 0; r < 4; ++r) {
      float tail = 0.f;
      for (int64_t k = full; k < n; ++k) tail += a[m * a_stride + k] * t[r * t_stride + k];
      acc[m * acc_stride + r] += HorizontalSum(s[m][r]) + tail;
    }
}

SQLLM_AVX2 void DotRowsAvx2(const float* a, const float* t, int64_t stride, int64_t n, int rows, float* acc) {
  const int64_t full = n / 8 * 8;
  for (int r = 0; r < rows; ++r) {
    __m256 s = _mm256_setzero_ps();
    for (int64_t k = 0; k < full; k += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(t + r * stride + k), s);
    float tail = 0.f;
    for (int64_t k = full; k < n; ++k) tail += a[k] * t[r * stride + k];
    acc[r] += HorizontalSum(s) + tail;
  }
}

bool HasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif  // SQLLM_X86

// ---- dispatch ------------------------------------------------------------------------------------

float RowDot(const uint32_t* w, const float* lut, const float* a, int64_t K, int bits) {
#ifdef SQLLM_X86
  if (HasAvx2()) {
    switch (bits) {
      case 2: return DotAvx2<2>(w, lut, a, K);
      case 3: return DotAvx2<3>(w, lut, a, K);
      case 4: return DotAvx2<4>(w, lut, a, K);
      case 8: return DotAvx2<8>(w, lut, a, K);
    }
  }
#endif
  return DotScalar(w, lut, a, 0, K, bits);
}

void RowDequant(const uint32_t* w, const float* lut, int64_t k0, int64_t k1, int bits, float* out) {
#ifdef SQLLM_X86
  if (HasAvx2()) {
    switch (bits) {
      case 2: return DequantAvx2<2>(w, lut, k0, k1, out);
      case 3: return DequantAvx2<3>(w, lut, k0, k1, out);
      case 4: return DequantAvx2<4>(w, lut, k0, k1, out);
      case 8: return DequantAvx2<8>(w, lut, k0, k1, out);
    }
  }
#endif
  DequantScalar(w, lut, k0, k1, bits, out);
}

// acc[m*rows + r] += A[m, :n] . tile[r, :n] for all m < M, r < rows.
void TileProduct(const float* a, int64_t a_stride, int64_t M, const float* tile, int64_t t_stride, int64_t n,
                 int64_t rows, float* acc) {
#ifdef SQLLM_X86
  if (HasAvx2()) {
    const int64_t rows4 = rows / 4 * 4;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2)
      for (int64_t r = 0; r < rows4; r += 4)
        Dot2x4Avx2(a + m * a_stride, a_stride, tile + r * t_stride, t_stride, n, acc + m * rows + r, rows);
    for (; m < M; ++m) DotRowsAvx2(a + m * a_stride, tile, t_stride, n, static_cast<int>(rows4), acc + m * rows);
    if (rows4 < rows)
      for (int64_t mm = 0; mm < M; ++mm)
        DotRowsAvx2(a + mm * a_stride, tile + rows4 * t_stride, t_stride, n, static_cast<int>(rows - rows4),
                    acc + mm * rows + rows4);
    return;
  }
#endif
  for (int64_t m = 0; m < M; ++m)
    DotRowsScalar(a + m * a_stride, tile, t_stride, n, static_cast<int>(rows), acc + m * rows);
}

// ---- tasks ---------------------------------------------------------------------------------------

struct Job {
  const Problem* p;
  const Args* args;
};

// Adds row n's sparse entries and bias to y[m] = acc[m * acc_stride] for m < M, then stores row n.
void FinishRow(const Job& job, int64_t n, float* acc, int64_t acc_stride) {
  const Problem& p = *job.p;
  const Args& args = *job.args;
  if (p.has_sparse)
    for (int64_t j = args.indptr[n]; j < args.indptr[n + 1]; ++j) {
      const float v = LoadT(args.values, j, args.half);
      const float* a = args.a + args.indices[j];
      for (int64_t m = 0; m < p.M; ++m) acc[m * acc_stride] += v * a[m * p.K];
    }
  const float b = p.has_bias ? LoadT(args.bias, n, args.half) : 0.f;
  for (int64_t m = 0; m < p.M; ++m) StoreT(args.y, m * p.N + n, acc[m * acc_stride] + b, args.half);
}

void GemvTask(void* data, size_t task) {
  const Job& job = *static_cast<const Job*>(data);
  const Problem& p = *job.p;
  float lut[256];
  const int64_t n1 = std::min<int64_t>(p.N, (static_cast<int64_t>(task) + 1) * kGemvRows);
  for (int64_t n = static_cast<int64_t>(task) * kGemvRows; n < n1; ++n) {
    LoadLut(*job.args, n, p.bits, lut);
    float acc = RowDot(job.args->qweight + n * p.words, lut, job.args->a, p.K, p.bits);
    FinishRow(job, n, &acc, 1);
  }
}

void GemmTask(void* data, size_t task) {
  const Job& job = *static_cast<const Job*>(data);
  const Problem& p = *job.p;
  const int64_t n0 = static_cast<int64_t>(task) * kTileRows;
  const int64_t rows = std::min<int64_t>(kTileRows, p.N - n0);
  std::vector<float> tile(kTileRows * kTileK), acc(p.M * rows, 0.f), luts(kTileRows * 256);
  for (int64_t r = 0; r < rows; ++r) LoadLut(*job.args, n0 + r, p.bits, &luts[r * 256]);
  for (int64_t k0 = 0; k0 < p.K; k0 += kTileK) {
    const int64_t k1 = std::min(p.K, k0 + kTileK);
    for (int64_t r = 0; r < rows; ++r)
      RowDequant(job.args->qweight + (n0 + r) * p.words, &luts[r * 256], k0, k1, p.bits, &tile[r * kTileK]);
    TileProduct(job.args->a + k0, p.K, p.M, tile.data(), kTileK, k1 - k0, rows, acc.data());
  }
  for (int64_t r = 0; r < rows; ++r) FinishRow(job, n0 + r, &acc[r], rows);
}

}  // namespace

void LutMatmul(const Problem& p, const Args& args, const ParallelFor& parallel_for) {
  Job job{&p, &args};
  if (p.M == 1)
    parallel_for(static_cast<size_t>((p.N + kGemvRows - 1) / kGemvRows), GemvTask, &job);
  else
    parallel_for(static_cast<size_t>((p.N + kTileRows - 1) / kTileRows), GemmTask, &job);
}

}  // namespace sqllm::cpu

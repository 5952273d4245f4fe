// CPU LUT matmul on the tiled qweight layout (sqllm/layout.h). Two paths, chosen per call:
//  - int8 (lut_int8.cc): bits 3 and 4, any M, CPUs with AVX-512 VBMI and VNNI. Codes become
//    unsigned 8-bit LUT values with a few byte shuffles per 64 codes and meet A quantized to int8
//    per 256 k in VNNI dot products; its accuracy contract is in docs/op-spec.md.
//  - exact: everything else (and SQLLM_CPU_KERNEL=exact). Per 16-row tile and unit of 256 codes,
//    the codes are decoded into a 16 x 256 fp32 tile of W holding the exact LUT values, which is
//    multiplied with all M rows of A (AVX2 FMA, or portable code), accumulating in fp32.
// Work is split over tiles, so the sparse part and bias of a row are added by the task that owns
// it, without atomics.
#include "lut_matmul.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "lut_int8.h"
#include "sqllm/half.h"
#include "sqllm/layout.h"

#if defined(__x86_64__) || defined(_M_X64)
// GCC 12's AVX-512 headers trip -Wuninitialized inside their own intrinsics (_mm512_undefined_*).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define SQLLM_X86 1
#define SQLLM_AVX2 __attribute__((target("avx2,fma")))
#define SQLLM_AVX2_F16C __attribute__((target("avx2,fma,f16c")))
#define SQLLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#endif

namespace sqllm::cpu {
namespace {


inline float LoadT(const void* p, int64_t i, bool half) {
  return half ? HalfToFloat(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

inline void StoreT(void* p, int64_t i, float v, bool half) {
  if (half)
    static_cast<uint16_t*>(p)[i] = FloatToHalf(v);
  else
    static_cast<float*>(p)[i] = v;
}

// The row's LUT in fp32, padded with zeros to at least 8 entries (a full AVX2 permute).
inline void LoadLut(const Args& args, int64_t n, int bits, float* out) {
  const int64_t size = int64_t{1} << bits;
  for (int64_t c = 0; c < size; ++c) out[c] = LoadT(args.lut, n * size + c, args.half);
  for (int64_t c = size; c < 8; ++c) out[c] = 0.f;
}

// ---- portable kernels --------------------------------------------------------------------------

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

SQLLM_AVX2 inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
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

bool HasAvx512() {  // F, BW and VL (for the sparse part)
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}

bool HasAvx2() {  // with F16C, which every AVX2 CPU has
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}
#endif  // SQLLM_X86

// ---- dispatch ------------------------------------------------------------------------------------

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

// Decodes unit `unit` of a tile into codes[r][k - 256 unit] for r < 16, k < 64 ng (layout.h).
void DecodeUnit(const uint32_t* tile, int64_t unit, int64_t K, int bits, uint8_t (*codes)[layout::kUnitCodes]) {
  const int64_t full_units = layout::FullUnits(K);
  const int ng = layout::UnitGroups(unit, K);
  const int words = ng * bits;
  uint32_t w[4 * 8];
  for (int lane = 0; lane < layout::kLanes; ++lane) {
    for (int u = 0; u < words; ++u) w[u] = tile[layout::UnitWord(unit, u, lane, full_units, bits)];
    const int g = lane >> 2, t = lane & 3;
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < ng; ++i)
        for (int s = 0; s < 4; ++s)
          for (int j = 0; j < 4; ++j)
            codes[8 * h + g][64 * i + 32 * (s >> 1) + 8 * t + 4 * (s & 1) + j] =
                static_cast<uint8_t>(layout::LaneCode(w, h, i, s, j, ng, bits));
  }
}

// The LUT rows of a tile in fp32 (padded to 256 entries).
struct TileLuts {
  float v[layout::kTileRows][256];
};

void LoadTileLuts(const Problem& p, const Args& args, int64_t tile, int64_t rows, TileLuts* luts) {
  for (int64_t r = 0; r < rows; ++r) LoadLut(args, 16 * tile + r, p.bits, luts->v[r]);
}

// acc[m * rows + r] += unit u's part of rows r < rows of `tile`, for all m < M, exactly (fp32).
void UnitProduct(const Problem& p, const Args& args, int64_t tile, int64_t rows, int64_t u, const TileLuts& luts,
                 float* acc) {
  float w[layout::kTileRows * layout::kUnitCodes];
  uint8_t codes[layout::kTileRows][layout::kUnitCodes];
  const int64_t k0 = u * layout::kUnitCodes, n = std::min<int64_t>(layout::kUnitCodes, p.K - k0);
  DecodeUnit(args.qweight + tile * p.words, u, p.K, p.bits, codes);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < n; ++k) w[r * layout::kUnitCodes + k] = luts.v[r][codes[r][k]];
  TileProduct(args.a + k0, p.K, p.M, w, layout::kUnitCodes, n, rows, acc);
}

// acc[m * rows + r] += the dense part of rows r < rows of `tile` for all m < M, exactly (fp32).
void ExactTile(const Problem& p, const Args& args, int64_t tile, int64_t rows, float* acc) {
  TileLuts luts;
  LoadTileLuts(p, args, tile, rows, &luts);
  const int64_t units = (layout::Groups(p.K) + layout::kUnitGroups - 1) / layout::kUnitGroups;
  for (int64_t u = 0; u < units; ++u) UnitProduct(p, args, tile, rows, u, luts, acc);
}

struct Job {
  const Problem* p;
  const Args* args;
  const Int8Plan* int8;  // null: the exact path
};

#ifdef SQLLM_X86
// sum over entries j in [j0, j1) of values[j] * a[indices[j]], 8 entries per step (gather, F16C).
SQLLM_AVX2_F16C float SparseDotAvx2(const int32_t* indices, const void* values, bool half, int64_t j0, int64_t j1,
                                    const float* a) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = j0;
  for (; j + 8 <= j1; j += 8) {
    const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(indices + j));
    const __m256 v = half ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
                                static_cast<const uint16_t*>(values) + j)))
                          : _mm256_loadu_ps(static_cast<const float*>(values) + j);
    acc = _mm256_fmadd_ps(v, _mm256_i32gather_ps(a, idx, 4), acc);
  }
  float sum = HorizontalSum(acc);
  for (; j < j1; ++j) sum += LoadT(values, j, half) * a[indices[j]];
  return sum;
}
#endif

#ifdef SQLLM_X86
// The same with AVX-512 (16 entries per masked gather, no scalar tail: rows hold a handful of entries).
SQLLM_AVX512 float SparseDotAvx512(const int32_t* indices, const void* values, bool half, int64_t j0, int64_t j1,
                                   const float* a) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = j0; j < j1; j += 16) {
    const __mmask16 mask = static_cast<__mmask16>(j1 - j >= 16 ? 0xFFFF : (1u << (j1 - j)) - 1u);
    const __m512i idx = _mm512_maskz_loadu_epi32(mask, indices + j);
    const __m512 v = half ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(values) + j))
                          : _mm512_maskz_loadu_ps(mask, static_cast<const float*>(values) + j);
    acc = _mm512_fmadd_ps(v, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, idx, a, 4), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// y[i] = half(v[i]) for i < n (F16C, round to nearest even as FloatToHalf).
SQLLM_AVX2_F16C void StoreHalfF16c(uint16_t* y, const float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) y[i] = FloatToHalf(v[i]);
}
#endif

float SparseDot(const Args& args, int64_t j0, int64_t j1, const float* a) {
#ifdef SQLLM_X86
  if (HasAvx512()) return SparseDotAvx512(args.indices, args.values, args.half, j0, j1, a);
  if (HasAvx2()) return SparseDotAvx2(args.indices, args.values, args.half, j0, j1, a);
#endif
  float sum = 0.f;
  for (int64_t j = j0; j < j1; ++j) sum += LoadT(args.values, j, args.half) * a[args.indices[j]];
  return sum;
}

// Adds the sparse entries and bias of the tile's rows to acc[m * rows + r] and stores Y's rows.
void FinishTile(const Problem& p, const Args& args, int64_t tile, int64_t rows, float* acc) {
  const int64_t n0 = 16 * tile;
  if (p.has_sparse)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t j0 = args.indptr[n0 + r], j1 = args.indptr[n0 + r + 1];
      if (j0 == j1) continue;
      for (int64_t m = 0; m < p.M; ++m) acc[m * rows + r] += SparseDot(args, j0, j1, args.a + m * p.K);
    }
  if (p.has_bias) {
    float b[layout::kTileRows];
    for (int64_t r = 0; r < rows; ++r) b[r] = LoadT(args.bias, n0 + r, args.half);
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t r = 0; r < rows; ++r) acc[m * rows + r] += b[r];
  }
  for (int64_t m = 0; m < p.M; ++m) {
    const float* v = acc + m * rows;
    if (!args.half) {
      std::memcpy(static_cast<float*>(args.y) + m * p.N + n0, v, static_cast<size_t>(rows) * sizeof(float));
      continue;
    }
    uint16_t* y = static_cast<uint16_t*>(args.y) + m * p.N + n0;
#ifdef SQLLM_X86
    if (HasAvx2()) {
      StoreHalfF16c(y, v, rows);
      continue;
    }
#endif
    for (int64_t r = 0; r < rows; ++r) y[r] = FloatToHalf(v[r]);
  }
}

void TileTask(void* data, size_t task) {
  const Job& job = *static_cast<const Job*>(data);
  const Problem& p = *job.p;
  const int64_t tile = static_cast<int64_t>(task);
  const int64_t rows = std::min<int64_t>(layout::kTileRows, p.N - 16 * tile);
  float small[8 * layout::kTileRows];  // [M][rows]; the heap only for M > 8
  std::vector<float> large(p.M > 8 ? static_cast<size_t>(p.M * rows) : 0);
  float* acc = p.M > 8 ? large.data() : small;
  if (!job.int8 || !Int8Tile(p, *job.args, *job.int8, tile, rows, acc)) {
    std::fill(acc, acc + p.M * rows, 0.f);
    ExactTile(p, *job.args, tile, rows, acc);
  }
  FinishTile(p, *job.args, tile, rows, acc);
}

KernelChoice ChoiceFromEnv() {
  const char* v = std::getenv("SQLLM_CPU_KERNEL");
  if (!v || !*v || std::strcmp(v, "auto") == 0) return KernelChoice::kAuto;
  if (std::strcmp(v, "exact") == 0) return KernelChoice::kExact;
  if (std::strcmp(v, "int8") == 0) return KernelChoice::kInt8;
  return KernelChoice::kAuto;
}

}  // namespace

KernelChoice DefaultKernelChoice() { return ChoiceFromEnv(); }

const char* CpuPathName(const Problem& p, KernelChoice choice) {
  return Int8Applies(p, choice) ? "int8-avx512-vnni" : (HasAvx2() ? "exact-avx2" : "exact-portable");
}

void LutMatmul(const Problem& p, const Args& args, const ParallelFor& parallel_for, KernelChoice choice) {
  Int8Plan plan;
  const bool int8 = Int8Applies(p, choice) && PrepareInt8(p, args.a, &plan);
  Job job{&p, &args, int8 ? &plan : nullptr};
  parallel_for(static_cast<size_t>(layout::Tiles(p.N)), TileTask, &job);
}

}  // namespace sqllm::cpu

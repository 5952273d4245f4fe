// Which tensor-core decode variant runs a problem (kernels.h, docs/cuda-kernels.md).
//
//   SQLLM_CUDA_DECODE_VARIANT=<name or number>   (read once per process) forces one variant for
//       every problem it can take: base, pipe, room, deep, dual, pair.
//   Otherwise the first row of kPolicy that matches (bits, K <= max_k, N <= max_n, M <= max_m,
//   sparse part or not) decides. Edit the table after a sweep: benchmarks/gpu_decode_sweep.sh measures every
//   variant per shape and prints the rows it would write.
//   A problem the chosen variant cannot take (its shared memory does not fit, e.g. M = 8 at large
//   K; "dual" and "pair" are 4-bit only) falls back to "pipe", then "base" (smallest shared memory),
//   then the CUDA-core kernel (dispatch.cc).
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace sqllm::cuda {
namespace {

constexpr const char* kNames[] = {"base", "pipe", "room", "deep", "dual", "pair"};
static_assert(sizeof(kNames) / sizeof(kNames[0]) == kDecodeVariants, "a name per DecodeVariant");

enum Sparse { kDenseOnly, kSparseOnly, kEither };

struct PolicyRow {
  int bits;
  int64_t max_k, max_n, max_m;
  Sparse sparse;
  int variant;
};

constexpr int64_t kAny = INT64_MAX;

// First match wins. From the H100 sweep of 2026-11-22 (benchmarks/gpu_decode_sweep.sh, kernel-only
// us, docs/cuda-kernels.md): 3 bits: "deep" is fastest or within 1% everywhere dense (0.75-0.97x
// of base), but its fused CSR epilogue costs more when the tile is short (K = 4096 with 0.45%:
// deep 16.1 us, base 14.9 us), so sparse problems with small K keep "base". 4 bits: "pair" at M = 1
// (0.59-0.91x of base); at M = 4 its larger register footprint loses (22.1 us vs base 18.8 us).
constexpr PolicyRow kPolicy[] = {
    {3, 4096, kAny, 8, kSparseOnly, kDecodeBase},
    {3, kAny, kAny, 8, kEither, kDecodeDeep},
    {4, kAny, kAny, 2, kEither, kDecodePair},
    {4, kAny, kAny, 8, kEither, kDecodeBase},
};

bool Matches(const PolicyRow& row, const Problem& p) {
  const bool sparse = p.has_sparse && p.nnz > 0;
  return row.bits == p.bits && p.K <= row.max_k && p.N <= row.max_n && p.M <= row.max_m &&
         (row.sparse == kEither || (row.sparse == kSparseOnly) == sparse);
}

int VariantFromEnv() {
  const char* v = std::getenv("SQLLM_CUDA_DECODE_VARIANT");
  if (!v || !*v) return -1;
  for (int i = 0; i < kDecodeVariants; ++i)
    if (std::strcmp(v, kNames[i]) == 0) return i;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (end != v && *end == '\0' && x >= 0 && x < kDecodeVariants) return static_cast<int>(x);
  return -1;  // unknown: the table decides
}

}  // namespace

const char* DecodeVariantName(int variant) {
  return variant >= 0 && variant < kDecodeVariants ? kNames[variant] : nullptr;
}

int ChooseDecodeVariant(const Problem& p) {
  static const int forced = VariantFromEnv();
  if (forced >= 0) return forced;
  for (const PolicyRow& row : kPolicy)
    if (Matches(row, p)) return row.variant;
  return kDecodeBase;
}

std::string LaunchDecodeVariant(int variant, const Problem& p, const DeviceArgs& args, cudaStream_t stream, bool pdl,
                                bool qweight_constant, bool lut_constant, const DeviceInfo& dev, bool* launched) {
  *launched = false;
  if (variant == kDecodeBase) return LaunchDecodeMma(p, args, stream, pdl, qweight_constant, dev, launched);
  if (variant > kDecodeBase && variant < kDecodeVariants)
    return LaunchDecodePipe(variant, p, args, stream, pdl, qweight_constant, lut_constant, dev, launched);
  return "";
}

}  // namespace sqllm::cuda

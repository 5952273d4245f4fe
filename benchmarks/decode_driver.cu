// Standalone check and benchmark of the tensor-core decode kernel (ops/cuda/decode_tc.cu), for
// kernel work on a GPU machine without onnxruntime-gpu: random problems packed into the tiled
// layout (ops/include/sqllm/layout.h), the kernel's output against a float64 reference on the
// host, and kernel-only times from CUDA graphs over distinct weights (more than 4x the L2),
// beside cuBLAS fp16 (the GEMM ORT's MatMul runs) and the device-to-device copy bandwidth.
//
// Build (repo root):  nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a
//                     -Iops/include -Iops benchmarks/decode_driver.cu ops/cuda/decode_tc.cu
//                     ops/cuda/device_info.cc -lcublas -o decode_driver
// Run:   ./decode_driver check          correctness over odd and model shapes
//        ./decode_driver bench [json]   timings (prints a table; writes JSON rows to `json`)
//        ./decode_driver quick [json]   timings of six key rows
//        ./decode_driver one M K N bits density [reps]   one problem checked, then launched reps times
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda/kernels.h"
#include "sqllm/layout.h"

using sqllm::Problem;
namespace layout = sqllm::layout;

#define CK(x)                                                                                     \
  do {                                                                                            \
    cudaError_t e_ = (x);                                                                         \
    if (e_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));    \
      std::exit(2);                                                                               \
    }                                                                                             \
  } while (0)

struct Host {
  int M, K, N, bits;
  std::vector<uint8_t> codes;  // [N][K]
  std::vector<uint32_t> q;     // tiled
  std::vector<__half> lut, a, values, bias;
  std::vector<int32_t> indptr, indices;
};

static void Pack(Host& h) {
  const int64_t tw = layout::TileWords(h.K, h.bits), fu = layout::FullUnits(h.K);
  h.q.assign(layout::Tiles(h.N) * tw, 0u);
  for (int n = 0; n < h.N; ++n)
    for (int k = 0; k < h.K; ++k) {
      const auto c = layout::Locate(n & 15, k, h.K);
      uint32_t* tile = h.q.data() + (n >> 4) * tw;
      const uint32_t code = h.codes[static_cast<size_t>(n) * h.K + k];
      for (int b = 0; b < h.bits; ++b) {
        const int sb = layout::StreamBit(c.h, c.i, c.s, c.j, b, c.ng, h.bits);
        if ((code >> b) & 1) tile[layout::UnitWord(c.unit, sb >> 5, c.lane, fu, h.bits)] |= 1u << (sb & 31);
      }
    }
}

static Host Make(int M, int K, int N, int bits, double density, bool bias, uint64_t seed, bool heavy_rows = false) {
  Host h{M, K, N, bits};
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  h.codes.resize(static_cast<size_t>(N) * K);
  for (auto& c : h.codes) c = static_cast<uint8_t>(rng() & ((1u << bits) - 1));
  h.lut.resize(static_cast<size_t>(N) << bits);
  for (auto& v : h.lut) v = __float2half(0.05f * nd(rng));
  h.a.resize(static_cast<size_t>(M) * K);
  for (auto& v : h.a) v = __float2half(nd(rng));
  if (density > 0) {
    h.indptr.push_back(0);
    std::uniform_int_distribution<int> kd(0, K - 1);
    for (int n = 0; n < N; ++n) {
      std::poisson_distribution<int> pd(density * K);
      int cnt = pd(rng);
      if (heavy_rows && n % 97 == 5) cnt += 3000 % (K + 1);  // a few heavy rows (beyond the register prefetch)
      for (int i = 0; i < cnt; ++i) {
        h.indices.push_back(kd(rng));
        h.values.push_back(__float2half(0.5f * nd(rng)));
      }
      if (heavy_rows && n % 13 == 0 && cnt > 0) {  // a duplicate entry
        h.indices.push_back(h.indices.back());
        h.values.push_back(__float2half(0.25f));
      }
      h.indptr.push_back(static_cast<int32_t>(h.indices.size()));
    }
  }
  if (bias) {
    h.bias.resize(N);
    for (auto& v : h.bias) v = __float2half(nd(rng));
  }
  Pack(h);
  return h;
}

// The float64 product, and in `bound` the int8 path's error bound (docs/op-spec.md: per row n the
// LUT step sw = (max - min) / 255, per row m and unit u of A the step sa = max_u |A| / 127;
// sum_k sw / 2 |a_k| + sa_u / 254 (|w_k| + sw / 2)).
static std::vector<double> Reference(const Host& h, std::vector<double>* bound) {
  std::vector<double> y(static_cast<size_t>(h.M) * h.N);
  bound->assign(y.size(), 0.0);
  const int units = (h.K + 255) / 256;
  std::vector<double> sa(static_cast<size_t>(h.M) * units, 0.0);
  for (int m = 0; m < h.M; ++m)
    for (int k = 0; k < h.K; ++k) {
      double& s = sa[static_cast<size_t>(m) * units + k / 256];
      s = std::max(s, std::fabs(static_cast<double>(__half2float(h.a[static_cast<size_t>(m) * h.K + k]))) / 127);
    }
  const int threads = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> pool;
  for (int w = 0; w < threads; ++w)
    pool.emplace_back([&, w] {
      std::vector<double> row(h.K), dense(h.K);
      for (int n = w; n < h.N; n += threads) {
        double lo = 1e300, hi = -1e300;
        for (int e = 0; e < (1 << h.bits); ++e) {
          const double v = __half2float(h.lut[(static_cast<size_t>(n) << h.bits) + e]);
          lo = std::min(lo, v), hi = std::max(hi, v);
        }
        const double sw = (hi - lo) / 255;
        for (int k = 0; k < h.K; ++k)
          dense[k] = row[k] = __half2float(h.lut[(static_cast<size_t>(n) << h.bits) + h.codes[static_cast<size_t>(n) * h.K + k]]);
        if (!h.indptr.empty())
          for (int e = h.indptr[n]; e < h.indptr[n + 1]; ++e) row[h.indices[e]] += __half2float(h.values[e]);
        for (int m = 0; m < h.M; ++m) {
          double s = h.bias.empty() ? 0.0 : __half2float(h.bias[n]), b = 0;
          const __half* a = h.a.data() + static_cast<size_t>(m) * h.K;
          for (int k = 0; k < h.K; ++k) {
            const double x = __half2float(a[k]);
            s += row[k] * x;
            b += sw / 2 * std::fabs(x) + sa[static_cast<size_t>(m) * units + k / 256] / 254 * (std::fabs(dense[k]) + sw / 2);
          }
          y[static_cast<size_t>(m) * h.N + n] = s;
          (*bound)[static_cast<size_t>(m) * h.N + n] = b;
        }
      }
    });
  for (auto& t : pool) t.join();
  return y;
}

struct Dev {
  __half *a = nullptr, *lut = nullptr, *values = nullptr, *bias = nullptr, *y = nullptr;
  uint32_t* q = nullptr;
  int32_t *indptr = nullptr, *indices = nullptr;
  Problem p;
};

template <typename T>
static T* Upload(const std::vector<T>& v) {
  if (v.empty()) return nullptr;
  T* d = nullptr;
  CK(cudaMalloc(&d, v.size() * sizeof(T)));
  CK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

static Dev ToDevice(const Host& h) {
  Dev d;
  d.a = Upload(h.a);
  d.q = Upload(h.q);
  d.lut = Upload(h.lut);
  d.indptr = Upload(h.indptr);
  d.indices = Upload(h.indices);
  d.values = Upload(h.values);
  d.bias = Upload(h.bias);
  CK(cudaMalloc(&d.y, static_cast<size_t>(h.M) * h.N * sizeof(__half)));
  d.p.M = h.M;
  d.p.K = h.K;
  d.p.N = h.N;
  d.p.bits = h.bits;
  d.p.words = layout::TileWords(h.K, h.bits);
  d.p.has_sparse = !h.indptr.empty();
  d.p.nnz = static_cast<int64_t>(h.indices.size());
  d.p.has_bias = !h.bias.empty();
  d.p.elem_type = sqllm::kFloat16;
  return d;
}

static void Free(Dev& d) {
  for (void* p : {static_cast<void*>(d.a), static_cast<void*>(d.q), static_cast<void*>(d.lut),
                  static_cast<void*>(d.indptr), static_cast<void*>(d.indices), static_cast<void*>(d.values),
                  static_cast<void*>(d.bias), static_cast<void*>(d.y)})
    if (p) cudaFree(p);
}

static bool g_pdl = true;

static void Launch(const Dev& d, cudaStream_t s) {
  sqllm::cuda::DeviceInfo dev;
  static bool have = false;
  static sqllm::cuda::DeviceInfo cached;
  if (!have) {
    if (auto e = sqllm::cuda::CurrentDevice(&cached); !e.empty()) {
      std::fprintf(stderr, "%s\n", e.c_str());
      std::exit(2);
    }
    have = true;
  }
  dev = cached;
  sqllm::cuda::DeviceArgs args{d.a, d.q, d.lut, d.indptr, d.indices, d.values, d.bias, d.y, true};
  bool launched = false;
  const std::string err = sqllm::cuda::LaunchDecodeTc(d.p, args, s, g_pdl, true, dev, &launched);
  if (!err.empty() || !launched) {
    std::fprintf(stderr, "launch failed (M=%ld K=%ld N=%ld bits=%d): %s\n", d.p.M, d.p.K, d.p.N, d.p.bits,
                 err.empty() ? "kernel declined the problem" : err.c_str());
    std::exit(2);
  }
}

static bool Check(int M, int K, int N, int bits, double density, bool bias, uint64_t seed) {
  Host h = Make(M, K, N, bits, density, bias, seed, true);
  Dev d = ToDevice(h);
  CK(cudaMemset(d.y, 0xFF, static_cast<size_t>(M) * N * sizeof(__half)));  // NaN poison
  Launch(d, nullptr);
  CK(cudaDeviceSynchronize());
  std::vector<__half> y(static_cast<size_t>(M) * N);
  CK(cudaMemcpy(y.data(), d.y, y.size() * sizeof(__half), cudaMemcpyDeviceToHost));
  std::vector<double> bound;
  const std::vector<double> ref = Reference(h, &bound);
  double num = 0, den = 0, worst = 0;
  size_t worst_i = 0;
  bool finite = true;
  for (size_t i = 0; i < y.size(); ++i) {
    const double v = __half2float(y[i]);
    if (!std::isfinite(v)) finite = false;
    const double e = std::fabs(v - ref[i]);
    num += e * e;
    den += ref[i] * ref[i];
    // the int8 path's bound, plus fp16 output rounding and fp32 accumulation order
    const double tol = 1.01 * bound[i] + 2e-3 * std::fabs(ref[i]) + 2e-3;
    if (!(e <= tol) && e - tol > worst) {
      worst = e - tol;
      worst_i = i;
    }
  }
  const double rel = std::sqrt(num / std::max(den, 1e-300));
  const bool ok = finite && worst == 0 && rel < 1e-2;  // int8 LUT: ~3e-3 on random layers
  std::printf("%s M=%d K=%d N=%d bits=%d sparse=%.4f bias=%d: rel %.2e%s", ok ? "PASS" : "FAIL", M, K, N, bits, density,
              bias, rel, finite ? "" : " (non-finite)");
  if (worst > 0)
    std::printf("  worst m=%zu n=%zu got %.5f want %.5f", worst_i / N, worst_i % N, __half2float(y[worst_i]),
                ref[worst_i]);
  std::printf("\n");
  Free(d);
  return ok;
}

static int RunChecks() {
  int fails = 0;
  uint64_t seed = 1;
  struct Case {
    int M, K, N, bits;
    double density;
    bool bias;
  };
  std::vector<Case> cases;
  for (int bits : {3, 4}) {
    for (int K : {1, 7, 63, 64, 100, 250, 256, 320, 576, 1000, 4160, 4173})
      for (int N : {1, 17, 48, 300}) cases.push_back({1 + (K + N) % 8, K, N, bits, K > 8 ? 0.01 : 0.0, N % 2 == 1});
    for (int M = 1; M <= 8; ++M) cases.push_back({M, 4096, 1000, bits, M % 2 ? 0.0045 : 0.0, M % 3 == 0});
    cases.push_back({1, 11008, 4096, bits, 0.0045, false});
    cases.push_back({8, 11008, 512, bits, 0.0045, true});
    cases.push_back({3, 28672, 64, bits, 0.0, true});     // A chunked over M
    cases.push_back({1, 4096, 11008, bits, 0.0, false});
    cases.push_back({16, 4096, 256, bits, 0.02, true});   // M > 8
  }
  for (const Case& c : cases) fails += !Check(c.M, c.K, c.N, c.bits, c.density, c.bias, seed++);
  std::printf("%d of %zu checks failed\n", fails, cases.size());
  return fails ? 1 : 0;
}

// ---- timing ------------------------------------------------------------------------------------

static double CopyGbps() {
  const size_t bytes = size_t{1} << 30;
  void *a, *b;
  CK(cudaMalloc(&a, bytes));
  CK(cudaMalloc(&b, bytes));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int i = 0; i < 12; ++i) {
    CK(cudaEventRecord(e0));
    CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice));
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float t;
    CK(cudaEventElapsedTime(&t, e0, e1));
    if (i >= 2) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / (ms[ms.size() / 2] * 1e-3) / 1e9;
}

template <typename F>
static double GraphTimeUs(F&& enqueue_round, int launches_per_round) {
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const int rounds = std::max(1, 400 / launches_per_round);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int r = 0; r < rounds; ++r) enqueue_round(s);
  CK(cudaStreamEndCapture(s, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int i = 0; i < 7; ++i) {
    CK(cudaEventRecord(e0, s));
    CK(cudaGraphLaunch(exec, s));
    CK(cudaEventRecord(e1, s));
    CK(cudaEventSynchronize(e1));
    float t;
    CK(cudaEventElapsedTime(&t, e0, e1));
    if (i >= 2) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(s);
  return ms[ms.size() / 2] * 1e3 / (rounds * launches_per_round);
}

#if SQLLM_TC_PROFILE
namespace sqllm::cuda {
std::string ReadDecodeTcProfile(unsigned long long (*out)[6], int ctas);
}
// Per-CTA phases of the last launch of the last graph replay (consumer thread 0, SM clocks).
static void PrintProfile(int K, int N, int bits) {
  std::vector<unsigned long long> v(2048 * 6);
  const std::string e = sqllm::cuda::ReadDecodeTcProfile(reinterpret_cast<unsigned long long (*)[6]>(v.data()), 2048);
  if (!e.empty()) { std::printf("profile: %s\n", e.c_str()); return; }
  int ctas = 0;
  double pdl = 0, pro = 0, loop = 0, loop_max = 0;
  unsigned long long g0 = ~0ull, g1 = 0, gmax_entry = 0;
  for (int c = 0; c < 2048; ++c) {
    const unsigned long long* r = &v[6 * c];
    if (!r[0] || r[3] < r[2]) continue;
    ++ctas;
    pdl += r[1] - r[0];
    pro += r[2] - r[0];
    loop += r[3] - r[2];
    loop_max = std::max(loop_max, double(r[3] - r[2]));
    g0 = std::min(g0, r[4]);
    gmax_entry = std::max(gmax_entry, r[4]);
    g1 = std::max(g1, r[5]);
  }
  if (!ctas || !K) return;
  std::printf("  profile %dx%d %db: %d CTAs; cycles per CTA: PdlWait %.0f, prologue (incl. PdlWait, A) %.0f, tile loop %.0f "
              "(max %.0f); span first entry -> last end %.2f us, last entry at +%.2f us\n",
              K, N, bits, ctas, pdl / ctas, pro / ctas, loop / ctas, loop_max, (g1 - g0) * 1e-3, (gmax_entry - g0) * 1e-3);
}
#endif

struct BenchRow {
  int M, K, N, bits;
  double density;
  double us, us_nopdl, cublas_us, gbps, pct;
  double bytes;
};

static BenchRow Bench(int M, int K, int N, int bits, double density, double copy_gbps, cublasHandle_t handle) {
  Host h = Make(M, K, N, bits, density, false, 1234 + K + N + bits);
  const double set_bytes = h.q.size() * 4.0 + h.lut.size() * 2.0 + h.indices.size() * 6.0 + h.indptr.size() * 4.0;
  const int sets = static_cast<int>(std::clamp(std::ceil(4 * 60e6 / set_bytes), 4.0, 64.0));
  std::vector<Dev> devs;
  for (int i = 0; i < sets; ++i) {
    if (i) {  // distinct weights: re-draw the codes' packing source cheaply by rotating words
      std::rotate(h.q.begin(), h.q.begin() + (h.q.size() / sets) * i % std::max<size_t>(h.q.size(), 1), h.q.end());
    }
    devs.push_back(ToDevice(h));
  }
  const auto round = [&](cudaStream_t s) {
    for (const Dev& d : devs) Launch(d, s);
  };
  BenchRow row{M, K, N, bits, density};
  g_pdl = true;
#if SQLLM_TC_PROFILE
  PrintProfile(0, 0, 0);  // clears what earlier rows left
#endif
  row.us = GraphTimeUs(round, sets);
#if SQLLM_TC_PROFILE
  PrintProfile(K, N, bits);
#endif
  g_pdl = false;
  row.us_nopdl = GraphTimeUs(round, sets);
  g_pdl = true;
  row.bytes = set_bytes + (static_cast<double>(M) * K + static_cast<double>(M) * N) * 2.0;
  row.gbps = row.bytes / (row.us * 1e-6) / 1e9;
  row.pct = 100.0 * row.gbps / copy_gbps;
  // cuBLAS fp16 GEMM with fp32 compute on dense fp16 weights (what ORT's MatMul runs), same M
  if (density == 0) {
    const size_t wbytes = static_cast<size_t>(K) * N * 2;
    const int wsets = static_cast<int>(std::clamp(std::ceil(4 * 60e6 / wbytes), 2.0, 16.0));
    std::vector<__half*> ws(wsets);
    for (auto& w : ws) {
      CK(cudaMalloc(&w, wbytes));
      CK(cudaMemset(w, 0x3c, wbytes));
    }
    __half *a, *y;
    CK(cudaMalloc(&a, static_cast<size_t>(M) * K * 2));
    CK(cudaMalloc(&y, static_cast<size_t>(M) * N * 2));
    CK(cudaMemset(a, 0x3c, static_cast<size_t>(M) * K * 2));
    const float one = 1.f, zero = 0.f;
    row.cublas_us = GraphTimeUs(
        [&](cudaStream_t s) {
          cublasSetStream(handle, s);
          for (__half* w : ws)
            cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, w, CUDA_R_16F, K, a, CUDA_R_16F, K, &zero, y,
                         CUDA_R_16F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        },
        wsets);
    for (auto* w : ws) cudaFree(w);
    cudaFree(a);
    cudaFree(y);
  }
  for (Dev& d : devs) Free(d);
  return row;
}

static int RunBench(const char* json_path, bool quick) {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const double copy = CopyGbps();
  std::printf("device %s, %d SMs, L2 %d MB, copy bandwidth %.0f GB/s (read + write)\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, copy);
  cublasHandle_t handle;
  if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) std::exit(2);
  struct Shape {
    int K, N;
  };
  const Shape shapes[] = {{4096, 4096},  {4096, 11008}, {11008, 4096}, {4096, 12288}, {4096, 22016},
                          {4096, 32000}, {8192, 28672}, {5120, 13824}, {13824, 5120}};
  std::vector<BenchRow> rows;
  if (quick) {
    for (const Shape& s : {Shape{4096, 4096}, Shape{4096, 11008}, Shape{11008, 4096}})
      rows.push_back(Bench(1, s.K, s.N, 3, 0.0, copy, handle));
    rows.push_back(Bench(1, 4096, 11008, 3, 0.0045, copy, handle));
    rows.push_back(Bench(1, 4096, 11008, 4, 0.0, copy, handle));
    rows.push_back(Bench(1, 8192, 28672, 3, 0.0, copy, handle));
  }
  for (int bits : {3, 4})
    for (const Shape& s : shapes) {
      if (quick) break;
      rows.push_back(Bench(1, s.K, s.N, bits, 0.0, copy, handle));
      if (s.K == 4096 && (s.N == 11008 || s.N == 4096)) rows.push_back(Bench(1, s.K, s.N, bits, 0.0045, copy, handle));
      if (s.K == 11008) rows.push_back(Bench(1, s.K, s.N, bits, 0.0045, copy, handle));
    }
  for (int M : {2, 4, 8})
    for (int bits : {3, 4})
      if (!quick) rows.push_back(Bench(M, 4096, 11008, bits, 0.0, copy, handle));
  std::printf("%6s %6s %2s %5s %6s | %8s %9s %8s | %8s %6s | %9s\n", "K", "N", "M", "bits", "sparse", "us (PDL)",
              "us no-PDL", "GB/s", "% copy", "fp16/us", "cuBLAS us");
  FILE* f = json_path ? std::fopen(json_path, "w") : nullptr;
  if (f) std::fprintf(f, "{\"device\": \"%s\", \"copy_gbps\": %.1f, \"rows\": [\n", prop.name, copy);
  for (size_t i = 0; i < rows.size(); ++i) {
    const BenchRow& r = rows[i];
    std::printf("%6d %6d %2d %5d %6.4f | %8.2f %9.2f %8.0f | %7.1f%% %6.2f | %9.2f\n", r.K, r.N, r.M, r.bits, r.density,
                r.us, r.us_nopdl, r.gbps, r.pct, r.cublas_us > 0 ? r.us / r.cublas_us : 0.0, r.cublas_us);
    if (f)
      std::fprintf(f,
                   "  {\"K\": %d, \"N\": %d, \"M\": %d, \"bits\": %d, \"sparsity\": %.4f, \"kernel_us\": %.3f, "
                   "\"kernel_us_no_pdl\": %.3f, \"bytes\": %.0f, \"kernel_gbps\": %.1f, \"pct_copy\": %.1f, "
                   "\"cublas_fp16_us\": %.3f}%s\n",
                   r.K, r.N, r.M, r.bits, r.density, r.us, r.us_nopdl, r.bytes, r.gbps, r.pct, r.cublas_us,
                   i + 1 < rows.size() ? "," : "");
  }
  if (f) {
    std::fprintf(f, "]}\n");
    std::fclose(f);
  }
  return 0;
}

// One problem, checked, then launched `reps` more times (for ncu).
static int RunOne(int M, int K, int N, int bits, double density, int reps) {
  if (!Check(M, K, N, bits, density, false, 7)) return 1;
  Host h = Make(M, K, N, bits, density, false, 8);
  Dev d = ToDevice(h);
  for (int i = 0; i < reps; ++i) Launch(d, nullptr);
  CK(cudaDeviceSynchronize());
  Free(d);
  return 0;
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "check";
  if (mode == "check") return RunChecks();
  if (mode == "one" && argc >= 7)
    return RunOne(std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]), std::atof(argv[6]),
                  argc > 7 ? std::atoi(argv[7]) : 10);
  if (mode == "bench" || mode == "quick") return RunBench(argc > 2 ? argv[2] : nullptr, mode == "quick");
  std::fprintf(stderr, "usage: decode_driver check | bench [json] | one M K N bits density [reps]\n");
  return 2;
}

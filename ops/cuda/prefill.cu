// Prefill path kernels (large M): dequantize W into a scratch buffer for a cuBLAS GEMM, and
// broadcast the bias into Y so that the GEMM adds it with beta = 1 (one rounding of Y).
//
// Dequantize. Scratch layout: rows n0 .. n0 + rows - 1 of W, row r at w + r * ldw, T elements,
// ldw = K rounded up to 8 (16-byte rows for fp16, 32-byte rows for fp32); the GEMM reads it as a
// column-major K x rows matrix with leading dimension ldw (see dispatch.cc). Work item = (row,
// chunk of 2048 codes); 256 threads, thread t decodes codes k0 + 8t .. + 7 from a 96-bit window of
// the row's words (3 loads, funnel shifts), looks them up in the row's LUT (staged in shared memory
// as fp32), and writes them to a shared fp32 chunk. The row's sparse entries that fall into the
// chunk are then added with shared-memory atomics (duplicates add; fp32), and the chunk is rounded
// once to T and written with 16-byte stores. Every item reads its row's CSR range, so a very heavy
// row costs (entries x chunks) but never serialises on global atomics. Grid-stride over items.
#include <algorithm>

#include "common.cuh"
#include "kernels.h"
#include "sqllm/layout.h"

namespace sqllm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kCodesPerThread = 8;
constexpr int kChunk = kThreads * kCodesPerThread;  // 2048 codes per item

template <typename T>
struct DequantParams {
  const uint32_t* q;
  const T* lut;
  const int32_t* indptr;
  const int32_t* indices;
  const T* values;
  T* w;
  int64_t n0, rows, K, words, ldw, chunks;
  int bits;
};

__device__ __forceinline__ void Store8(__half* dst, const float* v) {
  uint4 u;
  __half2 h[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
  u.x = *reinterpret_cast<uint32_t*>(&h[0]);
  u.y = *reinterpret_cast<uint32_t*>(&h[1]);
  u.z = *reinterpret_cast<uint32_t*>(&h[2]);
  u.w = *reinterpret_cast<uint32_t*>(&h[3]);
  *reinterpret_cast<uint4*>(dst) = u;
}
__device__ __forceinline__ void Store8(float* dst, const float* v) {
  reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) DequantizeKernel(const DequantParams<T> p) {
  __shared__ __align__(16) float chunk[kChunk];
  __shared__ float lut[256];
  const int tid = threadIdx.x;
  const int entries = 1 << p.bits;
  const int64_t items = p.rows * p.chunks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t r = item / p.chunks, n = p.n0 + r;
    const int64_t k0 = (item - r * p.chunks) * kChunk;
    const int64_t kk = k0 + kCodesPerThread * tid;
    __syncthreads();  // the previous item is done with `chunk` and `lut`
    for (int i = tid; i < entries; i += kThreads) lut[i] = ToFloat(p.lut[(n << p.bits) + i]);
    __syncthreads();
    float v[kCodesPerThread];
    if (kk < p.K) {
      const uint32_t* tile = p.q + (n >> 4) * p.words;
#pragma unroll
      for (int i = 0; i < kCodesPerThread; ++i)
        v[i] = kk + i < p.K ? lut[layout::CodeAt(tile, static_cast<int>(n & 15), kk + i, p.K, p.bits)] : 0.f;
    }
    if (p.indptr) {  // add the row's sparse entries of this chunk in shared memory (fp32)
      if (kk < p.K) {
#pragma unroll
        for (int i = 0; i < kCodesPerThread; ++i) chunk[kCodesPerThread * tid + i] = v[i];
      }
      __syncthreads();
      const int64_t end = p.indptr[n + 1];
      for (int64_t e = p.indptr[n] + tid; e < end; e += kThreads) {
        const int64_t k = p.indices[e];
        if (k >= k0 && k < k0 + kChunk) atomicAdd(&chunk[k - k0], ToFloat(p.values[e]));
      }
      __syncthreads();
      if (kk < p.K) {
#pragma unroll
        for (int i = 0; i < kCodesPerThread; ++i) v[i] = chunk[kCodesPerThread * tid + i];
      }
    }
    if (kk < p.K) {
      T* dst = p.w + r * p.ldw + kk;
      if (kk + kCodesPerThread <= p.K) {
        Store8(dst, v);
      } else {
#pragma unroll
        for (int i = 0; i < kCodesPerThread; ++i)
          if (kk + i < p.K) dst[i] = FromFloat<T>(v[i]);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) BiasFillKernel(T* y, const T* bias, int64_t M, int64_t N) {
  const int64_t total = M * N, stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride)
    y[i] = bias[i % N];
}

std::string Finish(cudaError_t e, const char* what) {
  const cudaError_t last = cudaGetLastError();
  if (e == cudaSuccess) e = last;
  return e == cudaSuccess ? "" : CudaMessage(e, what);
}

template <typename T>
std::string Dequantize(const Problem& p, const DeviceArgs& d, int64_t n0, int64_t rows, void* w, int64_t ldw,
                       cudaStream_t stream, const DeviceInfo& dev) {
  DequantParams<T> q{};
  q.q = d.qweight;
  q.lut = static_cast<const T*>(d.lut);
  q.indptr = p.has_sparse ? d.indptr : nullptr;
  q.indices = d.indices;
  q.values = static_cast<const T*>(d.values);
  q.w = static_cast<T*>(w);
  q.n0 = n0;
  q.rows = rows;
  q.K = p.K;
  q.words = p.words;
  q.ldw = ldw;
  q.chunks = (p.K + kChunk - 1) / kChunk;
  q.bits = p.bits;
  const int64_t items = rows * q.chunks;
  const int64_t ctas = std::max<int64_t>(1, std::min<int64_t>(items, static_cast<int64_t>(dev.sms) * 8));
  return Finish(LaunchKernel(&DequantizeKernel<T>, dim3(static_cast<unsigned>(ctas)), dim3(kThreads), 0, stream,
                             false, q),
                "launching the dequantize kernel");
}

template <typename T>
std::string BiasFill(const Problem& p, const DeviceArgs& d, cudaStream_t stream, const DeviceInfo& dev) {
  const int64_t total = p.M * p.N;
  const int64_t ctas =
      std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, static_cast<int64_t>(dev.sms) * 16));
  return Finish(LaunchKernel(&BiasFillKernel<T>, dim3(static_cast<unsigned>(ctas)), dim3(kThreads), 0, stream, false,
                             static_cast<T*>(d.y), static_cast<const T*>(d.bias), p.M, p.N),
                "launching the bias kernel");
}

}  // namespace

std::string LaunchDequantize(const Problem& p, const DeviceArgs& args, int64_t n0, int64_t rows, void* w,
                             int64_t ldw, cudaStream_t stream, const DeviceInfo& dev) {
  if (ldw % 8 != 0 || ldw < p.K || reinterpret_cast<uintptr_t>(w) % 16 != 0 || n0 < 0 || rows < 1 || n0 + rows > p.N)
    return "SqueezeMatMul (CUDA): internal error: bad dequantize arguments";
  return args.half ? Dequantize<__half>(p, args, n0, rows, w, ldw, stream, dev)
                   : Dequantize<float>(p, args, n0, rows, w, ldw, stream, dev);
}

std::string LaunchBiasFill(const Problem& p, const DeviceArgs& args, cudaStream_t stream, const DeviceInfo& dev) {
  return args.half ? BiasFill<__half>(p, args, stream, dev) : BiasFill<float>(p, args, stream, dev);
}

cudaError_t CheckKernelImage() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, &BiasFillKernel<float>);  // cudaErrorNoKernelImageForDevice if none fits
}

}  // namespace sqllm::cuda

// CUDA SqueezeMatMul, simple version: one block per (output row, row of A). Correct for every
// shape and bit width; the bandwidth-bound decode and tensor-core prefill paths replace it.
#include <cuda_fp16.h>

#include "launch.h"

namespace sqllm::cuda {
namespace {

constexpr int kThreads = 128;

// The part of Problem a kernel needs, as a plain struct (kernel parameters must be trivially copyable).
struct Dims {
  int64_t M, K, N, words;
  int bits;
};

__device__ inline float ToFloat(float v) { return v; }
__device__ inline float ToFloat(__half v) { return __half2float(v); }
template <typename T> __device__ inline T FromFloat(float v);
template <> __device__ inline float FromFloat<float>(float v) { return v; }
template <> __device__ inline __half FromFloat<__half>(float v) { return __float2half_rn(v); }

__device__ inline uint32_t CodeAt(const uint32_t* w, int64_t k, int bits) {
  const int64_t pos = k * bits;
  const int64_t i = pos >> 5;
  const int s = static_cast<int>(pos & 31);
  uint64_t v = w[i];
  if (s + bits > 32) v |= static_cast<uint64_t>(w[i + 1]) << 32;
  return static_cast<uint32_t>(v >> s) & ((1u << bits) - 1);
}

template <typename T>
__global__ void RowKernel(Dims p, const T* a, const uint32_t* qweight, const T* lut, const int32_t* indptr,
                          const int32_t* indices, const T* values, const T* bias, T* y) {
  const int64_t n = blockIdx.x, m = blockIdx.y;
  const uint32_t* w = qweight + n * p.words;
  const T* l = lut + (n << p.bits);
  const T* am = a + m * p.K;
  float acc = 0.f;
  for (int64_t k = threadIdx.x; k < p.K; k += blockDim.x) acc += ToFloat(l[CodeAt(w, k, p.bits)]) * ToFloat(am[k]);
  if (indptr)
    for (int64_t j = indptr[n] + threadIdx.x; j < indptr[n + 1]; j += blockDim.x)
      acc += ToFloat(values[j]) * ToFloat(am[indices[j]]);
  for (int off = 16; off; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  __shared__ float warp_sums[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int i = 0; i < kThreads / 32; ++i) s += warp_sums[i];
    if (bias) s += ToFloat(bias[n]);
    y[m * p.N + n] = FromFloat<T>(s);
  }
}

template <typename T>
std::string Launch(const Problem& p, const DeviceArgs& d, cudaStream_t stream) {
  if (p.M > 65535) return "SqueezeMatMul (CUDA): M > 65535 is not supported by the simple kernel";
  RowKernel<T><<<dim3(static_cast<unsigned>(p.N), static_cast<unsigned>(p.M)), kThreads, 0, stream>>>(
      Dims{p.M, p.K, p.N, p.words, p.bits}, static_cast<const T*>(d.a), d.qweight, static_cast<const T*>(d.lut), d.indptr, d.indices,
      static_cast<const T*>(d.values), static_cast<const T*>(d.bias), static_cast<T*>(d.y));
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : std::string("SqueezeMatMul (CUDA): launch failed: ") + cudaGetErrorString(e);
}

}  // namespace

std::string LaunchSqueezeMatMul(const Problem& p, const DeviceArgs& args, cudaStream_t stream) {
  return args.half ? Launch<__half>(p, args, stream) : Launch<float>(p, args, stream);
}

}  // namespace sqllm::cuda

// Launchers of the individual CUDA kernels (one per .cu file), used by dispatch.cc. Each checks its
// own preconditions on the host and returns "" or an error message; `*launched` tells whether the
// kernel took the problem (false: the caller must use another kernel).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "device_info.h"
#include "launch.h"

namespace sqllm::cuda {

// The tensor-core decode kernels (fp16, bits 3 and 4, 1 <= M <= 8, A fits in shared memory) come
// in variants; decode_policy.cc picks one per problem (docs/cuda-kernels.md).
enum DecodeVariant : int {
  kDecodeBase = 0,  // decode_mma.cu: the baseline kernel
  kDecodePipe,      // decode_pipe.cu: ring of 2 items per warp, GPU filled (3 CTAs/SM)
  kDecodeRoom,      // decode_pipe.cu: as pipe, one CTA slot per SM left for the next kernel (PDL)
  kDecodeDeep,      // decode_pipe.cu: ring of 4 items per warp (2 CTAs/SM)
  kDecodeDual,      // decode_pipe.cu: as pipe, 4 bits with the dual table layout (no 3-bit form)
  kDecodePair,      // decode_pipe.cu: 4 bits with a 256-entry pair table (2 CTAs/SM; no 3-bit form)
  kDecodeVariants
};

// decode_mma.cu: the baseline ("base").
std::string LaunchDecodeMma(const Problem& p, const DeviceArgs& args, cudaStream_t stream, bool pdl,
                            bool qweight_constant, const DeviceInfo& dev, bool* launched);

// decode_pipe.cu: the pipelined variants (`variant` > kDecodeBase). qweight_constant /
// lut_constant: those inputs may be read before griddepcontrol.wait.
std::string LaunchDecodePipe(int variant, const Problem& p, const DeviceArgs& args, cudaStream_t stream, bool pdl,
                             bool qweight_constant, bool lut_constant, const DeviceInfo& dev, bool* launched);

// decode_policy.cc: variant names ("base", "pipe", ...; null when out of range), the variant for a
// problem (SQLLM_CUDA_DECODE_VARIANT, else the per-shape table), and a launcher for any variant.
const char* DecodeVariantName(int variant);
int ChooseDecodeVariant(const Problem& p);
std::string LaunchDecodeVariant(int variant, const Problem& p, const DeviceArgs& args, cudaStream_t stream, bool pdl,
                                bool qweight_constant, bool lut_constant, const DeviceInfo& dev, bool* launched);

// decode_generic.cu: any T, any bits, 1 <= M <= 8, any K.
std::string LaunchDecodeGeneric(const Problem& p, const DeviceArgs& args, cudaStream_t stream, const DeviceInfo& dev);

// prefill.cu: rows [n0, n0 + rows) of W = lut[code] + S, as T, into w (row stride ldw elements,
// ldw % 8 == 0, w 16-byte aligned).
std::string LaunchDequantize(const Problem& p, const DeviceArgs& args, int64_t n0, int64_t rows, void* w,
                             int64_t ldw, cudaStream_t stream, const DeviceInfo& dev);
// prefill.cu: Y[m, n] = bias[n] for all m < M (so that the GEMM can accumulate with beta = 1).
std::string LaunchBiasFill(const Problem& p, const DeviceArgs& args, cudaStream_t stream, const DeviceInfo& dev);

}  // namespace sqllm::cuda

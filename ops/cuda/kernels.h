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

// decode_tc.cu: the tensor-core decode kernel (fp16, bits 3 and 4, sm_90+; any M, in chunks that
// fit A in shared memory). weights_constant: qweight and the LUT may be read before griddepcontrol.wait.
std::string LaunchDecodeTc(const Problem& p, const DeviceArgs& args, cudaStream_t stream, bool pdl,
                           bool weights_constant, const DeviceInfo& dev, bool* launched);

// decode_generic.cu: any T, any bits, 1 <= M <= 8, any K (CUDA cores; what decode_tc.cu declines).
std::string LaunchDecodeGeneric(const Problem& p, const DeviceArgs& args, cudaStream_t stream, const DeviceInfo& dev);

// prefill.cu: rows [n0, n0 + rows) of W = lut[code] + S, as T, into w (row stride ldw elements,
// ldw % 8 == 0, w 16-byte aligned).
std::string LaunchDequantize(const Problem& p, const DeviceArgs& args, int64_t n0, int64_t rows, void* w,
                             int64_t ldw, cudaStream_t stream, const DeviceInfo& dev);
// prefill.cu: Y[m, n] = bias[n] for all m < M (so that the GEMM can accumulate with beta = 1).
std::string LaunchBiasFill(const Problem& p, const DeviceArgs& args, cudaStream_t stream, const DeviceInfo& dev);

// prefill.cu: whether this build holds machine code (or PTX) that the current device can run.
cudaError_t CheckKernelImage();

}  // namespace sqllm::cuda

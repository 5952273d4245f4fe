// Per-device facts the launchers need (cached: queried once per device, never synchronising), and
// the few tuning switches read once from the environment.
#pragma once

#include <cstdint>
#include <string>

namespace sqllm::cuda {

struct DeviceInfo {
  int device = 0;
  int sms = 0;             // streaming multiprocessors
  int cc_major = 0, cc_minor = 0;
  int64_t smem_optin = 0;  // max dynamic shared memory per block after opting in (bytes)
  int64_t smem_per_sm = 0;  // shared memory per multiprocessor (bytes)
};

// Facts about the current device ("" or an error message).
std::string CurrentDevice(DeviceInfo* out);

// Environment switches (read once per process):
//   SQLLM_CUDA_PDL=0                disable programmatic dependent launch (default: on, sm_90+)
//   SQLLM_CUDA_DECODE_MAX_M=<int>   fp16: largest M run by the decode kernels, in chunks of 8
//                                   (default 32; fp32 always uses the decode kernel up to M = 8)
//   SQLLM_CUDA_PREFILL_CHUNK_MB=<n> prefill: dequantize and multiply at most this many MiB of W
//                                   per step (default 256; bounds the scratch buffer)
struct Tuning {
  bool pdl = true;
  int64_t decode_max_m = 32;
  int64_t prefill_chunk_bytes = int64_t{256} << 20;
};
const Tuning& GetTuning();

}  // namespace sqllm::cuda

#include "device_info.h"

#include <cuda_runtime.h>

#include <cstdlib>
#include <mutex>

namespace sqllm::cuda {
namespace {

constexpr int kMaxDevices = 64;

int64_t EnvInt(const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  if (end == v || *end != '\0' || x < lo || x > hi) return fallback;
  return x;
}

}  // namespace

std::string CurrentDevice(DeviceInfo* out) {
  static std::mutex mutex;
  static DeviceInfo cache[kMaxDevices];
  static bool valid[kMaxDevices] = {};
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess)
    return std::string("SqueezeMatMul (CUDA): cudaGetDevice: ") + cudaGetErrorString(e);
  if (device < 0 || device >= kMaxDevices) return "SqueezeMatMul (CUDA): device ordinal out of range";
  std::lock_guard<std::mutex> lock(mutex);
  if (!valid[device]) {
    DeviceInfo d;
    d.device = device;
    int smem = 0, smem_sm = 0;
    for (auto [attr, dst] : {std::pair<cudaDeviceAttr, int*>{cudaDevAttrMultiProcessorCount, &d.sms},
                             {cudaDevAttrComputeCapabilityMajor, &d.cc_major},
                             {cudaDevAttrComputeCapabilityMinor, &d.cc_minor},
                             {cudaDevAttrMaxSharedMemoryPerBlockOptin, &smem},
                             {cudaDevAttrMaxSharedMemoryPerMultiprocessor, &smem_sm}}) {
      e = cudaDeviceGetAttribute(dst, attr, device);
      if (e != cudaSuccess)
        return std::string("SqueezeMatMul (CUDA): cudaDeviceGetAttribute: ") + cudaGetErrorString(e);
    }
    d.smem_optin = smem;
    d.smem_per_sm = smem_sm;
    cache[device] = d;
    valid[device] = true;
  }
  *out = cache[device];
  return "";
}

const Tuning& GetTuning() {
  static const Tuning tuning = [] {
    Tuning t;
    t.pdl = EnvInt("SQLLM_CUDA_PDL", 1, 0, 1) != 0;
    t.decode_max_m = EnvInt("SQLLM_CUDA_DECODE_MAX_M", t.decode_max_m, 8, int64_t{1} << 20);
    t.prefill_chunk_bytes = EnvInt("SQLLM_CUDA_PREFILL_CHUNK_MB", 256, 1, int64_t{1} << 20) << 20;
    return t;
  }();
  return tuning;
}

}  // namespace sqllm::cuda

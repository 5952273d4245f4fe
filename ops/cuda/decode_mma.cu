// Decode path for fp16, bits 3 and 4, M <= 8: a LUT "GEMV" that dequantizes in shared-memory
// lookup tables and multiplies on tensor cores (mma.sync m16n8k16, fp32 accumulation).
//
// This file holds the BASELINE kernel (decode variant "base"); decode_pipe.cu holds the pipelined
// variants, which share the fragment mapping, tables and epilogue below (decode_mma_common.cuh).
// The derivation below applies to both; what the pipelined kernels change is in decode_pipe.cu.
//
// Why tensor cores for a GEMV. At 3 bits the H100 must consume ~25-30 codes per clock per SM to
// stream the codes at full HBM bandwidth. One FFMA per code per row of A leaves no issue slots for
// extracting the codes and looking them up, and M up to 8 multiplies that. With mma.sync the
// multiply-add is free (one instruction per 16 rows x 16 k x 8 rows of A); what remains per code
// is the lookup, so the kernel is built around making that cheap:
//
// Work decomposition
//   CTA = 8 warps (256 threads). Row tile = 16 consecutive rows of W (output features). A CTA
//   handles tiles_per_cta consecutive row tiles, one after the other (the host picks it so that
//   the grid is one wave). Within a tile the 8 warps split K: K is cut into k-tiles of 256 codes,
//   warp w takes k-tiles w, w+8, w+16, ... and accumulates a 16 x 8 fp32 partial in mma
//   registers; the 8 partials are summed through shared memory at the end of the tile. The part
//   of K after the last whole k-tile (K % 256 codes) is done on CUDA cores in the epilogue.
//   (8 warps so that at K = 4096 every warp has 2 k-tiles, both in flight from the start: a
//   4096 x 4096 layer is only ~48 KB of codes per SM, so latency, not issue, is what matters.)
//
// mma fragment mapping (PTX ISA, m16n8k16 .f16): lane = 4*g + t (g = groupID, t = thread in
// group). The A operand (16 x 16, row-major) is W: rows g and g+8 of the tile, columns (k)
// {2t, 2t+1, 2t+8, 2t+9}. The B operand (16 x 8) is A^T: column n = g is row m = g of A, rows
// (k) {2t, 2t+1, 2t+8, 2t+9}. C (16 x 8 fp32): c0,c1 = (row g, m 2t, 2t+1), c2,c3 = (row g+8,
// m 2t, 2t+1). The order of k inside a dot product is free, so each mma's 16 k indices are mapped
// to physical k such that every lane reads CONTIGUOUS codes of its two rows:
//   mma step j of a k-tile: lane t's k indices {2t, 2t+1} -> codes 4j', 4j'+1 of its block and
//   {2t+8, 2t+9} -> codes 4j'+2, 4j'+3, where a lane's 64 codes per row per k-tile are
//     3 bits: one block of 64 contiguous codes, block index t      (6 words = 3 x 8-byte loads)
//     4 bits: two blocks of 32 contiguous codes, block indices t and 4+t (4 words = one 16-byte
//             load each; the 4 lanes of a row read 64 contiguous bytes per instruction)
//   and the B fragment uses the same map, so each step's B is 4 consecutive halves of A row g.
//
// Lookup tables (shared memory, rebuilt per row tile; bank-conflict free by construction)
//   Lane L of every warp reads only its own copy of the tables of its two rows (g and g+8), and
//   its copy lives entirely in bank L: word (slot * ENTRIES + e) * 32 + L, slot 0 = row g,
//   slot 1 = row g+8. Whatever codes the 32 lanes hold, one lookup instruction is one wavefront.
//     3 bits: ENTRIES = 64 pair entries: e = c(k) | c(k+1) << 3 -> half2(lut[c(k)], lut[c(k+1)]),
//             which IS the mma A-fragment register; one lookup per two codes; 16 KiB.
//     4 bits: ENTRIES = 16 single entries (fp16 in the low half of the word); two lookups and one
//             PRMT per A-fragment register; 4 KiB.
//   The address of a lookup is (field << 7) | (slot * ENTRIES * 128 + L * 4): one funnel/shift
//   and one LOP3 per lookup, no multiply.
//
// A (the activations) is staged once per CTA in shared memory as fp16 with 8 bytes of padding
// after every block of BL = 64 (3 bits) / 32 (4 bits) halves and a row stride RS = 32 (mod 128)
// bytes: the B-fragment loads (8 bytes per lane, lanes (g, t)) then hit 64 distinct banks over the
// two half-warp wavefronts: bank(g, t) = 8g + (2 BL + 8) t / 4 (mod 32), conflict free for both
// block sizes. Lanes with g >= M load nothing (B = 0, their C columns are discarded).
//
// Loads in flight: each warp prefetches the codes of its next k-tile (possibly of the next row
// tile) into registers while it computes the current one. With PDL (sm_90+), the first k-tile's
// codes are requested before griddepcontrol.wait when qweight is constant (an initializer), so
// the kernel streams weights while the previous kernel on the stream finishes.
//
// Epilogue per tile (warp w owns rows 2w, 2w+1): sum of the 8 warp partials + K tail (CUDA cores)
// + sparse part + bias, rounded once to fp16. The sparse part is fused: the warp strides over the
// CSR entries of its 2 rows (contiguous in CSR order) 32 at a time, gathers A from shared memory,
// and adds into per-row registers; no atomics, and the work per warp is proportional to the
// entries of its rows. The first 64 entries of the 2 rows are loaded before the tile's mma loop
// (their row bounds were read during the previous tile) so their latency is hidden.
//
// Table build (per tile, all 256 threads): thread -> row r = tid % 16, entries tid / 16 + 16 i;
// it writes the 4 lane copies of an entry (16 contiguous bytes, banks 4g .. 4g+3 of its row's
// group g) with one 16-byte store; the 8 lanes of a quarter warp are 8 different groups, so the
// stores are conflict free.
//
// Shared memory (bytes): [0, TAB) tables | [TAB, TAB + 4096) warp partials, float [8][16][8] |
// [TAB + 4096, + M * RS) A.
#include "decode_mma_common.cuh"

namespace sqllm::cuda {
namespace {

using namespace mma;

constexpr int kMinBlocks = 3;  // CTAs per SM the register budget is cut for (<= 80 regs)
constexpr int kPad = 8;        // A layout: ASmem<BITS, 8>

template <int BITS>
struct BaseLayout {
  static constexpr int kTabOffset = 0;
  static constexpr int kRedOffset = Codes<BITS>::kTabBytes;
  static constexpr int kAOffset = kRedOffset + kRedBytes;
};

// One k-tile: 16 mma steps. tab0: byte offset of this lane's slot-0 table copy with entry 0
// (slot 1 at + kSlotBytes); a_addr: byte offset of A(g, first k of this lane's block 0 in this k-tile).
template <int BITS>
__device__ __forceinline__ void ComputeItem(const unsigned char* smem, const uint32_t (&w)[2][Codes<BITS>::kLaneWords],
                                            uint32_t tab0, uint32_t a_addr, bool b_on, float (&c)[4]) {
  using L = Codes<BITS>;
  using A = ASmem<BITS, kPad>;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int b = j / L::kStepsPerBlock, jj = j % L::kStepsPerBlock;
    uint32_t b0 = 0, b1 = 0;
    if (b_on) {
      const uint2 v = Lds<uint2>(smem, a_addr + b * A::kBlockBytes + 8 * jj);
      b0 = v.x, b1 = v.y;
    }
    uint32_t a[4];
    if constexpr (BITS == 3) Lookup3(smem, w, j, tab0, a);
    else Lookup4(smem, w, b, jj, tab0, a);
    Mma16816(c, a[0], a[1], a[2], a[3], b0, b1);
  }
}

template <int BITS>
__global__ void __launch_bounds__(kThreads, kMinBlocks) DecodeMmaKernel(const MmaParams p) {
  using L = Codes<BITS>;
  using Lay = BaseLayout<BITS>;
  using A = ASmem<BITS, kPad>;
  extern __shared__ __align__(16) unsigned char smem[];

  PdlTrigger();

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.x) * p.tiles_per_cta;
  const int64_t tile_end = MinI64(tile_begin + p.tiles_per_cta, p.n_tiles);
  // This warp's k-tiles: warp + kWarps * i for i < count.
  const int count = p.k_tiles > warp ? (p.k_tiles - warp + kWarps - 1) / kWarps : 0;

  uint32_t cur[2][L::kLaneWords];
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int i = 0; i < L::kLaneWords; ++i) cur[s][i] = 0;
  if (count > 0 && p.q_before_wait) LoadItem<BITS>(p, tile_begin, warp, g, t, cur);
  PdlWait();  // everything below may read what the previous kernel on the stream wrote
  if (count > 0 && !p.q_before_wait) LoadItem<BITS>(p, tile_begin, warp, g, t, cur);

  // Prologue: A into shared memory, the first tile's tables and CSR bounds.
  LutRegs lut_regs;
  LoadLut<BITS>(p, tile_begin, tid, lut_regs);
  int ip = LoadIndptr(p, tile_begin, warp, lane);
  {
    const int K = p.K, k4 = (K + 3) >> 2, total = p.M * k4;
    for (int i = tid; i < total; i += kThreads) {
      const int m = i / k4, k0 = (i - m * k4) * 4;
      const __half* src = p.a + static_cast<int64_t>(m) * K + k0;
      uint2 v;
      if (p.a_vec) {
        v = *reinterpret_cast<const uint2*>(src);
      } else {
        uint32_t h[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) h[j] = k0 + j < K ? LoadU16(src + j) : 0u;
        v = make_uint2(h[0] | (h[1] << 16), h[2] | (h[3] << 16));
      }
      Sts(smem, Lay::kAOffset + A::Offset(p.a_row_bytes, m, k0), v);
    }
  }
  BuildTables<BITS>(smem, Lay::kTabOffset, tid, lut_regs);
  __syncthreads();

  // Per-lane constants: table copies (bank = lane) and the B-fragment address base.
  const uint32_t tab0 = Lay::kTabOffset + lane * 4;
  const bool b_on = g < p.M;
  const uint32_t a_lane = Lay::kAOffset + (b_on ? g : 0) * p.a_row_bytes + t * A::kLaneBytes;

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const bool has_next = tile + 1 < tile_end;
    // Next tile's lut values and CSR bounds: requested now, used after this tile's mma loop.
    if (has_next) LoadLut<BITS>(p, tile + 1, tid, lut_regs);
    const int ip_next = has_next ? LoadIndptr(p, tile + 1, warp, lane) : 0;
    Sparse sp;
    PrefetchSparse(p, ip, lane, sp);

    float c[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < count; ++i) {
      int64_t next_tile = tile;
      int next_i = i + 1;
      if (next_i == count) next_tile = tile + 1, next_i = 0;
      const bool prefetch = next_tile < tile_end;
      uint32_t nxt[2][L::kLaneWords];
      if (prefetch) LoadItem<BITS>(p, next_tile, warp + kWarps * next_i, g, t, nxt);
      const int kt = warp + kWarps * i;
      ComputeItem<BITS>(smem, cur, tab0, a_lane + kt * A::kKTileBytes, b_on, c);
      if (prefetch) {
#pragma unroll
        for (int s = 0; s < 2; ++s)
#pragma unroll
          for (int j = 0; j < L::kLaneWords; ++j) cur[s][j] = nxt[s][j];
      }
    }
    StorePartials(smem, Lay::kRedOffset, warp, g, t, c);
    __syncthreads();  // partials complete; tables no longer read
    Epilogue<BITS, kPad>(smem, Lay::kRedOffset, Lay::kAOffset, p, tile, warp, lane, sp);
    if (has_next) {
      BuildTables<BITS>(smem, Lay::kTabOffset, tid, lut_regs);
      ip = ip_next;
    }
    __syncthreads();  // next tables built; partials consumed
  }
}

template <int BITS>
std::string Launch(const Problem& p, const DeviceArgs& d, cudaStream_t stream, bool pdl, bool qweight_constant,
                   const DeviceInfo& dev, bool* launched) {
  using Lay = BaseLayout<BITS>;
  *launched = false;
  const int64_t rs = ARowStride<BITS, kPad>(p.K);
  const int64_t smem = Lay::kAOffset + p.M * rs;
  if (smem > dev.smem_optin) return "";  // A does not fit: the generic kernel takes it

  auto kernel = &DecodeMmaKernel<BITS>;
  int blocks_per_sm = 0;
  if (auto err = KernelOccupancy(kernel, dev, smem, &blocks_per_sm); !err.empty()) return err;
  if (blocks_per_sm < 1) return "";  // cannot run: the generic kernel takes it

  MmaParams m;
  if (auto err = CommonParams<BITS>(p, d, &m); !err.empty()) return err;
  const int64_t slots = static_cast<int64_t>(dev.sms) * blocks_per_sm;
  m.tiles_per_cta = std::max<int64_t>(1, (m.n_tiles + slots - 1) / slots);
  m.a_row_bytes = static_cast<uint32_t>(rs);
  m.q_before_wait = (pdl && qweight_constant) ? 1 : 0;

  const int64_t grid = (m.n_tiles + m.tiles_per_cta - 1) / m.tiles_per_cta;
  if (grid > 0x7fffffff) return "SqueezeMatMul (CUDA): N too large for the decode grid";
  cudaError_t e = LaunchKernel(kernel, dim3(static_cast<unsigned>(grid)), dim3(kThreads), static_cast<size_t>(smem),
                               stream, pdl, m);
  const cudaError_t last = cudaGetLastError();
  if (e == cudaSuccess) e = last;
  if (e != cudaSuccess) return CudaMessage(e, "launching the decode (mma) kernel");
  *launched = true;
  return "";
}

}  // namespace

std::string LaunchDecodeMma(const Problem& p, const DeviceArgs& args, cudaStream_t stream, bool pdl,
                            bool qweight_constant, const DeviceInfo& dev, bool* launched) {
  *launched = false;
  if (!args.half || p.M < 1 || p.M > 8 || dev.cc_major < 8 || p.K > 0x7fffffff) return "";
  if (p.bits == 3) return Launch<3>(p, args, stream, pdl, qweight_constant, dev, launched);
  if (p.bits == 4) return Launch<4>(p, args, stream, pdl, qweight_constant, dev, launched);
  return "";
}

}  // namespace sqllm::cuda

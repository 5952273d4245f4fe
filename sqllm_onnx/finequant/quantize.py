"""Block-wise uniform (RTN) int4/int8 weight quantization in the layout of ORT's `com.microsoft.MatMulNBits`.

A weight W [N, K] (an nn.Linear's orientation) is cut along K into blocks of `block_size` values;
each block (n, b) gets its own scale s and zero point z (asymmetric min-max, zero included in the
range so that 0 is exact):

    lo = min(0, min W[n, block b]),  hi = max(0, max W[n, block b])
    s  = (hi - lo) / (2^bits - 1)    (stored in the activation dtype, fp16 or fp32)
    z  = clamp(round(-lo / s), 0, 2^bits - 1)
    q  = clamp(round(W / s) + z, 0, 2^bits - 1)          W ~ (q - z) * s

Codes and zero points are computed with the *stored* scale, so the dequantized matrix is exactly
what MatMulNBits computes. MatMulNBits tensors (checked against ORT 1.31 CPU by tests/test_finequant.py):

    B            uint8 [N, n_blocks, block_size * bits / 8]; codes packed least-significant bits first
                 (4-bit: element 2i in the low nibble, 2i+1 in the high nibble of byte i)
    scales       T [N, n_blocks]
    zero_points  uint8, 4-bit: [N, ceil(n_blocks / 2)], two per byte, low nibble first;
                 8-bit: [N, n_blocks]. (Absent, ORT assumes 2^(bits-1): symmetric quantization.)

with n_blocks = ceil(K / block_size); the padding of a last partial block holds the zero point
(dequantizes to 0; ORT ignores it anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SUPPORTED_BITS = (4, 8)
# Block sizes MatMulNBits accepts: a power of two >= 16. ORT 1.31's CPU kernel takes 16..256; its
# CUDA GEMV kernels (batch-1 decoding) take 16..128 for 4 bits and 16..256 for 8 bits.
BLOCK_SIZES = (16, 32, 64, 128, 256)
ROW_CHUNK_ELEMENTS = 1 << 22  # rows are quantized in chunks of about this many weights


@dataclass
class NBitsLayer:
    """One linear layer as MatMulNBits inputs (B, scales, zero_points) plus the attributes and bias."""

    B: np.ndarray  # uint8 [N, n_blocks, blob]
    scales: np.ndarray  # T [N, n_blocks]
    zero_points: np.ndarray  # uint8 packed
    bits: int
    block_size: int
    K: int
    bias: np.ndarray | None = None  # T [N]

    @property
    def N(self) -> int:
        return int(self.B.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.B.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.B, self.scales, self.zero_points, self.bias) if a is not None)

    def astype(self, dtype) -> "NBitsLayer":
        """The same layer with its float tensors (scales, bias) cast to `dtype` (codes unchanged)."""
        cast = lambda a: None if a is None else np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
        return NBitsLayer(self.B, cast(self.scales), self.zero_points, self.bits, self.block_size, self.K,
                          cast(self.bias))

    def dequantize(self) -> np.ndarray:
        """W [N, K] float32, exactly (q - z) * s."""
        return dequantize(self.B, self.scales, self.zero_points, self.bits, self.block_size, self.K)


def check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))} (got {block_size!r})")


def _levels(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS} (got {bits!r})")
    return (1 << bits) - 1


def _row_chunks(W: torch.Tensor, bits: int, block_size: int, scale_dtype):
    """Yield (rows, w, valid, q, s, z) per chunk of rows of W [N, K], on W's device: w [r, n_blocks, block]
    (zero-padded), valid (False on the padding), q (float codes), s (scales in scale_dtype), z (float zero points)."""
    qmax = _levels(bits)
    check_block_size(block_size)
    N, K = W.shape
    n_blocks = -(-K // block_size)
    pad = n_blocks * block_size - K
    step = max(1, ROW_CHUNK_ELEMENTS // max(K, 1))
    for r0 in range(0, N, step):
        w = W[r0:r0 + step].to(torch.float32)
        valid = torch.ones_like(w, dtype=torch.bool)
        if pad:
            w = torch.nn.functional.pad(w, (0, pad))
            valid = torch.nn.functional.pad(valid, (0, pad))
        w = w.reshape(w.shape[0], n_blocks, block_size)
        valid = valid.reshape(w.shape)
        lo = torch.where(valid, w, torch.inf).amin(-1).clamp(max=0)
        hi = torch.where(valid, w, -torch.inf).amax(-1).clamp(min=0)
        s = ((hi - lo) / qmax).to(scale_dtype)
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero block: any scale works
        sf = s.to(torch.float32)
        z = torch.round(-lo / sf).clamp(0, qmax)
        q = (torch.round(w / sf[..., None]) + z[..., None]).clamp(0, qmax)
        q = torch.where(valid, q, z[..., None].expand_as(q))
        yield slice(r0, r0 + w.shape[0]), w, valid, q, s, z


def quantize_blocks(W: torch.Tensor, bits: int, block_size: int, scale_dtype=torch.float32):
    """(codes uint8 [N, n_blocks, block_size], scales [N, n_blocks] in scale_dtype, zero points uint8
    [N, n_blocks]) of W [N, K] (float; computed in float32 on W's device, returned on the CPU)."""
    N, K = W.shape
    n_blocks = -(-K // block_size)
    codes = torch.empty(N, n_blocks, block_size, dtype=torch.uint8)
    scales = torch.empty(N, n_blocks, dtype=scale_dtype)
    zeros = torch.empty(N, n_blocks, dtype=torch.uint8)
    for rows, _, _, q, s, z in _row_chunks(W.detach(), bits, block_size, scale_dtype):
        codes[rows] = q.to(torch.uint8).cpu()
        scales[rows] = s.cpu()
        zeros[rows] = z.to(torch.uint8).cpu()
    return codes, scales, zeros


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, K: int) -> torch.Tensor:
    """W [N, K] float32 from unpacked codes [N, n_blocks, block], scales and zero points [N, n_blocks]."""
    N = codes.shape[0]
    W = (codes.to(torch.float32) - zeros.to(torch.float32)[..., None]) * scales.to(torch.float32)[..., None]
    return W.reshape(N, -1)[:, :K]


def relative_error(W: torch.Tensor, bits: int, block_size: int, scale_dtype=torch.float32) -> float:
    """||W - dequantize(quantize(W))||_F / ||W||_F (the heuristic's statistic), on W's device."""
    err = norm = 0.0
    for _, w, valid, q, s, z in _row_chunks(W.detach(), bits, block_size, scale_dtype):
        w_hat = (q - z[..., None]) * s.to(torch.float32)[..., None]
        err += float(torch.where(valid, w_hat - w, 0).double().square().sum())
        norm += float(w.double().square().sum())
    return (err / norm) ** 0.5 if norm > 0 else 0.0


# ---- packing (numpy and torch, same bit order) ------------------------------------------------------

def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., n] codes -> uint8 [..., n * bits / 8], least-significant bits first."""
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes.copy()
    if bits == 4:
        if codes.shape[-1] % 2:
            codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], -1)
        return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)
    raise ValueError(f"bits must be one of {SUPPORTED_BITS} (got {bits!r})")


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of pack_codes: uint8 [..., n] codes."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[..., :n].copy()
    out = np.stack([packed & 0xF, packed >> 4], -1).reshape(*packed.shape[:-1], -1)
    return out[..., :n]


def unpack_codes_torch(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits == 8:
        return packed[..., :n]
    out = torch.stack([packed & 0xF, packed >> 4], -1).reshape(*packed.shape[:-1], -1)
    return out[..., :n]


def dequantize(B, scales, zero_points, bits: int, block_size: int, K: int) -> np.ndarray:
    """W [N, K] float32 from MatMulNBits tensors (the numpy reference of what ORT computes)."""
    B = np.asarray(B)
    N, n_blocks = B.shape[0], B.shape[1]
    codes = unpack_codes(B, bits, block_size).astype(np.float32)
    zeros = unpack_codes(zero_points, bits, n_blocks).astype(np.float32)
    s = np.asarray(scales).reshape(N, n_blocks).astype(np.float32)
    return ((codes - zeros[..., None]) * s[..., None]).reshape(N, -1)[:, :K]


def dequantize_torch(B: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, bits: int, block_size: int,
                     K: int) -> torch.Tensor:
    """W [N, K] float32, the torch twin of `dequantize` (used by NBitsLinear's eager forward)."""
    N, n_blocks = B.shape[0], B.shape[1]
    codes = unpack_codes_torch(B, bits, block_size)
    zeros = unpack_codes_torch(zero_points, bits, n_blocks)
    return dequantize_blocks(codes, scales.reshape(N, n_blocks), zeros, K)


def quantize_layer(W: torch.Tensor, bits: int, block_size: int, scale_dtype=np.float32, bias=None) -> NBitsLayer:
    """Quantize W [N, K] into MatMulNBits tensors (scales and bias in `scale_dtype`)."""
    scale_dtype = np.dtype(scale_dtype)
    torch_dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}[scale_dtype]
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise ValueError("the weight holds NaN or Inf")
    codes, scales, zeros = quantize_blocks(W, bits, block_size, torch_dtype)
    if not torch.isfinite(scales).all():
        raise ValueError(f"a block's scale overflows {scale_dtype.name}")
    B = pack_codes(codes.numpy(), bits)
    zp = pack_codes(zeros.numpy(), bits)
    b = None if bias is None else bias.detach().to(torch.float32).cpu().numpy().astype(scale_dtype)
    return NBitsLayer(B=np.ascontiguousarray(B), scales=np.ascontiguousarray(scales.numpy()),
                      zero_points=np.ascontiguousarray(zp), bits=bits, block_size=block_size, K=int(W.shape[1]),
                      bias=b)


__all__ = ["NBitsLayer", "SUPPORTED_BITS", "BLOCK_SIZES", "quantize_blocks", "dequantize_blocks", "relative_error",
           "pack_codes", "unpack_codes", "dequantize", "dequantize_torch", "quantize_layer", "check_block_size"]

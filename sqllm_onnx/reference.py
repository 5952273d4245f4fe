"""Numpy reference of ``sqllm.SqueezeMatMul`` (docs/op-spec.md) and the code packing it uses.

This module is the single source of truth for the op: the quantizer packs with ``pack_codes``, and
every kernel test compares ONNX Runtime's output against ``squeeze_matmul``. It favours clarity
over speed, except for packing, which runs on every layer of a model and is vectorised.
"""

from __future__ import annotations

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)
_ROWS_PER_CHUNK = 1024  # bounds the temporary bit arrays of pack/unpack to ~K*bits*1024 bytes


def words_per_row(K: int, bits: int) -> int:
    """Number of int32 words one output row of ``qweight`` takes: ceil(K*bits/32)."""
    return (K * bits + 31) // 32


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes ``[N, K]`` (integers in [0, 2^bits)) into ``qweight`` int32 ``[N, ceil(K*bits/32)]``.

    Per row, an LSB-first bit stream: code k occupies stream bits [k*bits, (k+1)*bits), stream bit i
    is bit i%32 of word i/32; padding bits are zero.
    """
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for bits={bits}")
    N, K = codes.shape
    W = words_per_row(K, bits)
    out = np.empty((N, W), dtype=np.int32)
    shifts = np.arange(bits, dtype=np.uint8)
    for r0 in range(0, N, _ROWS_PER_CHUNK):
        c = codes[r0:r0 + _ROWS_PER_CHUNK].astype(np.uint8)
        stream = ((c[:, :, None] >> shifts) & 1).reshape(c.shape[0], K * bits)
        padded = np.zeros((c.shape[0], W * 32), dtype=np.uint8)
        padded[:, :K * bits] = stream
        packed = np.packbits(padded, axis=1, bitorder="little")  # bytes, little-endian within words
        out[r0:r0 + _ROWS_PER_CHUNK] = packed.view("<u4").view(np.int32)
    return out


def unpack_codes(qweight: np.ndarray, K: int, bits: int) -> np.ndarray:
    """Inverse of ``pack_codes``: ``qweight`` ``[N, ceil(K*bits/32)]`` -> codes uint8 ``[N, K]``."""
    _check_bits(bits)
    qweight = np.ascontiguousarray(qweight, dtype=np.int32)
    N, W = qweight.shape
    if W != words_per_row(K, bits):
        raise ValueError(f"qweight has {W} words per row, expected ceil(K*bits/32) = {words_per_row(K, bits)}")
    out = np.empty((N, K), dtype=np.uint8)
    weights = (1 << np.arange(bits)).astype(np.uint8)
    for r0 in range(0, N, _ROWS_PER_CHUNK):
        q = qweight[r0:r0 + _ROWS_PER_CHUNK].astype("<u4")
        stream = np.unpackbits(q.view(np.uint8), axis=1, bitorder="little")[:, :K * bits]
        out[r0:r0 + _ROWS_PER_CHUNK] = stream.reshape(q.shape[0], K, bits) @ weights
    return out


def csr_to_dense(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, N: int, K: int) -> np.ndarray:
    """The sparse part S as a dense float64 ``[N, K]`` matrix (duplicate entries add)."""
    dense = np.zeros((N, K), dtype=np.float64)
    rows = np.repeat(np.arange(N), np.diff(np.asarray(indptr, dtype=np.int64)))
    np.add.at(dense, (rows, np.asarray(indices, dtype=np.int64)), np.asarray(values, dtype=np.float64))
    return dense


def dequantize(qweight, lut, K: int, bits: int, sparse_indptr=None, sparse_indices=None,
               sparse_values=None) -> np.ndarray:
    """W = lut[n, code(n, k)] + S[n, k] as float64 ``[N, K]``."""
    codes = unpack_codes(qweight, K, bits)
    lut = np.asarray(lut, dtype=np.float64)
    W = np.take_along_axis(lut, codes.astype(np.int64), axis=1)
    if sparse_indptr is not None:
        W += csr_to_dense(sparse_indptr, sparse_indices, sparse_values, lut.shape[0], K)
    return W


def squeeze_matmul(A, qweight, lut, sparse_indptr=None, sparse_indices=None, sparse_values=None,
                   bias=None, *, K: int, N: int, bits: int) -> np.ndarray:
    """Reference ``Y = A · Wᵀ (+ bias)``, computed in float64 and rounded once to A's dtype."""
    A = np.asarray(A)
    if A.shape[-1] != K:
        raise ValueError(f"A's last dimension is {A.shape[-1]}, expected K={K}")
    W = dequantize(qweight, lut, K, bits, sparse_indptr, sparse_indices, sparse_values)
    if W.shape[0] != N:
        raise ValueError(f"lut has {W.shape[0]} rows, expected N={N}")
    Y = A.astype(np.float64) @ W.T
    if bias is not None:
        Y += np.asarray(bias, dtype=np.float64)
    return Y.astype(A.dtype)

"""Numpy reference of ``sqllm.SqueezeMatMul`` (docs/op-spec.md) and the code packing it uses.

This module is the single source of truth for the op: the quantizer packs with ``pack_codes``, and
every kernel test compares ONNX Runtime's output against ``squeeze_matmul``. It favours clarity
over speed, except for packing, which runs on every layer of a model and is vectorised.
"""

from __future__ import annotations

import functools

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)
TILE_ROWS, GROUP_CODES, UNIT_GROUPS = 16, 64, 4  # the tiled layout (docs/op-spec.md, ops/include/sqllm/layout.h)
_TILES_PER_CHUNK = 64  # bounds the temporary bit arrays of pack/unpack to ~64 * 16 * K * bits bytes


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def qweight_shape(N: int, K: int, bits: int) -> tuple[int, int]:
    """Shape of ``qweight``: ``[ceil(N/16), 32 * ceil(K/64) * bits]`` int32 (one row per 16-row tile of W)."""
    return -(-N // TILE_ROWS), 32 * -(-K // GROUP_CODES) * bits


def legacy_row_shape(N: int, K: int, bits: int) -> tuple[int, int]:
    """Shape of the row-major ``qweight`` of sqllm-onnx 0.1 exports and checkpoints: ``[N, ceil(K*bits/32)]``."""
    return N, (K * bits + 31) // 32


CODE_LAYOUT = 2  # the op's `layout` attribute: 3-bit codes in nibble planes (ops/include/sqllm/layout.h)


@functools.lru_cache(maxsize=64)
def _tile_bit_positions(K: int, bits: int, code_layout: int = CODE_LAYOUT) -> np.ndarray:
    """For a tile, the physical bit (within the tile's words) of bit ``jb`` of code (r, k), flattened
    in (r, k, jb) order over r < 16, k < 64 * ceil(K/64): the layout of ops/include/sqllm/layout.h.
    ``code_layout`` 1 is the LSB-first 3-bit stream of earlier exports (for repacking them)."""
    G = -(-K // GROUP_CODES)
    full_units, partial = divmod(G, UNIT_GROUPS)
    r = np.arange(TILE_ROWS)[:, None, None]
    k = np.arange(G * GROUP_CODES)[None, :, None]
    jb = np.arange(bits)[None, None, :]
    g, h = r & 7, r >> 3
    kk = k & 255
    i, p, t, q, j = kk >> 6, (kk >> 5) & 1, (kk >> 3) & 3, (kk >> 2) & 1, kk & 3
    s = 2 * p + q
    unit = k >> 8
    full = unit < full_units
    ng = np.where(full, UNIT_GROUPS, partial)
    lane = 4 * g + t
    if bits == 3 and code_layout >= 2:
        # three planes of ng words: (h, p) = (0, 0), (1, 0), (0, 1) in the low 3 bits of nibble 4q + j;
        # (h, p) = (1, 1): bit jb in the 4th bit of the nibble in plane jb
        nibble = 4 * q + j
        spread = (h == 1) & (p == 1)
        plane = np.where(p == 1, 2, h)
        sb = np.where(spread, 32 * (jb * ng + i) + 4 * nibble + 3, 32 * (plane * ng + i) + 4 * nibble + jb)
    else:
        sb = ((h * ng + i) * 16 + 4 * s + j) * bits + jb
    w, bit = sb >> 5, sb & 31
    word = unit * 128 * bits + np.where(full, (w >> 2) * 128 + 4 * lane + (w & 3), w * 32 + lane)
    positions = (word * 32 + bit).reshape(-1)
    assert np.array_equal(np.sort(positions), np.arange(positions.size)), "the layout is a permutation"
    return positions


def pack_codes(codes: np.ndarray, bits: int, code_layout: int = CODE_LAYOUT) -> np.ndarray:
    """Pack codes ``[N, K]`` (integers in [0, 2^bits)) into ``qweight``: int32 ``qweight_shape(N, K, bits)``.

    The tiled layout of docs/op-spec.md: 16-row tiles, K in groups of 64 codes, four groups to a unit,
    each unit stored as 32 lanes' bit streams (rows and K padded with code 0).
    """
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for bits={bits}")
    N, K = codes.shape
    if N == 0 or K == 0:
        raise ValueError(f"codes must have N, K >= 1, got shape {codes.shape}")
    T, words = qweight_shape(N, K, bits)
    positions = _tile_bit_positions(K, bits, code_layout)
    Kp = words // (32 * bits) * GROUP_CODES
    out = np.empty((T, words), dtype=np.int32)
    shifts = np.arange(bits, dtype=np.uint8)
    for t0 in range(0, T, _TILES_PER_CHUNK):
        t1 = min(T, t0 + _TILES_PER_CHUNK)
        c = np.zeros(((t1 - t0) * TILE_ROWS, Kp), dtype=np.uint8)
        block = codes[t0 * TILE_ROWS:t1 * TILE_ROWS]
        c[:block.shape[0], :K] = block
        stream = ((c.reshape(t1 - t0, TILE_ROWS, Kp, 1) >> shifts) & 1).reshape(t1 - t0, -1)
        physical = np.empty_like(stream)
        physical[:, positions] = stream
        out[t0:t1] = np.packbits(physical, axis=1, bitorder="little").view("<u4").view(np.int32)
    return out


def unpack_codes(qweight: np.ndarray, K: int, bits: int, N: int, code_layout: int = CODE_LAYOUT) -> np.ndarray:
    """Inverse of ``pack_codes``: ``qweight`` (tiled) -> codes uint8 ``[N, K]``."""
    _check_bits(bits)
    qweight = np.ascontiguousarray(qweight, dtype=np.int32)
    shape = qweight_shape(N, K, bits)
    if qweight.shape != shape:
        raise ValueError(f"qweight has shape {list(qweight.shape)}, expected [ceil(N/16), 32*ceil(K/64)*bits] = {list(shape)}")
    T, words = shape
    positions = _tile_bit_positions(K, bits, code_layout)
    Kp = words // (32 * bits) * GROUP_CODES
    weights = (1 << np.arange(bits)).astype(np.uint8)
    out = np.empty((T * TILE_ROWS, Kp), dtype=np.uint8)
    for t0 in range(0, T, _TILES_PER_CHUNK):
        t1 = min(T, t0 + _TILES_PER_CHUNK)
        q = qweight[t0:t1].astype("<u4")
        physical = np.unpackbits(q.view(np.uint8), axis=1, bitorder="little")
        stream = physical[:, positions].reshape(t1 - t0, TILE_ROWS, Kp, bits)
        out[t0 * TILE_ROWS:t1 * TILE_ROWS] = (stream @ weights).reshape(-1, Kp)
    return out[:N, :K]


def repack_layout1(qweight: np.ndarray, K: int, bits: int, N: int) -> np.ndarray:
    """``qweight`` of code layout 1 (3-bit codes as an LSB-first stream: checkpoints made before the
    `layout` attribute) in the current layout; other widths are the same in both and come back as they are."""
    if bits != 3:
        return qweight
    return pack_codes(unpack_codes(qweight, K, bits, N, code_layout=1), bits)


def unpack_legacy_rows(qweight: np.ndarray, K: int, bits: int) -> np.ndarray:
    """Codes uint8 ``[N, K]`` of a row-major ``qweight`` ``[N, ceil(K*bits/32)]`` (sqllm-onnx 0.1): per
    row an LSB-first bit stream, code k at stream bits [k*bits, (k+1)*bits). For converting old checkpoints."""
    _check_bits(bits)
    qweight = np.ascontiguousarray(qweight, dtype=np.int32)
    N, W = qweight.shape
    if W != (K * bits + 31) // 32:
        raise ValueError(f"qweight has {W} words per row, expected ceil(K*bits/32) = {(K * bits + 31) // 32}")
    out = np.empty((N, K), dtype=np.uint8)
    weights = (1 << np.arange(bits)).astype(np.uint8)
    for r0 in range(0, N, 1024):
        q = qweight[r0:r0 + 1024].astype("<u4")
        stream = np.unpackbits(q.view(np.uint8), axis=1, bitorder="little")[:, :K * bits]
        out[r0:r0 + 1024] = stream.reshape(q.shape[0], K, bits) @ weights
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
    lut = np.asarray(lut, dtype=np.float64)
    codes = unpack_codes(qweight, K, bits, lut.shape[0])
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

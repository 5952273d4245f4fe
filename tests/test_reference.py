"""The numpy reference and the packing helpers that the quantizer and every kernel rely on."""

import numpy as np
import pytest

from sqllm_onnx import reference as ref


@pytest.mark.parametrize("bits", ref.SUPPORTED_BITS)
@pytest.mark.parametrize("N, K", [(1, 1), (5, 31), (16, 64), (17, 100), (33, 250), (5, 4096 + 7)])
def test_pack_unpack_roundtrip(bits, N, K):
    rng = np.random.default_rng(K * 10 + bits + N)
    codes = rng.integers(0, 1 << bits, size=(N, K))
    q = ref.pack_codes(codes, bits)
    assert q.dtype == np.int32 and q.shape == ref.qweight_shape(N, K, bits)
    assert q.shape == (-(-N // 16), 32 * -(-K // 64) * bits)
    np.testing.assert_array_equal(ref.unpack_codes(q, K, bits, N), codes)


def _word(q, tile, unit, w, lane, bits, full_unit=True):
    """Lane-local word w of `lane` in `unit` of `tile`, by the formula of docs/op-spec.md."""
    base = unit * 128 * bits + ((w // 4) * 128 + 4 * lane + w % 4 if full_unit else w * 32 + lane)
    return int(q.view(np.uint32)[tile, base])


def test_pack_layout_spot_checks():
    # 4 bits, one full unit: row r = 8h + g, k = 64i + 32p + 8t + 4q + j; lane 4g + t holds the
    # code of (h, i, s = 2p + q, j) at stream bit ((4h + i) * 16 + 4s + j) * 4.
    codes = np.zeros((16, 256), np.int64)
    codes[9, 64 * 2 + 32 * 1 + 8 * 3 + 4 * 0 + 1] = 0xA  # r = 9: h 1, g 1; i 2, p 1, t 3, q 0, j 1 -> s 2
    q = ref.pack_codes(codes, 4)
    stream_bit = ((4 * 1 + 2) * 16 + 4 * 2 + 1) * 4  # 412: word 12, bit 28
    assert _word(q, 0, 0, stream_bit // 32, 4 * 1 + 3, 4) == 0xA << (stream_bit % 32)
    assert np.count_nonzero(q) == 1
    # 3 bits (code layout 2): planes of words; (h, p) = (0, 0) -> plane 0, (1, 0) -> 1, (0, 1) -> 2,
    # the code in the low 3 bits of nibble 4q + j of word plane * ng + i; (h, p) = (1, 1) -> bit b
    # in the top bit of that nibble of plane b.
    codes = np.zeros((16, 256), np.int64)
    codes[0, 64 * 3 + 32 * 1 + 8 * 0 + 4 * 1 + 2] = 0b101  # r 0 (h 0, lane 0), i 3, p 1, q 1, j 2
    q = ref.pack_codes(codes, 3)
    assert _word(q, 0, 0, 2 * 4 + 3, 0, 3) == 0b101 << (4 * 6)  # plane 2, word 11, nibble 6
    assert np.count_nonzero(q) == 1
    codes = np.zeros((16, 256), np.int64)
    codes[8 + 2, 64 * 1 + 32 * 1 + 8 * 1 + 4 * 0 + 3] = 0b110  # r 10 (h 1, g 2), i 1, p 1, t 1, q 0, j 3
    q = ref.pack_codes(codes, 3)
    lane = 4 * 2 + 1
    assert _word(q, 0, 0, 0 * 4 + 1, lane, 3) == 0  # bit 0 of the code is 0
    assert _word(q, 0, 0, 1 * 4 + 1, lane, 3) == 1 << (4 * 3 + 3)  # bit 1: plane 1, nibble 3, top bit
    assert _word(q, 0, 0, 2 * 4 + 1, lane, 3) == 1 << (4 * 3 + 3)  # bit 2: plane 2
    assert np.count_nonzero(q) == 2
    # A partial unit (K = 300: unit 1 has ng = 1 group) is stored word-interleaved (w * 32 + lane);
    # 3 bits: plane v is word v * ng + i.
    codes = np.zeros((16, 300), np.int64)
    codes[8, 256 + 8 * 2] = 5  # r 8: h 1, g 0; k - 256 = 16: i 0, p 0, t 2, q 0, j 0 -> lane 2, plane 1
    q = ref.pack_codes(codes, 3)
    assert _word(q, 0, 1, 1, 2, 3, full_unit=False) == 5
    assert np.count_nonzero(q) == 1
    # code layout 1 (earlier 3-bit exports: an LSB-first stream) is repacked to the current one
    rng = np.random.default_rng(3)
    c = rng.integers(0, 8, (40, 300))
    old = ref.pack_codes(c, 3, code_layout=1)
    assert not np.array_equal(old, ref.pack_codes(c, 3))
    np.testing.assert_array_equal(ref.repack_layout1(old, 300, 3, 40), ref.pack_codes(c, 3))


def test_legacy_rows_convert_to_tiles():
    rng = np.random.default_rng(7)
    for bits, K in [(3, 100), (4, 64), (2, 33)]:
        codes = rng.integers(0, 1 << bits, size=(21, K))
        words = (K * bits + 31) // 32
        stream = np.zeros((21, words * 32), np.uint8)
        for b in range(bits):
            stream[:, np.arange(K) * bits + b] = (codes >> b) & 1
        legacy = np.packbits(stream, axis=1, bitorder="little").view("<u4").view(np.int32)
        assert legacy.shape == ref.legacy_row_shape(21, K, bits)
        np.testing.assert_array_equal(ref.unpack_legacy_rows(legacy, K, bits), codes)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="bits must be one of"):
        ref.pack_codes(np.zeros((1, 4)), 5)
    with pytest.raises(ValueError, match="must lie in"):
        ref.pack_codes(np.full((1, 4), 8), 3)
    with pytest.raises(ValueError, match="expected"):
        ref.unpack_codes(np.zeros((1, 2), np.int32), 32, 3, 1)


def test_squeeze_matmul_matches_dense_formula():
    rng = np.random.default_rng(0)
    K, N, bits = 40, 6, 3
    codes = rng.integers(0, 8, size=(N, K))
    lut = rng.standard_normal((N, 8)).astype(np.float32)
    indptr = np.array([0, 2, 2, 3, 3, 3, 5], np.int32)
    indices = np.array([5, 5, 0, 39, 1], np.int32)  # duplicate (row 0, col 5) adds up
    values = np.array([1.0, 2.0, -1.0, 0.5, 0.25], np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    A = rng.standard_normal((2, 3, K)).astype(np.float32)
    W = lut[np.arange(N)[:, None], codes].astype(np.float64)
    W[0, 5] += 3.0
    W[2, 0] -= 1.0
    W[5, 39] += 0.5
    W[5, 1] += 0.25
    expected = (A.astype(np.float64) @ W.T + bias).astype(np.float32)
    got = ref.squeeze_matmul(A, ref.pack_codes(codes, bits), lut, indptr, indices, values, bias, K=K, N=N, bits=bits)
    assert got.shape == (2, 3, N) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)

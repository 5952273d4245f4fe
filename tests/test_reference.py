"""The numpy reference and the packing helpers that the quantizer and every kernel rely on."""

import numpy as np
import pytest

from sqllm_onnx import reference as ref


@pytest.mark.parametrize("bits", ref.SUPPORTED_BITS)
@pytest.mark.parametrize("K", [1, 31, 32, 33, 100, 4096 + 7])
def test_pack_unpack_roundtrip(bits, K):
    rng = np.random.default_rng(K * 10 + bits)
    codes = rng.integers(0, 1 << bits, size=(5, K))
    q = ref.pack_codes(codes, bits)
    assert q.dtype == np.int32 and q.shape == (5, ref.words_per_row(K, bits))
    np.testing.assert_array_equal(ref.unpack_codes(q, K, bits), codes)


def test_pack_layout_is_lsb_first_bit_stream():
    # 4 bits: code k is nibble k%8 of word k/8.
    q = ref.pack_codes(np.arange(8)[None, :], 4)
    assert q[0, 0] == 0x76543210
    # 3 bits: codes 0..31 fill exactly three words; code 10 straddles words 0 and 1 (bits 30..32).
    codes = np.zeros((1, 32), dtype=np.int64)
    codes[0, 10] = 0b111
    q = ref.pack_codes(codes, 3).view(np.uint32)
    assert q.shape == (1, 3) and q[0, 0] == 0b11 << 30 and q[0, 1] == 0b1 and q[0, 2] == 0
    # padding bits after the last code are zero
    q = ref.pack_codes(np.full((1, 3), 7), 3).view(np.uint32)
    assert q[0, 0] == (1 << 9) - 1


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="bits must be one of"):
        ref.pack_codes(np.zeros((1, 4)), 5)
    with pytest.raises(ValueError, match="must lie in"):
        ref.pack_codes(np.full((1, 4), 8), 3)
    with pytest.raises(ValueError, match="words per row"):
        ref.unpack_codes(np.zeros((1, 2), np.int32), 32, 3)


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

"""Import of original SqueezeLLM checkpoints, with synthetic .pt files in their layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sqllm_onnx import reference
from sqllm_onnx.quantize import CheckpointError, import_squeezellm, load_checkpoint, save_checkpoint

LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj")


def squeezellm_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """SqueezeLLM's packing, written out independently of ours: codes [N, K] -> int32 [K*bits/32, N];
    for each output column, 32/bits codes per word (2/4/8 bits) or, for 3 bits, 32 codes in three
    words with codes 10 and 21 straddling word boundaries."""
    iw = codes.T.astype(np.uint32)  # [K, N]
    K = iw.shape[0]
    q = np.zeros((K // 32 * bits, iw.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < q.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                q[row] |= iw[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits
            for j in range(10):
                q[row] |= iw[i + j] << (3 * j)
            i += 10
            q[row] |= (iw[i] << 30) & 0xFFFFFFFF
            row += 1
            q[row] |= (iw[i] >> 2) & 1
            i += 1
            for j in range(10):
                q[row] |= iw[i + j] << (3 * j + 1)
            i += 10
            q[row] |= (iw[i] << 31) & 0xFFFFFFFF
            row += 1
            q[row] |= (iw[i] >> 1) & 0x3
            i += 1
            for j in range(10):
                q[row] |= iw[i + j] << (3 * j + 2)
            i += 10
            row += 1
    return q.view(np.int32)


def synthetic_checkpoint(bits: int, sparse: bool, seed: int = 0, full_rows: bool = False):
    """A state dict in the SqueezeLLM layout and, per layer, the dense weight it encodes."""
    rng = np.random.default_rng(seed)
    sd, truth = {}, {}
    shapes = {LAYERS[0]: (48, 64), LAYERS[1]: (64, 96), LAYERS[2]: (40, 64)}
    for name, (N, K) in shapes.items():
        codes = rng.integers(0, 1 << bits, size=(N, K))
        lut = np.sort(rng.standard_normal((N, 1 << bits)), axis=1).astype(np.float32)
        W = np.take_along_axis(lut.astype(np.float64), codes, axis=1)
        sd[f"{name}.qweight"] = torch.from_numpy(squeezellm_pack(codes, bits))
        sd[f"{name}.lookup_table"] = torch.from_numpy(lut)
        if sparse:
            S = np.where(rng.random((N, K)) < 0.01, rng.standard_normal((N, K)), 0).astype(np.float32)
            S[0, 0] = 5.0  # at least one entry
            r, c = np.nonzero(S)  # row-major: a CSR matrix over [N, K], as torch's to_sparse_csr gives
            sd[f"{name}.rows"] = torch.from_numpy(np.concatenate([[0], np.cumsum(np.bincount(r, minlength=N))])
                                                  .astype(np.int32))
            sd[f"{name}.cols"] = torch.from_numpy(c.astype(np.int32))
            sd[f"{name}.vals"] = torch.from_numpy(S[r, c])
            sd[f"sparse_threshold.{name}"] = torch.tensor(len(r))
            W = W + S
        if full_rows:
            idx = np.array([2, 5])
            dense_rows = rng.standard_normal((K, 2)).astype(np.float32)
            sd[f"{name}.full_rows"] = torch.from_numpy(dense_rows)
            sd[f"{name}.full_row_indices"] = torch.from_numpy(idx.astype(np.int32))
            W[idx] += dense_rows.T
        if name == LAYERS[2]:
            bias = rng.standard_normal(N).astype(np.float32)
            sd[f"{name}.bias"] = torch.from_numpy(bias)
        truth[name] = W
    sd["model.embed_tokens.weight"] = torch.zeros(10, 64)  # non-linear entries are ignored
    sd["model.norm.weight"] = torch.ones(64)
    return sd, truth


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sparse", [False, True])
def test_import_reproduces_the_weights(tmp_path, bits, sparse):
    sd, truth = synthetic_checkpoint(bits, sparse, seed=bits)
    path = tmp_path / f"sq-tiny-w{bits}-s{45 if sparse else 0}.pt"
    torch.save(sd, path)
    q = import_squeezellm(path)
    assert list(q.layers) == list(LAYERS)
    assert q.manifest["bits"] == bits and q.manifest["source"]["file"] == path.name
    for name, W in truth.items():
        layer = q.layers[name]
        assert layer.K == W.shape[1] and layer.N == W.shape[0] and layer.bits == bits
        assert layer.lut.dtype == np.float32  # the file's float32 tables are kept
        assert (layer.nnz > 0) == sparse
        got = reference.dequantize(layer.qweight, layer.lut, layer.K, layer.bits, layer.sparse_indptr,
                                   layer.sparse_indices, layer.sparse_values)
        np.testing.assert_array_equal(got, W)
    np.testing.assert_array_equal(q.layers[LAYERS[2]].bias, sd[f"{LAYERS[2]}.bias"].numpy())
    assert q.layers[LAYERS[0]].bias is None
    # it saves and loads as one of our checkpoints
    save_checkpoint(q, tmp_path / "ck")
    back = load_checkpoint(tmp_path / "ck")
    for name in LAYERS:
        for k, v in q.layers[name].arrays().items():
            np.testing.assert_array_equal(v, back.layers[name].arrays()[k])


def test_import_packing_is_our_legacy_row_stream_transposed():
    # SqueezeLLM packs per column the same LSB-first stream as sqllm-onnx 0.1's row-major qweight;
    # the import unpacks it and repacks the codes into the tiled layout.
    rng = np.random.default_rng(5)
    for bits in (2, 3, 4, 8):
        codes = rng.integers(0, 1 << bits, size=(7, 64))
        np.testing.assert_array_equal(reference.unpack_legacy_rows(squeezellm_pack(codes, bits).T, 64, bits), codes)


def test_import_dense_rows_and_float16(tmp_path):
    sd, truth = synthetic_checkpoint(3, True, seed=9, full_rows=True)
    q = import_squeezellm(sd, lut_dtype="float16")
    for name, W in truth.items():
        layer = q.layers[name]
        assert layer.lut.dtype == np.float16 and layer.sparse_values.dtype == np.float16
        got = reference.dequantize(layer.qweight, layer.lut, layer.K, layer.bits, layer.sparse_indptr,
                                   layer.sparse_indices, layer.sparse_values)
        np.testing.assert_allclose(got, W, rtol=2e-3, atol=2e-3)


def test_import_errors(tmp_path):
    sd, _ = synthetic_checkpoint(4, True)
    bad = dict(sd)
    del bad[f"{LAYERS[0]}.qweight"]
    with pytest.raises(CheckpointError, match="no qweight"):
        import_squeezellm(bad)
    bad = dict(sd)
    bad[f"{LAYERS[0]}.rows"] = sd[f"{LAYERS[0]}.rows"][:-1]
    with pytest.raises(CheckpointError, match="CSR"):
        import_squeezellm(bad)
    bad = dict(sd)
    del bad[f"{LAYERS[0]}.vals"]
    with pytest.raises(CheckpointError, match="together"):
        import_squeezellm(bad)
    with pytest.raises(CheckpointError, match="not a SqueezeLLM"):
        import_squeezellm({"model.norm.weight": torch.ones(3)})
    torch.save(sd, tmp_path / "sq-x-w3-s45.pt")  # named 3-bit, holds 4-bit tables
    with pytest.raises(CheckpointError, match="named w3"):
        import_squeezellm(tmp_path / "sq-x-w3-s45.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        import_squeezellm(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        import_squeezellm(tmp_path / "missing.pt")

"""Import of original SqueezeLLM checkpoints (`sq-<model>-w{3,4}-s{0,5,45}.pt`) into our format.

Their layout, per quantized linear NAME (an nn.Linear with N outputs and K inputs, K a multiple of 32):
- `NAME.qweight` int32 [K*bits/32, N]: for each output column n, the codes of k = 0..K-1 packed as an
  LSB-first bit stream down the column (32 codes in `bits` words; for 3 bits a code may straddle two
  words) -- the stream of our `qweight` row n, transposed;
- `NAME.lookup_table` [N, 2^bits]: the per-output-channel table;
- dense-and-sparse checkpoints add `NAME.rows` [N+1], `NAME.cols` [nnz], `NAME.vals` [nnz]: a CSR
  matrix over [N, K] whose values are added to the dense weight (as in our op); some also carry
  `NAME.full_rows` [K, X] and `NAME.full_row_indices` [X] (rows stored dense, also added);
- optionally `NAME.bias`; other entries (embeddings, norms, `sparse_threshold.*`) are not layers.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np

from sqllm_onnx import reference
from sqllm_onnx.op import PackedLinear
from sqllm_onnx.quantize.checkpoint import CheckpointError, QuantizedModel, validate_layer

_NAME_BITS = re.compile(r"-w(\d+)-s(\d+)")


def _np(t) -> np.ndarray:
    import torch

    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def _as_int32(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype == np.int32:
        return np.ascontiguousarray(a)
    if a.dtype == np.uint32:
        return np.ascontiguousarray(a).view(np.int32)
    if np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.uint32).max):
            raise CheckpointError(f"{what} has values outside 32 bits")
        return np.ascontiguousarray(a.astype(np.int64).astype(np.uint32).view(np.int32))
    raise CheckpointError(f"{what} must be an integer tensor, got {a.dtype}")


def convert_layer(name: str, sd: dict, lut_dtype: str | None = None) -> PackedLinear:
    """One SqueezeLLM layer (entries `name.*` of the state dict) as a PackedLinear."""
    lut = _np(sd[f"{name}.lookup_table"])
    if lut.ndim != 2 or lut.shape[1] < 2 or lut.shape[1] & (lut.shape[1] - 1):
        raise CheckpointError(f"{name}.lookup_table must be [N, 2^bits], got {list(lut.shape)}")
    bits = int(math.log2(lut.shape[1]))
    N = lut.shape[0]
    if f"{name}.qweight" not in sd:
        raise CheckpointError(f"{name} has a lookup_table but no qweight")
    q = _as_int32(_np(sd[f"{name}.qweight"]), f"{name}.qweight")
    if q.ndim != 2 or q.shape[1] != N:
        raise CheckpointError(f"{name}.qweight must be [K*bits/32, N={N}], got {list(q.shape)}")
    if (q.shape[0] * 32) % bits:
        raise CheckpointError(f"{name}.qweight has {q.shape[0]} words per column, not a whole number of "
                              f"{bits}-bit codes")
    K = q.shape[0] * 32 // bits
    dtype = np.dtype(lut_dtype) if lut_dtype else (np.dtype(np.float16) if lut.dtype == np.float16 else np.dtype(np.float32))
    # q.T is our old row-major stream (one row of W per row); the op reads the tiled layout.
    tiled = reference.pack_codes(reference.unpack_legacy_rows(np.ascontiguousarray(q.T), K, bits), bits)
    layer = PackedLinear(qweight=tiled, lut=np.ascontiguousarray(lut, dtype=dtype), bits=bits, K=K)

    rows, cols, vals = (sd.get(f"{name}.{k}") for k in ("rows", "cols", "vals"))
    entries_r, entries_c, entries_v = [], [], []
    if rows is not None or cols is not None or vals is not None:
        if rows is None or cols is None or vals is None:
            raise CheckpointError(f"{name}: rows, cols and vals must be present together")
        rows, cols, vals = _np(rows).astype(np.int64), _np(cols).astype(np.int64), _np(vals)
        if rows.shape != (N + 1,) or rows[0] != 0 or np.any(np.diff(rows) < 0) or rows[-1] != cols.shape[0] \
                or vals.shape != cols.shape:
            raise CheckpointError(f"{name}: rows/cols/vals do not form a CSR matrix with {N} rows")
        entries_r.append(np.repeat(np.arange(N), np.diff(rows)))
        entries_c.append(cols)
        entries_v.append(vals.astype(np.float64))
    full, full_idx = sd.get(f"{name}.full_rows"), sd.get(f"{name}.full_row_indices")
    if full is not None and full_idx is not None and _np(full_idx).size:
        full, full_idx = _np(full).astype(np.float64), _np(full_idx).astype(np.int64)
        if full.shape != (K, full_idx.shape[0]):
            raise CheckpointError(f"{name}.full_rows must be [K={K}, {full_idx.shape[0]}], got {list(full.shape)}")
        kk, jj = np.nonzero(full)
        entries_r.append(full_idx[jj])
        entries_c.append(kk)
        entries_v.append(full[kk, jj])
    if entries_r:
        r, c, v = (np.concatenate(e) for e in (entries_r, entries_c, entries_v))
        if r.size and (c.min() < 0 or c.max() >= K or r.min() < 0 or r.max() >= N):
            raise CheckpointError(f"{name}: sparse entries lie outside [{N}, {K}]")
        order = np.lexsort((c, r))
        layer.sparse_indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=N))]).astype(np.int32)
        layer.sparse_indices = c[order].astype(np.int32)
        layer.sparse_values = v[order].astype(dtype)
    bias = sd.get(f"{name}.bias")
    if bias is not None:
        layer.bias = np.ascontiguousarray(_np(bias), dtype=dtype)
    validate_layer(name, layer, where=f"SqueezeLLM checkpoint layer {name}")
    return layer


def import_squeezellm(source, lut_dtype: str | None = None) -> QuantizedModel:
    """Convert an original SqueezeLLM checkpoint (path of the .pt file, or its state dict) into a
    QuantizedModel (module names unchanged, e.g. ``model.layers.0.self_attn.q_proj``).

    `lut_dtype` ("float16"/"float32") casts tables, sparse values and biases; default: float16 when
    the file's tables are float16, float32 otherwise (the released checkpoints use float32).
    """
    import torch

    info: dict = {}
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"SqueezeLLM checkpoint {path} does not exist")
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {e}") from e
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        info = {"file": path.name, "sha256": h.hexdigest()}
    else:
        sd = source
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict) and not any(
            k.endswith(".lookup_table") for k in sd):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise CheckpointError("a SqueezeLLM checkpoint is a state dict (name -> tensor)")
    names = [k[: -len(".lookup_table")] for k in sd if k.endswith(".lookup_table")]  # module order
    if not names:
        raise CheckpointError("no '<layer>.lookup_table' entries: not a SqueezeLLM checkpoint")
    layers = {name: convert_layer(name, sd, lut_dtype) for name in names}
    bits = {layer.bits for layer in layers.values()}
    if len(bits) != 1:
        raise CheckpointError(f"layers with different widths {sorted(bits)} in one checkpoint")
    numel = sum(layer.N * layer.K for layer in layers.values())
    nnz = sum(layer.nnz for layer in layers.values())
    dtype = next(iter(layers.values())).lut.dtype.name
    named = _NAME_BITS.search(info.get("file", ""))
    if named and int(named.group(1)) != next(iter(bits)):
        raise CheckpointError(f"{info['file']} is named w{named.group(1)} but its tables have "
                              f"{1 << next(iter(bits))} entries ({next(iter(bits))} bits)")
    manifest = {
        "method": "squeezellm-import", "bits": next(iter(bits)), "sparsity": 100.0 * nnz / max(numel, 1),
        "sensitive": None, "outliers": None, "lut_dtype": dtype, "seed": None, "calibration": None,
        "source": {"format": "SqueezeLLM .pt", **info},
        "totals": {"weights": numel, "nnz": nnz, "layers": len(layers), "nnz_percent": 100.0 * nnz / max(numel, 1)},
        "layers": {n: {"bits": l.bits, "K": l.K, "N": l.N, "nnz": l.nnz} for n, l in layers.items()},
    }
    from sqllm_onnx import __version__

    manifest["sqllm_onnx_version"] = __version__
    return QuantizedModel(layers=layers, manifest=manifest)


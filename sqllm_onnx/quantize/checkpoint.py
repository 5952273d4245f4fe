"""The quantized checkpoint: a folder with `model.safetensors` (every layer's op inputs) and
`manifest.json` (how it was made, per-layer statistics, file hashes), plus applying it to a model.

Layout of `model.safetensors`: for each quantized module name NAME (as in `model.named_modules()`),
`NAME.qweight` int32 [ceil(N/16), 32*ceil(K/64)*bits] (the op's tiled layout; the row-major
[N, ceil(K*bits/32)] of sqllm-onnx 0.1 checkpoints is converted on load), `NAME.lut` T [N, 2^bits], optionally
`NAME.sparse_indptr` int32 [N+1], `NAME.sparse_indices` int32 [nnz], `NAME.sparse_values` T [nnz], and
`NAME.bias` T [N]; T is the manifest's `lut_dtype`. `manifest["layers"][NAME]` holds `bits`, `K`, `N`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sqllm_onnx import reference
from sqllm_onnx.export_folder import sha256_file
from sqllm_onnx.op import PackedLinear

FORMAT = "sqllm-onnx-quantized"
FORMAT_VERSION = 2  # 2: 3-bit qweight in code layout 2 (reference.CODE_LAYOUT); version 1 is repacked on load
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
ARRAYS = ("qweight", "lut", "sparse_indptr", "sparse_indices", "sparse_values", "bias")


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, corrupt, or inconsistent with its manifest."""


@dataclass
class QuantizedModel:
    """Quantized layers in the op's layout, by module name, and the manifest describing them."""

    layers: dict[str, PackedLinear] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return int(self.manifest.get("bits", next(iter(self.layers.values())).bits))

    def __repr__(self) -> str:
        m = self.manifest
        return (f"QuantizedModel({len(self.layers)} layers, method={m.get('method')}, bits={m.get('bits')}, "
                f"sparsity={m.get('sparsity')}%, lut_dtype={m.get('lut_dtype')})")


# ---- one layer <-> named arrays ----------------------------------------------------------------------

def layer_arrays(name: str, layer: PackedLinear) -> dict[str, np.ndarray]:
    named = {"qweight": layer.qweight, "lut": layer.lut, "sparse_indptr": layer.sparse_indptr,
             "sparse_indices": layer.sparse_indices, "sparse_values": layer.sparse_values, "bias": layer.bias}
    return {f"{name}.{k}": np.ascontiguousarray(v) for k, v in named.items() if v is not None}


def layer_from_arrays(name: str, arrays: dict[str, np.ndarray], bits: int, K: int, N: int | None = None,
                      lut_dtype: str | None = None, where: str = "checkpoint", code_layout: int = reference.CODE_LAYOUT
                      ) -> PackedLinear:
    """Rebuild and validate one layer from its named arrays (clear CheckpointError when inconsistent);
    ``code_layout`` 1 (checkpoints of format version 1) is repacked into the current layout."""
    def get(k):
        return arrays.get(f"{name}.{k}")

    qweight, lut = get("qweight"), get("lut")
    if qweight is None or lut is None:
        raise CheckpointError(f"{where}: layer {name!r} lacks its qweight or lut tensor")
    if (qweight.ndim == 2 and lut.ndim == 2 and qweight.dtype == np.int32
            and qweight.shape == reference.legacy_row_shape(lut.shape[0], int(K), int(bits))
            and qweight.shape != reference.qweight_shape(lut.shape[0], int(K), int(bits))):
        # a sqllm-onnx 0.1 checkpoint: row-major codes, repacked into the tiled layout
        qweight = reference.pack_codes(reference.unpack_legacy_rows(qweight, int(K), int(bits)), int(bits))
    elif code_layout == 1 and qweight.shape == reference.qweight_shape(lut.shape[0], int(K), int(bits)):
        qweight = reference.repack_layout1(qweight, int(K), int(bits), lut.shape[0])
    layer = PackedLinear(qweight=qweight, lut=lut, bits=int(bits), K=int(K), sparse_indptr=get("sparse_indptr"),
                         sparse_indices=get("sparse_indices"), sparse_values=get("sparse_values"), bias=get("bias"))
    validate_layer(name, layer, N=N, lut_dtype=lut_dtype, where=where)
    return layer


def validate_layer(name: str, layer: PackedLinear, N: int | None = None, lut_dtype: str | None = None,
                   where: str = "checkpoint") -> None:
    def fail(msg):
        raise CheckpointError(f"{where}: layer {name!r}: {msg}")

    if layer.bits not in reference.SUPPORTED_BITS:
        fail(f"bits must be one of {reference.SUPPORTED_BITS}, got {layer.bits}")
    lut = layer.lut
    if lut.ndim != 2 or lut.shape[1] != 1 << layer.bits:
        fail(f"lut must have shape [N, {1 << layer.bits}], got {list(lut.shape)}")
    n = lut.shape[0]
    if N is not None and n != N:
        fail(f"lut has {n} rows but the manifest says N = {N}")
    if lut.dtype not in (np.float16, np.float32):
        fail(f"lut must be float16 or float32, got {lut.dtype}")
    if lut_dtype is not None and lut.dtype != np.dtype(lut_dtype):
        fail(f"lut is {lut.dtype} but the manifest says {lut_dtype}")
    shape = reference.qweight_shape(n, layer.K, layer.bits)
    if layer.qweight.dtype != np.int32 or layer.qweight.shape != shape:
        fail(f"qweight must be int32 [ceil(N/16), 32*ceil(K/64)*bits] = {list(shape)}, got {layer.qweight.dtype} "
             f"{list(layer.qweight.shape)}")
    parts = (layer.sparse_indptr, layer.sparse_indices, layer.sparse_values)
    if any(p is not None for p in parts):
        if any(p is None for p in parts):
            fail("sparse_indptr, sparse_indices and sparse_values must be given together")
        indptr, indices, values = parts
        if indptr.dtype != np.int32 or indices.dtype != np.int32:
            fail("sparse_indptr and sparse_indices must be int32")
        if indptr.shape != (n + 1,):
            fail(f"sparse_indptr must have shape [N+1] = [{n + 1}], got {list(indptr.shape)}")
        nnz = indices.shape[0] if indices.ndim == 1 else -1
        if indptr[0] != 0 or np.any(np.diff(indptr.astype(np.int64)) < 0) or indptr[-1] != nnz:
            fail("sparse_indptr must start at 0, be non-decreasing and end at nnz")
        if nnz and (indices.min() < 0 or indices.max() >= layer.K):
            fail(f"sparse_indices must lie in [0, K={layer.K})")
        if values.shape != (nnz,) or values.dtype != lut.dtype:
            fail(f"sparse_values must be {lut.dtype} [nnz] = [{nnz}], got {values.dtype} {list(values.shape)}")
    if layer.bias is not None and (layer.bias.shape != (n,) or layer.bias.dtype != lut.dtype):
        fail(f"bias must be {lut.dtype} [N] = [{n}], got {layer.bias.dtype} {list(layer.bias.shape)}")


# ---- files -------------------------------------------------------------------------------------------

def write_atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_arrays_atomic(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(arrays, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_arrays(path: Path, where: str) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{where}: cannot read {path.name}: {e}") from e


def save_checkpoint(qmodel: QuantizedModel, path: str | Path) -> Path:
    """Write `model.safetensors` then `manifest.json` (each atomically) into the folder `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    manifest = json.loads(json.dumps(qmodel.manifest))  # a copy, and a JSON check
    manifest["format"], manifest["format_version"] = FORMAT, FORMAT_VERSION
    layers_meta = manifest.setdefault("layers", {})
    for name, layer in qmodel.layers.items():
        validate_layer(name, layer, where="save_checkpoint")
        arrays.update(layer_arrays(name, layer))
        meta = layers_meta.setdefault(name, {})
        meta.update({"bits": int(layer.bits), "K": int(layer.K), "N": int(layer.N), "nnz": int(layer.nnz)})
    extra = set(layers_meta) - set(qmodel.layers)
    for name in extra:
        del layers_meta[name]
    save_arrays_atomic(path / WEIGHTS, arrays, {"format": FORMAT})
    manifest["files"] = {WEIGHTS: {"sha256": sha256_file(path / WEIGHTS), "bytes": (path / WEIGHTS).stat().st_size}}
    write_atomic_json(path / MANIFEST, manifest)
    qmodel.manifest = manifest
    return path


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder")
    if not file.is_file():
        hint = (" It holds an unfinished run (partial/): run the same quantize command again to finish it."
                if (path / "partial").is_dir() else "")
        raise CheckpointError(f"{path} has no {MANIFEST}; it is not a finished quantized checkpoint.{hint}")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a {FORMAT} manifest")
    if manifest.get("format_version") not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{file} has format version {manifest.get('format_version')}, this sqllm-onnx "
                              f"reads versions 1 and {FORMAT_VERSION}")
    if not isinstance(manifest.get("layers"), dict) or not manifest["layers"]:
        raise CheckpointError(f"{file} lists no layers")
    return manifest


def load_checkpoint(path: str | Path, verify_hash: bool = True) -> QuantizedModel:
    """Read a checkpoint folder written by `save_checkpoint`, validating every layer against the op
    contract and the manifest (and the file against its recorded sha256)."""
    path = Path(path)
    manifest = read_manifest(path)
    file = path / WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{path} has a manifest but no {WEIGHTS}")
    recorded = manifest.get("files", {}).get(WEIGHTS, {})
    if recorded.get("bytes") is not None and file.stat().st_size != recorded["bytes"]:
        raise CheckpointError(f"{file} has {file.stat().st_size} bytes but the manifest recorded "
                              f"{recorded['bytes']}: the file is truncated or belongs to another checkpoint")
    if verify_hash and recorded.get("sha256") and sha256_file(file) != recorded["sha256"]:
        raise CheckpointError(f"{file} does not match the sha256 in {MANIFEST}: the file is corrupt or "
                              "belongs to another checkpoint")
    arrays, _ = load_arrays(file, str(path))
    layers = {}
    for name, meta in manifest["layers"].items():
        try:
            bits, K, N = int(meta["bits"]), int(meta["K"]), int(meta["N"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: manifest entry of layer {name!r} lacks bits/K/N") from e
        if manifest.get("bits") is not None and bits != int(manifest["bits"]):
            raise CheckpointError(f"{path}: layer {name!r} says {bits} bits but the manifest's top level says "
                                  f"{manifest['bits']}: the manifest was edited or belongs to another checkpoint")
        layers[name] = layer_from_arrays(name, arrays, bits, K, N, manifest.get("lut_dtype"), where=str(path),
                                         code_layout=1 if manifest["format_version"] == 1 else reference.CODE_LAYOUT)
    known = {f"{n}.{a}" for n in layers for a in ARRAYS}
    stray = sorted(set(arrays) - known)
    if stray:
        raise CheckpointError(f"{path}: {WEIGHTS} holds tensors the manifest does not list: {stray[:3]}")
    return QuantizedModel(layers=layers, manifest=manifest)


# ---- applying a checkpoint ---------------------------------------------------------------------------

def dequantized_weight(layer: PackedLinear) -> np.ndarray:
    """W = lut[code] + S as float64 [N, K] (the op's weight, `reference.dequantize`)."""
    return reference.dequantize(layer.qweight, layer.lut, layer.K, layer.bits, layer.sparse_indptr,
                                layer.sparse_indices, layer.sparse_values)


def apply_to_model(model, qmodel: QuantizedModel) -> None:
    """Replace, in place, each quantized nn.Linear's weight (and bias) by what the op computes with:
    W = reference.dequantize(...) cast to the model's dtype, bias as stored."""
    import torch

    from sqllm_onnx.quantize.targets import check_layer_names

    check_layer_names(model, qmodel.layers, "the checkpoint")
    for name, layer in qmodel.layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"the model has no module {name!r} (checkpoint for another model?)") from e
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear")
        if tuple(module.weight.shape) != (layer.N, layer.K):
            raise ValueError(f"{name}: the model's weight is {list(module.weight.shape)}, the checkpoint's "
                             f"[{layer.N}, {layer.K}] (checkpoint for another model?)")
        W = torch.from_numpy(dequantized_weight(layer))
        with torch.no_grad():
            module.weight.copy_(W.to(module.weight.dtype))
            if layer.bias is not None:
                if module.bias is None:
                    raise ValueError(f"{name}: the checkpoint has a bias but the model's linear has none")
                module.bias.copy_(torch.from_numpy(layer.bias.astype(np.float32)).to(module.bias.dtype))

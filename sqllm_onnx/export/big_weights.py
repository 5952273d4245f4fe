"""Keeping a 7B export to one pass over its weights and one full-precision copy in memory.

Measured on a 7B-shaped llama cut to 8 decoder layers (fp16, 3.7 GB, 2-core VM), the export took 112 s
and peaked at 8.1 GB of RSS, and nearly all of it was weight traffic, not graph work:
- torch's exporter constant-folds `Transpose(W)` for every nn.Linear into a new initializer Wᵀ: a
  second full-precision copy of every unquantized projection, alive until the export ends;
- its whole-graph shape inference (run twice) copies every parameter into a protobuf to infer
  shapes that the traced types already carry: 34 s;
- Optimum then re-reads all external data into one ModelProto and writes it out again to merge the
  per-tensor files into one: 25 s, and the whole model in memory once more.
What this module does instead, each piece for one of those:
- `pretranspose_linears`: unquantized nn.Linear layers (not the output embedding, whose tied-embedding
  form onnx_graph.share_tied_embedding recognises) hold Wᵀ instead of W, swapped one layer at a time,
  so the graph needs no Transpose and nothing is folded;
- `lean_weight_traffic`: during the export, shape inference sees only the small parameters (the big
  ones are float weights whose values never decide a shape; their shapes come from the traced
  types), and Optimum's merge is skipped;
- `merge_external_data`: streams the per-tensor files into one `model.onnx_data`, a chunk at a time.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

SHAPE_INFERENCE_MAX_ELEMENTS = 4096  # parameters up to this size still reach torch's shape inference
ALIGNMENT = 4096  # tensor offsets in model.onnx_data: page-aligned, so ORT can memory-map them
CHUNK = 64 << 20


class _MatMulStored(torch.autograd.Function):
    """x @ weight_t, traced as one MatMul on the stored tensor."""

    @staticmethod
    def forward(ctx, x, weight_t):
        if torch.onnx.is_in_onnx_export():
            # The tracer needs only the shape and dtype (symbolic writes the node); torch's CPU fp16
            # matmul in this layout would take minutes over a 7B model. SqueezeLinear does the same.
            return x.new_zeros(*x.shape[:-1], weight_t.shape[1])
        return torch.matmul(x.float(), weight_t.float()).to(x.dtype)  # fp32 accumulation, as F.linear

    @staticmethod
    def symbolic(g, x, weight_t):
        return g.op("MatMul", x, weight_t)


class PretransposedLinear(nn.Module):
    """y = x @ Wᵀ + b with Wᵀ stored: traces as MatMul(x, weight_t) (+ Add), with no Transpose."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight_t = nn.Parameter(weight_t, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = weight_t.shape

    def forward(self, x):
        y = _MatMulStored.apply(x, self.weight_t)
        return y if self.bias is None else y + self.bias


def pretranspose_linears(model: nn.Module) -> int:
    """Replace every plain nn.Linear except the output embedding by a PretransposedLinear; returns how
    many. Each W is freed as its Wᵀ is made, so at most one layer is held twice. A linear reachable
    by several paths (a shared module) gets one replacement, set at every path."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    paths: dict[int, tuple[nn.Linear, list[str]]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if type(m) is nn.Linear and m is not output:
            paths.setdefault(id(m), (m, []))[1].append(name)
    for linear, names in paths.values():
        with torch.no_grad():
            replacement = PretransposedLinear(linear.weight.detach().t().contiguous(),
                                              None if linear.bias is None else linear.bias.detach())
        for name in names:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        linear.weight = None  # the model held the only other references
    return len(paths)


@contextlib.contextmanager
def lean_weight_traffic():
    """For the duration of one Optimum export: torch's whole-graph shape inference without the big
    parameters, and no merge by Optimum (merge_external_data does it afterwards)."""
    import optimum.exporters.onnx.convert as optimum_convert

    patches = []
    infer = getattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", None)
    if infer is not None:  # torch's TorchScript exporter, as used by Optimum
        def small_params_only(graph, params_dict, opset):
            small = {k: v for k, v in params_dict.items()
                     if not isinstance(v, torch.Tensor) or v.numel() <= SHAPE_INFERENCE_MAX_ELEMENTS}
            return infer(graph, small, opset)

        patches.append((torch._C, "_jit_pass_onnx_graph_shape_type_inference", small_params_only))
    if hasattr(optimum_convert, "check_model_uses_external_data"):
        patches.append((optimum_convert, "check_model_uses_external_data", lambda model: False))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _external_tensors(model):
    from onnx import external_data_helper

    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            yield tensor


def _copy(src, out, offset: int, length: int, what: str) -> None:
    """length bytes of src from offset, appended to out: in the kernel where it can (copy_file_range),
    else a chunk at a time."""
    left = length
    if hasattr(os, "copy_file_range"):
        try:
            while left:
                n = os.copy_file_range(src.fileno(), out.fileno(), left, offset + length - left)
                if n == 0:
                    raise ValueError(f"{what} ends {left} bytes early")
                left -= n
            return
        except OSError:  # e.g. across file systems on old kernels: copy the rest by hand
            pass
    src.seek(offset + length - left)
    while left:
        chunk = src.read(min(CHUNK, left))
        if not chunk:
            raise ValueError(f"{what} ends {left} bytes early")
        out.write(chunk)
        left -= len(chunk)


def merge_external_data(model_path: Path) -> int:
    """Move every tensor stored in its own external file (torch writes one per tensor) into
    `<model>.onnx_data` next to `model_path`, page-aligned, and delete the old files; returns the bytes
    moved. Streams a chunk at a time: memory stays flat whatever the model's size. The old files go
    only after the new data file and model.onnx are in place (the exporter's staging folder makes the
    whole export atomic anyway)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    model_path = Path(model_path)
    folder = model_path.parent
    model = onnx.load(str(model_path), load_external_data=False)
    tensors = list(_external_tensors(model))
    if not tensors:
        return 0
    target_name = model_path.name + "_data"
    target = folder / target_name
    partial = folder / (target_name + ".partial")  # target may itself be one of the sources
    sources, moved = set(), 0
    with open(partial, "wb", buffering=0) as out:
        for tensor in tensors:
            info = ExternalDataInfo(tensor)
            source = (folder / info.location).resolve()
            if source.parent != folder.resolve() or not source.is_file():
                raise ValueError(f"tensor {tensor.name!r}: external data {info.location!r} is not a file in {folder}")
            length = info.length if info.length else source.stat().st_size - (info.offset or 0)
            out.write(b"\0" * (-out.tell() % ALIGNMENT))
            offset = out.tell()
            with open(source, "rb") as src:
                _copy(src, out, info.offset or 0, length, f"tensor {tensor.name!r}: {source.name}")
            sources.add(source)
            del tensor.external_data[:]
            for key, value in (("location", target_name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            moved += length
    tmp = model_path.with_name(model_path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(partial, target)
    os.replace(tmp, model_path)
    for source in sources - {target.resolve()}:
        source.unlink()
    return moved


__all__ = ["PretransposedLinear", "pretranspose_linears", "lean_weight_traffic", "merge_external_data"]

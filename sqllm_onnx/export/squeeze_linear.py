"""The torch side of the op: `SqueezeLinear` replaces an `nn.Linear` before export.

It holds the packed tensors of one layer (exactly the op's inputs) as buffers. In eager mode it
computes `x @ W.T + b` with W dequantized on the fly (so tracing sees real values without a second
full-precision copy of the model); under `torch.onnx.export` the autograd function's `symbolic`
emits one `sqllm.SqueezeMatMul` node whose packed inputs become initializers.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from sqllm_onnx import reference
from sqllm_onnx.op import DOMAIN, OP_TYPE, PackedLinear


@functools.lru_cache(maxsize=64)
def _tile_code_bits(K: int, bits: int):
    """Per code (r, k) of a tile (r < 16, k < 64 ceil(K/64)) and bit b: the word and the bit within it
    (reference.pack_codes' layout; a 3-bit code's bits may lie in three words)."""
    pos = reference._tile_bit_positions(K, bits).reshape(reference.TILE_ROWS, -1, bits)
    return pos // 32, pos % 32


def dequantize_torch(qweight: torch.Tensor, lut: torch.Tensor, K: int, bits: int, indptr=None, indices=None,
                     values=None) -> torch.Tensor:
    """W [N, K] in lut's dtype: lut[n, code(n, k)] (+ the CSR part). Same contract as
    reference.dequantize, vectorised in torch for large layers (tiles in chunks of ~16M code bits)."""
    N = lut.shape[0]
    word, bit = (torch.from_numpy(a).to(qweight.device) for a in _tile_code_bits(K, bits))
    q = qweight.to(torch.int64) & 0xFFFFFFFF
    per_chunk = max(1, (1 << 24) // word.numel())
    codes = []
    for t0 in range(0, q.shape[0], per_chunk):
        qt = q[t0:t0 + per_chunk]
        c = torch.zeros((qt.shape[0], *word.shape[:2]), dtype=torch.int64, device=qt.device)
        for b in range(bits):  # [tiles, 16, Kp] per bit
            c |= ((qt[:, word[..., b]] >> bit[..., b]) & 1) << b
        codes.append(c.reshape(-1, word.shape[1]))
    codes = torch.cat(codes)[:N, :K]
    W = torch.gather(lut, 1, codes)
    if indptr is not None and indices is not None and indices.numel():
        rows = torch.repeat_interleave(torch.arange(N, device=qweight.device), torch.diff(indptr.to(torch.int64)))
        W.index_put_((rows, indices.to(torch.int64)), values.to(W.dtype), accumulate=True)
    return W


class _SqueezeMatMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, lut, indptr, indices, values, bias, K: int, N: int, bits: int):
        if torch.onnx.is_in_onnx_export():
            # The tracer only needs the shape and dtype (symbolic writes the node); dequantizing
            # every layer here would dominate the export time of a 7B model.
            return x.new_zeros((*x.shape[:-1], N))
        W = dequantize_torch(qweight, lut, K, bits, indptr, indices, values).to(x.dtype)
        y = torch.matmul(x, W.t())
        return y if bias is None else y + bias

    @staticmethod
    def symbolic(g, x, qweight, lut, indptr, indices, values, bias, K: int, N: int, bits: int):
        # torch's exporter may compute the producer of x in fp32 (e.g. attention upcast in an fp16
        # model) while recording fp16: the op needs A in the LUT's type, and ORT drops the Cast
        # where it is a no-op.
        a = g.op("Cast", x, to_i=_ONNX_FLOAT_TYPES[lut.type().scalarType()])
        inputs = [a, qweight, lut]
        if indptr is not None or bias is not None:
            inputs += [indptr, indices, values] if indptr is not None else [_omitted(g)] * 3
        if bias is not None:
            inputs.append(bias)
        y = g.op(f"{DOMAIN}::{OP_TYPE}", *inputs, K_i=K, N_i=N, bits_i=bits, layout_i=reference.CODE_LAYOUT)
        # Y's shape for the exporter (ONNX shape inference does not know the op): without it the
        # shape-dependent ops of an MoE router (its expert-mask squeeze) become If nodes whose dead
        # branch ORT refuses to type-check (as nbits_linear.py does for MatMulNBits).
        from torch.onnx import symbolic_helper

        sizes = symbolic_helper._get_tensor_sizes(x)
        if sizes is not None:
            y.setType(x.type().with_dtype(lut.type().dtype()).with_sizes([*sizes[:-1], N]))
        return y


_ONNX_FLOAT_TYPES = {"Float": 1, "Half": 10}  # ONNX TensorProto.FLOAT, FLOAT16


def _omitted(g):
    """An omitted optional input (exported as an empty input name)."""
    from torch.onnx import symbolic_helper

    return symbolic_helper._optional_input_placeholder_tensor(g)


class SqueezeLinear(nn.Module):
    """A linear layer stored as SqueezeMatMul inputs (int32 codes, LUT, CSR, bias)."""

    def __init__(self, layer: PackedLinear):
        super().__init__()
        self.K, self.N, self.bits = layer.K, layer.N, layer.bits
        self.in_features, self.out_features = layer.K, layer.N
        for name, array in (("qweight", layer.qweight), ("lut", layer.lut), ("sparse_indptr", layer.sparse_indptr),
                            ("sparse_indices", layer.sparse_indices), ("sparse_values", layer.sparse_values),
                            ("bias", layer.bias)):
            self.register_buffer(name, None if array is None else torch.from_numpy(np.ascontiguousarray(array)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SqueezeMatMulFunction.apply(x, self.qweight, self.lut, self.sparse_indptr, self.sparse_indices,
                                            self.sparse_values, self.bias, self.K, self.N, self.bits)

    def extra_repr(self) -> str:
        nnz = 0 if self.sparse_indices is None else self.sparse_indices.numel()
        return f"K={self.K}, N={self.N}, bits={self.bits}, nnz={nnz}, bias={self.bias is not None}"


def concat_rows(layers: list[PackedLinear]) -> PackedLinear:
    """One layer computing the given layers' outputs side by side (their rows of W stacked along N):
    SqueezeLLM's tables, codes and CSR are per output row, so nothing of the quantization changes.
    All layers need the same K, bits and LUT dtype. Tiles are stacked as they are when every N but
    the last is a multiple of 16; otherwise the codes are repacked."""
    first = layers[0]
    if any((l.K, l.bits, l.lut.dtype) != (first.K, first.bits, first.lut.dtype) for l in layers):
        raise ValueError("concat_rows: the layers differ in K, bits or LUT dtype")
    K, bits = first.K, first.bits
    if all(l.N % reference.TILE_ROWS == 0 for l in layers[:-1]):
        qweight = np.concatenate([l.qweight for l in layers])
    else:
        qweight = reference.pack_codes(np.concatenate([reference.unpack_codes(l.qweight, K, bits, l.N)
                                                       for l in layers]), bits)
    lut = np.concatenate([l.lut for l in layers])
    indptr = indices = values = None
    if any(l.sparse_indptr is not None for l in layers):
        ptrs, idx, vals, offset = [np.zeros(1, np.int32)], [], [], 0
        for l in layers:
            if l.sparse_indptr is None:
                ptrs.append(np.full(l.N, offset, np.int32))
                continue
            ptrs.append((l.sparse_indptr[1:] + offset).astype(np.int32))
            idx.append(l.sparse_indices)
            vals.append(l.sparse_values.astype(lut.dtype))
            offset += l.nnz
        indptr = np.concatenate(ptrs)
        indices = np.concatenate(idx) if idx else np.zeros(0, np.int32)
        values = np.concatenate(vals) if vals else np.zeros(0, lut.dtype)
    bias = None
    if any(l.bias is not None for l in layers):
        bias = np.concatenate([np.zeros(l.N, lut.dtype) if l.bias is None else l.bias.astype(lut.dtype)
                               for l in layers])
    return PackedLinear(qweight, lut, bits, K, indptr, indices, values, bias)


def packed_of(module: SqueezeLinear) -> PackedLinear:
    """The PackedLinear a SqueezeLinear holds (numpy views of its buffers)."""
    get = lambda name: None if getattr(module, name) is None else getattr(module, name).numpy()  # noqa: E731
    return PackedLinear(get("qweight"), get("lut"), module.bits, module.K, get("sparse_indptr"),
                        get("sparse_indices"), get("sparse_values"), get("bias"))


def swap_in(model: nn.Module, layers: dict, module_for=None) -> None:
    """Replace each named nn.Linear of `model` by `module_for(layer)` (default: a SqueezeLinear of a
    PackedLinear; nbits_linear passes its MatMulNBits module), freeing its weight. `layer` needs .N, .K."""
    module_for = module_for or SqueezeLinear
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is a {type(old).__name__}, not an nn.Linear")
        if (old.out_features, old.in_features) != (layer.N, layer.K):
            raise ValueError(f"{name}: the quantized layer is [{layer.N}, {layer.K}] but the model's layer is "
                             f"[{old.out_features}, {old.in_features}]")
        setattr(parent, child, module_for(layer))

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
def _tile_code_words(K: int, bits: int):
    """Per code (r, k) of a tile (r < 16, k < 64 ceil(K/64)): the words holding its first and last
    bit and the shift of its first bit (reference.pack_codes' layout)."""
    pos = reference._tile_bit_positions(K, bits).reshape(reference.TILE_ROWS, -1, bits)
    return pos[..., 0] // 32, pos[..., -1] // 32, pos[..., 0] % 32


def dequantize_torch(qweight: torch.Tensor, lut: torch.Tensor, K: int, bits: int, indptr=None, indices=None,
                     values=None) -> torch.Tensor:
    """W [N, K] in lut's dtype: lut[n, code(n, k)] (+ the CSR part). Same contract as
    reference.dequantize, vectorised in torch for large layers (tiles in chunks of ~16M codes)."""
    N = lut.shape[0]
    first, last, shift = (torch.from_numpy(a).to(qweight.device) for a in _tile_code_words(K, bits))
    q = qweight.to(torch.int64) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    per_chunk = max(1, (1 << 24) // first.numel())
    codes = []
    for t0 in range(0, q.shape[0], per_chunk):
        qt = q[t0:t0 + per_chunk]
        lo, hi = qt[:, first], qt[:, last]  # [tiles, 16, Kp]
        codes.append((((lo | (hi << 32)) >> shift) & mask).reshape(-1, first.shape[1]))
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
        y = g.op(f"{DOMAIN}::{OP_TYPE}", *inputs, K_i=K, N_i=N, bits_i=bits)
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

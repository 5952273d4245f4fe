"""The torch side of FineQuant exports: `NBitsLinear` replaces an `nn.Linear` before export.

It holds one layer's MatMulNBits tensors (B, scales, zero_points; sqllm_onnx/finequant/quantize.py)
as buffers. In eager mode it computes `x @ W.T (+ b)` with W dequantized on the fly; under
`torch.onnx.export` the autograd function's `symbolic` emits one `com.microsoft::MatMulNBits` node
(ONNX Runtime's own contrib op: CPU and CUDA kernels, no custom-op library needed) whose tensors
become initializers, and the forward returns zeros of the right shape instead of dequantizing (the
tracer needs only the shape), as SqueezeLinear does. A bias stays a separate Add after the node:
ORT's CUDA 4-bit GEMV kernel takes the batch-1 path only for MatMulNBits nodes without a bias input.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.onnx import symbolic_helper

from sqllm_onnx.finequant.quantize import NBitsLayer, dequantize_torch

DOMAIN = "com.microsoft"
OP_TYPE = "MatMulNBits"
OP_INFO = {"domain": DOMAIN, "op_type": OP_TYPE, "opset": 1}
_ONNX_FLOAT_TYPES = {"Float": 1, "Half": 10}  # ONNX TensorProto.FLOAT, FLOAT16


class _MatMulNBitsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, B, scales, zero_points, K: int, N: int, bits: int, block_size: int, accuracy_level: int):
        if torch.onnx.is_in_onnx_export():
            return x.new_zeros((*x.shape[:-1], N))
        W = dequantize_torch(B, scales, zero_points, bits, block_size, K).to(x.dtype)
        return torch.matmul(x, W.t())

    @staticmethod
    def symbolic(g, x, B, scales, zero_points, K: int, N: int, bits: int, block_size: int, accuracy_level: int):
        # A must have the scales' type; the exporter may have computed x's producer in fp32 in an
        # fp16 model (ORT removes the Cast where it is a no-op).
        a = g.op("Cast", x, to_i=_ONNX_FLOAT_TYPES[scales.type().scalarType()])
        y = g.op(f"{DOMAIN}::{OP_TYPE}", a, B, scales, zero_points, K_i=K, N_i=N, bits_i=bits,
                 block_size_i=block_size, accuracy_level_i=accuracy_level)
        # Tell the exporter Y's shape (ONNX shape inference does not know contrib ops): without it,
        # shape-dependent ops downstream (e.g. the squeeze of an MoE router's expert mask) are
        # exported as If nodes whose dead branch ORT then refuses to type-check.
        sizes = symbolic_helper._get_tensor_sizes(x)
        if sizes is not None:
            y.setType(x.type().with_dtype(scales.type().dtype()).with_sizes([*sizes[:-1], N]))
        return y


class NBitsLinear(nn.Module):
    """A linear layer stored as MatMulNBits inputs (packed codes, scales, zero points) plus a bias."""

    def __init__(self, layer: NBitsLayer, accuracy_level: int = 0):
        super().__init__()
        self.K, self.N, self.bits, self.block_size = layer.K, layer.N, layer.bits, layer.block_size
        self.in_features, self.out_features = layer.K, layer.N
        self.accuracy_level = int(accuracy_level)
        for name, array in (("B", layer.B), ("scales", layer.scales), ("zero_points", layer.zero_points),
                            ("bias", layer.bias)):
            self.register_buffer(name, None if array is None else torch.from_numpy(np.ascontiguousarray(array)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _MatMulNBitsFunction.apply(x, self.B, self.scales, self.zero_points, self.K, self.N, self.bits,
                                       self.block_size, self.accuracy_level)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_torch(self.B, self.scales, self.zero_points, self.bits, self.block_size, self.K)

    def extra_repr(self) -> str:
        return (f"K={self.K}, N={self.N}, bits={self.bits}, block_size={self.block_size}, "
                f"bias={self.bias is not None}")


def concat_rows(layers: list[NBitsLayer]) -> NBitsLayer:
    """One layer computing the given layers' outputs side by side (rows stacked along N): B, scales and
    zero points are per output row. All layers need the same K, bits, block size and scale dtype."""
    first = layers[0]
    if any((l.K, l.bits, l.block_size, l.scales.dtype) != (first.K, first.bits, first.block_size, first.scales.dtype)
           for l in layers):
        raise ValueError("concat_rows: the layers differ in K, bits, block size or scale dtype")
    bias = None
    if any(l.bias is not None for l in layers):
        bias = np.concatenate([np.zeros(l.N, first.scales.dtype) if l.bias is None else l.bias for l in layers])
    return NBitsLayer(np.concatenate([l.B for l in layers]), np.concatenate([l.scales for l in layers]),
                      np.concatenate([l.zero_points for l in layers]), first.bits, first.block_size, first.K, bias)


def layer_of(module: NBitsLinear) -> NBitsLayer:
    """The NBitsLayer an NBitsLinear holds (numpy views of its buffers)."""
    return NBitsLayer(module.B.numpy(), module.scales.numpy(), module.zero_points.numpy(), module.bits,
                      module.block_size, module.K, None if module.bias is None else module.bias.numpy())


def swap_in(model: nn.Module, layers: dict[str, NBitsLayer], accuracy_level: int = 0) -> None:
    """Replace each named nn.Linear of `model` by an NBitsLinear, freeing its weight."""
    from sqllm_onnx.export import squeeze_linear

    squeeze_linear.swap_in(model, layers, lambda layer: NBitsLinear(layer, accuracy_level))


def count_nodes(model_path) -> int:
    """MatMulNBits nodes in an ONNX file (structure only, tensor data not loaded)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    return sum(1 for n in proto.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN)


def make_model(layer: NBitsLayer, dtype=np.float32, accuracy_level: int = 0):
    """A one-node model Y = MatMulNBits(A) with the layer's tensors as initializers (tests, debugging)."""
    import onnx
    from onnx import helper, numpy_helper

    from sqllm_onnx.op import IR_VERSION

    layer = layer.astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(layer.B, "B"), numpy_helper.from_array(layer.scales, "scales"),
             numpy_helper.from_array(layer.zero_points, "zero_points")]
    inputs = ["A", "B", "scales", "zero_points"]
    if layer.bias is not None:
        inits.append(numpy_helper.from_array(layer.bias, "bias"))
        inputs += ["", "bias"]  # g_idx omitted
    node = helper.make_node(OP_TYPE, inputs, ["Y"], domain=DOMAIN, K=layer.K, N=layer.N, bits=layer.bits,
                            block_size=layer.block_size, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "matmul_nbits", [helper.make_tensor_value_info("A", elem, ["M", layer.K])],
                              [helper.make_tensor_value_info("Y", elem, ["M", layer.N])], initializer=inits)
    model = helper.make_model(graph, ir_version=IR_VERSION,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    onnx.checker.check_model(model)
    return model


__all__ = ["NBitsLinear", "concat_rows", "layer_of", "swap_in", "count_nodes", "make_model", "OP_INFO", "DOMAIN",
           "OP_TYPE"]

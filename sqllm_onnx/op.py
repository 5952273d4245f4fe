"""Building ``sqllm.SqueezeMatMul`` nodes and one-op models (the contract is docs/op-spec.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sqllm_onnx.reference import CODE_LAYOUT

DOMAIN = "sqllm"
OPSET_VERSION = 1
OP_TYPE = "SqueezeMatMul"
INPUT_NAMES = ("A", "qweight", "lut", "sparse_indptr", "sparse_indices", "sparse_values", "bias")
# onnxruntime 1.31 reads IR version <= 13 while onnx 1.23 writes 14 by default.
IR_VERSION = 10
DEFAULT_ONNX_OPSET = 17


@dataclass
class PackedLinear:
    """One quantized linear layer in the op's layout: what the quantizer produces and the exporter
    turns into initializers. Float arrays share one dtype T (float16 or float32)."""

    qweight: np.ndarray  # int32 [ceil(N/16), 32*ceil(K/64)*bits], the tiled layout
    lut: np.ndarray  # T [N, 2^bits]
    bits: int
    K: int
    sparse_indptr: np.ndarray | None = None  # int32 [N+1]
    sparse_indices: np.ndarray | None = None  # int32 [nnz]
    sparse_values: np.ndarray | None = None  # T [nnz]
    bias: np.ndarray | None = None  # T [N]

    @property
    def N(self) -> int:
        return int(self.lut.shape[0])

    @property
    def nnz(self) -> int:
        return 0 if self.sparse_indices is None else int(self.sparse_indices.shape[0])

    def astype(self, dtype) -> "PackedLinear":
        """The same layer with its float tensors (lut, sparse values, bias) cast to ``dtype``."""
        cast = lambda a: None if a is None else np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
        return PackedLinear(self.qweight, cast(self.lut), self.bits, self.K, self.sparse_indptr,
                            self.sparse_indices, cast(self.sparse_values), cast(self.bias))

    def arrays(self) -> dict[str, np.ndarray]:
        """The non-empty op inputs 1..6 by contract name."""
        named = dict(zip(INPUT_NAMES[1:], (self.qweight, self.lut, self.sparse_indptr, self.sparse_indices,
                                           self.sparse_values, self.bias)))
        return {k: v for k, v in named.items() if v is not None}


def make_node(a_name: str, y_name: str, layer: PackedLinear, prefix: str, node_name: str | None = None):
    """A SqueezeMatMul node plus its initializers (named ``prefix.<input>``)."""
    arrays = layer.arrays()
    inputs, inits = [a_name], []
    for name in INPUT_NAMES[1:]:
        if name in arrays:
            inputs.append(f"{prefix}.{name}")
            inits.append(numpy_helper.from_array(arrays[name], name=f"{prefix}.{name}"))
        else:
            inputs.append("")
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node(OP_TYPE, inputs, [y_name], name=node_name or prefix, domain=DOMAIN,
                            K=layer.K, N=layer.N, bits=layer.bits, layout=CODE_LAYOUT)
    return node, inits


def make_model(layer: PackedLinear, a_shape=("M", None), dtype=np.float32) -> onnx.ModelProto:
    """A one-op model ``Y = SqueezeMatMul(A)`` with the packed layer as initializers."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    a_shape = [layer.K if d is None else d for d in a_shape]
    y_shape = list(a_shape[:-1]) + [layer.N]
    node, inits = make_node("A", "Y", layer.astype(dtype), "w")
    graph = helper.make_graph([node], "squeeze_matmul", [helper.make_tensor_value_info("A", elem, a_shape)],
                              [helper.make_tensor_value_info("Y", elem, y_shape)], initializer=inits)
    return helper.make_model(graph, ir_version=IR_VERSION,
                             opset_imports=[helper.make_opsetid("", DEFAULT_ONNX_OPSET),
                                            helper.make_opsetid(DOMAIN, OPSET_VERSION)])


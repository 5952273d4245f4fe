"""Clean-up of the graph torch/Optimum wrote, before it ships.

- torch's exporter de-duplicates equal initializers behind Identity nodes; SqueezeMatMul validates
  its CSR once only when the CSR inputs are initializers, so those Identities are folded away;
- with tied embeddings, torch stores lm_head as a second, transposed copy of the embedding table
  (for SmolLM2-135M, 56 MB of a 100 MB export): the MatMul becomes ORT's FusedMatMul(transB=1)
  on the embedding table itself;
- the IR version is capped at what onnxruntime 1.31 reads, and the `sqllm` opset is declared.
The tensor data is never loaded: only the graph structure changes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from sqllm_onnx.op import DOMAIN, IR_VERSION, OP_TYPE, OPSET_VERSION


def fold_initializer_identities(graph: onnx.GraphProto) -> int:
    """Point consumers of Identity(initializer) at the initializer itself; returns nodes removed."""
    initializers = {t.name for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in initializers and n.output[0] not in graph_outputs}
    if not alias:
        return 0
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output and n.output[0] in alias)]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(kept)
    return len(alias)


def share_tied_embedding(graph: onnx.GraphProto) -> bool:
    """Replace MatMul(x, Eᵀ) by com.microsoft.FusedMatMul(x, E, transB=1) when Eᵀ is an initializer
    holding exactly the transpose of a Gather's table E. Only tensors stored inline are compared."""
    inits = {t.name: t for t in graph.initializer}
    tables = [inits[n.input[0]] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits]
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        bt = inits[node.input[1]]
        for table in tables:
            if (list(bt.dims) != list(table.dims)[::-1] or bt.data_type != table.data_type or not bt.raw_data
                    or not table.raw_data):
                continue
            if not np.array_equal(numpy_helper.to_array(bt), numpy_helper.to_array(table).T):
                continue
            fused = onnx.helper.make_node("FusedMatMul", [node.input[0], table.name], list(node.output),
                                          name=node.name.replace("MatMul", "FusedMatMul"), domain="com.microsoft",
                                          transA=0, transB=1, alpha=1.0)
            node.CopyFrom(fused)
            if not any(bt.name in n.input for n in graph.node):
                graph.initializer.remove(bt)
            return True
    return False


def finalize(model_path: Path) -> dict:
    """Rewrite model_path in place (structure only) and return a summary of its nodes."""
    model = onnx.load(str(model_path), load_external_data=False)
    removed = fold_initializer_identities(model.graph)
    shared = share_tied_embedding(model.graph)
    if shared and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    model.ir_version = min(model.ir_version, IR_VERSION)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION))
    onnx.save(model, str(model_path))
    ops = Counter(n.op_type for n in model.graph.node)
    return {"squeeze_matmul_nodes": ops.get(OP_TYPE, 0), "matmul_nodes": ops.get("MatMul", 0) + ops.get("Gemm", 0),
            "identities_folded": removed, "tied_embedding_shared": shared, "nodes": sum(ops.values())}

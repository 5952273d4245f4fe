"""The small files written beside model.onnx: the manifest and ORT GenAI's genai_config.json."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

MANIFEST = "sqllm_manifest.json"
GENAI_CONFIG = "genai_config.json"
LIBRARY_COPY = "libsqllm_ops.so"
from sqllm_onnx import families


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def genai_config(model_config, generation_config, onnx_path: Path, library_path: str = LIBRARY_COPY,
                 max_length: int | None = None) -> dict:
    """genai_config.json for ORT GenAI: the decoder's I/O names as Optimum wrote them, and the op
    library in session_options.custom_ops_library.

    `library_path` is written as given. The default, the bare name of the copy inside the export
    folder, keeps the folder movable: onnxruntime-genai >= 0.9 resolves a relative
    custom_ops_library against the folder holding genai_config.json (0.8 passed it to dlopen
    as is), and 0.16 to 0.18 at least refuse an absolute path outside that folder and the working
    directory, and any path with "..".

    past_present_share_buffer: true for the lean graph, whose GroupQueryAttention writes each new
    position into a max-length cache buffer bound as both past and present (one allocation per
    generation instead of one per step, and what GenAI's CUDA graphs need); false for the plain graph
    (Optimum's own attention concatenates past and new into a fresh present tensor)."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    share_buffer = any(n.op_type == "GroupQueryAttention" for n in proto.graph.node)
    inputs = {i.name for i in proto.graph.input}
    c = model_config
    heads = c.num_attention_heads
    # the cache's own shape [batch, kv_heads, past, head_dim], which every family's config names differently
    cache = next((i for i in proto.graph.input if i.name == "past_key_values.0.key"), None)
    dims = [d.dim_value for d in cache.type.tensor_type.shape.dim] if cache is not None else []
    head_size = dims[3] if len(dims) == 4 and dims[3] else getattr(c, "head_dim", None) or c.hidden_size // heads
    kv_heads = dims[1] if len(dims) == 4 and dims[1] else getattr(c, "num_key_value_heads", None) or heads
    io_inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
                 "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if "position_ids" in inputs:
        io_inputs["position_ids"] = "position_ids"
    context = getattr(c, "max_position_embeddings", 2048)
    eos = generation_config.eos_token_id if generation_config is not None else c.eos_token_id
    pad = getattr(c, "pad_token_id", None)
    return {
        "model": {
            "bos_token_id": c.bos_token_id,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "custom_ops_library": library_path,
                                    "provider_options": []},
                "filename": onnx_path.name,
                "head_size": head_size,
                "hidden_size": c.hidden_size,
                "inputs": io_inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": c.num_hidden_layers,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            # GenAI's own name where it knows the family, else its generic decoder-only type (the Optimum
            # graph needs nothing architecture-specific from GenAI)
            "type": families.genai_type(c.model_type),
            "vocab_size": c.vocab_size,
        },
        "search": {"do_sample": False, "max_length": min(max_length or context, context), "min_length": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": share_buffer,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }

"""Which linear layers are quantized: the projections of every decoder block (and lm_head on request)."""

from __future__ import annotations

# Names of the quantized projections, by architecture family (the last component of the module name).
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def linear_layer_names(model, quantize_lm_head: bool = False) -> list[str]:
    """Module names (as in ``model.named_modules()``) of the linears quantized by default:
    q/k/v/o/gate/up/down (llama, mistral, qwen2), q/k/v/out_proj/fc1/fc2 (OPT); lm_head only when asked."""
    import torch

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    wanted = set(OPT_PROJECTIONS if model_type == "opt" else DECODER_PROJECTIONS)
    names = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in wanted]
    if quantize_lm_head:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not isinstance(head, torch.nn.Linear):
            raise ValueError("quantize_lm_head: the model has no linear output embedding (lm_head)")
        inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if inp is not None and inp.weight is head.weight:
            raise ValueError("quantize_lm_head: lm_head shares its weight with the input embeddings "
                             "(tie_word_embeddings); quantizing it would change the embeddings too")
        head_name = next(n for n, m in model.named_modules() if m is head)
        names.append(head_name)
    if not names:
        raise ValueError(f"found no linear layer to quantize in this {model_type or type(model).__name__} model")
    return names

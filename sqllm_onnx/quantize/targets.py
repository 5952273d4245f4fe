"""Which layers are quantized: every linear layer inside the decoder blocks, whatever its name.

Discovery finds the decoder blocks (the ModuleList of `config.num_hidden_layers` modules: model.layers,
transformer.h, gpt_neox.layers, model.decoder.layers, ...) and takes every nn.Linear inside them,
subclasses included (Falcon's FalconLinear): attention projections, fused ones (Phi-3 qkv_proj and
gate_up_proj, Falcon/Bloom/GPT-NeoX query_key_value, MPT Wqkv), MLA's low-rank projections
(DeepSeek-V3), MLPs, and every expert and shared expert of a mixture-of-experts block.

Left in floating point:
- routers: a linear that is a direct child of a module that also holds `experts` (Qwen3-MoE's
  mlp.gate, Qwen2-MoE's shared_expert_gate) or that is named `router`: they pick the experts, and a
  small error there changes which weights run at all (DeepSeek-V3's router is not an nn.Linear);
- embeddings, norms, everything outside the blocks, and lm_head unless asked for.

GPT-2's Conv1D stores its weight as [in, out]; `conv1d_to_linear` turns each one into the
equivalent nn.Linear when a model is loaded (models.load_model), so that the quantizer, the
checkpoint, FineQuant and the exporter handle one class. Experts stored as fused 3-D parameters
(gpt_oss's GptOssExperts in transformers 4.57) are refused: they are no linear modules to replace.
"""

from __future__ import annotations

ROUTER_NAMES = ("router",)


class UnsupportedLayers(ValueError):
    """The model holds weights discovery cannot quantize (the message says which)."""


def decoder_blocks(model):
    """(name, ModuleList) of the decoder blocks: the ModuleList of config.num_hidden_layers modules
    holding the most parameters."""
    import torch

    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) and (layers is None or len(m) == layers)]
    if not found:
        raise UnsupportedLayers(f"found no decoder blocks (a ModuleList of {layers} layers) in this "
                                f"{type(model).__name__}")
    return max(found, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def conv1d_to_linear(model) -> int:
    """Replace every transformers Conv1D (y = x @ W + b, W [in, out]) by the nn.Linear computing the
    same (weight Wᵀ); returns how many were replaced."""
    import torch
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        K, N = module.weight.shape
        linear = torch.nn.Linear(K, N, bias=module.bias is not None, device="meta")
        grad = module.weight.requires_grad
        linear.weight = torch.nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=grad)
        if module.bias is not None:
            linear.bias = torch.nn.Parameter(module.bias.detach(), requires_grad=grad)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
        replaced += 1
    return replaced


def _is_router(name: str, parent) -> bool:
    return name in ROUTER_NAMES or hasattr(parent, "experts")


def linear_layer_names(model, quantize_lm_head: bool = False) -> list[str]:
    """Module names (as in ``model.named_modules()``) of the linears quantized: every nn.Linear of the
    decoder blocks but the routers; lm_head only when asked."""
    import torch
    from transformers.pytorch_utils import Conv1D

    prefix, blocks = decoder_blocks(model)
    names = []
    for block_name, block in blocks.named_modules(prefix=prefix):
        for child_name, child in block.named_children():
            full = f"{block_name}.{child_name}"
            if isinstance(child, Conv1D):
                raise UnsupportedLayers(f"{full} is a GPT-2 Conv1D: call quantize.targets.conv1d_to_linear(model) "
                                        "first (models.load_model does)")
            if isinstance(child, torch.nn.Linear):
                if not _is_router(child_name, block):
                    names.append(full)
            elif child_name == "experts" and not isinstance(child, torch.nn.ModuleList) and any(
                    p.dim() == 3 for p in child.parameters(recurse=False)):
                raise UnsupportedLayers(f"{full} ({type(child).__name__}) stores its experts as fused 3-D "
                                        "parameters, not linear layers; sqllm-onnx cannot quantize them "
                                        "(export with --method none)")
    if quantize_lm_head:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not isinstance(head, torch.nn.Linear):
            raise ValueError("quantize_lm_head: the model has no linear output embedding (lm_head)")
        inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if inp is not None and inp.weight is head.weight:
            raise ValueError("quantize_lm_head: lm_head shares its weight with the input embeddings "
                             "(tie_word_embeddings); quantizing it would change the embeddings too")
        names.append(next(n for n, m in model.named_modules() if m is head))
    if not names:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(f"found no linear layer to quantize in this {model_type or type(model).__name__} model")
    return names


def check_layer_names(model, names, where: str) -> None:
    """A clear error when a checkpoint (ours, an imported SqueezeLLM .pt, FineQuant's) names layers the
    discovery does not quantize in `model` (a router, a norm, another model's layer)."""
    allowed = set(linear_layer_names(model))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    allowed |= {n for n, m in model.named_modules() if m is head}
    stray = [n for n in names if n not in allowed]
    if stray:
        raise ValueError(f"{where} quantizes {len(stray)} layer(s) that are not linear layers of this model's decoder "
                         f"blocks (or its lm_head), e.g. {stray[0]!r}: a checkpoint of another model?")


def is_expert(name: str) -> bool:
    """Whether a discovered layer belongs to a routed expert (it sees only the tokens routed to it)."""
    return ".experts." in f".{name}."

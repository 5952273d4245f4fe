"""The decoder families sqllm-onnx exports, and what it knows about each.

The list is the decoder-only model types that optimum-onnx 0.1.0 exports for
`text-generation-with-past` and that the pinned transformers (< 4.58) builds without remote code;
tests/test_export_families.py exports a tiny random model of every one of them, so the list cannot
rot. Left out of Optimum's list on purpose: its encoder-decoders (bart, marian, ...), gemma3 (the
multimodal wrapper; its text model is gemma3_text) and internlm2 (remote code only).
"""

from __future__ import annotations

from sqllm_onnx.errors import UserError

# model_type -> ORT GenAI's model.type where GenAI 0.18 knows the family (its DecoderOnly models read
# Optimum's I/O names); the rest use GenAI's generic "decoder". gpt2 is not mapped: GenAI's gpt2 type
# expects a combined past_%d cache input, not Optimum's separate key/value tensors.
GENAI_TYPES = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
    "gemma3_text": "gemma3_text", "phi3": "phi3", "granite": "granite", "nemotron": "nemotron", "olmo": "olmo",
    "smollm3": "smollm3",
}
GENAI_GENERIC_TYPE = "decoder"

# Per family, what a tiny test config needs beyond the shared sizes (models.random_config): head sizes
# that defaults would make larger than the hidden size, MoE sizes, MHA where Optimum's config wants it.
TINY_OVERRIDES = {
    "arcee": {}, "bloom": {}, "cohere": {}, "falcon": {}, "gemma": {"head_dim": 16}, "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16}, "glm": {}, "gpt2": {}, "gpt_bigcode": {}, "gpt_neox": {},
    "gpt_neo": {"num_layers": 2, "attention_types": [[["global", "local"], 1]]},  # checked against each other
    "granite": {}, "llama": {}, "mistral": {}, "mpt": {}, "nemotron": {}, "olmo": {}, "olmo2": {}, "opt": {},
    "phi3": {}, "qwen2": {}, "qwen3": {"head_dim": 16}, "smollm3": {}, "stablelm": {},
    "codegen": {"rotary_dim": 8}, "gptj": {"rotary_dim": 8}, "helium": {"head_dim": 16},
    "phi": {"num_key_value_heads": 4},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "deepseek_v3": {"q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                    "v_head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
                    "num_key_value_heads": 4},
    # exported unquantized only: its experts are fused 3-D parameters (quantize.targets refuses them)
    "gpt_oss": {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2},
}
FAMILIES = tuple(sorted(TINY_OVERRIDES))
MOE_FAMILIES = ("qwen3_moe", "deepseek_v3", "gpt_oss")


class UnsupportedArchitecture(UserError, ValueError):
    pass


def check(model_type: str | None) -> None:
    """One line naming the families that can be exported, for any other model type."""
    if model_type not in TINY_OVERRIDES:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}: optimum-onnx 0.1.0 exports (text-generation-with-past) "
            f"only these decoder families: {', '.join(FAMILIES)}")


def genai_type(model_type: str) -> str:
    return GENAI_TYPES.get(model_type, GENAI_GENERIC_TYPE)

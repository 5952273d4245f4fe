"""The "lean" graph style: decoder layers traced as ONNX Runtime's fused ops instead of primitives.

Why: Optimum traces a Hugging Face decoder op by op. After ORT's own optimizations a llama layer is
still ~115 nodes (Shape/Gather/Unsqueeze/Concat chains, RMSNorm as Pow/ReduceMean/Add/Sqrt/Div/Mul,
rotary as ~10 ops, attention as ~15, plus the causal-mask construction). On the CUDA execution
provider every node costs microseconds of launch and dispatch, so batch-1 decoding of a 7B model
spends 10-20 ms/token on overhead while streaming its 3-bit weights takes ~1.2 ms: fewer weight
bytes only shows up in tokens/s when the graph is lean. This module patches the model, before
tracing, so that each decoder layer comes out as ~13 nodes, the shape ORT GenAI's model builder
produces:

    SkipSimplifiedLayerNormalization   input_layernorm, fused with the previous layer's residual add
                                       (layer 0: SimplifiedLayerNormalization, nothing to add)
    q_proj, k_proj, v_proj             one sqllm.SqueezeMatMul of the three SqueezeLinears' rows
                                       stacked (tables, codes and CSR are per output row, so the
                                       fused node computes exactly what the three would), and a
                                       Split; likewise one MatMulNBits for FineQuant layers of one
                                       block size; other modules as they are (MatMul(+Add) for
                                       nn.Linear); Qwen3 then normalises each head of q and k
                                       (Reshape, SimplifiedLayerNormalization, Reshape); Phi-3's
                                       fused qkv_proj is one projection and a Split
    GroupQueryAttention                rotary (do_rotary=1, cos/sin caches), KV-cache concat, causal
                                       (and sliding-window) masking, GQA head sharing, softmax
    o_proj
    SkipSimplifiedLayerNormalization   residual add + post_attention_layernorm
    gate_proj, up_proj, Sigmoid, Mul, Mul, down_proj     the SwiGLU MLP (SiLU traced as x*sigmoid(x);
                                       ORT's optimizer fuses Sigmoid+Mul into QuickGelu(alpha=1))

Gemma 2/3 put a norm on both sides of each sublayer: o_proj is followed by SimplifiedLayerNormalization
(post_attention_layernorm) and SkipSimplifiedLayerNormalization (residual add + pre_feedforward_layernorm),
the MLP by SimplifiedLayerNormalization (post_feedforward_layernorm, added by the next layer's fused norm).
Gemma's norms scale by (1 + weight) (one folded initializer each), Gemma/Gemma 2 scale the embeddings
by sqrt(hidden_size), Gemma 2's attention softcapping is GroupQueryAttention's `softcap`, and Gemma 3's
sliding layers read a second cos/sin pair from its local rotary embedding.

and once per graph: Gather (embedding), ReduceSum/Sub/Cast (seqlens_k = sum(attention_mask) - 1,
int32 [batch]), Shape/Gather/Cast (total_sequence_length = attention_mask.shape[1], int32 scalar),
the final norm as one more SkipSimplifiedLayerNormalization (fusing the last residual add), lm_head.
The model's causal-mask and rotary-embedding construction are not traced at all.

How: each fused piece is a `torch.autograd.Function` whose `forward` computes the same thing in
torch (so tracing sees real values and shapes, and the patched model still runs eagerly) and whose
`symbolic` emits the ORT op, the mechanism `SqueezeLinear` uses for SqueezeMatMul. `patched(model)`
is a context manager that, for its duration, replaces the base model's forward (LlamaModel,
MistralModel, Qwen2Model, Qwen3Model, Phi3Model) by `_lean_model_forward`, which runs the decoder layers through
`_lean_layer_forward` (the layers' own submodules: norms' weights, projections, MLP), and registers
the cos/sin tables as buffers so they become two initializers shared by every layer. Leaving the
context restores the model exactly.

The I/O contract is Optimum's `text-generation-with-past`, unchanged: inputs input_ids,
attention_mask, position_ids, past_key_values.{i}.key/value [batch, kv_heads, past_len, head_dim];
outputs logits, present.{i}.key/value [batch, kv_heads, past_len + seq_len, head_dim]. Optimum turns
the past inputs into a DynamicCache (one DynamicLayer per decoder layer, holding the input tensors)
and the cache back into the present outputs (`to_legacy_cache`); the lean layer reads its layer's
past K/V from that cache and stores GroupQueryAttention's present K/V in its place. Past and present
may be separate buffers (a cache that grows each step, as Optimum and the Python Decoder drive it) or
one max-length buffer bound to both (GroupQueryAttention's shared-buffer mode: it writes the new
positions in place and takes the cache length from seqlens_k, i.e. the attention mask): ORT GenAI
(genai_config past_present_share_buffer true) and `sqllm-onnx bench --cuda-graph` drive it that way.

GroupQueryAttention (inputs 0-8 of its ORT 1.31 signature; the optional position_ids, attention_bias,
head_sink, KV-quantization and q/k-norm inputs are left out): query, key, value [batch, seq, heads*head_dim]
(BSH, exactly the projections' outputs: no Reshape/Transpose), past_key, past_value (BNSH),
seqlens_k, total_sequence_length, cos_cache, sin_cache [max_position_embeddings, rotary_dim/2];
attributes num_heads, kv_num_heads, scale (the attention module's own scaling), do_rotary=1,
rotary_interleaved=0 (HF's rotate_half), local_window_size (Mistral/Qwen2 sliding window, whose
window includes the current token as HF's does; -1 otherwise). The cos/sin tables come from the
model's own rotary-embedding module evaluated at positions 0..max_position_embeddings-1, attention
scaling included, so every rope type that depends only on the position is right (default, linear,
llama3, yarn); types that depend on the sequence length (dynamic, longrope) are refused.
Kernels: CPU float32 and float16 (both tested here), CUDA float16 and bfloat16 only (an fp32 export
on the CUDA EP runs attention on the CPU: export fp16 for GPUs). SimplifiedLayerNormalization (onnx
domain, an ORT op) and com.microsoft.SkipSimplifiedLayerNormalization: CPU float32/float16 (tested),
CUDA float32/float16. local_window_size's meaning (key k visible from query q when q - k < window)
was checked against HF on the CPU EP only; the CUDA kernels are meant to agree but are untested here.

Limitations (all exact for batch 1 and for unpadded batches, which is how Decoder, greedy_generate,
ORT GenAI and ORTModelForCausalLM with one prompt use the graph):
- position_ids stays a graph input (the contract) but is not read: GroupQueryAttention derives each
  token's rotary position from the cache, position = seqlens_k[b] + 1 - seq_len + i (a first prompt:
  0..seq_len-1). Left-padded batches (what transformers' generate uses for batched prompts) therefore
  get shifted positions, and GroupQueryAttention's masking assumes each row's valid tokens start at
  position 0 (right padding): batched, left-padded prompts are not exact.
- GroupQueryAttention refuses seq_len > 1 together with a non-empty cache unless batch is 1 ("batch_size
  must be 1 when sequence_length > 1 and past context is given"): chunked prefill and multi-token
  steps are batch-1 only.
- Sequences are limited to max_position_embeddings tokens (the cos/sin tables' length).
- Rope types dynamic and longrope are refused (the exporter falls back to the plain graph when the
  style was not asked for explicitly). OPT is always exported plain.
- The eager torch forward of the patched model mirrors the fused ops for unpadded inputs and
  DynamicLayer caches; it exists for tracing, not as a replacement model.
"""

from __future__ import annotations

import contextlib

import torch

# qwen3_moe is not here: its router's shape-dependent ops, traced after the fused norms (whose output
# shapes ONNX inference cannot see), become If nodes that ORT refuses; it exports plain.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text")
# Families whose attention normalises q and k per head (RMSNorm over head_dim) before the rotary embedding.
HEAD_NORM_ARCHITECTURES = ("qwen3", "gemma3_text")
# Gemma's RMSNorm scales by (1 + weight); Gemma and Gemma 2 multiply the embeddings by sqrt(hidden_size)
# in the model's forward (Gemma 3's embedding module does it itself).
ONE_PLUS_WEIGHT_NORMS = ("gemma", "gemma2", "gemma3_text")
SCALED_EMBEDDING = ("gemma", "gemma2")
# Families whose sliding window is per layer (layer_types), read from each attention module.
PER_LAYER_WINDOW = ("qwen2", "qwen3", "gemma2", "gemma3_text")
GRAPH_STYLES = ("lean", "plain")
# Rope types whose cos/sin depend only on the position (see transformers' ROPE_INIT_FUNCTIONS).
POSITION_ONLY_ROPE = ("default", "linear", "llama3", "yarn")
MS_DOMAIN = "com.microsoft"
COS_CACHE, SIN_CACHE = "lean_cos_cache", "lean_sin_cache"
# Gemma 3's sliding-window layers use a second rotary embedding (rotary_emb_local, another base)
COS_CACHE_LOCAL, SIN_CACHE_LOCAL = "lean_cos_cache_local", "lean_sin_cache_local"


class LeanGraphUnsupported(ValueError):
    """The model cannot be exported in the lean style (the message says why)."""


# ---- the fused ops ---------------------------------------------------------------------------------

def _to(x: torch.Tensor, dtype) -> torch.Tensor:
    """x.to(dtype), but no op at all when x already has that dtype: the tracer records a no-op
    `.to` as a Cast and rebinds the tensor to it, so later uses of x would read a stray Cast."""
    return x if x.dtype == dtype else x.to(dtype)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: normalise in float32, back to the input dtype, times the weight."""
    h = _to(x, torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * _to(h, x.dtype)


class _SimplifiedLayerNorm(torch.autograd.Function):
    """RMSNorm -> SimplifiedLayerNormalization (onnx domain, implemented by ORT)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        return _rms(x, weight, eps)

    @staticmethod
    def symbolic(g, x, weight, eps: float):
        return g.op("SimplifiedLayerNormalization", x, weight, axis_i=-1, epsilon_f=eps, stash_type_i=1)


class _SkipSimplifiedLayerNorm(torch.autograd.Function):
    """(x + skip) -> (RMSNorm(x + skip), x + skip): com.microsoft.SkipSimplifiedLayerNormalization,
    outputs 0 (normalised) and 3 (the sum, the next residual)."""

    @staticmethod
    def forward(ctx, x, skip, weight, eps: float):
        total = skip + x
        return _rms(total, weight, eps), total

    @staticmethod
    def symbolic(g, x, skip, weight, eps: float):
        out, _mean, _inv_std, total = g.op(f"{MS_DOMAIN}::SkipSimplifiedLayerNormalization", x, skip, weight,
                                           epsilon_f=eps, outputs=4)
        return out, total


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _GroupQueryAttention(torch.autograd.Function):
    """Rotary + KV-cache concat + causal GQA -> com.microsoft.GroupQueryAttention.

    q [B, S, H*D], k/v [B, S, KV*D], past_k/past_v [B, KV, P, D], seqlens_k int32 [B],
    total_len int32 scalar, cos/sin [max_pos, D/2]; returns out [B, S, H*D], present_k/present_v
    [B, KV, P+S, D]. The torch forward follows the op for unpadded rows (seqlens_k = P + S - 1)."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache,
                num_heads: int, kv_num_heads: int, scale: float, window: int, softcap: float):
        B, S, _ = q.shape
        D = q.shape[-1] // num_heads
        P = past_k.shape[2]
        q = q.reshape(B, S, num_heads, D).transpose(1, 2)
        k = k.reshape(B, S, kv_num_heads, D).transpose(1, 2)
        v = v.reshape(B, S, kv_num_heads, D).transpose(1, 2)
        # GroupQueryAttention's positions: a first prompt 0..S-1, otherwise seqlens_k + 1 - S + i.
        steps = torch.arange(S, device=q.device)
        if P == 0:
            pos = steps[None].expand(B, S)
        else:
            pos = (_to(seqlens_k, torch.int64)[:, None] + 1 - S + steps[None]).clamp(0, cos_cache.shape[0] - 1)
        rot = cos_cache.shape[-1] * 2
        cos = _to(torch.cat([cos_cache[pos]] * 2, dim=-1)[:, None], torch.float32)  # [B, 1, S, rot]
        sin = _to(torch.cat([sin_cache[pos]] * 2, dim=-1)[:, None], torch.float32)

        def rope(x):
            xf = _to(x, torch.float32)
            xr, xp = xf[..., :rot], xf[..., rot:]
            return _to(torch.cat([xr * cos + _rotate_half(xr) * sin, xp], dim=-1), x.dtype)

        q, k = rope(q), rope(k)
        present_k = torch.cat([past_k, k], dim=2)
        present_v = torch.cat([past_v, v], dim=2)
        groups = num_heads // kv_num_heads
        keys = _to(present_k.repeat_interleave(groups, dim=1), torch.float32)
        values = _to(present_v.repeat_interleave(groups, dim=1), torch.float32)
        scores = torch.matmul(_to(q, torch.float32), keys.transpose(2, 3)) * scale
        if softcap > 0:  # Gemma 2: softcap * tanh(scores / softcap), before the mask
            scores = torch.tanh(scores / softcap) * softcap
        q_idx = (P + steps)[:, None]
        k_idx = torch.arange(P + S, device=q.device)[None]
        visible = k_idx <= q_idx
        if window > 0:
            visible = visible & (k_idx > q_idx - window)
        scores = scores.masked_fill(~visible, float("-inf"))
        out = _to(torch.matmul(torch.softmax(scores, dim=-1), values), q.dtype)
        return out.transpose(1, 2).reshape(B, S, num_heads * D), present_k, present_v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache,
                 num_heads: int, kv_num_heads: int, scale: float, window: int, softcap: float):
        extra = {"softcap_f": softcap} if softcap > 0 else {}
        return g.op(f"{MS_DOMAIN}::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache,
                    sin_cache, num_heads_i=num_heads, kv_num_heads_i=kv_num_heads, scale_f=scale, do_rotary_i=1,
                    rotary_interleaved_i=0, local_window_size_i=window, outputs=3, **extra)


# ---- what the model needs -------------------------------------------------------------------------

def check(model) -> None:
    """Raise LeanGraphUnsupported unless `model` (a *ForCausalLM) can be exported lean."""
    config = model.config
    if config.model_type not in ARCHITECTURES:
        raise LeanGraphUnsupported(f"the lean graph style supports {', '.join(ARCHITECTURES)}, not "
                                   f"{config.model_type!r}")
    base = _base_model(model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        raise LeanGraphUnsupported(f"{type(base).__name__} has no rotary_emb module")
    for module in (rotary, getattr(base, "rotary_emb_local", None)):
        rope_type = getattr(module, "rope_type", "default")
        if module is not None and rope_type not in POSITION_ONLY_ROPE:
            raise LeanGraphUnsupported(
                f"rope type {rope_type!r} depends on the sequence length, which GroupQueryAttention's fixed cos/sin "
                f"tables cannot follow (supported: {', '.join(POSITION_ONLY_ROPE)}); export with graph='plain'")
    if getattr(config, "use_bidirectional_attention", False):
        raise LeanGraphUnsupported("bidirectional attention: GroupQueryAttention is causal")
    for i, layer in enumerate(base.layers):
        attn = layer.self_attn
        projections = ("qkv_proj",) if hasattr(attn, "qkv_proj") else ("q_proj", "k_proj", "v_proj")
        for name in projections + ("o_proj",) + (
                ("q_norm", "k_norm") if config.model_type in HEAD_NORM_ARCHITECTURES else ()):
            if not hasattr(attn, name):
                raise LeanGraphUnsupported(f"layer {i}'s attention has no {name}")
        for name in ("input_layernorm", "post_attention_layernorm"):
            if not hasattr(getattr(layer, name, None), "weight"):
                raise LeanGraphUnsupported(f"layer {i} has no RMSNorm {name}")
    head_dim = base.layers[0].self_attn.head_dim
    rotary_dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    if (rotary_dim // 2) % 8:  # ORT 1.31's GroupQueryAttention: cos/sin tables of a multiple of 8 columns
        raise LeanGraphUnsupported(f"a rotary embedding over {rotary_dim} of {head_dim} dims: GroupQueryAttention "
                                   "needs rotary_dim / 2 to be a multiple of 8")
    if getattr(config, "num_attention_heads", 0) % (getattr(config, "num_key_value_heads", None) or 1):
        raise LeanGraphUnsupported("num_attention_heads is not a multiple of num_key_value_heads")


def supported(model) -> str | None:
    """None when `model` can be exported lean, else the reason it cannot."""
    try:
        check(model)
    except LeanGraphUnsupported as e:
        return str(e)
    return None


def _base_model(model):
    base = getattr(model, model.base_model_prefix, None)  # Gemma3ForCausalLM's prefix names no attribute
    return base if base is not None else getattr(model, "model", model)


def _eps(norm, config) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = getattr(norm, "eps", None)
    return float(eps if eps is not None else config.rms_norm_eps)


def _window(attn, config) -> int:
    """GroupQueryAttention's local_window_size: HF's sliding window (keys with q - k < window), or -1."""
    if config.model_type in PER_LAYER_WINDOW:
        window = getattr(attn, "sliding_window", None)  # per layer (layer_types)
    else:
        window = getattr(config, "sliding_window", None)
    return int(window) if window else -1


def rotary_tables(model, dtype, rotary=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin caches [max_position_embeddings, rotary_dim/2] from the model's own rotary module
    (default base.rotary_emb; attention scaling included), computed in float32 like HF does and cast
    to `dtype`."""
    base = _base_model(model)
    rotary = rotary or base.rotary_emb
    n = int(model.config.max_position_embeddings)
    positions = torch.arange(n, dtype=torch.int64)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32, device=rotary.inv_freq.device), positions)
    cos, sin = cos[0].to(torch.float32), sin[0].to(torch.float32)
    half = cos.shape[-1] // 2
    if not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
        raise LeanGraphUnsupported("the rotary embedding is not of the rotate_half form cat(freqs, freqs)")
    return cos[:, :half].to(dtype).contiguous(), sin[:, :half].to(dtype).contiguous()


# ---- the patched forwards -------------------------------------------------------------------------

def _cache_layer(cache, idx):
    layers = getattr(cache, "layers", None)
    if cache is None or layers is None or idx >= len(layers):
        return None
    return layers[idx]


def _scale(norm, config):
    """The RMSNorm's multiplier: its weight, or Gemma's 1 + weight (folded into one initializer)."""
    return norm.weight + 1.0 if config.model_type in ONE_PLUS_WEIGHT_NORMS else norm.weight


def _norm(x, norm, config):
    return _SimplifiedLayerNorm.apply(x, _scale(norm, config), _eps(norm, config))


def _skip_norm(x, skip, norm, config):
    return _SkipSimplifiedLayerNorm.apply(x, skip, _scale(norm, config), _eps(norm, config))


def _head_norm(x, norm, head_dim: int, config):
    """RMSNorm over each head of x [B, S, heads*head_dim]: Reshape, SimplifiedLayerNormalization, Reshape."""
    shape = x.shape
    return _norm(x.reshape(shape[0], shape[1], -1, head_dim), norm, config).reshape(shape)


FUSED_QKV = "sqllm_qkv"  # the fused q/k/v module's attribute on the attention module (while patched)


def qkv_fusable(attn) -> bool:
    """Whether q/k/v of this attention module are quantized layers that one node can compute: three
    SqueezeLinears of one K, width and LUT dtype, or three NBitsLinears (FineQuant) of one K, width,
    block size, scale dtype and accuracy level."""
    from sqllm_onnx.export.nbits_linear import NBitsLinear
    from sqllm_onnx.export.squeeze_linear import SqueezeLinear

    mods = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    if all(isinstance(m, SqueezeLinear) for m in mods):
        return len({(m.K, m.bits, m.lut.dtype) for m in mods}) == 1
    if all(isinstance(m, NBitsLinear) for m in mods):
        return len({(m.K, m.bits, m.block_size, m.scales.dtype, m.accuracy_level) for m in mods}) == 1
    return False


def fused_projections(model) -> dict[str, list[tuple[str, int]]]:
    """fused layer name -> [(layer name, N), ...] of the projections the lean graph fuses."""
    base, out = _base_model(model), {}
    prefix = next(name for name, module in model.named_modules() if module is base)
    for i, layer in enumerate(base.layers[: model.config.num_hidden_layers]):
        attn = layer.self_attn
        if qkv_fusable(attn):
            at = f"{prefix}.layers.{i}.self_attn" if prefix else f"layers.{i}.self_attn"
            out[f"{at}.{FUSED_QKV}"] = [(f"{at}.{name}", getattr(attn, name).N) for name in ("q_proj", "k_proj", "v_proj")]
    return out


def _lean_layer_forward(layer, pending, residual, cache, seqlens_k, total_len, tables, config):
    """One decoder layer. `pending` is the previous layer's MLP output (None for layer 0), not yet
    added to `residual`; returns this layer's (MLP output, residual) for the next one. `tables`:
    (cos, sin) of the global rotary embedding and, for Gemma 3, of the local one (else None)."""
    attn = layer.self_attn
    if pending is None:
        x = _norm(residual, layer.input_layernorm, config)
    else:
        x, residual = _skip_norm(pending, residual, layer.input_layernorm, config)
    B = x.shape[0]
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    q_size, kv_size = config.num_attention_heads * attn.head_dim, kv_heads * attn.head_dim
    if hasattr(attn, "qkv_proj"):  # Phi-3: one fused projection, split once (a Split node)
        q, k, v = attn.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
    elif hasattr(attn, FUSED_QKV):  # quantized q/k/v, fused by patched()
        q, k, v = getattr(attn, FUSED_QKV)(x).split([q_size, kv_size, kv_size], dim=-1)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    if config.model_type in HEAD_NORM_ARCHITECTURES:  # Qwen3: RMSNorm of each head, then GQA's rotary
        q = _head_norm(q, attn.q_norm, attn.head_dim, config)
        k = _head_norm(k, attn.k_norm, attn.head_dim, config)
    cached = _cache_layer(cache, attn.layer_idx)
    if cached is not None and getattr(cached, "is_initialized", False):
        if type(cached).__name__ != "DynamicLayer":
            raise NotImplementedError(f"the lean graph patch handles DynamicLayer caches, not {type(cached).__name__}")
        past_k, past_v = cached.keys, cached.values
    else:
        past_k = past_v = torch.zeros(B, kv_heads, 0, attn.head_dim, dtype=x.dtype, device=x.device)
    cos_cache, sin_cache = tables[1] if tables[1] is not None and getattr(attn, "is_sliding", False) else tables[0]
    out, present_k, present_v = _GroupQueryAttention.apply(
        q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache, int(config.num_attention_heads),
        int(kv_heads), float(attn.scaling), _window(attn, config),
        float(getattr(attn, "attn_logit_softcapping", None) or 0.0))
    if cached is not None and getattr(cached, "is_initialized", False):
        cached.keys, cached.values = present_k, present_v  # Optimum reads the present outputs here
    elif cache is not None:
        cache.update(present_k, present_v, attn.layer_idx)
    a = attn.o_proj(out)
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 2/3: a norm on each side of both sublayers
        a = _norm(a, layer.post_attention_layernorm, config)
        x, residual = _skip_norm(a, residual, layer.pre_feedforward_layernorm, config)
        return _norm(layer.mlp(x), layer.post_feedforward_layernorm, config), residual
    x, residual = _skip_norm(a, residual, layer.post_attention_layernorm, config)
    return layer.mlp(x), residual


def _lean_model_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                        inputs_embeds=None, use_cache=None, cache_position=None, **kwargs):
    """LlamaModel/MistralModel/Qwen2Model/Qwen3Model/Phi3Model.forward, lean: no causal mask, no rotary construction
    (position_ids is accepted and, as in GroupQueryAttention, positions come from the cache)."""
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPast

    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    if self.config.model_type in SCALED_EMBEDDING:  # as GemmaModel: the normalizer in the embeddings' dtype
        inputs_embeds = inputs_embeds * torch.tensor(self.config.hidden_size ** 0.5, dtype=inputs_embeds.dtype)
    if use_cache is None:
        use_cache = self.config.use_cache
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache()  # DynamicLayers (no sliding-window layers: GQA holds the full cache)
    if attention_mask is None:
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        attention_mask = torch.ones(inputs_embeds.shape[0], past + inputs_embeds.shape[1], dtype=torch.int64,
                                    device=inputs_embeds.device)
    # GroupQueryAttention's two length inputs, computed once: ReduceSum/Sub/Cast and Shape/Gather/Cast.
    seqlens_k = _to(_to(attention_mask, torch.int64).sum(-1) - 1, torch.int32)
    total_len = _to(torch._shape_as_tensor(attention_mask)[1], torch.int32)
    tables = [tuple(_to(getattr(self, name), inputs_embeds.dtype) for name in names) if hasattr(self, names[0])
              else None for names in ((COS_CACHE, SIN_CACHE), (COS_CACHE_LOCAL, SIN_CACHE_LOCAL))]
    pending, residual = None, inputs_embeds
    for layer in self.layers[: self.config.num_hidden_layers]:
        pending, residual = _lean_layer_forward(layer, pending, residual, past_key_values, seqlens_k, total_len,
                                                tables, self.config)
    if pending is None:
        hidden = _norm(residual, self.norm, self.config)
    else:
        hidden, _ = _skip_norm(pending, residual, self.norm, self.config)
    return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values if use_cache else None)


@contextlib.contextmanager
def patched(model, dtype=None):
    """Within the context, `model` traces (and runs) in the lean style; on exit it is restored.
    `dtype` is the cos/sin tables' dtype (default: the model's)."""
    check(model)
    base = _base_model(model)
    dtype = dtype or next(model.parameters()).dtype
    cos, sin = rotary_tables(model, dtype)
    had_forward = "forward" in base.__dict__
    old_forward = base.__dict__.get("forward")
    # Persistent buffers: torch's exporter turns state-dict entries into initializers, one pair shared
    # by every layer (non-persistent buffers would be inlined as Constant nodes).
    base.register_buffer(COS_CACHE, cos, persistent=True)
    base.register_buffer(SIN_CACHE, sin, persistent=True)
    local = getattr(base, "rotary_emb_local", None)
    if local is not None:
        cos_local, sin_local = rotary_tables(model, dtype, local)
        base.register_buffer(COS_CACHE_LOCAL, cos_local, persistent=True)
        base.register_buffer(SIN_CACHE_LOCAL, sin_local, persistent=True)
    base.forward = _lean_model_forward.__get__(base, type(base))
    fused = _fuse_qkv(base)
    try:
        yield model
    finally:
        if had_forward:
            base.forward = old_forward
        else:
            del base.forward
        for name in (COS_CACHE, SIN_CACHE, COS_CACHE_LOCAL, SIN_CACHE_LOCAL):
            base._buffers.pop(name, None)
        for attn in fused:
            delattr(attn, FUSED_QKV)


def _fuse_qkv(base) -> list:
    """Gives every attention module whose q/k/v qualify (qkv_fusable) one module of their stacked
    rows (the three stay, untraced, so that leaving patched() restores the model)."""
    from sqllm_onnx.export import nbits_linear, squeeze_linear

    fused = []
    for layer in base.layers[: base.config.num_hidden_layers]:  # the layers _lean_model_forward runs
        attn = layer.self_attn
        if qkv_fusable(attn):
            mods = [getattr(attn, name) for name in ("q_proj", "k_proj", "v_proj")]
            if isinstance(mods[0], squeeze_linear.SqueezeLinear):
                module = squeeze_linear.SqueezeLinear(squeeze_linear.concat_rows([squeeze_linear.packed_of(m)
                                                                                  for m in mods]))
            else:
                module = nbits_linear.NBitsLinear(nbits_linear.concat_rows([nbits_linear.layer_of(m) for m in mods]),
                                                  mods[0].accuracy_level)
            setattr(attn, FUSED_QKV, module)
            fused.append(attn)
    return fused


def finalize(model_path, vocab_size: int | None = None) -> None:
    """Structure-only touch-ups of a freshly traced lean graph (tensor data is never loaded):
    - position_ids goes back into the inputs: the lean layers do not read it, so torch's exporter
      dropped it, but it is part of the I/O contract (an unused input costs nothing);
    - the optional outputs of SkipSimplifiedLayerNormalization nobody reads (mean, inv_std_var, and
      the final norm's sum) are left unnamed, so no EP computes or allocates them;
    - ONNX shape inference does not know ORT's contrib ops, so torch left placeholder names on the
      outputs' static axes: logits' vocabulary axis becomes `vocab_size` again and present.{i}'s
      heads and head_dim axes those of past_key_values.{i}, as in the plain graph; the intermediate
      value_info (placeholders only) goes, as in the plain graph: ORT infers those shapes itself."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    names = [i.name for i in graph.input]
    if "position_ids" not in names and "attention_mask" in names:
        position_ids = onnx.helper.make_tensor_value_info("position_ids", onnx.TensorProto.INT64,
                                                          ["batch_size", "sequence_length"])
        inputs = list(graph.input)
        inputs.insert(names.index("attention_mask") + 1, position_ids)
        del graph.input[:]
        graph.input.extend(inputs)
    consumed = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type == "SkipSimplifiedLayerNormalization" and node.domain == MS_DOMAIN:
            outputs = [name if i == 0 or name in consumed else "" for i, name in enumerate(node.output)]
            while outputs and outputs[-1] == "":
                outputs.pop()
            del node.output[:]
            node.output.extend(outputs)
    del graph.value_info[:]
    inputs = {i.name: i.type.tensor_type.shape.dim for i in graph.input}
    for output in graph.output:
        dims = output.type.tensor_type.shape.dim
        if output.name == "logits" and vocab_size and len(dims) == 3:
            static = {2: int(vocab_size)}
        elif output.name.startswith("present."):
            past = inputs.get(output.name.replace("present.", "past_key_values.", 1), [])
            static = {a: d.dim_value for a, d in enumerate(past) if d.dim_value and a < len(dims)}
        else:
            static = {}
        for axis, size in static.items():
            if not dims[axis].dim_value:
                dims[axis].Clear()
                dims[axis].dim_value = size
    onnx.save(model, str(model_path))


def resolve_style(model, graph: str | None) -> tuple[str, str | None]:
    """(style, note): `graph` None means lean where supported, else plain (the note says why);
    an explicit "lean" on an unsupported model raises LeanGraphUnsupported."""
    if graph is not None and graph not in GRAPH_STYLES:
        raise ValueError(f"graph must be one of {GRAPH_STYLES}, got {graph!r}")
    if graph == "plain":
        return "plain", None
    reason = supported(model)
    if reason is None:
        return "lean", None
    if graph == "lean":
        raise LeanGraphUnsupported(reason)
    return "plain", f"plain graph: {reason}"


__all__ = ["ARCHITECTURES", "GRAPH_STYLES", "LeanGraphUnsupported", "check", "supported", "patched", "finalize",
           "resolve_style", "rotary_tables"]

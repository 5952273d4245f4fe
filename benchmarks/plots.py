"""The plots of docs/results.md, from the measured JSON under docs/data/ (nothing is re-run).

    python benchmarks/plots.py [DATA_DIR] [OUT_DIR]      (needs the `plots` extra: matplotlib)

- ms_per_token_vs_bits.png: batch-1 decode ms/token (`sqllm-onnx bench`) against bits per weight of the
  quantized projections, one point per exported variant.
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


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/data/2026-11-22")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "docs")
    bench = json.loads((data / "e2e_bench_smollm2-135m.json").read_text())
    ppl = {Path(r["model_dir"]).name: r["perplexity"] for r in
           json.loads((data / "e2e_ppl_smollm2-135m.json").read_text())}

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in bench["results"]:
        ax.scatter(bits_of(r["label"]), r["ms_per_token"], s=40)
        ax.annotate(r["label"].replace(" (squeezellm)", ""), (bits_of(r["label"]), r["ms_per_token"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("bits per weight (quantized projections)")
    ax.set_ylabel("decode ms/token (batch 1)")
    ax.set_title(f"SmolLM2-135M, {bench['device']}, ORT CUDA EP", fontsize=9)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out / "ms_per_token_vs_bits.png", dpi=120)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in bench["results"]:
        name = Path(r["model_dir"]).name
        if name in ppl:
            mb = r["weight_bytes"] / 1e6
            ax.scatter(mb, ppl[name], s=40, color="tab:blue")
            ax.annotate(r["label"].replace(" (squeezellm)", ""), (mb, ppl[name]), fontsize=7, xytext=(4, 3),
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

"""The markdown table of docs/results.md "Quantizer quality", read back from the manifests that
benchmarks/gpu_quality.sh copied into its output folder (manifest-NAME.json, with "evaluation" and
"timing" entries).

    python3 benchmarks/quantize_table.py gpu-out

Bits per weight: everything a fp16 export stores for the quantized projections (packed codes, LUTs,
CSR indptr/indices/values; biases excluded), over their number of weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = ["rtn3", "km3", "sq3s0", "sq3s5", "sq3s45", "lnq3s0", "lnq3s45", "rtn4", "km4", "sq4s0", "sq4s5", "sq4s45",
        "lnq4s0", "lnq4s45"]


def bits_per_weight(manifest: dict) -> float:
    total, weights = 0, 0
    for layer in manifest["layers"].values():
        N, K, b, nnz = layer["N"], layer["K"], layer["bits"], layer["nnz"]
        total += N * ((K * b + 31) // 32) * 32 + N * (1 << b) * 16
        if nnz:
            total += (N + 1) * 32 + nnz * (32 + 16)
        weights += N * K
    return total / weights


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-out")
    base = None
    rows = []
    for name in ROWS:
        f = out / f"manifest-{name}.json"
        if not f.is_file():
            continue
        m = json.loads(f.read_text())
        ev = m.get("evaluation", {})
        base = base or ev.get("baseline_ppl")
        rows.append((name, m, ev))
    if base is None:
        sys.exit(f"no manifest in {out} has the unquantized perplexity (evaluation.baseline_ppl)")
    print(f"unquantized (float32 compute): {base:.3f}\n")
    print("| run | method | bits | sparse % | perplexity | ratio | bits/weight | weighted error | clustering s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m, ev in rows:
        algo = m.get("algorithm", {})
        werr = m["totals"].get("weighted_error")
        print(f"| {name} | {m['method']} ({algo.get('clustering', '')}; outliers {algo.get('outliers', '-')}) | "
              f"{m['bits']} | {m['totals']['nnz_percent']:.3f} | {ev.get('ppl', float('nan')):.3f} | "
              f"{ev.get('ppl', float('nan')) / base:.3f} | {bits_per_weight(m):.3f} | "
              f"{'-' if werr is None else f'{werr:.4g}'} | {m['timing'].get('clustering_s')} |")


if __name__ == "__main__":
    main()

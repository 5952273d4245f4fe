"""Weighted k-means solvers on real rows: SqueezeLLM's scikit-learn call, best-of-10 scikit-learn,
our seeded Lloyd, and the exact dynamic program, as weighted SSE relative to the exact optimum.

    PYTHONPATH=. python3 benchmarks/quantize_kmeans_gap.py --fisher-cache /tmp/fisher.safetensors

Rows: `--rows` output rows from each of a few layers of SmolLM2-135M, sample weights = their Fisher
(100 x 512 calibration tokens, read from / written to --fisher-cache).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

LAYERS = ("model.layers.2.self_attn.q_proj", "model.layers.10.self_attn.v_proj", "model.layers.15.mlp.down_proj",
          "model.layers.22.mlp.gate_proj", "model.layers.28.mlp.up_proj")


def main() -> None:
    import torch
    from sklearn.cluster import KMeans

    from sqllm_onnx.models import load_model
    from sqllm_onnx.quantize import QuantConfig, kmeans
    from sqllm_onnx.quantize.quantizer import sensitivity

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fisher-cache", default=None)
    p.add_argument("--rows", type=int, default=16)
    args = p.parse_args()
    model, tok = load_model(None)
    F, _ = sensitivity(model, tok, QuantConfig(), caches=[args.fisher_cache] if args.fisher_cache else [])
    ratios = {k: {3: [], 4: []} for k in ("sklearn_squeezellm", "sklearn_best_of_10", "lloyd_ours")}
    times = {k: 0.0 for k in ("exact", "lloyd_ours", "sklearn_squeezellm")}
    for name in LAYERS:
        W = model.get_submodule(name).weight.detach().float()[: args.rows]
        w = kmeans._fix_weights(F[name][: args.rows].double()).float()
        for bits in (3, 4):
            def sse(lut):
                lut = torch.as_tensor(lut, dtype=torch.float64)
                return kmeans.weighted_sse(W, w, lut, kmeans.assign_nearest(W.double(), lut)).numpy()
            t = time.perf_counter()
            exact = sse(kmeans.weighted_kmeans(W, w, bits))
            times["exact"] += time.perf_counter() - t
            t = time.perf_counter()
            lloyd = sse(kmeans.weighted_kmeans(W, w, bits, kmeans.row_generator(0, name), solver="lloyd"))
            times["lloyd_ours"] += time.perf_counter() - t
            ratios["lloyd_ours"][bits] += list(lloyd / exact)
            for key, n_init, max_iter in (("sklearn_squeezellm", "auto", 50), ("sklearn_best_of_10", 10, 300)):
                t = time.perf_counter()
                for r in range(W.shape[0]):
                    km = KMeans(n_clusters=1 << bits, random_state=0, n_init=n_init, max_iter=max_iter)
                    km.fit(W[r, :, None].double().numpy(), sample_weight=w[r].double().numpy())
                    ratios[key][bits].append(sse(km.cluster_centers_[:, 0][None].repeat(W.shape[0], 0))[r] / exact[r])
                if key == "sklearn_squeezellm":
                    times[key] += time.perf_counter() - t
    rows = len(LAYERS) * args.rows
    print(f"weighted SSE / exact optimum over {rows} rows ({len(LAYERS)} layers x {args.rows}), Fisher weights")
    print("| solver | 3-bit mean | 3-bit max | 4-bit mean | 4-bit max |")
    print("|---|---|---|---|---|")
    for key, r in ratios.items():
        print(f"| {key} | {np.mean(r[3]):.4f} | {np.max(r[3]):.4f} | {np.mean(r[4]):.4f} | {np.max(r[4]):.4f} |")
    print(json.dumps({"seconds": {k: round(v, 2) for k, v in times.items()}, "rows_per_bits": rows}))


if __name__ == "__main__":
    main()

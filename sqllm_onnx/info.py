"""`sqllm-onnx info`: what this installation holds and whether its CUDA kernels can run here.

The op library's own report (CUDA architectures compiled in, CPU kernel paths, ORT API version),
the onnxruntime packages installed (a CPU `onnxruntime` beside `onnxruntime-gpu` is a broken mix:
both write the same `onnxruntime` module), and a probe of the current GPU.
"""

from __future__ import annotations

import json
from importlib import metadata

import sqllm_onnx

# Distributions that provide (or build on) the `onnxruntime` module.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda")


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def installed_distributions() -> dict:
    found = {}
    for name in ORT_DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def report() -> dict:
    import onnxruntime as ort

    library = sqllm_onnx.get_library_path()
    info = sqllm_onnx.library_info()
    out = {"sqllm_onnx": sqllm_onnx.__version__, "library": library, **info,
           "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
           "distributions": installed_distributions(), "warnings": []}
    if info["cuda_archs"]:
        out["cuda"] = sqllm_onnx.cuda_probe()
    if "onnxruntime" in out["distributions"] and "onnxruntime-gpu" in out["distributions"]:
        out["warnings"].append("both onnxruntime and onnxruntime-gpu are installed: they overwrite each other's "
                               "files; `pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu`")
    if "CUDAExecutionProvider" in out["providers"] and not info["cuda_archs"]:
        out["warnings"].append("onnxruntime has the CUDA provider but the op library has no CUDA kernels: "
                               "install the CUDA-enabled sqllm-onnx wheel (README, setup)")
    return out


def main(args, command: str) -> int:
    r = report()
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"sqllm-onnx {r['sqllm_onnx']}")
    print(f"op library: {r['library']} (version {r['version']}, ORT API {r['ort_api_version']})")
    print(f"  CPU kernels: {', '.join(r['cpu_paths'])}")
    print(f"  CUDA kernels: {', '.join(r['cuda_archs']) or 'none (CPU-only build)'}")
    if "cuda" in r:
        c = r["cuda"]
        if c.get("devices"):
            state = "run here" if c["runs"] else f"cannot run here ({c['error']})"
            print(f"  GPU: {c['name']}, compute capability {c['cc']}: the CUDA kernels {state}")
        else:
            print(f"  GPU: none found (CUDA runtime: {c.get('error', 'no CUDA device')})")
    dists = ", ".join(f"{k} {v}" for k, v in r["distributions"].items())
    print(f"onnxruntime {r['onnxruntime']} ({dists}); providers: {', '.join(r['providers'])}")
    for w in r["warnings"]:
        print(f"warning: {w}")
    return 0

"""`sqllm-onnx bench DIR [DIR ...]`: batch-1 decoding speed and memory of exported models.

For each folder, in one process and one harness: a prompt of `--prompt-len` token ids is prefilled
in one run (prefill tokens/s), then `--new-tokens` tokens are decoded greedily one at a time
(ms/token, median over steps). On CUDA the KV cache stays on the GPU: each step binds the previous
step's `present.*` device buffers as `past_key_values.*` inputs (IOBinding); only the logits of
the last position come back to the host for the argmax, as in a real application. ORT CUDA graphs
need static shapes, which a KV cache that grows every step does not have (Optimum's decoder
concatenates), so they are not used here; the kernel benchmark shows graph-mode op times.
Peak GPU memory is the device's used memory (NVML) above what it was before the session.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from pathlib import Path

import numpy as np

from sqllm_onnx.runtime.session import open_session


def weight_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.name.startswith("model.onnx"))


def describe(model_dir: Path) -> str:
    manifest = Path(model_dir) / "sqllm_manifest.json"
    if manifest.exists():
        data = json.loads(manifest.read_text())
        q = data.get("quantization")
        if not q:
            return f"{data.get('dtype', '?')} (unquantized)"
        if str(q.get("method", "")).startswith("ort-"):
            return f"ORT MatMulNBits {q['bits']}b g{q['block_size']} {q['method'].split('-')[-1].upper()}"
        if q.get("method") == "finequant":  # MatMulNBits too, block sizes chosen per matrix (or one fixed)
            if q.get("block_size") == "adaptive":
                blocks = ", ".join(f"{n}x{b}" for b, n in (q.get("block_size_histogram") or {}).items())
                return f"FineQuant int{q.get('bits')} (blocks {blocks})"
            return f"RTN int{q.get('bits')} block {q.get('block_size')} (MatMulNBits)"
        return f"SqueezeLLM {q.get('bits')}b {q.get('sparsity', 0):g}% ({q.get('method')})"
    return Path(model_dir).name


class _GpuMemory:
    """Device memory in use, from NVML (None when NVML is unavailable)."""

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            self._nvml = None

    def used(self) -> int | None:
        return None if self._nvml is None else int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)


class DeviceDecoder:
    """Runs one exported decoder step by step with the KV cache kept where the provider computes (the
    GPU for cuda): each step binds the previous step's present.* buffers as past_key_values.*."""

    def __init__(self, session, provider: str):
        import onnxruntime as ort

        self.session, self._ort = session, ort
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.presents = [name.replace("past_key_values.", "present.") for name in self.past]
        self.kv_type = np.float16 if self.past and "float16" in self.inputs[self.past[0]].type else np.float32
        vocab = session.get_outputs()[0].shape[-1]
        self.vocab = vocab if isinstance(vocab, int) else 32000
        self.device = "cuda" if provider == "cuda" else "cpu"

    def empty_past(self) -> dict:
        values = {}
        for name in self.past:
            shape = [1 if d == "batch_size" else (0 if isinstance(d, str) or d is None else d)
                     for d in self.inputs[name].shape]
            values[name] = self._ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.kv_type), self.device, 0)
        return values

    def run(self, ids: np.ndarray, cache: dict, length: int):
        """One decoder run; returns (last-position logits on the host, new cache on the device)."""
        ort, binding = self._ort, self.session.io_binding()
        n = ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, length + n), np.int64),
                 "position_ids": np.arange(length, length + n, dtype=np.int64)[None]}
        for name, value in feeds.items():
            if name in self.inputs:
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, self.device, 0))
        for name, value in cache.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", self.device)
        for name in self.presents:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy()[0, -1], dict(zip(self.past, outputs[1:]))

    def greedy(self, logits, cache: dict, length: int, steps: int, on_step=None):
        """`steps` greedy one-token runs after a prefill that returned (logits, cache) at `length`;
        returns the seconds of each run. on_step(i) is called before run i (profiling hooks)."""
        times = []
        for i in range(steps):
            if on_step is not None:
                on_step(i)
            token = np.array([[int(np.argmax(logits))]], dtype=np.int64)
            t0 = time.perf_counter()
            logits, cache = self.run(token, cache, length)
            times.append(time.perf_counter() - t0)
            length += 1
        return times


def bench_one(model_dir: Path, provider: str, prompt_len: int, new_tokens: int, repeats: int, seed: int = 0) -> dict:
    memory = _GpuMemory() if provider == "cuda" else None
    before = memory.used() if memory else None
    decoder = DeviceDecoder(open_session(model_dir, provider), provider)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, decoder.vocab, size=(1, prompt_len), dtype=np.int64)
    decoder.run(prompt, decoder.empty_past(), 0)  # warm-up: kernels, arena, cuBLAS
    prefill, steps = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits, cache = decoder.run(prompt, decoder.empty_past(), 0)
        prefill.append(time.perf_counter() - t0)
        steps += decoder.greedy(logits, cache, prompt_len, new_tokens)
    peak = memory.used() if memory else None
    return {"model_dir": str(model_dir), "label": describe(model_dir), "weight_bytes": weight_bytes(model_dir),
            "ms_per_token": statistics.median(steps) * 1e3, "ms_per_token_mean": statistics.fmean(steps) * 1e3,
            "prefill_tokens_per_s": prompt_len / statistics.median(prefill),
            "peak_gpu_mb": None if peak is None or before is None else (peak - before) / 2**20,
            "provider": provider, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats}


def to_markdown(results: list[dict], command: str, device: str) -> str:
    base = next((r for r in results if "unquantized" in r["label"]), results[0])
    lines = [f"Command: `{command}`  ", f"Device: {device}; date {datetime.date.today().isoformat()}; batch 1, prompt "
             f"{results[0]['prompt_len']} tokens, {results[0]['new_tokens']} new tokens, KV cache on the device.", "",
             "| model | weights MB | x fp16 size | ms/token | speed-up vs fp16 | prefill tok/s | peak GPU MB |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        peak = "n/a" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:.0f}"
        lines.append(f"| {r['label']} | {r['weight_bytes'] / 1e6:.0f} | {r['weight_bytes'] / base['weight_bytes']:.2f} | "
                     f"{r['ms_per_token']:.2f} | {base['ms_per_token'] / r['ms_per_token']:.2f}x | "
                     f"{r['prefill_tokens_per_s']:.0f} | {peak} |")
    return "\n".join(lines) + "\n"


def add_arguments(p) -> None:
    p.add_argument("more_dirs", nargs="*", type=Path, help="more exported folders, timed in the same run")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="prefill + decode rounds per model")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)


def main(args, command: str) -> int:
    dirs = [Path(args.model_dir), *args.more_dirs]
    for d in dirs:
        if not (d / "model.onnx").is_file():
            raise SystemExit(f"{d} holds no model.onnx")
    if args.prompt_len < 1 or args.new_tokens < 1:
        raise SystemExit("--prompt-len and --new-tokens must be >= 1")
    results = []
    for d in dirs:
        r = bench_one(d, args.provider, args.prompt_len, args.new_tokens, args.repeats)
        print(f"{r['label']}: {r['ms_per_token']:.2f} ms/token, prefill {r['prefill_tokens_per_s']:.0f} tok/s, "
              f"peak {r['peak_gpu_mb']} MB", flush=True)
        results.append(r)
    device = "CPU"
    if args.provider == "cuda":
        try:
            import torch

            device = torch.cuda.get_device_name(0)
        except Exception:
            device = "CUDA GPU"
    md = to_markdown(results, command, device)
    print(md)
    if args.json:
        args.json.write_text(json.dumps({"command": command, "device": device, "results": results}, indent=2))
    if args.markdown:
        args.markdown.write_text(md)
    return 0

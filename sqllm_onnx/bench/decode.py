"""`sqllm-onnx bench DIR [DIR ...]`: batch-1 decoding speed and memory of exported models.

For each folder, in one process and one harness: a prompt of `--prompt-len` token ids is prefilled
in one run (prefill tokens/s), then `--new-tokens` tokens are decoded greedily one at a time
(ms/token, median over steps). On CUDA the KV cache stays on the GPU: each step binds the previous
step's `present.*` device buffers as `past_key_values.*` inputs (IOBinding); only the logits of
the last position come back to the host for the argmax, as in a real application. ORT CUDA graphs
need static shapes and fixed buffers, which a KV cache that grows every step does not have; with
`--cuda-graph` each (lean) model gets a second row from StaticCacheDecoder: one max-length KV buffer
per layer shared by past and present (GroupQueryAttention's shared-buffer mode), fixed input and
output buffers, and one-token steps replayed as a CUDA graph.
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
    GPU for cuda): each step binds the previous step's present.* buffers as past_key_values.*, so the
    cache grows by one position per step (new buffers each time)."""

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
        self.reset()

    def _value(self, array: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def _kv_shape(self, name: str, length: int) -> list[int]:
        return [1 if d == "batch_size" else (length if isinstance(d, str) or d is None else d)
                for d in self.inputs[name].shape]

    def reset(self) -> None:
        self.cache = {name: self._value(np.zeros(self._kv_shape(name, 0), self.kv_type)) for name in self.past}
        self.length = 0

    def feed(self, ids: np.ndarray) -> np.ndarray:
        """Runs ids [1, n] after everything fed so far; returns the last position's logits (host)."""
        binding = self.session.io_binding()
        n = ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, self.length + n), np.int64),
                 "position_ids": np.arange(self.length, self.length + n, dtype=np.int64)[None]}
        for name, value in feeds.items():
            if name in self.inputs:
                binding.bind_ortvalue_input(name, self._value(value))
        for name, value in self.cache.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", self.device)
        for name in self.presents:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.cache = dict(zip(self.past, outputs[1:]))
        self.length += n
        return outputs[0].numpy()[0, -1]

    def greedy(self, logits, steps: int) -> list[float]:
        """`steps` greedy one-token runs after a feed that returned `logits`; the seconds of each."""
        times = []
        for _ in range(steps):
            token = np.array([[int(np.argmax(logits))]], dtype=np.int64)
            t0 = time.perf_counter()
            logits = self.feed(token)
            times.append(time.perf_counter() - t0)
        return times


class StaticCacheDecoder(DeviceDecoder):
    """The same steps with every buffer fixed, so that a one-token step can run as an ORT CUDA graph:
    one KV buffer per layer of `max_len` positions, bound as both past_key_values.* and present.*
    (GroupQueryAttention's shared-buffer mode: it writes the new position in place and reads the
    cache's length from seqlens_k, i.e. from the attention mask), an attention mask of `max_len`
    positions whose first `length` are 1, and fixed input_ids / position_ids / logits buffers that
    each step overwrites. Needs the lean graph (GroupQueryAttention). Prompts of more than one token
    run outside the CUDA graph (gpu_graph_id -1)."""

    def __init__(self, session, provider: str, max_len: int, cuda_graph: bool = False):
        self.max_len, self.cuda_graph = int(max_len), bool(cuda_graph)
        self.mask = None
        super().__init__(session, provider)
        self.step_ids = self._value(np.zeros((1, 1), np.int64))
        self.step_positions = self._value(np.zeros((1, 1), np.int64))
        logits_type = np.float16 if "float16" in session.get_outputs()[0].type else np.float32
        self.step_logits = self._value(np.zeros((1, 1, self.vocab), logits_type))
        self.step = self._binding(self.step_ids, self.step_positions, self.step_logits)

    def reset(self) -> None:
        """Empties the cache by clearing the mask: the buffers stay where a captured graph expects them."""
        if self.mask is None:
            self.cache = {name: self._value(np.zeros(self._kv_shape(name, self.max_len), self.kv_type))
                          for name in self.past}
            self.mask_host = np.zeros((1, self.max_len), np.int64)
            self.mask = self._value(self.mask_host)
        self.mask_host[:] = 0
        self.mask.update_inplace(self.mask_host)
        self.length = 0

    def _binding(self, ids, positions, logits):
        binding = self.session.io_binding()
        named = {"input_ids": ids, "attention_mask": self.mask, "position_ids": positions}
        for name, value in named.items():
            if name in self.inputs:
                binding.bind_ortvalue_input(name, value)
        if logits is None:  # first: get_outputs() lists the outputs in binding order
            binding.bind_output("logits", self.device)
        else:
            binding.bind_ortvalue_output("logits", logits)
        for past, present in zip(self.past, self.presents):
            binding.bind_ortvalue_input(past, self.cache[past])
            binding.bind_ortvalue_output(present, self.cache[past])
        return binding

    def feed(self, ids: np.ndarray) -> np.ndarray:
        n = ids.shape[1]
        if self.length + n > self.max_len:
            raise ValueError(f"the static cache holds {self.max_len} positions; {self.length} used, {n} more fed")
        self.mask_host[0, self.length:self.length + n] = 1
        self.mask.update_inplace(self.mask_host)
        positions = np.arange(self.length, self.length + n, dtype=np.int64)[None]
        self.length += n
        if n > 1 or self.length == n:  # a prompt: its own binding, never captured
            binding = self._binding(self._value(ids), self._value(positions), None)
            options = self._ort.RunOptions()
            if self.cuda_graph:
                options.add_run_config_entry("gpu_graph_id", "-1")
            self.session.run_with_iobinding(binding, options)
            return binding.get_outputs()[0].numpy()[0, -1]
        self.step_ids.update_inplace(ids)
        self.step_positions.update_inplace(positions)
        self.session.run_with_iobinding(self.step)
        return self.step_logits.numpy()[0, -1]


def has_group_query_attention(model_dir: Path) -> bool:
    import onnx

    graph = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False).graph
    return any(n.op_type == "GroupQueryAttention" for n in graph.node)


def bench_one(model_dir: Path, provider: str, prompt_len: int, new_tokens: int, repeats: int, seed: int = 0,
              cuda_graph: bool = False) -> dict:
    memory = _GpuMemory() if provider == "cuda" else None
    before = memory.used() if memory else None
    if cuda_graph:
        if provider != "cuda":
            raise ValueError("CUDA graphs need --provider cuda")
        if not has_group_query_attention(model_dir):
            raise ValueError(f"{model_dir}: CUDA graphs need a static KV cache, which needs the lean graph "
                             "(GroupQueryAttention); export with --graph lean")
        session = open_session(model_dir, provider, provider_options={"enable_cuda_graph": "1"})
        decoder = StaticCacheDecoder(session, provider, prompt_len + new_tokens, cuda_graph=True)
    else:
        decoder = DeviceDecoder(open_session(model_dir, provider), provider)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, decoder.vocab, size=(1, prompt_len), dtype=np.int64)
    # warm-up: kernels, arena, cuBLAS (and, with CUDA graphs, the capture after ORT's first plain runs)
    decoder.greedy(decoder.feed(prompt), min(new_tokens, 4))
    prefill, steps = [], []
    for _ in range(repeats):
        decoder.reset()
        t0 = time.perf_counter()
        logits = decoder.feed(prompt)
        prefill.append(time.perf_counter() - t0)
        steps += decoder.greedy(logits, new_tokens)
    peak = memory.used() if memory else None
    label = describe(model_dir) + (" (CUDA graph)" if cuda_graph else "")
    return {"model_dir": str(model_dir), "label": label, "weight_bytes": weight_bytes(model_dir),
            "ms_per_token": statistics.median(steps) * 1e3, "ms_per_token_mean": statistics.fmean(steps) * 1e3,
            "prefill_tokens_per_s": prompt_len / statistics.median(prefill),
            "peak_gpu_mb": None if peak is None or before is None else (peak - before) / 2**20,
            "provider": provider, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "cuda_graph": cuda_graph}


def to_markdown(results: list[dict], command: str, device: str) -> str:
    base = next((r for r in results if "unquantized" in r["label"] and not r.get("cuda_graph")), results[0])
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
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time each model with a static KV cache and ORT CUDA graphs, as a second row "
                        "(cuda, lean graphs only)")
    p.add_argument("--genai", type=Path, action="append", default=[], metavar="DIR",
                   help="also time this GenAI model folder (e.g. onnxruntime_genai's model builder output) through "
                        "GenAI's own generator loop, in the same run (repeatable; with --cuda-graph a second row "
                        "with GenAI's CUDA graphs)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)


def main(args, command: str) -> int:
    from sqllm_onnx import export_folder

    dirs = [Path(args.model_dir), *args.more_dirs]
    for d in dirs:
        export_folder.inspect(d)
    if args.prompt_len < 1 or args.new_tokens < 1:
        raise SystemExit("--prompt-len and --new-tokens must be >= 1")
    if args.cuda_graph and args.provider != "cuda":
        raise SystemExit("--cuda-graph needs --provider cuda")
    for d in args.genai:
        if not (Path(d) / "genai_config.json").exists():
            raise SystemExit(f"--genai {d}: no genai_config.json there (not a GenAI model folder)")
    results = []
    for d, genai in [(d, False) for d in dirs] + [(d, True) for d in args.genai]:
        for graph in (False, True) if args.cuda_graph else (False,):
            if graph and not genai and not has_group_query_attention(d):
                print(f"{d}: no CUDA-graph row (a plain graph: a static KV cache needs GroupQueryAttention)")
                continue
            try:
                if genai:
                    from sqllm_onnx.bench.genai import bench_genai

                    r = bench_genai(d, args.provider, args.prompt_len, args.new_tokens, args.repeats, cuda_graph=graph)
                else:
                    r = bench_one(d, args.provider, args.prompt_len, args.new_tokens, args.repeats, cuda_graph=graph)
            except Exception as e:  # the CUDA-graph row is extra: report why it is missing, keep the others
                if not graph:
                    raise
                print(f"{d}: no CUDA-graph row: {type(e).__name__}: {e}", flush=True)
                continue
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

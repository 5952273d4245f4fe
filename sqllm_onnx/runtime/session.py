"""ORT sessions for exported folders, and one decoder step with a KV cache (numpy, any provider)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

import sqllm_onnx

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def model_file(model_dir: str | Path) -> Path:
    path = Path(model_dir) / "model.onnx"
    if not path.is_file():
        from sqllm_onnx.errors import UserError

        raise UserError(f"{model_dir} holds no model.onnx (is it an sqllm-onnx export folder?)")
    return path


def quiet(so: ort.SessionOptions) -> ort.SessionOptions:
    """ONNX Runtime's own log at errors only (its shape-inference warnings about the fused contrib ops
    carry nothing for a user), unless SQLLM_VERBOSE=1 (`sqllm-onnx --verbose`)."""
    if os.environ.get("SQLLM_VERBOSE") != "1":
        so.log_severity_level = 3
    return so


def open_session(model_dir: str | Path, provider: str = "cpu", threads: int = 0,
                 provider_options: dict | None = None) -> ort.InferenceSession:
    """A session over DIR/model.onnx with the op library registered (harmless for graphs without it)."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, got {provider!r}")
    if PROVIDERS[provider] not in ort.get_available_providers():
        from sqllm_onnx.errors import UserError

        raise UserError(f"{PROVIDERS[provider]} is not available in this onnxruntime "
                        f"({', '.join(ort.get_available_providers())}): for --provider cuda replace onnxruntime by "
                        f"onnxruntime-gpu (`pip uninstall -y onnxruntime && pip install onnxruntime-gpu`)")
    so = quiet(ort.SessionOptions())
    so.intra_op_num_threads = threads
    sqllm_onnx.register(so)
    if provider == "cuda":
        if uses_squeeze_matmul(model_dir):
            check_cuda_library()
        # On Hopper, ORT prefers cuDNN SDPA for GroupQueryAttention, which builds a new cuDNN plan
        # for every new KV length: with a KV cache that grows each step that cost ~60 ms per token
        # on an H100 (measured). The flash kernel needs no plan. An explicit setting wins.
        os.environ.setdefault("ORT_ENABLE_CUDNN_FLASH_ATTENTION", "0")
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        providers = [(PROVIDERS["cuda"], provider_options or {}), PROVIDERS["cpu"]]
    else:
        providers = [PROVIDERS["cpu"]]
    path = model_file(model_dir)
    before = sqllm_onnx.kernel_counts()
    try:
        session = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # noqa: BLE001 - ORT's load errors (damaged protobuf, missing data) as one line
        from sqllm_onnx.errors import UserError

        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__).strip()
        if first.startswith("[ONNXRuntimeError]"):
            first = first.split(" : ", 3)[-1]
        raise UserError(f"{path} cannot be loaded by onnxruntime ({first[:300]}): the folder may be damaged "
                        f"(`sqllm-onnx check {model_dir}`)") from None
    if provider == "cuda":
        check_placement(before, sqllm_onnx.kernel_counts())
    return session


def uses_squeeze_matmul(model_dir: str | Path) -> bool:
    """Whether DIR's graph holds SqueezeMatMul nodes: from the export manifest, else from the graph
    (without its external data)."""
    import json

    from sqllm_onnx.export.configs import MANIFEST

    try:
        graph = json.loads((Path(model_dir) / MANIFEST).read_text()).get("graph") or {}
        if "squeeze_matmul_nodes" in graph:
            return graph["squeeze_matmul_nodes"] > 0
    except (OSError, ValueError, AttributeError):
        pass
    import onnx

    from sqllm_onnx.op import OP_TYPE

    try:
        proto = onnx.load(str(model_file(model_dir)), load_external_data=False)
    except Exception:  # noqa: BLE001 - a damaged file: the session's own load reports it
        return True
    return any(n.op_type == OP_TYPE for n in proto.graph.node)


def check_cuda_library(info: dict | None = None, probe: dict | None = None) -> None:
    """A clear error, before any session exists, when the registered op library cannot run its
    SqueezeMatMul kernels on this GPU: built without CUDA, or without code for this GPU's
    architecture. (ORT would otherwise place every SqueezeMatMul node on the CPU provider, with
    copies both ways, and the user would only see a slow model.)"""
    from sqllm_onnx.errors import UserError

    info = sqllm_onnx.library_info() if info is None else info
    library = sqllm_onnx.get_library_path()
    if not info.get("cuda_archs"):
        raise UserError(f"the op library {library} has no CUDA kernels (built where no nvcc was found): install "
                        f"the CUDA-enabled wheel of sqllm-onnx, or rebuild with SQLLM_CUDA=ON (`sqllm-onnx info`)")
    probe = sqllm_onnx.cuda_probe() if probe is None else probe
    if not probe.get("runs"):
        where = f"{probe['name']} (compute capability {probe['cc']})" if probe.get("devices") else "this machine"
        raise UserError(f"the CUDA kernels of {library} (architectures {', '.join(info['cuda_archs'])}) cannot run "
                        f"on {where}: {probe.get('error') or 'unknown error'}")


def check_placement(before: tuple[int, int], after: tuple[int, int]) -> None:
    """After a CUDA session was created: an error if ORT gave any SqueezeMatMul node to the CPU
    provider (counts of kernels created, (cpu, cuda), before and after)."""
    from sqllm_onnx.errors import UserError

    on_cpu, on_cuda = after[0] - before[0], after[1] - before[1]
    if on_cpu > 0:
        raise UserError(f"onnxruntime placed {on_cpu} of {on_cpu + on_cuda} SqueezeMatMul nodes on the CPU provider "
                        f"instead of CUDA (unsupported input type on CUDA, or a library without CUDA kernels for "
                        f"this model): it would run slowly with copies both ways; see `sqllm-onnx info`")


class Decoder:
    """Steps an Optimum `text-generation-with-past` decoder: feeds input ids plus the KV cache of
    the previous steps, keeps the new cache. Batch 1, numpy tensors."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.input_names = {i.name for i in session.get_inputs()}
        self.past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        self.present_names = [p.name.replace("past_key_values.", "present.") for p in self.past]
        self.float_type = np.float16 if self.past and "float16" in self.past[0].type else np.float32
        self.reset()

    def reset(self) -> None:
        self.cache = {}
        for p in self.past:
            shape = [1 if d == "batch_size" else (0 if isinstance(d, str) or d is None else d) for d in p.shape]
            self.cache[p.name] = np.zeros(shape, self.float_type)
        self.length = 0

    def step(self, ids) -> np.ndarray:
        """Logits [len(ids), vocab] (float32) for `ids` appended to everything fed so far."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, self.length + n), np.int64),
                 "position_ids": np.arange(self.length, self.length + n, dtype=np.int64)[None], **self.cache}
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        outputs = self.session.run(["logits", *self.present_names], feeds)
        self.cache = {p.name: out for p, out in zip(self.past, outputs[1:])}
        self.length += n
        return outputs[0][0].astype(np.float32)


def greedy_generate(decoder: Decoder, prompt_ids, max_new_tokens: int, eos_token_id=None) -> list[int]:
    """Greedy decoding with the KV cache: the prompt in one step, then one token per step."""
    decoder.reset()
    eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]) - {None}
    logits = decoder.step(prompt_ids)
    out = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(logits[-1]))
        out.append(token)
        if token in eos:
            break
        logits = decoder.step([token])
    return out

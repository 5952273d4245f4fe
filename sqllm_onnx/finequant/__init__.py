"""FineQuant (Kim, Henry, Fahim and Awadalla 2023, arXiv 2308.09723) for ONNX Runtime: calibration-free,
block-wise uniform int4/int8 weight-only quantization whose block size is chosen per matrix from the
weights alone (heuristic.py), exported as ORT's own `com.microsoft.MatMulNBits` nodes
(quantize.py: the tensors; sqllm_onnx/export/nbits_linear.py: the torch module that emits them).

    from sqllm_onnx.finequant import FineQuantConfig, quantize_model
    qmodel = quantize_model(model, FineQuantConfig(bits=4))        # adaptive block sizes
    qmodel = quantize_model(model, FineQuantConfig(bits=4, block_size=128))   # fixed-block RTN
    export(out_dir, FineQuantConfig(bits=4), model_name_or_path)   # sqllm_onnx.export.exporter

docs/finequant.md describes the heuristic, its thresholds and the MatMulNBits layout.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from sqllm_onnx.finequant.heuristic import (DEFAULT_HALVING_GAIN, DEFAULT_MAX_BLOCK, DEFAULT_MIN_BLOCK, BlockChoice,
                                            candidates, choose_block_size)
from sqllm_onnx.finequant.quantize import (BLOCK_SIZES, SUPPORTED_BITS, NBitsLayer, check_block_size, dequantize,
                                           quantize_layer)

METHOD = "finequant"
SCALE_DTYPES = ("float16", "float32")


@dataclass
class FineQuantConfig:
    """How to quantize with FineQuant.

    - ``bits``: 4 or 8 (MatMulNBits' widths with CPU and CUDA kernels in ORT 1.31).
    - ``block_size``: None for the adaptive choice per matrix; a fixed size (16..256, a power of two)
      turns FineQuant into plain fixed-block RTN (the baselines of docs/results.md).
    - ``min_block``, ``max_block``, ``halving_gain``: the heuristic's thresholds (heuristic.py).
    - ``scale_dtype``: the scales' and the graph's float type, "float16" or "float32".
    - ``quantize_lm_head``: also quantize lm_head (kept in the export dtype by default, as for SqueezeLLM).
    - ``accuracy_level``: MatMulNBits' attribute (0: A is not quantized or downcast; 4 lets the CPU
      kernel quantize A to int8, faster on CPUs and less exact; the CUDA kernels ignore it).
    - ``device``: where the block statistics are computed ("cpu", "cuda"; default: cuda when available).
      The result does not depend on it beyond float rounding of the error statistics.
    """

    bits: int = 4
    block_size: int | None = None
    min_block: int = DEFAULT_MIN_BLOCK
    max_block: int = DEFAULT_MAX_BLOCK
    halving_gain: float = DEFAULT_HALVING_GAIN
    scale_dtype: str = "float16"
    quantize_lm_head: bool = False
    accuracy_level: int = 0
    device: str | None = None
    method: str = field(default=METHOD, init=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"FineQuant bits must be 4 or 8 (got {self.bits!r})")
        if self.block_size is not None:
            check_block_size(self.block_size)
        candidates(self.min_block, self.max_block)
        if not (isinstance(self.halving_gain, (int, float)) and self.halving_gain > 1):
            raise ValueError(f"halving_gain must be a number > 1 (got {self.halving_gain!r})")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES} (got {self.scale_dtype!r})")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4 (got {self.accuracy_level!r})")
        if self.device is not None and not isinstance(self.device, str):
            raise ValueError(f"device must be a string such as 'cpu' or 'cuda' (got {self.device!r})")

    def resolved_device(self) -> str:
        import torch

        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def adaptive(self) -> bool:
        return self.block_size is None

    def describe(self) -> str:
        how = "adaptive blocks" if self.adaptive else f"fixed block {self.block_size} (RTN)"
        return f"FineQuant int{self.bits}, {how}"


@dataclass
class NBitsModel:
    """Quantized layers (MatMulNBits tensors) by module name, and the manifest describing them."""

    layers: dict[str, NBitsLayer] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)


def target_layers(model, quantize_lm_head: bool = False) -> list[str]:
    """The linears FineQuant quantizes: the same discovery as SqueezeLLM (sqllm_onnx.quantize.targets:
    every linear of the decoder blocks, MoE experts included, routers left in floating point)."""
    from sqllm_onnx.quantize.targets import linear_layer_names

    return linear_layer_names(model, quantize_lm_head)


def quantize_model(model, config: FineQuantConfig, progress: bool = False, log=None) -> NBitsModel:
    """Quantize the target linears of `model` (left unchanged) into MatMulNBits tensors."""
    import torch
    from tqdm.auto import tqdm

    started = time.time()
    device = config.resolved_device()
    names = target_layers(model, config.quantize_lm_head)
    scale_dtype = np.dtype(config.scale_dtype)
    layers, stats = {}, {}
    for name in tqdm(names, desc="FineQuant", unit="layer", disable=not progress):
        module = model.get_submodule(name)
        W = module.weight.detach().to(device)
        with torch.no_grad():
            if config.adaptive:
                choice = choose_block_size(W, config.bits, config.min_block, config.max_block, config.halving_gain)
            else:
                choice = BlockChoice(block_size=config.block_size, start=config.block_size, reason="fixed")
            layer = quantize_layer(W, config.bits, choice.block_size, scale_dtype, bias=module.bias)
            Wf = module.weight.detach().to(torch.float32).cpu()
            err = torch.linalg.vector_norm(torch.from_numpy(layer.dequantize()) - Wf) / torch.linalg.vector_norm(Wf)
        layers[name] = layer
        stats[name] = {"N": layer.N, "K": layer.K, "block_size": choice.block_size, "start_block": choice.start,
                       "choice": choice.reason, "rel_error": round(float(err), 6),
                       "errors_by_block": {str(b): round(e, 6) for b, e in choice.errors.items()},
                       "bytes": layer.nbytes}
    histogram: dict[str, int] = {}
    for s in stats.values():
        histogram[str(s["block_size"])] = histogram.get(str(s["block_size"]), 0) + 1
    cfg = asdict(config)
    manifest = {"method": METHOD, "paper": "FineQuant, arXiv 2308.09723", "bits": config.bits,
                "block_size": config.block_size if not config.adaptive else "adaptive",
                "symmetric": False, "zero_points": "uint8 (packed for 4 bits)",
                "config": cfg, "block_size_histogram": dict(sorted(histogram.items(), key=lambda kv: int(kv[0]))),
                "weight_bytes": int(sum(layer.nbytes for layer in layers.values())),
                "layers": stats, "seconds": round(time.time() - started, 1)}
    if log is not None:
        log(f"FineQuant: {len(layers)} layers, block sizes {manifest['block_size_histogram']}")
    return NBitsModel(layers=layers, manifest=manifest)


def apply_to_model(model, qmodel: NBitsModel) -> None:
    """Replace each quantized layer's weight by its dequantized value (in place): torch then computes
    with exactly the weights the exported MatMulNBits nodes hold."""
    import torch

    with torch.no_grad():
        for name, layer in qmodel.layers.items():
            module = model.get_submodule(name)
            module.weight.copy_(torch.from_numpy(layer.dequantize()).to(module.weight.dtype))
            if layer.bias is not None and module.bias is not None:
                module.bias.copy_(torch.from_numpy(layer.bias.astype(np.float32)).to(module.bias.dtype))


__all__ = ["FineQuantConfig", "NBitsModel", "NBitsLayer", "quantize_model", "apply_to_model", "target_layers",
           "choose_block_size", "quantize_layer", "dequantize", "METHOD", "BLOCK_SIZES", "SUPPORTED_BITS"]

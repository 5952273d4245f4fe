"""The quantizer: Hugging Face causal LM -> SqueezeLLM dense-and-sparse checkpoint in the layout of
`sqllm.SqueezeMatMul` (docs/op-spec.md).

    from sqllm_onnx.quantize import QuantConfig, quantize_model, save_checkpoint, apply_to_model
    qmodel = quantize_model(model, tokenizer, QuantConfig(bits=3, sparsity=0.45), checkpoint_dir="out")
    apply_to_model(model, qmodel)   # torch now computes with exactly the op's weights

Modules: config (QuantConfig), calibration + fisher (sensitivity), decompose (dense/sparse split),
kmeans (per-row tables: exact weighted k-means, Lloyd, RTN), layer (one matrix), lnq (one matrix with
error feedback under its input Hessian, method "lnq"), sequential (blocks in order through the quantized
ones, input Hessians), quantizer (the model, resume), checkpoint (files, apply), squeezellm_import
(original SqueezeLLM .pt files), pipeline (decoder blocks placed across processes, the Fisher pass
through them), distributed (one run over several devices: `--devices`, torchrun), cli.
"""

import importlib

# Lazy attributes (PEP 562): `from sqllm_onnx.quantize.config import ...` (the CLI's argument parser)
# must not import torch through the quantizer.
_EXPORTS = {
    "CheckpointError": "checkpoint", "QuantizedModel": "checkpoint", "apply_to_model": "checkpoint",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint", "QuantConfig": "config",
    "quantize_model": "quantizer", "import_squeezellm": "squeezellm_import", "linear_layer_names": "targets",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sqllm_onnx.quantize.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

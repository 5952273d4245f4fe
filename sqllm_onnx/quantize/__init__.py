"""The quantizer: Hugging Face causal LM -> SqueezeLLM dense-and-sparse checkpoint in the layout of
`sqllm.SqueezeMatMul` (docs/op-spec.md).

    from sqllm_onnx.quantize import QuantConfig, quantize_model, save_checkpoint, apply_to_model
    qmodel = quantize_model(model, tokenizer, QuantConfig(bits=3, sparsity=0.45), checkpoint_dir="out")
    apply_to_model(model, qmodel)   # torch now computes with exactly the op's weights

Modules: config (QuantConfig), calibration + fisher (sensitivity), decompose (dense/sparse split),
kmeans (per-row tables: exact weighted k-means, Lloyd, RTN), layer (one matrix), quantizer (the model,
resume), checkpoint (files, apply), squeezellm_import (original SqueezeLLM .pt files), cli.
"""

from sqllm_onnx.quantize.checkpoint import (CheckpointError, QuantizedModel, apply_to_model, load_checkpoint,
                                            save_checkpoint)
from sqllm_onnx.quantize.config import QuantConfig
from sqllm_onnx.quantize.quantizer import quantize_model
from sqllm_onnx.quantize.squeezellm_import import import_squeezellm
from sqllm_onnx.quantize.targets import linear_layer_names

__all__ = ["QuantConfig", "QuantizedModel", "CheckpointError", "quantize_model", "save_checkpoint",
           "load_checkpoint", "apply_to_model", "linear_layer_names", "import_squeezellm"]

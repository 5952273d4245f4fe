"""`QuantConfig`: what to quantize and how, validated once, with the defaults of the paper."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

METHODS = ("squeezellm", "lnq", "kmeans", "rtn")
KMEANS_SOLVERS = ("exact", "lloyd")
OUTLIER_RULES = ("magnitude", "row-iqr", "error")
LUT_DTYPES = ("float16", "float32")
SUPPORTED_BITS = (2, 3, 4, 8)
DEFAULT_SENSITIVE = 0.05  # percent of the weights taken by the top-Fisher values (the paper's split)


@dataclass
class QuantConfig:
    """How to quantize a model.

    - ``bits``: code width; 3 and 4 are the SqueezeLLM widths, 2 and 8 are also packed by the op.
    - ``sparsity``: percent of each matrix's weights kept in the sparse (CSR) part, as the paper and
      its checkpoints name it: 0.45 means 0.45 %, i.e. 45 weights in 10 000.
    - ``sensitive``: the part of ``sparsity`` (percent) taken by the largest Fisher values; the rest
      goes to outliers. Default: 0.05 when ``sparsity >= 0.05``, else all of ``sparsity``.
    - ``method``: "squeezellm" (Fisher-weighted k-means), "lnq" (the same format with codes and
      tables chosen by error feedback over calibration activations, layer by layer: `lnq`),
      "kmeans" (unweighted k-means) or "rtn" (per-channel round-to-nearest on a uniform grid,
      written as a LUT).
    - ``lnq_iters`` ("lnq" only): passes of code assignment (GPTQ-style, with error feedback) each
      followed by a least-squares re-fit of the tables.
    - ``calib_data``: None or "stdlib" (the calibration part of pydoc_data.topics), a text file, or
      "hf:NAME[:CONFIG][:SPLIT]".
    - ``kmeans_solver`` (ablation): "exact" (the optimal weighted 1-D k-means, default) or "lloyd".
    - ``outlier_rule`` (ablation): how outliers are picked, see `decompose`: "magnitude" (largest |w|
      of the matrix, as SqueezeLLM; default), "row-iqr" (furthest outside their row's interquartile
      range) or "error" (largest Fisher-weighted error of a first dense fit).
    """

    bits: int = 3
    sparsity: float = 0.0
    sensitive: float | None = None
    method: str = "squeezellm"
    calib_data: str | None = None
    calib_samples: int = 100
    calib_seq_len: int = 512
    seed: int = 0
    lut_dtype: str = "float16"
    quantize_lm_head: bool = False
    device: str | None = None
    kmeans_solver: str = "exact"
    outlier_rule: str = "magnitude"
    lnq_iters: int = 2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))} (got {self.bits!r})")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)} (got {self.method!r})")
        if not _is_number(self.sparsity) or not 0 <= self.sparsity <= 100:
            raise ValueError(f"sparsity is a percentage of the weights, from 0 to 100 (got {self.sparsity!r}); "
                             "0.45 means 0.45 %")
        if self.sensitive is not None:
            if not _is_number(self.sensitive) or self.sensitive < 0:
                raise ValueError(f"sensitive must be a percentage >= 0 (got {self.sensitive!r})")
            if self.sensitive > self.sparsity:
                raise ValueError(f"sensitive ({self.sensitive} %) cannot exceed sparsity ({self.sparsity} %): "
                                 "the sensitive values are part of the sparse values")
        if isinstance(self.lnq_iters, bool) or not isinstance(self.lnq_iters, int) or self.lnq_iters < 1:
            raise ValueError(f"lnq_iters must be a positive integer (got {self.lnq_iters!r})")
        if self.method == "lnq" and self.quantize_lm_head:
            raise ValueError("method lnq quantizes the decoder blocks' projections only; use --method squeezellm "
                             "to quantize lm_head")
        if self.kmeans_solver not in KMEANS_SOLVERS:
            raise ValueError(f"kmeans_solver must be one of {', '.join(KMEANS_SOLVERS)} (got {self.kmeans_solver!r})")
        if self.outlier_rule not in OUTLIER_RULES:
            raise ValueError(f"outlier_rule must be one of {', '.join(OUTLIER_RULES)} (got {self.outlier_rule!r})")
        if self.lut_dtype not in LUT_DTYPES:
            raise ValueError(f"lut_dtype must be one of {', '.join(LUT_DTYPES)} (got {self.lut_dtype!r})")
        for name in ("calib_samples", "calib_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer (got {value!r})")
        if self.calib_seq_len < 2:
            raise ValueError("calib_seq_len must be at least 2 (the loss predicts the next token)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer (got {self.seed!r})")
        if self.device is not None and not isinstance(self.device, str):
            raise ValueError(f"device must be a string such as 'cpu' or 'cuda' (got {self.device!r})")

    # ---- derived values -------------------------------------------------------------------------

    @property
    def sensitive_percent(self) -> float:
        """The part of ``sparsity`` (percent) given to the top-Fisher values."""
        if self.sensitive is not None:
            return float(self.sensitive)
        return min(float(self.sparsity), DEFAULT_SENSITIVE) if self.sparsity >= DEFAULT_SENSITIVE else float(self.sparsity)

    @property
    def outlier_percent(self) -> float:
        return max(float(self.sparsity) - self.sensitive_percent, 0.0)

    @property
    def needs_fisher(self) -> bool:
        """Fisher sensitivity is needed for weighted k-means and for picking sensitive values."""
        return self.method in ("squeezellm", "lnq") or (self.sparsity > 0 and self.sensitive_percent > 0)

    @property
    def torch_lut_dtype(self):
        import torch

        return getattr(torch, self.lut_dtype)

    @property
    def numpy_lut_dtype(self):
        import numpy as np

        return np.dtype(self.lut_dtype)

    def fingerprint(self) -> dict:
        """The fields that define the result (everything but where it runs)."""
        d = dataclasses.asdict(self)
        d.pop("device")
        d["sensitive"] = self.sensitive_percent
        d["calib_data"] = self.calib_data or "stdlib"
        if not self.needs_fisher:  # calibration does not influence the result
            for k in ("calib_data", "calib_samples", "calib_seq_len"):
                d[k] = None
        if self.method == "rtn":
            d["kmeans_solver"] = None
        if self.method != "lnq":  # (so that runs of the other methods keep their fingerprint)
            d.pop("lnq_iters")
        if self.sparsity == 0 or self.outlier_percent == 0:
            d["outlier_rule"] = None
        return d

    def resolved_device(self) -> str:
        import torch

        if self.device:
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # excludes NaN

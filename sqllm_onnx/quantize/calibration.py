"""Calibration windows: `samples` random windows of `seq_len` tokens from the calibration text.

The default source is the calibration part of Python's `pydoc_data.topics` (offline, disjoint from
the part the perplexity protocol evaluates on); any text file or ``hf:NAME[:CONFIG][:SPLIT]`` works
too (see `sqllm_onnx.data`).
"""

from __future__ import annotations

import numpy as np

from sqllm_onnx import data


def describe_source(source: str | None) -> str:
    if source is None or str(source) == data.STDLIB:
        return "stdlib:pydoc_data.topics[calib]"
    return str(source)


def calibration_windows(tokenizer, source: str | None = None, samples: int = 100, seq_len: int = 512,
                        seed: int = 0) -> np.ndarray:
    """Token windows int64 [samples, seq_len] at random offsets of the calibration text."""
    ids = data.tokenize(tokenizer, data.load_text(source, "calib"))
    if len(ids) <= seq_len:
        raise ValueError(f"the calibration text {describe_source(source)!r} has {len(ids)} tokens; "
                         f"windows of {seq_len} tokens need more (lower --calib-seq-len or use more text)")
    return data.random_windows(ids, samples, seq_len, seed)

"""Text for calibration and evaluation, offline by default.

The default source is Python's own `pydoc_data.topics` (about 750 KB of English reference prose),
split by topic into two disjoint parts: the first three quarters calibrate, the last quarter
evaluates. Other sources: any text file, or a Hugging Face dataset (``hf:NAME[:CONFIG][:SPLIT]``),
which needs network access.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STDLIB = "stdlib"
_CALIB_FRACTION = 0.75


def stdlib_text(part: str) -> str:
    """The calibration ("calib") or evaluation ("eval") part of pydoc_data.topics."""
    from pydoc_data.topics import topics

    if part not in ("calib", "eval"):
        raise ValueError(f"part must be 'calib' or 'eval', got {part!r}")
    keys = sorted(topics)
    cut = int(len(keys) * _CALIB_FRACTION)
    chosen = keys[:cut] if part == "calib" else keys[cut:]
    return "\n\n".join(topics[k] for k in chosen)


def load_text(source: str | Path | None, part: str) -> str:
    """Text from `source`: None or "stdlib" (the given part of pydoc_data.topics), a file path, or
    ``hf:NAME[:CONFIG][:SPLIT]``."""
    if source is None or str(source) == STDLIB:
        return stdlib_text(part)
    source = str(source)
    if source.startswith("hf:"):
        return _hf_text(source[3:])
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"text source {source!r} is not a file (use 'stdlib', a text file, or hf:NAME)")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"text source {source!r} is empty")
    return text


def _hf_text(spec: str) -> str:
    parts = spec.split(":")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError("hf: text sources need the `datasets` package (pip install datasets)") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, ...
        raise RuntimeError(f"could not load Hugging Face dataset {spec!r} (offline?): {e}") from e
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(str(t) for t in ds[column] if t)


def tokenize(tokenizer, text: str) -> np.ndarray:
    """All token ids of `text` as one int64 array (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def random_windows(ids: np.ndarray, n: int, length: int, seed: int) -> np.ndarray:
    """`n` windows of `length` tokens at random offsets (as the paper samples its calibration set)."""
    if len(ids) <= length:
        raise ValueError(f"the text has {len(ids)} tokens; calibration windows need more than {length}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - length, size=n)
    return np.stack([ids[s:s + length] for s in starts])


def sequential_windows(ids: np.ndarray, length: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows of `length` tokens from the start (the evaluation protocol)."""
    count = len(ids) // length
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"the text has {len(ids)} tokens; evaluation needs at least {length}")
    return ids[:count * length].reshape(count, length)

"""Recognising an export folder, and telling when it is damaged, before any heavy work.

`sqllm-onnx export` writes `sqllm_manifest.json` with the size and SHA-256 of every other file of
the folder. `inspect(DIR)` (what `eval`, `generate` and `bench DIR` call first) checks that DIR is an
export and that every recorded file is there with its recorded size: cheap, and enough to catch a
truncated copy or a missing file. `verify(DIR)` (`sqllm-onnx check DIR`) also compares the hashes.
Every problem is an `errors.UserError` whose one-line message says what is wrong and what to do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sqllm_onnx.errors import UserError

MANIFEST = "sqllm_manifest.json"
FORMAT = "sqllm-onnx export"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def inspect(model_dir) -> dict:
    """The folder's manifest, after checking that it is an export with every file at its size."""
    folder = Path(model_dir)
    if not folder.exists():
        raise UserError(f"{folder}: no such folder (give the --out folder of `sqllm-onnx export`)")
    if not folder.is_dir():
        raise UserError(f"{folder} is a file, not an export folder (give the --out folder of `sqllm-onnx export`)")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        if (folder / "config.json").is_file():
            raise UserError(f"{folder} is a model folder, not an sqllm-onnx export: export it first with "
                            f"`sqllm-onnx export --model {folder} --out DIR`")
        raise UserError(f"{folder} is not an sqllm-onnx export (no {MANIFEST}): make one with "
                        "`sqllm-onnx export --out DIR`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{manifest_path} is damaged ({type(e).__name__}): re-export the model") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{manifest_path} is not the manifest of an sqllm-onnx export: re-export the model")
    files = manifest.get("files") or {}
    if "model.onnx" not in files:
        raise UserError(f"{manifest_path} lists no model.onnx: re-export the model")
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"{folder} lacks {name}, which the export wrote: the folder is incomplete (re-export, "
                            "or copy the whole folder again)")
        actual = path.stat().st_size
        if actual != size:
            raise UserError(f"{path} has {actual} bytes but the export wrote {size}: the folder is damaged or "
                            "truncated (re-export, or copy the whole folder again)")
    return manifest


def verify(model_dir, progress=None) -> dict:
    """`inspect`, then every recorded SHA-256 (exports made before hashes were recorded: sizes only).
    Returns {"files": n, "bytes": total, "hashed": n_hashed}."""
    manifest = inspect(model_dir)
    folder = Path(model_dir)
    hashes = manifest.get("sha256") or {}
    for name, digest in hashes.items():
        if progress:
            progress(name)
        if sha256_file(folder / name) != digest:
            raise UserError(f"{folder / name} differs from what the export wrote (SHA-256 mismatch): the folder is "
                            "damaged (re-export, or copy the whole folder again)")
    files = manifest.get("files") or {}
    return {"files": len(files), "bytes": sum(files.values()), "hashed": len(hashes)}


# ---- `sqllm-onnx check DIR` ----------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("model_dir", type=Path, help="an exported folder")


def main(args, command: str) -> int:
    result = verify(args.model_dir)
    note = "" if result["hashed"] else " (sizes only: this export predates recorded hashes)"
    print(f"{args.model_dir}: ok, {result['files']} files, {result['bytes'] / 1e6:.1f} MB as exported{note}")
    return 0

"""sqllm-onnx: SqueezeLLM (dense-and-sparse non-uniform quantization) for ONNX Runtime.

The custom-op library ``libsqllm_ops.so`` is built by CMake and installed inside this package;
``register(session_options)`` makes ``sqllm.SqueezeMatMul`` available to an onnxruntime session.
"""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"
__all__ = ["__version__", "cuda_probe", "get_library_path", "kernel_counts", "library_info", "register"]

_LIBRARY_NAME = "libsqllm_ops.so"
_ENV_OVERRIDE = "SQLLM_OPS_LIBRARY"


def get_library_path() -> str:
    """Absolute path of the op library.

    ``$SQLLM_OPS_LIBRARY`` wins when set (for a library built outside pip); otherwise the copy
    installed in ``sqllm_onnx/_lib``.
    """
    override = os.environ.get(_ENV_OVERRIDE)
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"${_ENV_OVERRIDE} points to {override!r}, which is not a file")
        return str(Path(override).resolve())
    for folder in _search_folders():
        candidate = folder / "_lib" / _LIBRARY_NAME
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"{_LIBRARY_NAME} is not installed with sqllm_onnx (looked in "
        f"{', '.join(str(f / '_lib') for f in _search_folders())}). Build it with `pip install .` "
        f"from the source tree, or point ${_ENV_OVERRIDE} at a library built with CMake.")


def library_info(path: str | None = None) -> dict:
    """What the op library holds: version, ORT API version, CUDA architectures compiled in, and the
    CPU kernel paths this CPU runs (exported ``SqllmLibraryInfo``)."""
    import ctypes
    import json

    lib = ctypes.CDLL(path or get_library_path())
    try:
        fn = lib.SqllmLibraryInfo
    except AttributeError as e:
        raise RuntimeError(f"{path or get_library_path()} predates SqllmLibraryInfo; rebuild it") from e
    fn.restype = ctypes.c_char_p
    return json.loads(fn().decode())


def cuda_probe(path: str | None = None) -> dict:
    """Whether the library's CUDA kernels can run on the current GPU (exported ``SqllmCudaProbe``):
    ``{"devices", "name", "cc", "runs", "error"}``; ``{"devices": 0, "runs": False, "error": ...}``
    for a library built without CUDA or a machine without a GPU."""
    import ctypes
    import json

    lib = ctypes.CDLL(path or get_library_path())
    fn = getattr(lib, "SqllmCudaProbe", None)
    if fn is None:
        return {"devices": 0, "runs": False, "error": "the library was built without CUDA kernels"}
    fn.restype = ctypes.c_char_p
    return json.loads(fn().decode())


def kernel_counts() -> tuple[int, int]:
    """(CPU, CUDA) SqueezeMatMul kernels the registered library has created in this process. ORT
    creates a node's kernel when a session is initialized, so the difference across a session's
    creation says which provider ORT gave the nodes."""
    import ctypes

    lib = ctypes.CDLL(get_library_path())  # the same handle ORT holds: dlopen of the same path
    cpu, cuda = ctypes.c_int64(), ctypes.c_int64()
    lib.SqllmKernelCounts(ctypes.byref(cpu), ctypes.byref(cuda))
    return cpu.value, cuda.value


def _search_folders() -> list[Path]:
    # An editable install may split the package between the source tree and site-packages.
    return [Path(p) for p in __path__]  # type: ignore[name-defined]


def register(session_options) -> "object":
    """Register the op library in an ``onnxruntime.SessionOptions``; returns the same object."""
    session_options.register_custom_ops_library(get_library_path())
    return session_options

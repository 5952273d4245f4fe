"""A native (C) version of the exact 1-D k-means dynamic program, compiled on first use.

The vectorised torch solver in `kmeans.optimal_kmeans` spends most of its time on ragged gathers; a
plain C loop over the same divide-and-conquer recursion is ~50x faster on a CPU. The source below is
compiled once with the system C compiler (``cc``/``$CC``) into a per-user cache folder and loaded
with ctypes; rows are split across threads (ctypes releases the GIL). Without a compiler, or with
``SQLLM_ONNX_NATIVE_KMEANS=0``, `available()` is False and the torch solver is used: both compute
the same optimum (the tests compare them).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>

/* Weighted SSE of sorted values j..i-1 around their weighted mean, from prefix sums. */
static inline double seg_cost(const double *W, const double *S, const double *Q, int64_t j, int64_t i) {
    double dw = W[i] - W[j];
    if (dw <= 0) return 0.0;
    double ds = S[i] - S[j];
    double c = (Q[i] - Q[j]) - ds * ds / dw;
    return c > 0 ? c : 0.0;
}

/* D_cur(i) = min_{j in [jlo, min(jhi, i-1)]} D_prev(j) + cost(j, i) for i in [ilo, ihi], using the
   monotonicity of the leftmost minimiser (divide and conquer). */
static void layer(const double *Dp, double *Dc, int64_t *arg, const double *W, const double *S,
                  const double *Q, int64_t ilo, int64_t ihi, int64_t jlo, int64_t jhi) {
    while (ilo <= ihi) {
        int64_t mid = (ilo + ihi) / 2, hi = jhi < mid - 1 ? jhi : mid - 1, bj = jlo;
        double best = 1.0 / 0.0;
        for (int64_t j = jlo; j <= hi; ++j) {
            double v = Dp[j] + seg_cost(W, S, Q, j, mid);
            if (v < best) { best = v; bj = j; }
        }
        Dc[mid] = best;
        arg[mid] = bj;
        layer(Dp, Dc, arg, W, S, Q, ilo, mid - 1, jlo, bj);
        ilo = mid + 1;  /* tail call on the right half */
        jlo = bj;
    }
}

/* Rows r in [r0, r1) of sorted values xs and weights ws [R, n]: cluster boundaries [R, k+1]
   (0 = b_0 <= ... <= b_k = n) of the optimal k-partition. Returns 0, or -1 when out of memory. */
int kmeans1d_bounds(int64_t r0, int64_t r1, int64_t n, int64_t k, const double *xs, const double *ws,
                    int64_t *bounds) {
    int64_t n1 = n + 1;
    double *buf = (double *)malloc(sizeof(double) * (size_t)(5 * n1));
    int64_t *args = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n1 * (k > 1 ? k - 1 : 1)));
    if (!buf || !args) { free(buf); free(args); return -1; }
    double *W = buf, *S = buf + n1, *Q = buf + 2 * n1, *Da = buf + 3 * n1, *Db = buf + 4 * n1;
    for (int64_t r = r0; r < r1; ++r) {
        const double *x = xs + r * n, *w = ws + r * n;
        W[0] = S[0] = Q[0] = 0.0;
        for (int64_t i = 0; i < n; ++i) {
            W[i + 1] = W[i] + w[i];
            S[i + 1] = S[i] + w[i] * x[i];
            Q[i + 1] = Q[i] + w[i] * x[i] * x[i];
        }
        for (int64_t i = 0; i <= n; ++i) Da[i] = seg_cost(W, S, Q, 0, i);
        double *Dp = Da, *Dc = Db;
        for (int64_t m = 2; m <= k; ++m) {
            int64_t *arg = args + (m - 2) * n1;
            if (m > n) {  /* more clusters than values: the extra ones stay empty */
                for (int64_t i = 0; i <= n; ++i) { arg[i] = i; Dc[i] = Dp[i]; }
            } else {
                for (int64_t i = 0; i < m; ++i) { Dc[i] = 1.0 / 0.0; arg[i] = 0; }
                layer(Dp, Dc, arg, W, S, Q, m, n, m - 1, n - 1);
            }
            double *t = Dp; Dp = Dc; Dc = t;
        }
        int64_t *b = bounds + r * (k + 1);
        b[k] = n;
        for (int64_t m = k; m >= 2; --m) b[m - 1] = args[(m - 2) * n1 + b[m]];
        b[0] = 0;
    }
    free(buf);
    free(args);
    return 0;
}
"""

_lock = threading.Lock()
_lib = None
_tried = False


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sqllm_onnx"


def _load():
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("SQLLM_ONNX_NATIVE_KMEANS", "1") == "0" or not sys.platform.startswith(("linux", "darwin")):
            return None
        tag = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
        folders = [_cache_dir(), Path(tempfile.gettempdir()) / f"sqllm_onnx-{os.getuid()}"]
        for folder in folders:
            lib = folder / f"kmeans1d-{tag}.so"
            try:
                if not lib.is_file():
                    folder.mkdir(parents=True, exist_ok=True)
                    src = folder / f"kmeans1d-{tag}.c"
                    src.write_text(SOURCE)
                    tmp = folder / f"kmeans1d-{tag}.{os.getpid()}.so"
                    cc = os.environ.get("CC", "cc")
                    subprocess.run([cc, "-O3", "-shared", "-fPIC", "-o", str(tmp), str(src)], check=True,
                                   capture_output=True, timeout=120)
                    os.replace(tmp, lib)
                handle = ctypes.CDLL(str(lib))
                fn = handle.kmeans1d_bounds
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 3
                _lib = fn
                return _lib
            except (OSError, subprocess.SubprocessError):
                continue
        return None


def available() -> bool:
    return _load() is not None


def optimal_bounds(xs: np.ndarray, ws: np.ndarray, k: int, threads: int | None = None) -> np.ndarray:
    """Boundaries int64 [R, k+1] of the optimal weighted k-partition of each sorted row (float64 [R, n])."""
    fn = _load()
    if fn is None:
        raise RuntimeError("the native k-means solver is not available")
    xs = np.ascontiguousarray(xs, dtype=np.float64)
    ws = np.ascontiguousarray(ws, dtype=np.float64)
    R, n = xs.shape
    out = np.empty((R, k + 1), dtype=np.int64)
    if R == 0:
        return out
    threads = max(1, min(threads or _default_threads(), R))
    cuts = np.linspace(0, R, threads + 1).astype(np.int64)
    errors = []

    def work(a, b):
        if fn(int(a), int(b), n, k, xs.ctypes.data, ws.ctypes.data, out.ctypes.data) != 0:
            errors.append(MemoryError("kmeans1d: out of memory"))

    if threads == 1:
        work(0, R)
    else:
        pool = [threading.Thread(target=work, args=(cuts[i], cuts[i + 1])) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    if errors:
        raise errors[0]
    return out


def _default_threads() -> int:
    try:
        import torch

        return max(1, torch.get_num_threads())
    except Exception:  # pragma: no cover
        return os.cpu_count() or 1

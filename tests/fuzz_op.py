"""Fuzzing SqueezeMatMul through onnxruntime (CPU): random shapes, attributes, dtypes and values,
with a share of each malformation class from docs/op-spec.md. Every case must either match the
numpy reference or be rejected with an onnxruntime error whose message names the problem; a crash
kills the process, which the driver (or pytest's subprocess check) reports.

    python tests/fuzz_op.py --cases 100000 --seed 1      # the figure in docs/reliability.md

Sessions are cached per (attributes, dtype, which inputs are present): most cases feed every
tensor as a graph input, validated on every run; a share puts the CSR in initializers, validated
once at session creation.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import sqllm_onnx
from sqllm_onnx import reference as ref
from sqllm_onnx.op import INPUT_NAMES, IR_VERSION, PackedLinear

from conftest import int8_applies, int8_error_bound  # noqa: E402 (tests/ is this script's folder)

# Messages an invalid case may produce: ours (they start with "SqueezeMatMul") or ORT's own type
# check at session creation, which names the input parameter.
ACCEPTED_ERROR = re.compile(r"SqueezeMatMul: |of input parameter \(\w+\) of operator \(SqueezeMatMul\)")
MALFORMATIONS = ("none", "bits", "K_attr", "N_attr", "huge_dims", "a_last_dim", "a_scalar", "qweight_shape",
                 "qweight_dtype", "lut_shape", "lut_dtype", "values_dtype", "bias_shape", "bias_dtype",
                 "csr_partial", "indptr_len", "indptr_start", "indptr_decreasing", "indptr_end", "index_high",
                 "index_negative", "values_len", "a_dtype")
INT32_MAX = 2**31 - 1


def make_case(rng: np.random.Generator) -> dict:
    """One random case: attributes, feeds, and what it should do ("ok" or a malformation)."""
    bits = int(rng.choice([2, 3, 4, 8]))
    K = int(rng.choice([1, 2, 7, 31, 32, 33, 64, 100, 257]))
    N = int(rng.integers(1, 40))
    leading = ([1], [3], [0], [2, 3], [1, 1, 2], [17], [])  # [] makes A 1-D [K]
    M_shape = list(leading[rng.choice(len(leading), p=[.3, .15, .05, .15, .1, .15, .1])])
    dtype = np.float16 if rng.random() < 0.4 else np.float32
    kind = "none" if rng.random() < 0.45 else str(rng.choice(MALFORMATIONS[1:]))
    sparse = rng.random() < 0.6 or kind.startswith(("csr", "indptr", "index", "values"))
    bias = rng.random() < 0.5 or kind.startswith("bias")
    constant_csr = sparse and rng.random() < 0.15

    codes = rng.integers(0, 1 << bits, size=(N, K))
    feeds = {"A": (rng.standard_normal(M_shape + [K]) * 2).astype(dtype), "qweight": ref.pack_codes(codes, bits),
             "lut": rng.standard_normal((N, 1 << bits)).astype(dtype)}
    if rng.random() < 0.1:  # non-finite values are not errors: they propagate
        feeds["lut"].flat[rng.integers(0, feeds["lut"].size)] = rng.choice([np.nan, np.inf, -np.inf])
    if sparse:
        counts = rng.integers(0, 4, size=N)
        counts[rng.integers(0, N)] += int(rng.integers(0, 3 * K + 1))  # a heavy row, duplicates included
        feeds["sparse_indptr"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        nnz = int(feeds["sparse_indptr"][-1])
        feeds["sparse_indices"] = rng.integers(0, K, size=nnz).astype(np.int32)  # unsorted, duplicates
        feeds["sparse_values"] = rng.standard_normal(nnz).astype(dtype)
    if bias:
        feeds["bias"] = rng.standard_normal(N).astype(dtype)
    attrs = {"K": K, "N": N, "bits": bits, "layout": 2}
    nnz = len(feeds.get("sparse_indices", []))

    if kind == "bits":
        attrs["bits"] = int(rng.choice([0, 1, 5, 6, 7, 16, -3]))
    elif kind == "K_attr":
        attrs["K"] = int(rng.choice([0, -1, 2**31, 2**40]))
    elif kind == "N_attr":
        attrs["N"] = int(rng.choice([0, -5, 2**31, 2**62]))
    elif kind == "huge_dims":  # declared dims far beyond the tensors: must be a mismatch, never an allocation
        attrs[str(rng.choice(["K", "N"]))] = int(rng.choice([INT32_MAX, 2**30, 10**9]))
    elif kind == "a_last_dim":
        feeds["A"] = np.zeros(M_shape + [K + int(rng.integers(1, 5))], dtype)
    elif kind == "a_scalar":
        feeds["A"] = np.array(1.0, dtype)
    elif kind == "qweight_shape":
        q = feeds["qweight"]
        feeds["qweight"] = q[:, :-1] if q.shape[1] > 1 and rng.random() < 0.5 else np.zeros((N + 1, q.shape[1]), np.int32)
    elif kind == "qweight_dtype":
        feeds["qweight"] = feeds["qweight"].astype(rng.choice([np.int64, np.float32, np.uint8]))
    elif kind == "lut_shape":
        feeds["lut"] = np.zeros((N, (1 << bits) + 1), dtype)
    elif kind == "lut_dtype":
        feeds["lut"] = feeds["lut"].astype(np.float32 if dtype == np.float16 else np.float16)
    elif kind == "values_dtype":
        feeds["sparse_values"] = feeds["sparse_values"].astype(np.float32 if dtype == np.float16 else np.float64)
    elif kind == "bias_shape":
        feeds["bias"] = np.zeros(N + 1, dtype)
    elif kind == "bias_dtype":
        feeds["bias"] = feeds["bias"].astype(np.float64)
    elif kind == "csr_partial":
        del feeds[str(rng.choice(["sparse_indptr", "sparse_indices", "sparse_values"]))]
    elif kind == "indptr_len":
        feeds["sparse_indptr"] = feeds["sparse_indptr"][:-1]
    elif kind == "indptr_start":
        feeds["sparse_indptr"] = feeds["sparse_indptr"] + np.int32(rng.integers(1, 3))
    elif kind == "indptr_decreasing" and N >= 2:
        p = feeds["sparse_indptr"]
        i = int(rng.integers(1, N))
        p[i] = p[i + 1] + 1 + int(rng.integers(0, 3))
    elif kind == "indptr_end":
        feeds["sparse_indptr"][-1] += int(rng.choice([-1, 1, 1000, INT32_MAX - nnz]))
    elif kind == "index_high" and nnz:
        feeds["sparse_indices"][rng.integers(0, nnz)] = int(rng.choice([K, K + 1, INT32_MAX]))
    elif kind == "index_negative" and nnz:
        feeds["sparse_indices"][rng.integers(0, nnz)] = int(rng.choice([-1, -K, -(2**31)]))
    elif kind == "values_len":
        feeds["sparse_values"] = np.zeros(nnz + 1, dtype)
    elif kind == "a_dtype":
        feeds["A"] = feeds["A"].astype(rng.choice([np.float64, np.int32]))
    else:
        kind = "none"  # the malformation did not apply to this shape: a valid case
    return {"attrs": attrs, "feeds": feeds, "kind": kind, "constant_csr": constant_csr and "sparse_indptr" in feeds}


def build_model(case: dict) -> bytes:
    feeds, inits, graph_inputs, names = case["feeds"], [], [], []
    constants = {"sparse_indptr", "sparse_indices", "sparse_values"} if case["constant_csr"] else set()
    for name in INPUT_NAMES:
        if name not in feeds:
            names.append("")
            continue
        names.append(name)
        value = feeds[name]
        if name in constants:
            inits.append(numpy_helper.from_array(value, name))
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                                              ["d%d" % i for i in range(value.ndim)]))
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node("SqueezeMatMul", names, ["Y"], domain="sqllm", **case["attrs"])
    graph = helper.make_graph([node], "fuzz", graph_inputs, [helper.make_empty_tensor_value_info("Y")], initializer=inits)
    model = helper.make_model(graph, ir_version=IR_VERSION,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("sqllm", 1)])
    return model.SerializeToString()


class Runner:
    def __init__(self, threads: int = 1):
        self.sessions: dict = {}
        self.threads = threads

    def session(self, case):
        feeds = case["feeds"]
        key = (tuple(sorted(case["attrs"].items())), tuple((n, str(v.dtype), v.ndim) for n, v in sorted(feeds.items())),
               case["constant_csr"])
        if case["constant_csr"]:
            key = None  # initializers differ per case
        if key is not None and key in self.sessions:
            return self.sessions[key]
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.log_severity_level = 4
        sqllm_onnx.register(so)
        s = ort.InferenceSession(build_model(case), so, providers=["CPUExecutionProvider"])
        if key is not None:
            if len(self.sessions) > 5000:
                self.sessions.clear()
            self.sessions[key] = s
        return s

    def run(self, case) -> str:
        """'ok', 'rejected', or raises AssertionError describing a contract violation."""
        try:
            s = self.session(case)
            names = {i.name for i in s.get_inputs()}
            y = s.run(None, {k: v for k, v in case["feeds"].items() if k in names})[0]
        except Exception as e:  # ORT errors
            msg = str(e)
            assert ACCEPTED_ERROR.search(msg), f"unclear error for {case['kind']}: {msg[:300]}"
            assert case["kind"] != "none", f"valid case rejected: {msg[:300]}"
            return "rejected"
        assert case["kind"] == "none", f"malformed case ({case['kind']}) was accepted"
        f, a = case["feeds"], case["attrs"]
        expected = ref.squeeze_matmul(f["A"], f["qweight"], f["lut"], f.get("sparse_indptr"), f.get("sparse_indices"),
                                      f.get("sparse_values"), f.get("bias"), K=a["K"], N=a["N"], bits=a["bits"])
        assert y.shape == expected.shape and y.dtype == expected.dtype
        finite = np.isfinite(expected)
        # IEEE rules make the non-finite pattern independent of summation order: it must agree exactly.
        assert np.array_equal(np.isnan(y), np.isnan(expected)) and np.array_equal(np.isposinf(y), np.isposinf(expected)), \
            "non-finite values differ from the reference"
        tol = (1e-3 if y.dtype == np.float16 else 1e-5) * (1 + np.abs(expected.astype(np.float64)))
        M = int(np.prod(f["A"].shape[:-1]))
        if M > 0 and int8_applies(M, a["bits"], os.environ.get("SQLLM_CPU_KERNEL", "exact")):
            # tiles with a non-finite LUT entry (and calls with a non-finite A) run the exact path;
            # the others are held to the int8 bound
            layer = PackedLinear(f["qweight"], np.nan_to_num(f["lut"], posinf=0, neginf=0), a["bits"], a["K"])
            tol = tol + int8_error_bound(np.nan_to_num(f["A"], posinf=0, neginf=0), layer) * 1.01 / 50
        # non-finite results must agree in kind where the reference is non-finite; fp32 sums of large
        # fp16 values may overflow to inf in fp16 output in either implementation, so compare finite ones
        ok = np.abs(y.astype(np.float64)[finite] - expected.astype(np.float64)[finite]) <= tol[finite] * 50
        assert ok.all(), f"wrong result ({case['attrs']}, max err {np.abs(y.astype(np.float64)[finite] - expected[finite]).max()})"
        return "ok"


def fuzz(cases: int, seed: int, threads: int = 1, progress: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    runner = Runner(threads)
    stats = collections.Counter()
    by_kind = collections.Counter()
    t0 = time.time()
    for i in range(cases):
        case = make_case(rng)
        outcome = runner.run(case)
        stats[outcome] += 1
        by_kind[case["kind"]] += 1
        if progress and (i + 1) % 10000 == 0:
            print(f"{i + 1} cases, {dict(stats)}, {time.time() - t0:.0f} s", flush=True)
    return {"cases": cases, "seed": seed, "outcomes": dict(stats), "by_kind": dict(by_kind),
            "seconds": round(time.time() - t0, 1), "crashes": 0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=100000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    result = fuzz(args.cases, args.seed, args.threads)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

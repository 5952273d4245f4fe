"""`sqllm-onnx bench kernel`: SqueezeMatMul side by side with ORT's MatMul and MatMulNBits.

Every method runs in the same harness: a graph of `--ops` (default 16) nodes with distinct weights,
all reading one activation A [M, K], so that weights come from memory rather than cache, as in a
real decoder. Per-op time = median session run time / ops. On CUDA the inputs and outputs are bound
to device buffers (IOBinding), with and without ORT CUDA graphs, and SqueezeMatMul is also timed
kernel-only with CUDA events and compared with the device's measured copy bandwidth.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

import sqllm_onnx
from sqllm_onnx import reference as ref
from sqllm_onnx.op import DEFAULT_ONNX_OPSET, DOMAIN, IR_VERSION, OPSET_VERSION, PackedLinear, make_node

DEFAULT_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 32000))


@dataclasses.dataclass
class Method:
    name: str  # shown in tables
    kind: str  # "squeeze", "matmul", "nbits"
    bits: int = 16
    sparsity: float = 0.0  # percent, as in the paper
    block: int = 0  # MatMulNBits block size


def default_methods() -> list[Method]:
    return [Method("ORT MatMul (float)", "matmul"),
            Method("ORT MatMulNBits 4b g32", "nbits", 4, block=32),
            Method("ORT MatMulNBits 4b g128", "nbits", 4, block=128),
            Method("SqueezeMatMul 3b", "squeeze", 3),
            Method("SqueezeMatMul 3b 0.45%", "squeeze", 3, 0.45),
            Method("SqueezeMatMul 4b", "squeeze", 4),
            Method("SqueezeMatMul 4b 0.45%", "squeeze", 4, 0.45)]


# ---- weights ---------------------------------------------------------------------------------------

def random_squeeze_layer(rng, K: int, N: int, bits: int, sparsity: float, dtype) -> PackedLinear:
    """Random codes (random words: every bit pattern is a valid tiled code stream, and kernels
    ignore the codes of padding rows and columns) and LUT, and a CSR with `sparsity` percent of the
    entries spread evenly over rows, as the quantizer makes them."""
    qweight = rng.integers(0, 2**32, size=ref.qweight_shape(N, K, bits), dtype=np.uint64).astype(np.uint32)
    layer = PackedLinear(qweight.view(np.int32), rng.standard_normal((N, 1 << bits)).astype(dtype) * 0.02, bits, K)
    nnz = int(round(K * N * sparsity / 100))
    if nnz:
        rows = np.sort(rng.integers(0, N, size=nnz))
        layer.sparse_indptr = np.searchsorted(rows, np.arange(N + 1)).astype(np.int32)
        layer.sparse_indices = rng.integers(0, K, size=nnz).astype(np.int32)
        layer.sparse_values = (rng.standard_normal(nnz) * 0.05).astype(dtype)
    return layer


def _nbits_inputs(rng, K: int, N: int, block: int, dtype, prefix: str):
    blocks = (K + block - 1) // block
    b = rng.integers(0, 256, size=(N, blocks, block // 2), dtype=np.uint8)
    scales = (rng.random(N * blocks, dtype=np.float32) * 0.01).astype(dtype)
    return [numpy_helper.from_array(b, f"{prefix}.B"), numpy_helper.from_array(scales, f"{prefix}.scales")]


def build_graph(method: Method, K: int, N: int, M: int, ops: int, dtype, seed: int = 0) -> tuple[str | bytes, int]:
    """The benchmark model (bytes, or the path of a file with external data when its weights pass
    protobuf's 2 GB limit, e.g. 16 fp16 4096x32000 matrices) and the weight bytes one op reads."""
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits, outputs, weight_bytes = [], [], [], 0
    for i in range(ops):
        y = f"Y{i}"
        outputs.append(helper.make_tensor_value_info(y, elem, [M, N]))
        if method.kind == "squeeze":
            layer = random_squeeze_layer(rng, K, N, method.bits, method.sparsity, dtype)
            node, layer_inits = make_node("A", y, layer, f"w{i}")
            weight_bytes = sum(a.nbytes for a in layer.arrays().values())
        elif method.kind == "matmul":
            w = (rng.standard_normal((K, N), dtype=np.float32) * 0.02).astype(dtype)
            layer_inits = [numpy_helper.from_array(w, f"w{i}")]
            node = helper.make_node("MatMul", ["A", f"w{i}"], [y])
            weight_bytes = w.nbytes
        else:
            layer_inits = _nbits_inputs(rng, K, N, method.block, dtype, f"w{i}")
            node = helper.make_node("MatMulNBits", ["A", f"w{i}.B", f"w{i}.scales"], [y], domain="com.microsoft",
                                    K=K, N=N, bits=method.bits, block_size=method.block, accuracy_level=4)
            weight_bytes = sum(numpy_helper.to_array(t).nbytes for t in layer_inits)
        nodes.append(node)
        inits.extend(layer_inits)
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("A", elem, [M, K])], outputs,
                              initializer=inits)
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[
        helper.make_opsetid("", DEFAULT_ONNX_OPSET), helper.make_opsetid(DOMAIN, OPSET_VERSION),
        helper.make_opsetid("com.microsoft", 1)])
    if weight_bytes * ops < 1.8e9:
        return model.SerializeToString(), weight_bytes
    folder = Path(tempfile.mkdtemp(prefix="sqllm-bench-"))
    onnx.save(model, str(folder / "bench.onnx"), save_as_external_data=True, location="bench.onnx.data")
    return str(folder / "bench.onnx"), weight_bytes


# ---- timing ----------------------------------------------------------------------------------------

def _session(model: str | bytes, provider: str, cuda_graph: bool, threads: int, ours: bool):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sqllm_onnx.register(so)
    if provider == "cuda":
        from sqllm_onnx.runtime.session import check_cuda_library, check_placement

        if ours:  # the graph holds SqueezeMatMul nodes
            check_cuda_library()
        opts = {"enable_cuda_graph": "1" if cuda_graph else "0"}
        before = sqllm_onnx.kernel_counts()
        session = ort.InferenceSession(model, so, providers=[("CUDAExecutionProvider", opts)])
        check_placement(before, sqllm_onnx.kernel_counts())
        return session
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def prepare_run(model: str | bytes, provider: str, M: int, K: int, N: int, ops: int, dtype,
                cuda_graph: bool = False, threads: int = 0, ours: bool = True):
    """A warmed-up session as a function that runs the whole graph once (`ours`: it holds SqueezeMatMul nodes)."""
    session = _session(model, provider, cuda_graph, threads, ours)
    a = (np.random.default_rng(1).standard_normal((M, K)) * 0.5).astype(dtype)
    if provider == "cpu":
        feed = {"A": a}
        run = lambda: session.run(None, feed)  # noqa: E731
    else:
        binding = session.io_binding()
        a_dev = ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0)
        binding.bind_ortvalue_input("A", a_dev)
        outs = [ort.OrtValue.ortvalue_from_shape_and_type((M, N), dtype, "cuda", 0) for _ in range(ops)]
        for i, o in enumerate(outs):
            binding.bind_ortvalue_output(f"Y{i}", o)
        run = lambda: session.run_with_iobinding(binding)  # noqa: E731
    for _ in range(3):  # warm-up (and CUDA graph capture)
        run()
    return run


def _error_line(e: Exception) -> str:
    """The first line of an exception's message, at most 200 characters (a row's "error" field)."""
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def interleaved_medians(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Median seconds per run of each function, timed round-robin (one run of each per round) so that
    every method sees the same share of whatever else the machine is doing (the shared CPU VMs).
    Returns (medians, errors): a function that raises is dropped from later rounds with its error."""
    samples = {key: [] for key in runs}
    errors = {}
    for _ in range(repeats):
        for key, run in runs.items():
            if key in errors:
                continue
            try:
                t0 = time.perf_counter()
                run()
                samples[key].append(time.perf_counter() - t0)
            except Exception as e:
                errors[key] = _error_line(e)
    return {key: statistics.median(v) for key, v in samples.items() if key not in errors}, errors


# ---- the command -----------------------------------------------------------------------------------

def run_benchmark(provider: str, shapes, methods, M: int, ops: int, repeats: int, threads: int,
                  kernel_only: bool, progress=print, graph_modes=None) -> dict:
    dtype = np.float16 if provider == "cuda" else np.float32
    results = {"provider": provider, "M": M, "ops": ops, "dtype": np.dtype(dtype).name, "repeats": repeats,
               "date": datetime.date.today().isoformat(), "host": platform.node(),
               "onnxruntime": ort.__version__, "sqllm_onnx": sqllm_onnx.__version__, "rows": []}
    if provider == "cuda":
        from sqllm_onnx.bench import cuda_events
        results["device"] = cuda_events.device_name()
        results["copy_gbps"] = cuda_events.copy_bandwidth_gbps()
        graph_modes = (False, True) if graph_modes is None else tuple(graph_modes)
    else:
        results["device"] = platform.processor() or platform.machine()
        graph_modes = (False,)
    for K, N in shapes:
        # every method's sessions of this shape first, then all timed together, round-robin
        rows, runs, temp_models = [], {}, []
        for method in methods:
            row = {"K": K, "N": N, "method": method.name}
            rows.append((method, row))
            try:
                model, row["weight_bytes"] = build_graph(method, K, N, M, ops, dtype)
            except Exception as e:
                row["error"] = f"building the graph failed: {_error_line(e)}"
                continue
            if isinstance(model, str):  # a temporary file with external data
                temp_models.append(model)
            for graph in graph_modes:
                try:
                    runs[(method.name, graph)] = prepare_run(model, provider, M, K, N, ops, dtype, cuda_graph=graph,
                                                             threads=threads, ours=method.kind == "squeeze")
                except Exception as e:  # a baseline the installed ORT cannot run is reported, not fatal
                    row["graph_error" if graph else "error"] = _error_line(e)
        times, failed = interleaved_medians(runs, repeats)
        runs.clear()  # frees the sessions
        for model in temp_models:
            shutil.rmtree(Path(model).parent, ignore_errors=True)
        for method, row in rows:
            for graph in graph_modes:
                if (method.name, graph) in times:
                    row["graph_us" if graph else "us"] = times[(method.name, graph)] / ops * 1e6
                if (method.name, graph) in failed:
                    row["graph_error" if graph else "error"] = failed[(method.name, graph)]
            if "us" in row:
                row["gbps"] = row["weight_bytes"] / (row["us"] * 1e-6) / 1e9
            if provider == "cuda" and kernel_only and method.kind == "squeeze" and "weight_bytes" in row:
                from sqllm_onnx.bench import cuda_events
                row["kernel_us"] = cuda_events.kernel_time_us(method, K, N, M, ops, dtype)
                row["kernel_gbps"] = row["weight_bytes"] / (row["kernel_us"] * 1e-6) / 1e9
            progress(_row_line(row))
            results["rows"].append(row)
    return results


def _row_line(row: dict) -> str:
    parts = [f"{row['K']}x{row['N']}", row["method"]]
    for key, unit in (("us", "us"), ("graph_us", "us graph"), ("kernel_us", "us kernel"), ("gbps", "GB/s")):
        if key in row:
            parts.append(f"{row[key]:.1f} {unit}")
    for key in ("error", "graph_error"):
        if key in row:
            parts.append(f"{key}: {row[key]}")
    return "  ".join(parts)


def to_markdown(results: dict, command: str) -> str:
    lines = [f"Command: `{command}`  ",
             f"Device: {results['device']}; onnxruntime {results['onnxruntime']}; sqllm-onnx "
             f"{results['sqllm_onnx']}; date {results['date']}; M = {results['M']}, {results['ops']} ops with "
             f"distinct weights per graph, {results['dtype']} activations, median of {results['repeats']} runs "
             "(timed round-robin across the methods of a shape).", ""]
    cuda = results["provider"] == "cuda"
    if cuda:
        lines += [f"Measured device-to-device copy bandwidth: {results['copy_gbps']:.0f} GB/s (read + write).", ""]
        head = "| K x N | method | weight MB | per-op us | per-op us (CUDA graph) | kernel us | kernel GB/s | % of copy BW |"
    else:
        head = "| K x N | method | weight MB | per-op us | GB/s of weights |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda row, key, f="{:.1f}": f.format(row[key]) if key in row else "n/a"  # noqa: E731
    for row in results["rows"]:
        cells = [f"{row['K']}x{row['N']}", row["method"], f"{row['weight_bytes'] / 1e6:.1f}", fmt(row, "us")]
        if cuda:
            pct = f"{100 * row['kernel_gbps'] / results['copy_gbps']:.0f}%" if "kernel_gbps" in row else "n/a"
            cells += [fmt(row, "graph_us"), fmt(row, "kernel_us"), fmt(row, "kernel_gbps", "{:.0f}"), pct]
        else:
            cells += [fmt(row, "gbps")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(p) -> None:
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cuda" if "CUDAExecutionProvider" in
                   ort.get_available_providers() else "cpu")
    p.add_argument("--shapes", default=None, help="comma-separated KxN list (default: the four Llama-7B shapes; "
                   "on CPU 4096x4096,4096x11008)")
    p.add_argument("--methods", default=None, help="comma-separated keys selecting methods (default: all): a key "
                   "equal to a method's name (case-insensitive) selects that method only, any other key every method "
                   "whose name contains it")
    p.add_argument("--m", type=int, default=1, help="rows of A (1 = batch-1 decoding)")
    p.add_argument("--ops", type=int, default=16, help="ops with distinct weights per graph")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = ORT default)")
    p.add_argument("--no-kernel-only", action="store_true", help="skip the CUDA-event kernel timing")
    p.add_argument("--graph-modes", choices=("both", "graph", "plain"), default="both",
                   help="CUDA: time sessions with ORT CUDA graphs, without, or both (each mode is one more session "
                   "per row; at large M the launch overhead is negligible and one mode suffices)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--markdown", type=Path, help="write a markdown table here")


def main(args, command: str) -> int:
    if args.provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit("--provider cuda needs onnxruntime-gpu with CUDAExecutionProvider "
                         f"(available: {ort.get_available_providers()})")
    if args.shapes:
        try:
            shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",")]
            assert all(len(s) == 2 and min(s) > 0 for s in shapes)
        except (ValueError, AssertionError):
            raise SystemExit(f"--shapes: expected a list like 4096x4096,4096x11008, got {args.shapes!r}")
    else:
        shapes = list(DEFAULT_SHAPES if args.provider == "cuda" else DEFAULT_SHAPES[:2])
    methods = default_methods()
    if args.methods:
        keys = [k.strip().lower() for k in args.methods.split(",")]
        names = {m.name.lower() for m in methods}
        methods = [m for m in methods
                   if any(k == m.name.lower() or (k not in names and k in m.name.lower()) for k in keys)]
        if not methods:
            raise SystemExit(f"--methods {args.methods!r} selects none of: {[m.name for m in default_methods()]}")
    repeats = args.repeats or (50 if args.provider == "cuda" else 10)
    graph_modes = {"both": (False, True), "graph": (True,), "plain": (False,)}[args.graph_modes]
    results = run_benchmark(args.provider, shapes, methods, args.m, args.ops, repeats, args.threads,
                            not args.no_kernel_only, graph_modes=graph_modes)
    md = to_markdown(results, command)
    print(md)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.markdown:
        args.markdown.write_text(md)
    return 0

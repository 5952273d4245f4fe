"""One quantization run over several devices: `sqllm-onnx quantize --devices cuda:0,cuda:1`, one
process per device in a torch.distributed group (NCCL on GPUs; gloo on CPUs, so that `--devices
cpu,cpu` runs the same code in CI).

- Launch: `--devices D0,D1,...` spawns one process per device (torch.multiprocessing; rendezvous
  through a file in a temporary folder). A process started by torchrun (RANK and WORLD_SIZE in its
  environment) is one rank itself and takes the device of its LOCAL_RANK: `--devices` indexed by
  it, else cuda:LOCAL_RANK (cpu without CUDA).
- Loading: the ranks load the model in turn, each dropping the blocks it does not hold before the
  next one loads, so the host holds one whole copy at a time.
- Fisher: `pipeline` (the blocks placed across the ranks, activations forward, gradients back).
- Clustering: each rank clusters the layers it holds, with the Fisher it computed (no Fisher moves
  between processes), and writes each layer's file into the checkpoint's partial/ folder as the
  one-process run does; rank 0 then assembles model.safetensors and manifest.json from those files.
  The run id (settings and weights) is the one-process run's, so a run started with one process can be
  resumed with several and the other way round.
- Not kept: the Fisher itself (4 bytes per weight: 128 GB for the 30B shape); a resumed run computes it
  again for the layers not yet done, or reads an earlier one-process run's partial/fisher.safetensors.

The checkpoint folder must be one that every rank sees (one host, or a shared file system).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from sqllm_onnx.errors import UsageError
from sqllm_onnx.quantize.config import QuantConfig

_DEVICE = re.compile(r"cpu|cuda:(\d+)")
# How long a rank waits for the others (NCCL's default is 10 minutes): the ranks load the model in
# turn, and a rank that finishes clustering early waits for the last one.
TIMEOUT = datetime.timedelta(hours=2)


@dataclass
class Job:
    """What every rank needs to run its part (sent to spawned processes)."""

    model: str | None
    tokenizer: str | None
    dtype: str
    config: QuantConfig
    out: str
    devices: list[str]
    progress: bool = True


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) of a process started by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def parse_devices(text: str) -> list[str]:
    """The devices of `--devices` ("cuda:0,cuda:1" or "cpu,cpu"), checked against what torch sees."""
    import torch

    devices = [d.strip() for d in text.split(",")]
    for d in devices:
        if not _DEVICE.fullmatch(d):
            hint = " (give each GPU its index: cuda:0,cuda:1)" if d == "cuda" else ""
            raise UsageError(f"--devices {text}: {d!r} is not a device{hint}; give cpu or cuda:N, comma-separated")
    kinds = {d.split(":")[0] for d in devices}
    if len(kinds) > 1:
        raise UsageError(f"--devices {text}: all cpu or all cuda:N (one process group uses one backend)")
    if kinds == {"cuda"}:
        if len(set(devices)) < len(devices):
            raise UsageError(f"--devices {text}: a GPU is named twice (one process per GPU)")
        count = torch.cuda.device_count()
        absent = [d for d in devices if int(d.split(":")[1]) >= count]
        if absent:
            seen = f"{count} CUDA device(s), cuda:0 to cuda:{count - 1}" if count else "no CUDA device"
            raise UsageError(f"--devices {text}: {absent[0]} does not exist (torch sees {seen})")
    return devices


def threads_per_process(processes: int) -> int:
    """CPU threads of each of `processes` processes on this host: its cores shared out."""
    import torch

    return max(1, torch.get_num_threads() // processes)


def quantize(job: Job) -> dict | None:
    """Run `job` over its devices; the finished checkpoint's manifest (None on the ranks but 0 of a
    torchrun launch). An error of a spawned process is raised here as it was raised there."""
    from sqllm_onnx.quantize import checkpoint as ckpt

    launched = torchrun_env()
    if launched is not None:
        rank, world, local_rank = launched
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if job.devices and len(job.devices) != local_world:
            raise UsageError(f"--devices names {len(job.devices)} devices but torchrun started {local_world} "
                             "processes on this host: one device each")
        _run_rank(rank, world, local_rank, local_world, job, "env://")
        return ckpt.read_manifest(job.out) if rank == 0 else None
    import torch.multiprocessing as mp

    world = len(job.devices)
    errors = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="sqllm-rendezvous-") as tmp:
        try:
            mp.spawn(_spawned, args=(world, job, f"file://{tmp}/store", errors), nprocs=world)
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            if not errors.empty():  # the first error raised: the others are its consequences
                raise errors.get() from None
            raise
    return ckpt.read_manifest(job.out)


def _spawned(rank: int, world: int, job: Job, init_method: str, errors) -> None:
    if os.environ.get("SQLLM_VERBOSE") != "1":
        import warnings

        warnings.filterwarnings("ignore")
    try:
        _run_rank(rank, world, rank, world, job, init_method)
    except BaseException as e:
        if os.environ.get("SQLLM_DEBUG") == "1":
            traceback.print_exc()
        try:
            errors.put(e)
        except Exception:  # an exception that does not pickle: its type and message
            errors.put(RuntimeError(f"{type(e).__name__}: {e}"))
        raise


def _run_rank(rank: int, world: int, local_rank: int, local_world: int, job: Job, init_method: str) -> None:
    import torch
    import torch.distributed as dist

    device = (job.devices[local_rank] if job.devices else
              f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    torch.set_num_threads(threads_per_process(local_world))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", init_method=init_method,
                            rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        _quantize_rank(job, device)
    finally:
        dist.destroy_process_group()


def _quantize_rank(job: Job, device: str) -> None:
    """This rank's part of the run (module docstring)."""
    import torch
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from sqllm_onnx.models import load_model
    from sqllm_onnx.quantize import fisher as fisher_mod, quantizer as q
    from sqllm_onnx.quantize.pipeline import Stage
    from sqllm_onnx.quantize.targets import linear_layer_names

    t_start = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    config = dataclasses.replace(job.config, device=device)
    talk = job.progress and rank == 0
    for turn in range(world):  # in turns: one whole model in host memory at a time
        if turn == rank:
            model, tokenizer = load_model(job.model, dtype=getattr(torch, job.dtype), tokenizer=job.tokenizer)
            names = linear_layer_names(model, config.quantize_lm_head)
            stage = Stage(model, names, rank, world)
            summaries = q.weight_summaries(stage.modules)  # on the CPU, as the one-process run
            stage.to(device)
        dist.barrier()
    everyone = [None] * world
    dist.all_gather_object(everyone, summaries)
    model_id = q.model_fingerprint(model, names, {k: v for part in everyone for k, v in part.items()})
    run_id = {"config": config.fingerprint(), "model": model_id}

    verdict = [None]
    if rank == 0:
        try:
            verdict = ["finished" if q.open_run(job.out, run_id, names, print if talk else _quiet)[2] else "run"]
        except Exception:  # the others stop quietly; rank 0 raises it
            dist.broadcast_object_list(["error"], src=0)
            raise
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] != "run":
        return

    partial = Path(job.out) / q.PARTIAL
    todo = [n for n in stage.names if not q.layer_file(partial, n).is_file()]
    t0 = time.perf_counter()
    F, calib = {}, None
    if config.needs_fisher:
        windows, calib = q.calibration_record(tokenizer, config)
        if _total(len(todo), device):
            saved = partial / "fisher.safetensors"  # left by a one-process run
            if saved.is_file():
                F = fisher_mod.load_fisher(saved, q.fisher_meta(model_id, calib, names), todo)
            else:
                F = stage.fisher(windows, todo, progress=talk)
    fisher_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    bar = tqdm(total=len(stage.names), initial=len(stage.names) - len(todo), unit="layer", disable=not talk,
               desc=f"clustering (rank 0 of {world}; each rank its {len(stage.names)} layers)")
    for name in todo:
        bar.set_postfix_str(name, refresh=False)
        layer, st = q.quantize_layer(name, stage.modules[name], F, config, device)
        q.finish_layer(name, layer, st, F, config, partial)
        bar.update(1)
    bar.close()
    report = {"rank": rank, "device": device, "blocks": [stage.blocks.start, stage.blocks.stop],
              "layers": len(stage.names), "quantized": len(todo), "fisher_s": round(fisher_s, 2),
              "clustering_s": round(time.perf_counter() - t1, 2), **_peak_memory(device)}
    reports = [None] * world if rank == 0 else None
    dist.gather_object(report, reports, dst=0)  # also: every rank's layer files are written
    if rank != 0:
        return
    layers, stats = q.load_layers(partial, names, config)
    missing = [n for n in names if n not in layers]
    if missing:
        raise RuntimeError(f"no layer file of {missing[:3]} in {partial} after every rank finished")
    qmodel = q.assemble(model, config, names, layers, stats, model_id=model_id, run_id=run_id, calib=calib,
                        device=device, timing={
                            "device": ",".join(r["device"] for r in reports),
                            "fisher_s": max(r["fisher_s"] for r in reports),
                            "clustering_s": max(r["clustering_s"] for r in reports),
                            "total_s": round(time.perf_counter() - t_start, 2),
                            "resumed_layers": len(names) - sum(r["quantized"] for r in reports),
                            "processes": reports})
    q.write_checkpoint(qmodel, Path(job.out))


def _total(count: int, device: str) -> int:
    """`count` summed over the ranks."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([count], device=device)
    dist.all_reduce(t)
    return int(t)


def _peak_memory(device: str) -> dict:
    import resource

    import torch

    peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
    if device.startswith("cuda"):
        peak["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        peak["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return peak


def _quiet(*args) -> None:
    pass

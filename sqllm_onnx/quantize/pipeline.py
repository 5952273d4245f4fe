"""Pipeline placement of a model's decoder blocks over the processes of a torch.distributed group,
and the Fisher pass through it (`quantize --devices`, see `distributed`).

Placement: rank r of W holds the contiguous blocks `block_ranges(blocks, W)[r]` and the small parts
every rank keeps (embeddings, rotary tables, final norm, lm_head). The model's ModuleList of blocks
is cut down to the rank's own, so the model's own forward runs them, with the arguments it computes
itself (mask, position embeddings): any family whose blocks sit in one ModuleList (checked once on the
tiny random model of every family of `families.FAMILIES` the quantizer takes, 2 processes on the CPU:
the same Fisher, bit for bit, as the one-process pass). On every rank but
the first, a forward pre-hook hands the first own block the hidden states received from the rank
before; on every rank but the last, a forward hook keeps the last own block's output, sends it on and
stops the forward there.

Fisher pass: per calibration sample the hidden states go forward rank by rank, the last rank computes
the loss and its backward, and the gradient of each rank's input goes back to the rank before, which
continues the backward from there. Each rank adds the squared gradients of the layers it holds into
fp32 buffers (`fisher.Accumulator`) sample by sample in order: every buffer gets the numbers the
one-process pass (`fisher.compute_fisher`) adds, in the same order, so with the same kernels and
thread count the checkpoints agree bit for bit (on the CPU: tests/test_quantize_distributed.py). Schedule: one
forward, one backward (1F1B): rank r runs W-1-r forwards ahead of its backwards, so that after the
first samples no rank waits for a whole round trip; sends are asynchronous (a rank sends forward and
backward at once), and a rank waits for its previous sends before starting new ones.
"""

from __future__ import annotations

import collections
import gc

import numpy as np
import torch
import torch.distributed as dist

from sqllm_onnx.errors import UsageError
from sqllm_onnx.quantize import fisher as fisher_mod
from sqllm_onnx.quantize.targets import decoder_blocks


class _Stop(Exception):
    """Raised by the last own block's hook: the rest of the model runs on later ranks."""


def block_ranges(num_blocks: int, world: int) -> list[range]:
    """Contiguous ranges of decoder blocks, one per rank, as even as the count allows (the first ranks
    take one more; the last also has the loss and lm_head)."""
    if world > num_blocks:
        raise UsageError(f"{world} processes but the model has {num_blocks} decoder blocks: each process holds "
                         f"at least one; use at most {num_blocks} devices")
    base, extra = divmod(num_blocks, world)
    ranges, start = [], 0
    for rank in range(world):
        stop = start + base + (rank < extra)
        ranges.append(range(start, stop))
        start = stop
    return ranges


class Stage:
    """This rank's part of the model: its decoder blocks and the quantized layers in them (lm_head, when
    quantized, belongs to the last rank). Building it cuts the model's block list down (module
    docstring); `names` are the model's layer names as they were before."""

    def __init__(self, model, names: list[str], rank: int, world: int):
        prefix, blocks = decoder_blocks(model)
        self.model, self.rank, self.world = model, rank, world
        self.is_first, self.is_last = rank == 0, rank == world - 1
        self.blocks = block_ranges(len(blocks), world)[rank]
        self.names = [n for n in names if self._holds(n, prefix)]
        self.modules = {n: model.get_submodule(n) for n in self.names}
        kept = torch.nn.ModuleList(blocks[i] for i in self.blocks)
        parent, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, kept)
        del blocks
        gc.collect()  # the other ranks' blocks go now, before the next rank loads its copy
        self.first, self.last = kept[0], kept[-1]

    def _holds(self, name: str, prefix: str) -> bool:
        head = f"{prefix}."
        if not name.startswith(head):  # outside the blocks: lm_head, next to the loss
            return self.is_last
        return int(name[len(head):].split(".", 1)[0]) in self.blocks

    def to(self, device) -> Stage:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    # ---- the Fisher pass ------------------------------------------------------------------------

    def fisher(self, windows: np.ndarray, names: list[str], progress: bool = False) -> dict:
        """Fisher buffers {name: fp32 [N, K] on this rank's device} of the layers `names` (held here) over
        the token windows; every rank of the group calls it with the same windows."""
        from tqdm.auto import tqdm

        windows = fisher_mod.check_windows(windows)
        acc = fisher_mod.Accumulator(self.model, {n: self.modules[n] for n in names}, self.device,
                                     fisher_mod.loss_scale(self.model))
        self._sends, self._skipped = [], 0
        ahead = self.world - 1 - self.rank  # forwards run ahead of the backwards (1F1B)
        pending = collections.deque()
        bar = tqdm(total=len(windows), desc=f"calibration (Fisher, {self.world} processes)", unit="sample",
                   disable=not progress)
        hooks = []
        if not self.is_first:
            hooks.append(self.first.register_forward_pre_hook(self._receive_input, with_kwargs=True))
        if not self.is_last:
            hooks.append(self.last.register_forward_hook(self._send_output))
        try:
            with acc:
                for i in range(len(windows)):
                    pending.append(self._forward(torch.as_tensor(windows[i][None], device=self.device)))
                    if len(pending) > ahead:
                        self._backward(*pending.popleft(), acc.scale)
                        bar.update(1)
                while pending:
                    self._backward(*pending.popleft(), acc.scale)
                    bar.update(1)
                self._wait_sends()
        finally:
            for h in hooks:
                h.remove()
        bar.close()
        skipped = torch.tensor([self._skipped], device=self.device)
        dist.broadcast(skipped, src=self.world - 1)  # the last rank saw the losses; all raise alike
        fisher_mod.check_skipped(int(skipped), len(windows))
        return acc.result(windows.size)

    def _forward(self, ids):
        """(this rank's input, its output; the loss on the last rank) of one sample."""
        self._input = self._output = None  # set by the hooks during the forward
        if self.is_last:
            loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
            return self._input, loss
        try:
            self.model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        return self._input, self._output

    def _backward(self, received, output, scale: float) -> None:
        """The backward of one sample through this rank's blocks, then its input's gradient to the
        rank before. A sample whose loss is not finite is skipped on every rank (flag 0)."""
        if self.is_last:
            ok = bool(torch.isfinite(output))
            self._skipped += not ok
            if ok:
                (output * scale).backward()
        else:
            flag = torch.empty(1, dtype=torch.int64, device=self.device)
            dist.recv(flag, self.rank + 1)
            ok = bool(flag)
            if ok:
                grad = torch.empty_like(output)
                dist.recv(grad, self.rank + 1)
                if output.requires_grad:  # else nothing before it on this rank needs a gradient
                    torch.autograd.backward(output, grad)
        if not self.is_first:
            self._isend(torch.tensor([int(ok)], device=self.device), self.rank - 1)
            if ok:
                self._isend(received.grad, self.rank - 1)

    def _receive_input(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        received = torch.empty_like(hidden)  # the shape and dtype of the hidden states this rank computed
        dist.recv(received, self.rank - 1)
        received.requires_grad_(True)
        self._input = received
        if args:
            return (received, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": received}

    def _send_output(self, module, args, output):
        self._output = output[0] if isinstance(output, tuple) else output
        self._isend(self._output.detach(), self.rank + 1)
        raise _Stop

    def _isend(self, tensor, peer: int) -> None:
        self._wait_sends()
        tensor = tensor.contiguous()
        self._sends.append((dist.isend(tensor, peer), tensor))  # the tensor lives until the send is done

    def _wait_sends(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends = []

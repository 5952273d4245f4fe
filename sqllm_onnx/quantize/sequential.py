"""Sequential calibration: the decoder blocks one after the other, each seeing the outputs of the
blocks before it *as quantized*, with the input Hessian H = X^T X / T of every projection collected
on the way (what error-feedback methods such as `lnq` minimise against).

Memory stays bounded by one block: the calibration hidden states of the block's input and output
([samples, seq_len, hidden] each), the Hessians of that block's projections, and the original
weights of that block while its quantized ones are in place. After a block's outputs are computed
its original weights go back, so the model is unchanged when this returns.

The first block's inputs (and the keyword arguments the model passes to every block: attention mask,
rotary embeddings, ...) are caught with a forward pre-hook that stops the model there, so the same
code serves every architecture whose blocks sit in one `nn.ModuleList` (llama, mistral, qwen2, OPT).
"""

from __future__ import annotations

import re

import numpy as np
import torch

BATCH = 8  # calibration windows per forward


class _Caught(Exception):
    pass


def decoder_blocks(model, names: list[str]) -> tuple[torch.nn.ModuleList, dict[int, list[str]]]:
    """The ModuleList of decoder blocks holding the layers `names`, and the names by block index."""
    by_list: dict[str, dict[int, list[str]]] = {}
    for name in names:
        found = None
        for m in re.finditer(r"\.(\d+)\.", name):
            prefix = name[:m.start()]
            if isinstance(model.get_submodule(prefix), torch.nn.ModuleList):
                found = (prefix, int(m.group(1)))
                break
        if found is None:
            raise ValueError(f"{name} is not inside a list of decoder blocks; sequential calibration quantizes "
                             "the blocks' projections only")
        by_list.setdefault(found[0], {}).setdefault(found[1], []).append(name)
    if len(by_list) != 1:
        raise ValueError(f"the layers to quantize lie in {len(by_list)} lists of blocks ({sorted(by_list)}); "
                         "sequential calibration needs one")
    prefix, blocks = next(iter(by_list.items()))
    return model.get_submodule(prefix), dict(sorted(blocks.items()))


def first_block_inputs(model, blocks: torch.nn.ModuleList, windows: np.ndarray, batch: int = BATCH):
    """[(hidden states of a batch, the keyword arguments block 0 got with it)] for the token windows."""
    caught = []

    def catch(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Caught

    hook = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for b0 in range(0, len(windows), batch):
            ids = torch.as_tensor(np.asarray(windows[b0:b0 + batch], dtype=np.int64))
            try:
                model(input_ids=ids, use_cache=False)
            except _Caught:
                pass
    finally:
        hook.remove()
    if len(caught) != -(-len(windows) // batch):
        raise RuntimeError("the model did not call its first decoder block once per batch")
    return caught


def _run_block(block, batches):
    outs = []
    for hidden, kwargs in batches:
        out = block(hidden, **kwargs)
        outs.append(((out[0] if isinstance(out, tuple) else out).detach(), kwargs))
    return outs


def _collect_hessians(block, modules: dict[str, torch.nn.Linear], batches) -> dict[str, torch.Tensor]:
    """H = X^T X / T (float64 [K, K]) of the inputs of each module over the batches."""
    sums = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in modules.items()}
    counts = dict.fromkeys(modules, 0)
    hooks = []
    for n, m in modules.items():
        def add(module, inputs, output, n=n):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[n] += (x.T @ x).double()
            counts[n] += x.shape[0]
        hooks.append(m.register_forward_hook(add))
    try:
        _run_block(block, batches)
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n] / max(counts[n], 1) for n in modules}


def quantize_sequentially(model, windows: np.ndarray, names: list[str], quantize_one, done: dict, dequantized,
                          bar=None, batch: int = BATCH) -> None:
    """Quantize the layers `names` block by block with the calibration `windows`.

    `quantize_one(name, module, H)` quantizes one layer and returns it (a PackedLinear, the caller's to
    keep);
    `done` {name: layer} holds layers quantized before (a resumed run: they are not quantized again, but
    still take part in the forward passes); `dequantized(layer)` is the float weight a layer computes
    with. The model's weights are the original ones again when this returns.
    """
    blocks, by_block = decoder_blocks(model, names)
    params = list(model.parameters())
    if params and params[0].device.type != "cpu":
        raise ValueError("sequential calibration runs the model on the CPU; move it there first")
    with torch.no_grad():
        batches = first_block_inputs(model, blocks, windows, batch)
        last = max(by_block)
        for index in range(last + 1):
            block = blocks[index]
            block_names = by_block.get(index, [])
            modules = {n: model.get_submodule(n) for n in block_names}
            todo = {n: m for n, m in modules.items() if n not in done}
            results = {}
            if todo:
                hessians = _collect_hessians(block, todo, batches)
                for n, m in todo.items():
                    if bar is not None:
                        bar.set_postfix_str(n, refresh=False)
                    results[n] = quantize_one(n, m, hessians.pop(n))
                    if bar is not None:
                        bar.update(1)
            if index == last:
                break
            originals = {}
            try:
                for n, m in modules.items():
                    originals[n] = (m.weight.data, None if m.bias is None else m.bias.data)
                    layer = results[n] if n in results else done[n]
                    m.weight.data = dequantized(layer).to(dtype=m.weight.dtype)
                    if layer.bias is not None and m.bias is not None:  # the bias as stored, as apply_to_model
                        m.bias.data = torch.from_numpy(layer.bias.astype(np.float32)).to(m.bias.dtype)
                batches = _run_block(block, batches)
            finally:
                for n, (w, b) in originals.items():
                    modules[n].weight.data = w
                    if b is not None:
                        modules[n].bias.data = b

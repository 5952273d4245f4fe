"""An interrupted Fisher pass resumes where its last progress save left it, with the same sums."""

import numpy as np
import pytest
import torch

from sqllm_onnx import models
from sqllm_onnx.quantize import fisher as fisher_mod
from sqllm_onnx.quantize.targets import linear_layer_names


class Interrupt(Exception):
    pass


def test_interrupted_fisher_pass_resumes_exactly(tmp_path, monkeypatch):
    model, _ = models.random_model("llama", seed=1)
    names = linear_layer_names(model)
    windows = np.random.default_rng(0).integers(3, 500, size=(6, 16))
    full = fisher_mod.compute_fisher(model, windows, names, progress=False)

    monkeypatch.setattr(fisher_mod, "SAVE_EVERY_S", -1.0)  # a progress save after every sample
    progress = tmp_path / "fisher-progress.safetensors"
    meta = {"test": 1}
    forward, calls = model.forward, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Interrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    with pytest.raises(Interrupt):
        fisher_mod.compute_fisher(model, windows, names, progress=False, progress_file=progress, meta=meta)
    _, done, _ = fisher_mod.load_progress(progress, meta, names)
    assert done == 3
    monkeypatch.setattr(model, "forward", forward)
    calls["n"] = 0
    resumed = fisher_mod.compute_fisher(model, windows, names, progress=False, progress_file=progress, meta=meta)
    for name in names:
        assert torch.equal(resumed[name], full[name]), name
    with pytest.raises(ValueError, match="another calibration"):
        fisher_mod.compute_fisher(model, windows, names, progress=False, progress_file=progress, meta={"test": 2})

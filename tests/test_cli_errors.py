"""Bad invocations of every `sqllm-onnx` command: a non-zero exit (2 for bad arguments, 1 for
failures), one line on stderr, no traceback, and nothing created (docs/reliability.md, "CLI").

A generator draws a few hundred cases from damaged and foreign folders (made once from a real tiny
export), missing and unreadable paths, broken model folders, and bad flag values, and runs each in
process (`sqllm_onnx.cli.main`) from an empty working folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
from pathlib import Path

import pytest

from sqllm_onnx import cli

CASES = 300


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) + ("/" if p.is_dir() else "") for p in root.rglob("*")}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Folders the cases point at: one good tiny export, damaged copies of it, and foreign folders."""
    from sqllm_onnx import models
    from sqllm_onnx.export.exporter import export

    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "hf-model"
    model, tokenizer = models.random_model("llama", seed=0)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    good = export(root / "good", None, str(model_dir), dtype="fp32", progress=False, log=lambda *a: None,
                  validate=False)
    made = {"good": good, "hf-model": model_dir}

    def variant(name, mutate):
        d = root / name
        shutil.copytree(good, d)
        mutate(d)
        made[name] = d

    def truncate(d):
        p = d / "model.onnx"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])

    def truncate_and_fix_manifest(d):  # passes the size check, fails in onnxruntime
        truncate(d)
        m = json.loads((d / "sqllm_manifest.json").read_text())
        m["files"]["model.onnx"] = (d / "model.onnx").stat().st_size
        (d / "sqllm_manifest.json").write_text(json.dumps(m))

    def flip_a_byte(d):  # same size, different content: only `check` notices
        p = d / "model.onnx"
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))

    variant("truncated", truncate)
    variant("truncated-manifest-fixed", truncate_and_fix_manifest)
    variant("no-tokenizer", lambda d: (d / "tokenizer.json").unlink())
    variant("no-manifest", lambda d: (d / "sqllm_manifest.json").unlink())
    variant("bad-manifest", lambda d: (d / "sqllm_manifest.json").write_text("{not json"))
    variant("foreign-manifest", lambda d: (d / "sqllm_manifest.json").write_text(json.dumps({"format": "other"})))
    variant("flipped", flip_a_byte)
    for name, content in (("empty", None), ("broken-config", "{bad"), ("config-no-type", "{}")):
        d = root / name
        d.mkdir()
        if content is not None:
            (d / "config.json").write_text(content)
        made[name] = d
    no_tok = root / "hf-no-tokenizer"
    shutil.copytree(model_dir, no_tok)
    for f in no_tok.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            f.unlink()
    made["hf-no-tokenizer"] = no_tok
    a_file = root / "a-file.txt"
    a_file.write_text("not a folder")
    made["a-file"] = a_file
    locked = root / "locked"
    shutil.copytree(good, locked)
    os.chmod(locked / "model.onnx", 0)
    made["locked"] = locked
    yield made
    os.chmod(locked / "model.onnx", stat.S_IRUSR | stat.S_IWUSR)


def _draw(rng: random.Random, f: dict, out: str) -> tuple[list[str], str]:
    """(argv, what it is) for one bad invocation; `out` names an output folder that must not appear."""
    bad_dirs = ["truncated", "truncated-manifest-fixed", "no-manifest", "bad-manifest", "foreign-manifest", "empty",
                "hf-model", "a-file", "no-tokenizer"]
    if os.geteuid() != 0:  # root reads files whatever their mode
        bad_dirs.append("locked")
    folder = lambda: str(f[rng.choice(bad_dirs)]) if rng.random() < 0.85 else "does/not/exist"  # noqa: E731
    bad_models = ["broken-config", "config-no-type", "hf-no-tokenizer", "empty", "a-file"]
    model = lambda: str(f[rng.choice(bad_models)]) if rng.random() < 0.8 else rng.choice(  # noqa: E731
        ["./no/such/model", "random:gpt9", "/nonexistent"])
    bad_int = lambda: rng.choice(["-1", "0", "x", "1.5", "", "99999999999999999999"])  # noqa: E731
    kind = rng.choice(["eval", "generate", "bench", "check", "export", "quantize", "args"])
    if kind == "eval":
        argv = ["eval", folder()]
        if rng.random() < 0.3:
            argv += [rng.choice(["--seq-len", "--max-windows", "--threads"]), bad_int()]
        return argv, "eval of a bad folder"
    if kind == "generate":
        argv = ["generate", folder(), "--prompt", rng.choice(["hello", "", "   "])]
        if rng.random() < 0.3:
            argv += ["--max-new-tokens", bad_int()]
        return argv, "generate of a bad folder"
    if kind == "bench":
        return ["bench", folder(), *rng.choice([[], ["--prompt-len", bad_int()], ["--cuda-graph"]])], "bench of a bad folder"
    if kind == "check":
        return ["check", str(f[rng.choice(bad_dirs + ["flipped"])])], "check of a damaged folder"
    if kind == "export":
        argv = ["export", "--model", model(), "--out", out]
        if rng.random() < 0.3:
            argv += [rng.choice(["--bits", "--calib-samples", "--sparsity"]), rng.choice(["-3", "abc", "5"])]
        return argv, "export of a bad model"
    if kind == "quantize":
        argv = ["quantize", "--model", model(), "--out", out]
        if rng.random() < 0.3:
            argv += [rng.choice(["--bits", "--calib-samples", "--sparsity"]), rng.choice(["-3", "abc", "101"])]
        return argv, "quantize of a bad model"
    return rng.choice([["nosuch"], ["eval"], ["export", "--bits"], ["generate", str(f["good"])],
                       ["export", "--out", out, "--method", "gptq"], ["bench", "kernel", "--shapes", "1x"],
                       ["bench", "kernel", "--provider", "tpu"], ["export", "--out", out, "--unknown-flag"],
                       ["quantize", "--out", out, "--eval-baseline"], ["demo", "--bits", "zz"]]), "bad arguments"


def test_bad_invocations_fail_cleanly(fixtures, tmp_path, capsys, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SQLLM_DEBUG", raising=False)
    roots = {p.parent for p in fixtures.values()}
    before = {r: _tree(r) for r in roots}
    rng = random.Random(12345)
    seen, codes = set(), {}
    for i in range(CASES):
        out = str(work / f"out{i}")
        argv, what = _draw(rng, fixtures, out)
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc not in (0, None), f"{what}: {argv} succeeded"
        assert "Traceback" not in err, f"{what}: {argv} printed a traceback:\n{err}"
        assert len(lines) == 1, f"{what}: {argv} printed {len(lines)} lines:\n{err}"
        assert "error" in lines[0], f"{what}: {argv}: {lines[0]}"
        assert rc == 2 or what != "bad arguments" or "usage" not in err
        assert not Path(out).exists(), f"{what}: {argv} left {out} behind"
        seen.add(what)
        codes[rc] = codes.get(rc, 0) + 1
    assert _tree(work) == set(), f"left in the working folder: {_tree(work)}"
    for r in roots:
        assert _tree(r) == before[r], f"the fixtures changed: {_tree(r) ^ before[r]}"
    assert len(seen) == 7
    print(f"\nCLI fuzz: {CASES} bad invocations, exit status counts {dict(sorted(codes.items()))}")


def test_argument_errors_exit_2_and_failures_exit_1(fixtures, capsys):
    assert cli.main(["eval", str(fixtures["empty"])]) == 1
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", str(fixtures["good"]), "--provider", "tpu"])
    assert e.value.code == 2
    assert cli.main(["generate", str(fixtures["good"]), "--prompt", ""]) == 2
    capsys.readouterr()


def test_check_accepts_a_good_export_and_names_the_damage(fixtures, capsys):
    assert cli.main(["check", str(fixtures["good"])]) == 0
    assert "ok" in capsys.readouterr().out
    assert cli.main(["check", str(fixtures["flipped"])]) == 1
    assert "SHA-256 mismatch" in capsys.readouterr().err
    assert cli.main(["eval", str(fixtures["truncated"])]) == 1
    assert "damaged or truncated" in capsys.readouterr().err


def test_debug_shows_the_traceback(fixtures, monkeypatch):
    monkeypatch.setenv("SQLLM_DEBUG", "1")
    from sqllm_onnx.errors import UserError

    with pytest.raises(UserError):
        cli.main(["eval", str(fixtures["empty"])])

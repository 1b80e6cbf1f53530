"""Faults: a run killed at any point leaves the old output or none, never a mix; the next run cleans
up after it; a full disk and read errors give one clear line and remove the temporary folder."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mergekit_lite
from mergekit_lite import CheckpointError, OutputError, Recipe

from helpers import leftovers, load_state, ta_recipe, write_recipe

KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from mergekit_lite import writer
    from mergekit_lite.cli import main

    mode, after = sys.argv[1], int(sys.argv[2])
    count = {"n": 0}

    if mode == "write":  # SIGKILL in the middle of a shard write
        real = os.pwrite
        def pwrite(fd, data, offset):
            count["n"] += 1
            if count["n"] == after:
                try:  # half the bytes (a direct write refuses an unaligned length: then none of them)
                    real(fd, bytes(data)[: len(data) // 2], offset)
                except OSError:
                    pass
                os.kill(os.getpid(), signal.SIGKILL)
            return real(fd, data, offset)
        writer.os.pwrite = pwrite
    else:  # SIGKILL between moving the old output aside and moving the new one in
        real_rename = os.rename
        def rename(a, b):
            count["n"] += 1
            real_rename(a, b)
            if count["n"] == after:
                os.kill(os.getpid(), signal.SIGKILL)
        writer.os.rename = rename
    sys.argv = ["mergekit-lite", *sys.argv[3:]]
    main()
    """
)


def run_and_kill(tmp_path: Path, recipe: Path, out: Path, mode: str, after: int, *extra: str) -> subprocess.CompletedProcess:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    return subprocess.run(
        [sys.executable, str(script), mode, str(after), "run", str(recipe), str(out), "-q", *extra],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.parametrize("after", [3, 12])
def test_sigkill_during_first_write_leaves_no_output(demo, tmp_path, after):
    recipe = write_recipe(tmp_path / "r.yml", ta_recipe(demo, output={"shard_size": 50_000}))
    result = run_and_kill(tmp_path, recipe, tmp_path / "out", "write", after)
    assert result.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    assert len(leftovers(tmp_path)) == 1  # the dead run's folder ...
    mergekit_lite.run(Recipe.from_dict(ta_recipe(demo)), tmp_path / "out", progress=False)
    assert leftovers(tmp_path) == []  # ... is removed by the next run
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_sigkill_during_forced_rewrite_keeps_old_output(demo, tmp_path):
    out = mergekit_lite.run(Recipe.from_dict(ta_recipe(demo)), tmp_path / "out", progress=False)
    before = load_state(out)
    (out / "marker").write_text("old")
    recipe = write_recipe(tmp_path / "r.yml", ta_recipe(demo, parameters={"lambda": 0.1}, output={"shard_size": 50_000}))
    result = run_and_kill(tmp_path, recipe, out, "write", 5, "--force")  # small shards: many writes
    assert result.returncode == -signal.SIGKILL
    assert (out / "marker").read_text() == "old"
    after = load_state(out)
    assert all((after[n] == before[n]).all() for n in before)


def test_sigkill_between_renames_restores_old_output(demo, tmp_path):
    out = mergekit_lite.run(Recipe.from_dict(ta_recipe(demo)), tmp_path / "out", progress=False)
    (out / "marker").write_text("old")
    recipe = write_recipe(tmp_path / "r.yml", ta_recipe(demo, parameters={"lambda": 0.1}))
    result = run_and_kill(tmp_path, recipe, out, "rename", 1, "--force")  # killed right after out -> aside
    assert result.returncode == -signal.SIGKILL
    assert not out.exists()  # none, never a mix ...
    with pytest.raises(OutputError, match="already exists"):
        mergekit_lite.run(Recipe.from_dict(ta_recipe(demo)), out, progress=False)  # ... and the next run restores the old one
    assert (out / "marker").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_full_disk_while_writing(demo, tmp_path, monkeypatch):
    from mergekit_lite import writer

    calls = {"n": 0}
    real = writer.os.pwrite

    def failing(fd, data, offset):
        calls["n"] += 1
        if calls["n"] >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", failing)
    with pytest.raises(OutputError, match="No space left on device"):  # small shards: many writes, direct or not
        mergekit_lite.run(Recipe.from_dict(ta_recipe(demo, output={"shard_size": 50_000})), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_read_error_names_the_file(demo, tmp_path, monkeypatch):
    from mergekit_lite import checkpoint

    real = checkpoint.os.preadv
    target = str(demo["code"] / "model.safetensors")
    fds: set[int] = set()
    real_open = checkpoint.os.open

    def tracking_open(path, flags, *a, **kw):
        fd = real_open(path, flags, *a, **kw)
        if str(path) == target:
            fds.add(fd)
        return fd

    def failing(fd, buffers, offset, flags=0):
        if fd in fds:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset, flags)

    monkeypatch.setattr(checkpoint.os, "open", tracking_open)
    monkeypatch.setattr(checkpoint.os, "preadv", failing)
    with pytest.raises(CheckpointError, match="code/model.safetensors.*Input/output error"):
        mergekit_lite.run(Recipe.from_dict(ta_recipe(demo)), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_nan_weights_are_refused(demo, tmp_path):
    import shutil

    import torch
    from safetensors.torch import save_file

    bad = shutil.copytree(demo["math"], tmp_path / "bad")
    state = load_state(bad)
    state["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    data = ta_recipe(demo)
    data["models"][0]["model"] = str(bad)
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.up_proj.weight has 1 NaN/Inf"):
        mergekit_lite.run(Recipe.from_dict(data), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    data["exclude"] = ["model.layers.0.mlp.up_proj.weight"]
    out = mergekit_lite.run(Recipe.from_dict(data), tmp_path / "out", progress=False)
    assert torch.equal(load_state(out)["model.layers.0.mlp.up_proj.weight"], load_state(demo["base"])["model.layers.0.mlp.up_proj.weight"])

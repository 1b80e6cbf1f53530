"""The command line: every user-caused failure is one clear line, exit code 2, and no output left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mergekit_lite import __version__
from mergekit_lite.cli import main

from helpers import leftovers, load_state, ta_recipe, write_recipe


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def run_recipe(tmp_path: Path, data: dict, *extra: str):
    recipe = write_recipe(tmp_path / "recipe.yml", data)
    return invoke("run", str(recipe), str(tmp_path / "out"), "-q", *extra)


def assert_clean_failure(result, tmp_path: Path, *needles: str) -> None:
    """Exit 2, one line naming the problem, no traceback, no output folder, no temporary folder."""
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: "), message
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, message
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_version_and_help():
    assert __version__ in invoke("--version").output
    for command in ([], ["run"], ["validate"], ["methods"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0
    run_help = invoke("run", "--help").output
    assert "--dry-run" in run_help and "--force" in run_help and "--device" in run_help and "merge_method" in run_help


def test_methods_lists_parameters():
    result = invoke("methods", "task_arithmetic")
    assert result.exit_code == 0
    assert "lambda" in result.output and "weight" in result.output
    assert invoke("methods", "task_arithmetc").exit_code == 2


def test_run_writes_and_prints_path(demo, tmp_path):
    result = run_recipe(tmp_path, ta_recipe(demo))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str((tmp_path / "out").absolute())
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_validate_ok(demo, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yml", ta_recipe(demo))
    result = invoke("validate", str(recipe))
    assert result.exit_code == 0 and result.stdout.startswith("ok:")


def test_dry_run_writes_nothing(demo, tmp_path):
    result = run_recipe(tmp_path, ta_recipe(demo), "--dry-run")
    assert result.exit_code == 0, result.output
    for word in ("tensors:", "bytes to read", "bytes to write", "peak memory"):
        assert word in result.stdout
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(demo, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    result = run_recipe(tmp_path, ta_recipe(demo))
    assert result.exit_code == 2 and "--force" in result.stderr
    assert (tmp_path / "out" / "keep").exists()
    assert run_recipe(tmp_path, ta_recipe(demo), "--force").exit_code == 0
    assert not (tmp_path / "out" / "keep").exists()


def test_missing_model_path(demo, tmp_path):
    data = ta_recipe(demo)
    data["models"][1]["model"] = str(tmp_path / "nowhere")
    assert_clean_failure(run_recipe(tmp_path, data), tmp_path, "nowhere", "no such file")


def test_not_a_checkpoint(demo, tmp_path):
    (tmp_path / "empty").mkdir()
    data = ta_recipe(demo)
    data["models"][0]["model"] = str(tmp_path / "empty")
    assert_clean_failure(run_recipe(tmp_path, data), tmp_path, "empty", "not a checkpoint")


def test_corrupt_safetensors(demo, tmp_path):
    bad = shutil.copytree(demo["code"], tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    data = ta_recipe(demo)
    data["models"][1]["model"] = str(bad)
    assert_clean_failure(run_recipe(tmp_path, data), tmp_path, "model.safetensors", "corrupt")


def test_truncated_safetensors(demo, tmp_path):
    bad = shutil.copytree(demo["code"], tmp_path / "bad")
    data_bytes = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data_bytes[: len(data_bytes) - 1000])
    data = ta_recipe(demo)
    data["models"][1]["model"] = str(bad)
    assert_clean_failure(run_recipe(tmp_path, data), tmp_path, "model.safetensors", "truncated")


def _rewrite(folder: Path, change) -> None:
    state = load_state(folder)
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_tensor_missing_in_a_finetune(demo, tmp_path):
    bad = shutil.copytree(demo["chat"], tmp_path / "bad")
    _rewrite(bad, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    data = ta_recipe(demo)
    data["models"][2]["model"] = str(bad)
    assert_clean_failure(run_recipe(tmp_path, data), tmp_path, "model.layers.1.mlp.up_proj.weight", "exclude")


def test_tensor_with_another_shape(demo, tmp_path):
    bad = shutil.copytree(demo["chat"], tmp_path / "bad")
    _rewrite(bad, lambda s: s.__setitem__("model.norm.weight", torch.ones(65)))
    data = ta_recipe(demo)
    data["models"][2]["model"] = str(bad)
    assert_clean_failure(run_recipe(tmp_path, data), tmp_path, "model.norm.weight", "[65]", "[64]")


def test_extra_tensor_in_a_finetune(demo, tmp_path):
    bad = shutil.copytree(demo["chat"], tmp_path / "bad")
    _rewrite(bad, lambda s: s.__setitem__("model.extra.weight", torch.ones(3)))
    data = ta_recipe(demo)
    data["models"][2]["model"] = str(bad)
    assert_clean_failure(run_recipe(tmp_path, data), tmp_path, "model.extra.weight")
    data["exclude"] = ["model.extra.*"]
    assert run_recipe(tmp_path, data).exit_code == 0


def test_unknown_method(demo, tmp_path):
    assert_clean_failure(run_recipe(tmp_path, ta_recipe(demo, merge_method="task_arithmatic")), tmp_path, "merge_method", "task_arithmetic")


def test_bad_yaml(tmp_path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: task_arithmetic\nmodels: [\n  - model: x\n")
    result = invoke("run", str(recipe), str(tmp_path / "out"))
    assert_clean_failure(result, tmp_path, "recipe.yml", "not valid YAML", "line")


def test_missing_recipe_file(tmp_path):
    result = invoke("validate", str(tmp_path / "nope.yml"))
    assert_clean_failure(result, tmp_path, "nope.yml", "not found")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_cuda_requested_without_cuda(demo, tmp_path):
    assert_clean_failure(run_recipe(tmp_path, ta_recipe(demo), "--device", "cuda"), tmp_path, "--device cuda", "no CUDA")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(demo, tmp_path):
    """The same recipe gives the same weights on cuda as on cpu."""
    cpu = run_recipe(tmp_path, ta_recipe(demo))
    assert cpu.exit_code == 0
    shutil.move(tmp_path / "out", tmp_path / "cpu")
    gpu = run_recipe(tmp_path, ta_recipe(demo), "--device", "cuda")
    assert gpu.exit_code == 0, gpu.output
    a, b = load_state(tmp_path / "cpu"), load_state(tmp_path / "out")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_real_process_prints_no_traceback(demo, tmp_path):
    """Through a real process: exit code 2 and one line on stderr."""
    data = ta_recipe(demo)
    data["models"][0]["model"] = str(tmp_path / "missing-model")
    recipe = write_recipe(tmp_path / "recipe.yml", data)
    result = subprocess.run(
        [sys.executable, "-m", "mergekit_lite.cli", "run", str(recipe), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "missing-model" in result.stderr


def test_console_script_runs_exit_handlers_flushes_and_keeps_exit_codes(demo, tmp_path):
    """The console entry ends the process without interpreter teardown: exit handlers still run, piped output
    arrives whole, a merge's output is complete on disk, and exit codes are main's (0, 2, and 1 for a message)."""
    start = ("import atexit, sys\n"
             "atexit.register(lambda: print('handler ran', file=sys.stderr))\n"
             "from mergekit_lite.cli import console_main\n")

    def console(*args: str, body: str = "console_main()") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", start + body, *args], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})

    version = console("--version")
    assert (version.returncode, version.stdout) == (0, f"mergekit-lite, version {__version__}\n")
    assert version.stderr == "handler ran\n"
    data = ta_recipe(demo)
    merged = console("run", str(write_recipe(tmp_path / "recipe.yml", data)), str(tmp_path / "console"), "-q")
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout.strip() == str(tmp_path / "console") and "handler ran" in merged.stderr
    assert run_recipe(tmp_path, data).exit_code == 0  # in process, the usual exit: the same bytes
    console_out, usual_out = load_state(tmp_path / "console"), load_state(tmp_path / "out")
    assert console_out.keys() == usual_out.keys()
    assert all(torch.equal(console_out[name], usual_out[name]) for name in usual_out)
    refused = console("run", str(tmp_path / "missing.yml"), str(tmp_path / "refused"))
    assert refused.returncode == 2 and refused.stderr.splitlines()[0].startswith("error:")
    assert not (tmp_path / "refused").exists()
    message = console(body="import mergekit_lite.cli as cli\n"
                           "def stop(): print('x'); raise SystemExit('stopped: a message')\n"
                           "cli.main = stop\nconsole_main()")
    assert (message.returncode, message.stdout) == (1, "x\n")
    assert message.stderr == "stopped: a message\nhandler ran\n"

def test_cli_gives_numpy_one_blas_thread_unless_the_user_chose(monkeypatch):
    """``OPENBLAS_NUM_THREADS`` is set to 1 by the command's start when unset, and a user's value is kept."""
    import os

    from click.testing import CliRunner

    from mergekit_lite.cli import main

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    assert CliRunner().invoke(main, ["methods"]).exit_code == 0
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    assert CliRunner().invoke(main, ["methods"]).exit_code == 0
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3"

"""The Ray executor on a local Ray instance (2 CPUs, started once for the file): the same bytes as the
local executor for each method family, a worker killed mid-merge, an input missing where a worker
runs, an interrupted run, and the λ searches run as Ray tasks."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

import mergekit_lite
from mergekit_lite.api import execute, plan
from mergekit_lite.cli import main
from mergekit_lite.demo import DEMO_TASKS
from mergekit_lite.errors import MergeKitLiteError
from mergekit_lite.ray_executor import FAULT_ENV, RayExecutor, split_shares
from mergekit_lite.recipe import Recipe

from helpers import copy_checkpoint, leftovers, write_recipe

ray = pytest.importorskip("ray")  # a dev install has it (the `dev` extra); `pip install mergekit-lite[ray]`


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """One local Ray instance for the whole file; its workers import this copy of the package and read the
    test-only fault control file named by FAULT_ENV (absent unless a test writes it)."""
    control = tmp_path_factory.mktemp("ray-control") / "fault.json"
    root = str(Path(mergekit_lite.__file__).resolve().parent.parent)
    old = {k: os.environ.get(k) for k in (FAULT_ENV, "PYTHONPATH")}
    os.environ[FAULT_ENV] = str(control)
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [old["PYTHONPATH"]])])
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield control
    if started:
        ray.shutdown()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under a folder, by relative path, read plainly."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def models(demo: dict[str, Path], **per_model) -> list[dict]:
    return [{"model": str(demo[t]), **({"parameters": per_model} if per_model else {})} for t in DEMO_TASKS]


def recipes(demo: dict[str, Path]) -> dict[str, dict]:
    """One recipe per method family (small shards: several files and an index)."""
    base = str(demo["base"])
    common = {"base_model": base, "output": {"shard_size": 20_000}}
    return {
        "task_arithmetic": {"merge_method": "task_arithmetic", **common, "models": models(demo, weight=0.6), "parameters": {"lambda": 0.8}},
        "ties_model_scope": {"merge_method": "ties", **common, "models": models(demo, density=0.3, weight=0.5),
                             "parameters": {"scope": "model"}},
        "ties_model_scope_float64": {"merge_method": "ties", **common, "models": models(demo, density=0.4, weight=0.5),
                                     "parameters": {"scope": "model"}, "dtype": "float64"},
        "dare_ties": {"merge_method": "dare_ties", **common, "models": models(demo, density=0.5, weight=0.5), "parameters": {"seed": 7}},
        "della": {"merge_method": "della", **common, "models": models(demo, density=0.5, weight=0.5), "parameters": {"epsilon": 0.1, "seed": 3}},
        "consensus": {"merge_method": "consensus", **common, "models": models(demo), "parameters": {"consensus_k": 2, "lambda": 0.5}},
        "ramplus_model_scope": {"merge_method": "ramplus_tl", **common, "models": models(demo), "parameters": {"scope": "model"}},
        "slerp": {"merge_method": "slerp", **common, "models": [{"model": base}, {"model": str(demo["math"])}], "parameters": {"t": 0.3}},
        "tall_masks_ties": {"merge_method": "tall_masks", "base_model": base, "models": models(demo),
                            "parameters": {"aggregate": "ties", "tall_lambda": 0.4}},
        "emr": {"merge_method": "emr", "base_model": base, "models": models(demo)},
        "tsv_compress": {"merge_method": "tsv_compress", "base_model": base, "models": models(demo), "parameters": {"rank_fraction": 0.5}},
    }


def run_both(recipe: dict, tmp_path: Path, executor: RayExecutor | None = None) -> tuple[Path, Path, RayExecutor]:
    """The recipe merged by the local executor and by Ray, into folders of the same name (their cards name it)."""
    executor = executor or RayExecutor()
    local = mergekit_lite.run(Recipe.from_dict(recipe), tmp_path / "local" / "out", progress=False)
    distributed = mergekit_lite.run(Recipe.from_dict(recipe), tmp_path / "ray" / "out", progress=False, executor=executor)
    return local, distributed, executor


@pytest.mark.parametrize("family", list(recipes({t: Path(t) for t in ["base", *DEMO_TASKS]})))
def test_byte_identical_to_the_local_executor(cluster, demo, tmp_path, family):
    local, distributed, executor = run_both(recipes(demo)[family], tmp_path)
    expected, got = files_of(local), files_of(distributed)
    assert sorted(got) == sorted(expected)
    assert [name for name in expected if got[name] != expected[name]] == []
    # the work really ran on Ray's worker processes, in several shares (else the comparison proves nothing)
    assert executor.log and all(entry.pid != os.getpid() for entry in executor.log)
    assert len(executor.log) >= 2
    if family == "task_arithmetic":
        assert any(name.endswith(".index.json") for name in got) and sum(n.endswith(".safetensors") for n in got) > 2


def test_cli_executor_ray_writes_the_same_files(cluster, demo, tmp_path):
    path = write_recipe(tmp_path / "r.yml", recipes(demo)["ties_model_scope"])
    for executor in ("local", "ray"):
        result = CliRunner().invoke(main, ["run", str(path), str(tmp_path / executor / "out"), "-q", "--executor", executor])
        assert result.exit_code == 0, result.output
    assert files_of(tmp_path / "local" / "out") == files_of(tmp_path / "ray" / "out")


def test_a_killed_worker_is_rerun_and_the_output_is_the_same(cluster, demo, tmp_path):
    recipe = recipes(demo)["ties_model_scope"]
    the_plan = plan(Recipe.from_dict(recipe))
    victim = [job.name for job in the_plan.jobs if job.merge][-3]  # a tensor late in its share: earlier ones were written
    the_plan.close()
    marker = tmp_path / "died"
    cluster.write_text(json.dumps({"tensor": victim, "marker": str(marker)}))
    try:
        local, distributed, executor = run_both(recipe, tmp_path)
    finally:
        cluster.unlink()
    assert marker.is_file(), "the worker was not killed: the test proves nothing"
    assert int(marker.read_text()) != os.getpid()
    assert files_of(local) == files_of(distributed)
    finished = [entry.pid for entry in executor.log if victim in entry.names]
    assert len(finished) >= 2 and int(marker.read_text()) not in finished  # its shares (statistics passes, merge) ran; the one that died re-ran elsewhere


def test_an_input_missing_on_a_worker_is_one_clear_error_and_nothing_is_written(cluster, demo, tmp_path):
    inputs = {t: copy_checkpoint(demo[t], tmp_path / "inputs" / t) for t in ["base", *DEMO_TASKS]}
    recipe = recipes(inputs)["task_arithmetic"]
    the_plan = plan(Recipe.from_dict(recipe))  # the driver read the headers; the workers will not find the file
    weights = next((inputs["code"]).glob("*.safetensors"))
    weights.unlink()
    out = tmp_path / "outputs" / "out"
    try:
        with pytest.raises(MergeKitLiteError) as info:
            execute(the_plan, out, progress=False, executor=RayExecutor())
    finally:
        the_plan.close()
    message = str(info.value)
    assert "\n" not in message and "code" in message and "Ray worker" in message
    assert not out.exists() and leftovers(out.parent) == []


def test_cli_missing_input_exits_2_with_one_line(cluster, demo, tmp_path):
    inputs = {t: copy_checkpoint(demo[t], tmp_path / "inputs" / t) for t in ["base", *DEMO_TASKS]}
    path = write_recipe(tmp_path / "r.yml", recipes(inputs)["task_arithmetic"])
    next(inputs["chat"].glob("*.safetensors")).unlink()
    result = CliRunner().invoke(main, ["run", str(path), str(tmp_path / "out"), "-q", "--executor", "ray"])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1 and "chat" in result.output
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_an_interrupted_run_leaves_no_output(cluster, demo, tmp_path, monkeypatch):
    executor = RayExecutor()
    real = executor.run

    def interrupted(*args, **kwargs):
        def stop(share, result):
            raise KeyboardInterrupt  # Ctrl-C on the driver while workers are writing

        return real(*args, **{**kwargs, "on_done": stop})

    monkeypatch.setattr(executor, "run", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        mergekit_lite.run(Recipe.from_dict(recipes(demo)["task_arithmetic"]), out, progress=False, executor=executor)
    assert not out.exists() and leftovers(tmp_path) == []


EVALUATOR = """
from pathlib import Path
from safetensors.torch import load_file

ROOTS = {roots!r}

def closeness(task, state):
    '''Minus the distance to the original fine-tune (read where the evaluator runs).'''
    target = {{}}
    for f in sorted(Path(ROOTS[task]).glob("*.safetensors")):
        target.update(load_file(f))
    return -sum(float((state[n].double() - target[n].double()).square().sum()) for n in target)
"""


@pytest.mark.parametrize("kind", ["merge_lambda", "tall_lambda"])
def test_lambda_searches_run_as_ray_tasks_with_the_same_choice(cluster, demo, tmp_path, monkeypatch, kind):
    module = f"ray_eval_{kind}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(EVALUATOR.format(roots={t: str(demo[t]) for t in DEMO_TASKS})))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    if kind == "merge_lambda":
        recipe = {"merge_method": "consensus", "base_model": str(demo["base"]), "models": models(demo), "parameters": {"consensus_k": 1},
                  "evaluator": f"{module}:closeness"}
    else:
        recipe = {"merge_method": "tall_masks", "base_model": str(demo["base"]), "models": models(demo),
                  "parameters": {"tall_lambda": {"search": [0.2, 0.4, 0.6]}}, "evaluator": f"{module}:closeness"}
    local, distributed, executor = run_both(recipe, tmp_path)
    assert files_of(local) == files_of(distributed)
    evaluations = [entry for entry in executor.log if entry.tensors == 1]
    assert len(evaluations) >= (10 if kind == "merge_lambda" else 9) and all(e.pid != os.getpid() for e in evaluations)
    sys.modules.pop(module, None)


def test_split_shares_by_hand():
    assert split_shares(list("abcd"), [1, 1, 1, 1], 2) == [["a", "b"], ["c", "d"]]
    assert split_shares(list("abcd"), [10, 1, 1, 1], 2) == [["a"], ["b", "c", "d"]]
    assert split_shares(list("ab"), [1, 1], 8) == [["a"], ["b"]]
    assert split_shares(["a"], [0], 3) == [["a"]]


def test_without_ray_the_cli_says_how_to_install_it(demo, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    path = write_recipe(tmp_path / "r.yml", recipes(demo)["task_arithmetic"])
    result = CliRunner().invoke(main, ["run", str(path), str(tmp_path / "out"), "--executor", "ray"])
    assert result.exit_code == 2
    assert result.output == "error: --executor ray needs Ray: pip install 'mergekit-lite[ray]'\n"
    assert not (tmp_path / "out").exists()


def test_one_executor_runs_several_recipes(cluster, demo, tmp_path):
    """Workers keep one plan per run: a second recipe on the same executor is planned again, not mistaken for the first."""
    executor = RayExecutor()
    for family in ("tall_masks_ties", "dare_ties"):
        local, distributed, _ = run_both(recipes(demo)[family], tmp_path / family, executor)
        assert files_of(local) == files_of(distributed)


def test_a_chain_runs_each_step_on_ray(cluster, demo, tmp_path):
    chain = textwrap.dedent(f"""\
        name: soup
        merge_method: linear
        models:
          - {{model: {demo['math']}, parameters: {{weight: 0.5}}}}
          - {{model: {demo['code']}, parameters: {{weight: 0.5}}}}
        ---
        merge_method: ties
        base_model: {demo['base']}
        models:
          - {{model: soup, parameters: {{weight: 1.0, density: 0.6}}}}
          - {{model: {demo['chat']}, parameters: {{weight: 0.8, density: 0.6}}}}
        parameters: {{scope: model}}
        """)
    path = tmp_path / "chain.yml"
    path.write_text(chain)
    executor = RayExecutor()
    for name, chosen in (("local", "local"), ("ray", executor)):
        mergekit_lite.run(path, tmp_path / name / "out", progress=False, executor=chosen)
    for folder in ("out", "out-intermediate"):  # the card names the step's folder (and the stamp records the card's size and digest)
        local = {k: v.replace(str(tmp_path / "local").encode(), b"@") for k, v in files_of(tmp_path / "local" / folder).items()}
        distributed = {k: v.replace(str(tmp_path / "ray").encode(), b"@") for k, v in files_of(tmp_path / "ray" / folder).items()}
        assert sorted(local) == sorted(distributed) and any(k.endswith(".safetensors") for k in local)
        assert {k: v for k, v in local.items() if not k.endswith("mergekit-lite-step.json")} == \
            {k: v for k, v in distributed.items() if not k.endswith("mergekit-lite-step.json")}
    assert {name for entry in executor.log for name in entry.names} >= {"model.norm.weight"}  # both steps' tensors ran there
    assert len({entry.names for entry in executor.log}) >= 4


def test_ray_address_joins_a_running_cluster(cluster, demo, tmp_path):
    """Another driver process joins this file's Ray instance by its address (the package shipped with the job)."""
    import subprocess

    address = ray.get_runtime_context().gcs_address
    path = write_recipe(tmp_path / "r.yml", recipes(demo)["dare_ties"])
    mergekit_lite.run(path, tmp_path / "local" / "out", progress=False)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-m", "mergekit_lite.cli", "run", str(path), str(tmp_path / "ray" / "out"), "-q",
                             "--executor", "ray", "--ray-address", address], capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert files_of(tmp_path / "local" / "out") == files_of(tmp_path / "ray" / "out")
    assert ray.is_initialized()  # the joining driver left the cluster running

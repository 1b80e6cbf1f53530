"""Chains (multi-document recipes, mergekit-multi's format): steps in dependency order, each output
checked against a dense reference written here, skipped when current, rebuilt when its recipe changed,
and every mistake in the chain one line with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import mergekit_lite
from mergekit_lite import Chain, Recipe, RecipeError
from mergekit_lite.chain import STAMP, load_recipe
from mergekit_lite.checkpoint import Checkpoint
from mergekit_lite.cli import main

from helpers import leftovers, load_state, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer")  # tiny_llama has no tokenizer files


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chain-models")
    return {name: tiny_llama(root / name, layers=2, seed=seed) for seed, name in enumerate(("base", "a", "b", "c"))}


def chain_docs(m: dict[str, Path], lam: float = 0.8, final_weight: float = 2.0) -> list[dict]:
    """stage1 = linear(a, b); stage2 = task arithmetic of stage1 and c over base; final = linear(stage2, b)."""
    return [
        {"name": "stage1", "merge_method": "linear",
         "models": [{"model": str(m["a"]), "parameters": {"weight": 0.3}}, {"model": str(m["b"]), "parameters": {"weight": 0.7}}]},
        {"name": "stage2", "merge_method": "task_arithmetic", "base_model": str(m["base"]),
         "models": [{"model": "stage1", "parameters": {"weight": 1.0}}, {"model": str(m["c"]), "parameters": {"weight": 0.5}}],
         "parameters": {"lambda": lam}},
        {"merge_method": "linear",
         "models": [{"model": "stage2", "parameters": {"weight": final_weight}}, {"model": str(m["b"]), "parameters": {"weight": 1.0}}]},
    ]


def write_chain(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
    return path


def reference(m: dict[str, Path], lam: float = 0.8, final_weight: float = 2.0) -> dict[str, dict[str, torch.Tensor]]:
    """The three steps computed densely, in float64, from the formulas."""
    s = {k: {n: t.double() for n, t in load_state(v).items()} for k, v in m.items()}
    stage1 = {n: (0.3 * s["a"][n] + 0.7 * s["b"][n]) / 1.0 for n in s["base"]}
    stage2 = {n: s["base"][n] + lam * (1.0 * (stage1[n] - s["base"][n]) + 0.5 * (s["c"][n] - s["base"][n])) for n in s["base"]}
    final = {n: (final_weight * stage2[n] + 1.0 * s["b"][n]) / (final_weight + 1.0) for n in s["base"]}
    return {"stage1": stage1, "stage2": stage2, "final": final}


def assert_state(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_state(folder)
    assert set(got) == set(expected)
    for n in expected:
        torch.testing.assert_close(got[n].double(), expected[n], rtol=1e-6, atol=1e-6, msg=n)


def files_stat(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# -- the chain computes what its steps compute --------------------------------------------------
def test_chain_equals_its_steps_computed_densely_and_run_by_hand(models, tmp_path):
    recipe = write_chain(tmp_path / "chain.yml", chain_docs(models))
    out = mergekit_lite.run(recipe, tmp_path / "out", progress=False)
    inter = tmp_path / "out-intermediate"
    ref = reference(models)
    assert out == (tmp_path / "out").absolute()
    assert sorted(p.name for p in inter.iterdir()) == ["stage1", "stage2"]
    for name in ("stage1", "stage2"):
        assert_state(inter / name, ref[name])
    assert_state(out, ref["final"])
    assert leftovers(tmp_path) == [] and leftovers(inter) == []
    # the same steps run one after another as single recipes give the same bytes
    docs = chain_docs(models)
    by_hand = {}
    for doc in docs:
        name = doc.pop("name", "final")
        for m in doc["models"]:
            m["model"] = str(by_hand.get(m["model"], m["model"]))
        by_hand[name] = mergekit_lite.run(Recipe.from_dict(doc), tmp_path / "by-hand" / name, progress=False)
    for name, folder in (("stage1", inter / "stage1"), ("stage2", inter / "stage2"), ("final", out)):
        mine, theirs = load_state(folder), load_state(by_hand[name])
        assert all(torch.equal(mine[n], theirs[n]) for n in theirs), name
    assert json.loads((out / STAMP).read_text())["digest"] != json.loads((inter / "stage1" / STAMP).read_text())["digest"]


def test_cli_runs_a_chain_into_the_intermediate_dir_and_says_each_step(models, tmp_path):
    recipe = write_chain(tmp_path / "chain.yml", chain_docs(models))
    result = invoke("run", recipe, tmp_path / "out", "--intermediate-dir", tmp_path / "steps")
    assert result.exit_code == 0, result.output
    steps = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert steps == [
        f"step 1/3 'stage1': running linear into {tmp_path / 'steps' / 'stage1'}",
        f"step 2/3 'stage2': running task_arithmetic into {tmp_path / 'steps' / 'stage2'}",
        f"step 3/3 final: running linear into {tmp_path / 'out'}",
    ]
    assert f"wrote {tmp_path / 'out'}" in result.stdout
    said = [line.split(": no tokenizer: ")[0] for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert said == [f"warning: {tmp_path / 'steps' / 'stage1'}", f"warning: {tmp_path / 'steps' / 'stage2'}", f"warning: {tmp_path / 'out'}"]
    assert_state(tmp_path / "steps" / "stage2", reference(models)["stage2"])
    assert not (tmp_path / "out-intermediate").exists()


def test_steps_run_in_dependency_order_whatever_the_document_order(models, tmp_path):
    docs = chain_docs(models)
    recipe = write_chain(tmp_path / "chain.yml", [docs[2], docs[1], docs[0]])
    chain = load_recipe(recipe)
    assert isinstance(chain, Chain) and [s.name for s in chain.steps] == ["stage1", "stage2", None]
    assert_state(mergekit_lite.run(chain, tmp_path / "out", progress=False), reference(models)["final"])


def test_all_named_chain_writes_its_last_step_to_out_dir(models, tmp_path):
    docs = chain_docs(models)
    docs[2]["name"] = "final-merge"
    out = mergekit_lite.run(write_chain(tmp_path / "chain.yml", docs), tmp_path / "out", progress=False)
    assert_state(out, reference(models)["final"])
    assert sorted(p.name for p in (tmp_path / "out-intermediate").iterdir()) == ["stage1", "stage2"]


# -- skipping and rebuilding --------------------------------------------------------------------
def test_rerun_reads_no_weights_and_rewrites_nothing(models, tmp_path, monkeypatch):
    recipe = write_chain(tmp_path / "chain.yml", chain_docs(models))
    mergekit_lite.run(recipe, tmp_path / "out", progress=False)
    folders = [tmp_path / "out", tmp_path / "out-intermediate" / "stage1", tmp_path / "out-intermediate" / "stage2"]
    before = [files_stat(f) for f in folders]
    reads = []
    original = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, name: reads.append(name) or original(self, name))
    lines: list[str] = []
    mergekit_lite.run_chain(load_recipe(recipe), tmp_path / "out", progress=False, report=lines.append)
    assert reads == []
    assert [files_stat(f) for f in folders] == before
    assert len(lines) == 3 and all("up to date" in line and "skipped" in line for line in lines)
    result = invoke("run", recipe, tmp_path / "out")
    assert result.exit_code == 0 and f"up to date: {tmp_path / 'out'}" in result.stdout
    assert reads == [] and [files_stat(f) for f in folders] == before


def test_a_changed_step_is_rebuilt_and_so_is_what_reads_it(models, tmp_path):
    recipe = write_chain(tmp_path / "chain.yml", chain_docs(models))
    mergekit_lite.run(recipe, tmp_path / "out", progress=False)
    stage1 = files_stat(tmp_path / "out-intermediate" / "stage1")
    write_chain(recipe, chain_docs(models, lam=0.25))
    # OUT_DIR is the user's: replaced only with --force, and nothing runs before that is said
    refused = invoke("run", recipe, tmp_path / "out")
    one_error(refused, str(tmp_path / "out"), "out of date", "--force")
    assert_state(tmp_path / "out-intermediate" / "stage2", reference(models)["stage2"])
    result = invoke("run", recipe, tmp_path / "out", "--force")
    assert result.exit_code == 0, result.output
    steps = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert "up to date" in steps[0] and "recipe" in steps[1] and "changed" in steps[1] and "running" in steps[2]
    assert files_stat(tmp_path / "out-intermediate" / "stage1") == stage1
    ref = reference(models, lam=0.25)
    assert_state(tmp_path / "out-intermediate" / "stage2", ref["stage2"])
    assert_state(tmp_path / "out", ref["final"])
    # only the final changes: the steps before it are kept
    stage2 = files_stat(tmp_path / "out-intermediate" / "stage2")
    write_chain(recipe, chain_docs(models, lam=0.25, final_weight=3.0))
    mergekit_lite.run(recipe, tmp_path / "out", force=True, progress=False)
    assert files_stat(tmp_path / "out-intermediate" / "stage2") == stage2
    assert_state(tmp_path / "out", reference(models, lam=0.25, final_weight=3.0)["final"])


def test_an_incomplete_step_output_is_rebuilt(models, tmp_path):
    recipe = write_chain(tmp_path / "chain.yml", chain_docs(models))
    mergekit_lite.run(recipe, tmp_path / "out", progress=False)
    weights = tmp_path / "out-intermediate" / "stage1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    lines: list[str] = []
    mergekit_lite.run_chain(load_recipe(recipe), tmp_path / "out", progress=False, report=lines.append)
    assert "missing or has another size" in lines[0] and "up to date" in lines[1] and "up to date" in lines[2]
    assert_state(tmp_path / "out-intermediate" / "stage1", reference(models)["stage1"])


def test_dry_run_prints_the_steps_and_writes_nothing(models, tmp_path):
    recipe = write_chain(tmp_path / "chain.yml", chain_docs(models))
    result = invoke("run", recipe, tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"chain {recipe}: 3 step(s), in this order; named steps go to {tmp_path / 'out-intermediate'}"
    assert lines[1] == f"step 1/3 'stage1' → {tmp_path / 'out-intermediate' / 'stage1'}: runs"
    assert lines[4] == f"  task_arithmetic of {models['base']} (base), step 'stage1', {models['c']}"
    assert lines[-1] == f"output: {tmp_path / 'out'} (dry run: nothing written)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.yml"]


def test_validate_checks_the_steps_it_can(models, tmp_path):
    recipe = write_chain(tmp_path / "chain.yml", chain_docs(models))
    result = invoke("validate", recipe)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "ok: a chain of 3 step(s), in this order: 'stage1', 'stage2', final"
    assert lines[1].startswith("step 1/3 'stage1': ok: linear over 2 model(s)")
    assert lines[-1] == "step 3/3 final: reads the output of step 'stage2'; its inputs are checked when it runs"


# -- mistakes -------------------------------------------------------------------------------------
def mistakes(m: dict[str, Path]) -> list[tuple[str, list[dict], tuple[str, ...]]]:
    docs = chain_docs
    a = str(m["a"])
    return [
        ("duplicate", [docs(m)[0], {**docs(m)[0]}, docs(m)[2]], ("document 2", "name: 'stage1' is already the name of document 1")),
        ("two-unnamed", [docs(m)[2], docs(m)[2]], ("documents 1, 2 have no name",)),
        ("cycle", [{**docs(m)[0], "models": [{"model": "stage2", "parameters": {"weight": 1}}, {"model": a, "parameters": {"weight": 1}}]},
                   docs(m)[1], docs(m)[2]], ("cycle", "'stage1' → 'stage2' → 'stage1'")),
        ("self", [{**docs(m)[0], "models": [{"model": "stage1"}, {"model": a}]}, docs(m)[1], docs(m)[2]], ("cycle", "'stage1' → 'stage1'")),
        ("unknown", [docs(m)[0], docs(m)[1], {**docs(m)[2], "models": [{"model": "stage3"}, {"model": a}]}],
         ("document 3 (final)", "models[0].model: 'stage3' is neither a step of this chain (stage1, stage2) nor an existing path", "did you mean")),
        ("two-ends", [docs(m)[0], {**docs(m)[1], "models": [{"model": a}, {"model": str(m["c"])}]}],
         ("steps 'stage1', 'stage2' are used by no other step",)),
        ("bad-name", [{**docs(m)[0], "name": "a/b"}, docs(m)[2]], ("document 1: name: 'a/b' is not usable",)),
        ("collection-input", [{"name": "stage1", "merge_method": "tall_masks", "base_model": str(m["base"]), "models": [{"model": a}]},
                              {**docs(m)[2], "models": [{"model": "stage1"}, {"model": a}]}], ("writes a collection", "only the final merge")),
        ("bad-recipe", [{**docs(m)[0], "parameters": {"lamda": 1}}, docs(m)[1], docs(m)[2]], ("document 1 (step 'stage1'): parameters.lamda",)),
    ]


@pytest.mark.parametrize("case", range(9), ids=["duplicate", "two-unnamed", "cycle", "self", "unknown", "two-ends", "bad-name", "collection-input", "bad-recipe"])
def test_chain_mistakes_are_one_line_and_write_nothing(models, tmp_path, case):
    label, docs, needles = mistakes(models)[case]
    recipe = write_chain(tmp_path / "chain.yml", docs)
    one_error(invoke("run", recipe, tmp_path / "out"), str(recipe), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.yml"]
    checked = invoke("validate", recipe)
    assert checked.exit_code == 2 and needles[0] in checked.stderr
    with pytest.raises(RecipeError, match="chain.yml"):
        mergekit_lite.run(recipe, tmp_path / "out", progress=False)


def test_a_step_name_that_is_also_a_path_is_refused(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stage1").mkdir()
    recipe = write_chain(tmp_path / "chain.yml", chain_docs(models))
    one_error(invoke("run", "chain.yml", "out"), "'stage1' is the name of a step of this chain and also an existing path", "./stage1")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-intermediate").exists()
    assert recipe.exists()


def test_an_intermediate_folder_that_is_not_a_step_output_needs_force(models, tmp_path):
    recipe = write_chain(tmp_path / "chain.yml", chain_docs(models))
    (tmp_path / "out-intermediate" / "stage2").mkdir(parents=True)
    (tmp_path / "out-intermediate" / "stage2" / "notes.txt").write_text("mine")
    one_error(invoke("run", recipe, tmp_path / "out"), "stage2: exists and is not the output of this step", "--force")
    assert not (tmp_path / "out-intermediate" / "stage1").exists() and not (tmp_path / "out").exists()
    assert invoke("run", recipe, tmp_path / "out", "--force").exit_code == 0
    assert not (tmp_path / "out-intermediate" / "stage2" / "notes.txt").exists()
    one_error(invoke("run", recipe, tmp_path / "out", "--intermediate-dir", tmp_path / "out" / "steps"), "must not be OUT_DIR or inside it")


# -- a single document is what it always was ----------------------------------------------------
def test_single_document_recipes_are_unchanged(models, tmp_path):
    doc = chain_docs(models)[0]
    del doc["name"]
    recipe = write_chain(tmp_path / "one.yml", [doc])
    assert isinstance(load_recipe(recipe), Recipe) and load_recipe(recipe) == Recipe.from_yaml(recipe)
    out = mergekit_lite.run(recipe, tmp_path / "out", progress=False)
    assert not (out / STAMP).exists()
    one_error(invoke("run", recipe, tmp_path / "out"), "already exists; pass --force")
    result = invoke("run", recipe, tmp_path / "out2", "--intermediate-dir", tmp_path / "steps")
    assert result.exit_code == 0 and "warning: --intermediate-dir has no effect" in result.stderr
    with pytest.raises(RecipeError, match="holds 3 YAML documents .* a chain of merges"):
        Recipe.from_yaml(write_chain(tmp_path / "chain.yml", chain_docs(models)))


def test_tokenizer_source_may_name_a_step(models, demo, tmp_path):
    """A step's tokenizer_source may be an earlier step that is not one of its models (its output folder's tokenizer)."""
    marked = tmp_path / "marked"
    shutil.copytree(demo["math"], marked)
    config = json.loads((marked / "tokenizer_config.json").read_text())
    (marked / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 'marked' }}"}))
    docs = [
        {"name": "tok", "merge_method": "linear", "models": [{"model": str(marked)}, {"model": str(demo["code"])}]},
        {"merge_method": "task_arithmetic", "base_model": str(demo["base"]), "models": [{"model": str(demo["chat"])}], "tokenizer_source": "tok"},
    ]
    chain = Chain.from_text(yaml.safe_dump_all(docs), "tok.yml")
    assert chain.final.needs == ("tok",)
    out = mergekit_lite.run(chain, tmp_path / "out", progress=False)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == "{{ 'marked' }}"
    assert os.path.isdir(tmp_path / "out-intermediate" / "tok")


def test_slices_and_a_collection_may_read_steps(models, tmp_path):
    """Step references in slice sources, and a final TALL-masks collection over a step's output."""
    soup = chain_docs(models)[0]
    stack = {"merge_method": "passthrough", "slices": [{"sources": [{"model": "stage1", "layer_range": [0, 2]}]},
                                                       {"sources": [{"model": str(models["c"]), "layer_range": [1, 2]}]}]}
    out = mergekit_lite.run(Chain.from_text(yaml.safe_dump_all([soup, stack]), "stack.yml"), tmp_path / "stack", progress=False)
    stage1, c, got = reference(models)["stage1"], load_state(models["c"]), load_state(out)
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], c["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(got["model.layers.1.mlp.up_proj.weight"].double(), stage1["model.layers.1.mlp.up_proj.weight"])
    compress = {"merge_method": "tall_masks", "base_model": str(models["base"]), "models": [{"model": "stage1"}, {"model": str(models["c"])}]}
    coll = mergekit_lite.run(Chain.from_text(yaml.safe_dump_all([soup, compress]), "coll.yml"), tmp_path / "coll", progress=False)
    assert mergekit_lite.Collection.open(coll).tasks == ["stage1", "c"]
    lines: list[str] = []
    mergekit_lite.run_chain(Chain.from_text(yaml.safe_dump_all([soup, compress]), "coll.yml"), tmp_path / "coll", progress=False, report=lines.append)
    assert all("up to date" in line for line in lines)


def test_one_named_document_is_a_chain_of_one_step(models, tmp_path):
    recipe = write_chain(tmp_path / "one.yml", chain_docs(models)[:1])
    assert isinstance(load_recipe(recipe), Chain)
    out = mergekit_lite.run(recipe, tmp_path / "out", progress=False)
    assert (out / STAMP).is_file() and not (tmp_path / "out-intermediate").exists()
    assert_state(out, reference(models)["stage1"])

"""The quality benchmark's parameter search (benchmarks/quality/tuning.py): grids, recipes, choosing a point.

Pure parts only: no suite is built and no CLI merge runs (the benchmark itself does that).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.quality import report, tuning
from benchmarks.quality.merge import METHODS, PAIR_METHODS, MethodSpec, method_recipe

TASKS = ("a", "b", "c")


def test_cycle_pairs_put_every_task_first_once_and_second_once():
    pairs = tuning.cycle_pairs(TASKS)
    assert pairs == (("a", "b"), ("b", "c"), ("c", "a"))
    assert sorted(p[0] for p in pairs) == sorted(p[1] for p in pairs) == sorted(TASKS)
    assert len(tuning.all_pairs(("a", "b", "c", "d"))) == 6


def test_grid_points_cover_every_combination_in_grid_order():
    spec = MethodSpec("x", "x", "breadcrumbs", grid={"density": (0.1, 0.2, 0.4), "gamma": (0.002, 0.01)})
    points = tuning.grid_points(spec)
    assert len(points) == 6
    assert points[0] == {"density": 0.1, "gamma": 0.002} and points[1] == {"density": 0.1, "gamma": 0.01}
    assert tuning.grid_points(MethodSpec("y", "y", "linear")) == [{}]
    # smoke runs keep the middle value of each grid
    assert tuning.grid_points(spec, keep=1) == [{"density": 0.2, "gamma": 0.002}]
    assert tuning.cut((1, 2, 3, 4, 5), 3) == (1, 3, 5)


def test_every_method_names_only_parameters_it_has():
    """Each grid and fixed parameter is one the method declares (or one of the benchmark's two stand-ins)."""
    from mergekit_lite.methods import get_method

    for spec in METHODS + PAIR_METHODS:
        declared = {p.name for p in get_method(spec.merge_method).params}
        stand_ins = {"with_base"} | ({"t"} if spec.t_as_weights else set())
        assert set(spec.grid) | set(spec.parameters) <= declared | stand_ins, spec.label
        if spec.scaled:
            assert "lambda" in declared, spec.label


def test_method_recipe_writes_t_as_weights_and_chooses_the_base():
    base, dirs = Path("ck/base"), {"a": Path("ck/a"), "b": Path("ck/b")}
    linear = next(m for m in PAIR_METHODS if m.key == "linear")
    recipe = method_recipe(linear, base, dirs, {"t": 0.7}, None)
    assert "base_model" not in recipe and recipe["parameters"] == {}
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [0.3, 0.7]
    slerp = next(m for m in PAIR_METHODS if m.key == "slerp")
    recipe = method_recipe(slerp, base, dirs, {"t": 0.3}, None)
    assert recipe["base_model"].endswith("ck/a") and recipe["parameters"] == {"t": 0.3}
    ties = next(m for m in METHODS if m.key == "ties")
    recipe = method_recipe(ties, base, dirs, {"density": 0.2}, 0.5)
    assert recipe["base_model"].endswith("ck/base")
    assert recipe["parameters"] == {"scope": "model", "merge": "mean", "density": 0.2, "lambda": 0.5}
    multislerp = next(m for m in METHODS if m.key == "multislerp")
    assert "base_model" not in method_recipe(multislerp, base, dirs, {"with_base": False}, None)
    assert method_recipe(multislerp, base, dirs, {"with_base": True}, None)["parameters"] == {}


def _search(spec: MethodSpec, groups, lambdas=(0.5, 1.0), extension=(1.5,)) -> tuning.MethodSearch:
    ft = {t: 0.8 for t in TASKS}
    return tuning.MethodSearch(spec, groups, lambda *a: {"recipe": list(map(str, a))}, tuning.grid_points(spec), lambdas, extension, ft, ft)


def test_search_scores_the_mean_over_groups_of_normalized_accuracy_and_picks_the_best():
    spec = MethodSpec("TIES", "ties", "ties", grid={"density": (0.1, 0.2)})
    search = _search(spec, (("a", "b"), ("b", "c")))
    jobs = search.source_jobs()
    assert len(jobs) == 4 and all(j.needs == (("val", 0.5), ("val", 1.0)) for j in jobs)
    # point 0 (density 0.1): 0.4 everywhere; point 1 (density 0.2): λ 0.5 gives 0.6 on group 1 and 0.8 on group 2
    results = [{"val@0.5": {"a": 0.4, "b": 0.4}, "val@1": {"a": 0.4, "b": 0.4}},
               {"val@0.5": {"b": 0.4, "c": 0.4}, "val@1": {"b": 0.4, "c": 0.4}},
               {"val@0.5": {"a": 0.4, "b": 0.8}, "val@1": {"a": 0.2, "b": 0.2}},
               {"val@0.5": {"b": 0.8, "c": 0.8}, "val@1": {"b": 0.2, "c": 0.2}}]
    search.record(results)
    assert search.scores[0, 0.5] == pytest.approx(0.5)
    assert search.scores[1, 0.5] == pytest.approx(((0.4 + 0.8) / 2 / 0.8 + 1.0) / 2)
    assert search.best() == (1, 0.5) and search.params == {"density": 0.2} and search.lam == 0.5
    assert not search.needs_extension()
    assert search.chosen_text() == "density 0.2, λ 0.5"
    finals = search.final_jobs()
    assert [j.needs for j in finals] == [(("val", None), ("test", None))] * 2
    assert finals[0].recipe == {"recipe": [str(spec), str(("a", "b")), str({"density": 0.2}), "0.5"]}


def test_ties_go_to_the_smallest_lambda_and_the_first_point_and_the_edge_extends():
    spec = MethodSpec("TA", "task_arithmetic", "task_arithmetic")
    search = _search(spec, (("a", "b"),))
    search.record([{"val@0.5": {"a": 0.4, "b": 0.4}, "val@1": {"a": 0.4, "b": 0.4}}])
    assert search.best() == (0, 0.5)
    search = _search(spec, (("a", "b"),))
    search.record([{"val@0.5": {"a": 0.4, "b": 0.4}, "val@1": {"a": 0.6, "b": 0.6}}])
    assert search.needs_extension()
    jobs = search.extension_jobs()
    assert jobs[0].needs == (("val", 1.5),)
    search.record([{"val@1.5": {"a": 0.7, "b": 0.7}}], search.extension)
    assert search.best() == (0, 1.5) and not search.needs_extension()
    assert search.curve() == {0.5: pytest.approx(0.5), 1.0: pytest.approx(0.75), 1.5: pytest.approx(0.875)}


def test_pairs_without_confirmation_score_the_derived_lambda():
    spec = MethodSpec("TA", "task_arithmetic", "task_arithmetic")
    search = _search(spec, (("a", "b"),))
    search.confirm = False
    search.record([{"val@0.5": {"a": 0.6, "b": 0.6}, "val@1": {"a": 0.4, "b": 0.4}}])
    (job,) = search.final_jobs()
    assert job.needs == (("val", 0.5), ("test", 0.5)) and job.recipe == search.source_jobs()[0].recipe
    assert search.check_jobs() == [] and search.merges() == 1


def test_normalized_noise_matches_the_binomial_formula():
    ft = {"a": 0.9, "b": 0.5}
    se = report.normalized_noise([{"a": 0.8, "b": 0.4}], ft, 1000)
    expected = math.sqrt(0.8 * 0.2 / 1000 / 0.81 + 0.4 * 0.6 / 1000 / 0.25) / 2
    assert se == pytest.approx(expected)


def test_singular_basis_methods_are_searched_over_lambda_from_the_pretrained_base():
    """TSV-M, Iso-C, Iso-CTS and WUDI output θ_0 + λ·merged: λ is searched (derived from the λ = 1 merge)."""
    from mergekit_lite.methods import get_method

    specs = {m.key: m for m in METHODS}
    for key in ("tsv_m", "iso_c", "iso_cts", "wudi"):
        spec = specs[key]
        assert spec.scaled and spec.base == "pretrained" and get_method(spec.merge_method).inputs == "task_vectors", key
    base, dirs = Path("ck/base"), {"a": Path("ck/a"), "b": Path("ck/b")}
    recipe = method_recipe(specs["wudi"], base, dirs, {"lr": 1e-4}, 0.5)
    assert recipe["merge_method"] == "wudi" and recipe["base_model"].endswith("ck/base")
    assert recipe["parameters"] == {"steps": 300, "lr": 1e-4, "lambda": 0.5}
    assert tuning.grid_points(specs["iso_cts"]) == [{"common_space_fraction": 0.5}, {"common_space_fraction": 0.8}]

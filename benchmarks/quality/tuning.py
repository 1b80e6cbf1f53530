"""Choosing each method's parameters on validation data: grids, the CLI merges they need, a cache of scores.

A method is searched over every combination of its grid (``MethodSpec.grid``) and, when its output is
θ_0 + λ·merged (``scaled``), over λ too. λ costs no extra merge: the CLI merges once at λ = 1 and the
benchmark scores θ_0 + λ·(θ_1 − θ_0) for each λ; the chosen point is then merged again by the CLI at
its λ, and that output is what the test split scores (its validation score must equal the derived one).

A search runs over *groups* of tasks: one group of all 8 tasks, or pairs of tasks. A point's score is
the mean over groups of the average normalized validation accuracy (accuracy / the fine-tune's) on the
group's tasks; one point is chosen per method for all groups.

Scores are cached per recipe (``<suite>/cache/merges/<key>.json``); the key hashes the recipe, the suite's
cache key and the source of ``mergekit_lite``, so a changed recipe, retrained suite or edited library never
reuses a stale score.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import merge
from .merge import MethodSpec
from .model import read_state
from .suite import Suite

REPO = Path(__file__).resolve().parents[2]
State = dict[str, torch.Tensor]
Group = tuple[str, ...]
#: (split, λ): a split scored on the merge itself (λ None) or on θ_0 + λ·(θ − θ_0)
Need = tuple[str, float | None]


def cycle_pairs(tasks: Sequence[str]) -> tuple[Group, ...]:
    """(t_1, t_2), (t_2, t_3), ..., (t_T, t_1): every task in two pairs, once first (the base of the
    methods whose base is one of the two models) and once second."""
    return tuple((tasks[i], tasks[(i + 1) % len(tasks)]) for i in range(len(tasks)))


def all_pairs(tasks: Sequence[str]) -> tuple[Group, ...]:
    return tuple(itertools.combinations(tasks, 2))


def cut(values: Sequence[Any], keep: int | None) -> tuple[Any, ...]:
    """A grid cut to ``keep`` values (the middle one when keep is 1; smoke runs), or whole."""
    values = tuple(values)
    if keep is None or len(values) <= keep:
        return values
    if keep == 1:
        return (values[(len(values) - 1) // 2],)
    return tuple(values[round(i * (len(values) - 1) / (keep - 1))] for i in range(keep))


def grid_points(spec: MethodSpec, keep: int | None = None) -> list[dict[str, Any]]:
    """Every combination of the method's grid, in grid order (``[{}]`` when it has none)."""
    grid = {name: cut(values, keep) for name, values in spec.grid.items()}
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def choose(candidates: Sequence[tuple[Any, float]]) -> int:
    """Index of the best score; among equal scores (to 12 digits) the earliest, i.e. the smallest λ and
    the first grid point."""
    return max(range(len(candidates)), key=lambda i: (round(candidates[i][1], 12), -i))


def describe(spec: MethodSpec, params: Mapping[str, Any], lam: float | None) -> str:
    """The chosen point in words: ``density 0.2, λ 0.5``; methods with nothing to search say why."""
    parts = []
    for name, value in params.items():
        if name == "with_base":
            parts.append("task vectors (with base)" if value else "weights (no base)")
        elif isinstance(value, bool):
            parts.append(f"{name} {str(value).lower()}")
        else:
            parts.append(f"{name} {value:g}")
    if lam is not None:
        parts.append(f"λ {lam:g}")
    return ", ".join(parts) if parts else f"nothing to tune ({spec.untuned})" if spec.untuned else "nothing to tune"


def library_fingerprint() -> str:
    """Hash of the mergekit_lite sources the CLI runs (part of every cache key)."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "mergekit_lite").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# -- running and scoring merges ------------------------------------------------------------------
@dataclass
class Job:
    """One recipe to merge with the CLI and the scores wanted from it on ``tasks``."""

    name: str  #: readable file stem: method/group/point
    recipe: dict[str, Any]
    tasks: Group
    needs: tuple[Need, ...]


def tag(need: Need) -> str:
    split, lam = need
    return split if lam is None else f"{split}@{lam:g}"


class Runner:
    """Merges recipes with ``mergekit-lite run`` and scores the outputs, through a cache of scores."""

    def __init__(self, suite: Suite, runs: Path, base: State, workers: int, use_cache: bool = True):
        self.suite, self.runs, self.base, self.workers, self.use_cache = suite, runs, base, workers, use_cache
        self.salt = f"{suite.key()}:{library_fingerprint()}"
        self.cache = suite.root / "cache" / "merges"
        self.states: dict[str, State] = {}  #: this run's merged outputs, by cache key (kept for later λ and test)
        self.merged = 0  #: CLI merges run
        self.reused = 0  #: merges not run because an earlier run's cache had every score wanted
        self.reused_seconds = 0.0  #: wall time those merges took when they ran (recorded in the cache)
        self.seconds: dict[str, float] = {}  #: wall time of this run's CLI merges (merge and read back)
        self._written: set[str] = set()  #: cache entries written by this run
        self._lock = threading.Lock()

    def key(self, recipe: Mapping[str, Any]) -> str:
        return hashlib.sha256(json.dumps([recipe, self.salt], sort_keys=True, default=str).encode()).hexdigest()[:24]

    def _load(self, key: str) -> dict[str, Any]:
        path = self.cache / f"{key}.json"
        if self.use_cache and path.is_file():
            return json.loads(path.read_text())
        return {}

    def _state(self, key: str, job: Job) -> State:
        if key not in self.states:
            started = time.perf_counter()
            recipe = merge.write_recipe(self.runs / "recipes" / f"{job.name}.yml", job.recipe, f"{job.name} (written by benchmarks/quality/run.py)")
            out = merge.merge(recipe, self.runs / "merged" / key)
            self.states[key] = read_state(out)
            merge.remove(out)
            self.seconds[key] = time.perf_counter() - started
            with self._lock:
                self.merged += 1
        return self.states[key]

    def _derived(self, state: State, lam: float | None) -> State:
        if lam is None or lam == 1.0:
            return state
        return {k: self.base[k] + lam * (state[k] - self.base[k]) for k in state}

    def scores(self, job: Job) -> dict[str, dict[str, float]]:
        """``{tag(need): {task: accuracy}}`` for every need of the job; merges only when the cache lacks one."""
        key = self.key(job.recipe)
        entry = self._load(key)
        missing = [need for need in job.needs if tag(need) not in entry.get("scores", {})]
        if missing:
            state = self._state(key, job)
            scores = entry.setdefault("scores", {})
            for split, lam in missing:
                scores[tag((split, lam))] = self.suite.accuracies(self._derived(state, lam), split, job.tasks)
            entry["recipe"] = job.recipe
            if key in self.seconds:
                entry["merge_seconds"] = round(self.seconds[key], 2)
            self.cache.mkdir(parents=True, exist_ok=True)
            tmp = self.cache / f"{key}.json.tmp{threading.get_ident()}"
            tmp.write_text(json.dumps(entry, indent=1, default=str) + "\n")
            tmp.replace(self.cache / f"{key}.json")
            self._written.add(key)
        elif key not in self._written and key not in self.states:
            with self._lock:
                self._written.add(key)
                self.reused += 1
                self.reused_seconds += entry.get("merge_seconds", 0.0)
        return {tag(need): entry["scores"][tag(need)] for need in job.needs}

    def run(self, jobs: Sequence[Job]) -> list[dict[str, dict[str, float]]]:
        """Every job's scores, ``workers`` CLI merges at a time; jobs with the same recipe merge once."""
        by_key: dict[str, Job] = {}
        for job in jobs:
            key = self.key(job.recipe)
            if key in by_key:
                first = by_key[key]
                by_key[key] = replace(first, needs=tuple(dict.fromkeys(first.needs + job.needs)))
            else:
                by_key[key] = job
        done = dict(zip(by_key, merge.parallel(self.scores, list(by_key.values()), self.workers)))
        return [{tag(n): done[self.key(job.recipe)][tag(n)] for n in job.needs} for job in jobs]

    def forget(self) -> None:
        self.states.clear()


# -- the search of one method over groups of tasks -----------------------------------------------
RecipeBuilder = Callable[[MethodSpec, Group, Mapping[str, Any], "float | None"], dict[str, Any]]


@dataclass
class MethodSearch:
    """One method's validation search over ``groups``; jobs are handed out phase by phase."""

    spec: MethodSpec
    groups: tuple[Group, ...]
    build: RecipeBuilder
    points: list[dict[str, Any]]
    lambdas: tuple[float, ...]
    extension: tuple[float, ...]
    finetuned_val: Mapping[str, float]
    finetuned_test: Mapping[str, float]
    #: merge the chosen point again with the CLI at its λ (the 8-task table), rather than scoring the derived one (pairs)
    confirm: bool = True
    #: (point index, λ) -> score, in search order
    scores: dict[tuple[int, float | None], float] = field(default_factory=dict)
    extended: bool = False
    test: list[dict[str, float]] = field(default_factory=list)
    #: validation accuracy of the chosen point's own CLI merge, per group
    val: list[dict[str, float]] = field(default_factory=list)
    #: largest |validation accuracy of the CLI's own λ merge − the derived one| over groups and tasks
    val_check: float | None = None

    def _name(self, group: Group, point: Mapping[str, Any], lam: float | None) -> str:
        where = "all" if len(group) > 2 else "+".join(group)
        what = ",".join(f"{k}={v:g}" if not isinstance(v, bool) else f"{k}={v}" for k, v in point.items()) or "fixed"
        return f"{self.spec.key}/{where}/{what}" + ("" if lam is None else f",lambda={lam:g}")

    def _source(self, group: Group, i: int, lambdas: Sequence[float]) -> Job:
        """The merge of point i (at λ = 1 when scaled) and the validation scores wanted from it."""
        lam = 1.0 if self.spec.scaled else None
        needs = tuple(("val", x) for x in lambdas) if self.spec.scaled else (("val", None),)
        point = self.points[i]
        return Job(self._name(group, point, lam), self.build(self.spec, group, point, lam), group, needs)

    def source_jobs(self, lambdas: Sequence[float] | None = None) -> list[Job]:
        return [self._source(g, i, lambdas or self.lambdas) for i in range(len(self.points)) for g in self.groups]

    def record(self, results: Sequence[Mapping[str, Mapping[str, float]]], lambdas: Sequence[float] | None = None) -> None:
        """Score each (point, λ) from the source jobs' results (same order as ``source_jobs``)."""
        lams: Sequence[float | None] = (lambdas or self.lambdas) if self.spec.scaled else (None,)
        it = iter(results)
        for i in range(len(self.points)):
            per_group = [next(it) for _ in self.groups]
            for lam in lams:
                key = tag(("val", lam))
                self.scores[i, lam] = sum(self._normalized(g, r[key], self.finetuned_val) for g, r in zip(self.groups, per_group)) / len(self.groups)

    def _normalized(self, group: Group, acc: Mapping[str, float], reference: Mapping[str, float]) -> float:
        return sum(acc[t] / reference[t] for t in group) / len(group)

    def best(self) -> tuple[int, float | None]:
        order = sorted(self.scores, key=lambda k: (k[0], -1.0 if k[1] is None else k[1]))
        return order[choose([(k, self.scores[k]) for k in order])]

    def needs_extension(self) -> bool:
        return self.spec.scaled and bool(self.extension) and not self.extended and self.best()[1] == max(self.lambdas)

    def extension_jobs(self) -> list[Job]:
        self.extended = True
        return self.source_jobs(self.extension)

    def final_jobs(self) -> list[Job]:
        """The chosen point, scored on validation and test: merged again by the CLI at its λ when ``confirm``,
        else θ_0 + λ·(θ_1 − θ_0) from the source merge (methods without λ: the source merge itself)."""
        i, lam = self.best()
        point = self.points[i]
        if self.spec.scaled and not self.confirm:
            return [replace(self._source(g, i, [lam]), needs=(("val", lam), ("test", lam))) for g in self.groups]
        return [Job(self._name(g, point, lam), self.build(self.spec, g, point, lam), g, (("val", None), ("test", None))) for g in self.groups]

    def merges(self) -> int:
        """CLI merges this search needs: one per grid point and group, plus the chosen λ's own merge when confirmed."""
        again = self.spec.scaled and self.confirm and self.lam != 1.0
        return len(self.points) * len(self.groups) + (len(self.groups) if again else 0)

    def check_jobs(self) -> list[Job]:
        """The derived validation scores at the chosen λ (already cached), to compare with the CLI's own λ merge."""
        if not (self.spec.scaled and self.confirm):
            return []
        i, lam = self.best()
        return [self._source(g, i, [lam]) for g in self.groups]

    # -- results ---------------------------------------------------------------------------------
    @property
    def grid(self) -> dict[str, list[Any]]:
        """The grid actually searched (smoke runs cut it), by parameter."""
        return {name: list(dict.fromkeys(p[name] for p in self.points)) for name in self.spec.grid}

    @property
    def params(self) -> dict[str, Any]:
        return self.points[self.best()[0]]

    @property
    def lam(self) -> float | None:
        return self.best()[1]

    def chosen_text(self) -> str:
        return describe(self.spec, self.params, self.lam)

    def test_normalized(self) -> list[float]:
        """Average normalized test accuracy of each group at the chosen point."""
        return [self._normalized(g, acc, self.finetuned_test) for g, acc in zip(self.groups, self.test)]

    def test_by_task(self) -> dict[str, float]:
        """Test accuracy per task (the 8-task protocol has one group)."""
        assert len(self.groups) == 1
        return dict(self.test[0])

    def curve(self) -> dict[float, float]:
        """Score per λ at the chosen grid point."""
        i = self.best()[0]
        return {lam: s for (j, lam), s in sorted(self.scores.items(), key=lambda kv: kv[0][1] or 0.0) if j == i and lam is not None}

    def spread(self) -> tuple[float, float]:
        """Lowest and highest score over the grid points, each at its best λ."""
        best_per_point = [max(s for (j, _), s in self.scores.items() if j == i) for i in range(len(self.points))]
        return min(best_per_point), max(best_per_point)

    def to_json(self) -> dict[str, Any]:
        i, lam = self.best()
        return {
            "label": self.spec.label, "method": self.spec.merge_method, "fixed": dict(self.spec.parameters),
            "grid": self.grid, "points": self.points,
            "lambdas": sorted({x for (_, x) in self.scores if x is not None}) if self.spec.scaled else None,
            "groups": [list(g) for g in self.groups],
            "val_normalized": [{"point": j, "lambda": x, "score": s} for (j, x), s in self.scores.items()],
            "chosen": {"point": self.points[i], "lambda": lam, "val_normalized": self.scores[i, lam], "text": self.chosen_text()},
            "val": self.val, "test": self.test, "test_normalized": self.test_normalized(), "val_check": self.val_check,
            "confirmed_by_cli": self.spec.scaled and self.confirm, "merges": self.merges(),
        }


def search_all(searches: Sequence[MethodSearch], runner: Runner, log: Callable[[str], None]) -> None:
    """Run every method's search, phase by phase, so that each phase's CLI merges run ``workers`` at a time."""
    jobs = [search.source_jobs() for search in searches]
    log(f"  grid: {sum(map(len, jobs))} merges to score")
    flat = runner.run([job for batch in jobs for job in batch])
    for search, batch in zip(searches, jobs):
        search.record(flat[: len(batch)])
        flat = flat[len(batch):]
    edge = [s for s in searches if s.needs_extension()]
    if edge:
        log(f"  best λ at the grid's edge for {', '.join(s.spec.label for s in edge)}: extending to {', '.join(f'{x:g}' for x in edge[0].extension)}")
        jobs = [s.extension_jobs() for s in edge]
        flat = runner.run([job for batch in jobs for job in batch])
        for search, batch in zip(edge, jobs):
            search.record(flat[: len(batch)], search.extension)
            flat = flat[len(batch):]
    finals = [s.final_jobs() for s in searches]
    checks = [s.check_jobs() for s in searches]
    log(f"  chosen points: {sum(map(len, finals))} merges (scaled methods: the CLI's own λ)")
    flat = runner.run([job for batch in finals for job in batch])
    derived = runner.run([job for batch in checks for job in batch])
    for search, batch, check in zip(searches, finals, checks):
        results, flat = flat[: len(batch)], flat[len(batch):]
        search.test = [dict(next(v for k, v in r.items() if k.startswith("test"))) for r in results]
        search.val = [dict(next(v for k, v in r.items() if k.startswith("val"))) for r in results]
        if check:
            mine, derived = derived[: len(check)], derived[len(check):]
            lam = search.lam
            search.val_check = max(abs(r["val"][t] - d[tag(("val", lam))][t]) for r, d in zip(results, mine) for t in r["val"])

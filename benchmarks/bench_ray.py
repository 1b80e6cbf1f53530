"""The Ray executor's scale, on paper and measured where it can be.

Measured here: a model-scope TIES merge and a TALL-masks compression of 3 synthetic fine-tunes
(a 41M-parameter Llama-shaped model, float32) with the local executor, and with Ray on 1 and on 2
workers (one torch thread each). Each pass's per-worker rate is taken from the 1-worker run's
share logs (input entries per second of share time), and the 2-worker time is predicted from it
and compared with the measured one.

On paper, from those rates: an 8 × 70B TIES merge (scope: model, bfloat16 inputs, float32
arithmetic: 4 passes) and a 100-checkpoint TALL compression of a 7B model on N workers: time,
bytes read and written per worker, memory per worker, passes, and the driver's work; a plot of
predicted time against N.

    .venv/bin/python benchmarks/bench_ray.py [--write]    # --write appends the figures to BENCHMARKS.md

The machine is shared (2 cores, other jobs running): run it once, not in a loop.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mergekit_lite as mkl  # noqa: E402
from mergekit_lite.demo import build_demo  # noqa: E402
from mergekit_lite.methods import get_method  # noqa: E402
from mergekit_lite.plan import INTERPRETER_BYTES, plan as make_plan  # noqa: E402
from mergekit_lite.ray_executor import RayExecutor  # noqa: E402
from mergekit_lite.recipe import Recipe  # noqa: E402

WORK = ROOT / "benchmarks" / "work" / "ray"
CONFIG = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, vocab_size=8192, num_attention_heads=12, num_key_value_heads=12)
PLOT = ROOT / "benchmarks" / "ray_scaling.png"
#: assumed aggregate read bandwidth of the shared file system the workers read from (bytes/s)
STORAGE = 10e9
GiB = 2**30


def recipes(folders: dict[str, Path]) -> dict[str, dict]:
    models = [{"model": str(folders[t])} for t in ("math", "code", "chat")]
    return {
        "ties_model_scope": {"merge_method": "ties", "base_model": str(folders["base"]),
                             "models": [{**m, "parameters": {"density": 0.2, "weight": 1.0}} for m in models],
                             "parameters": {"scope": "model"}},
        "tall_masks": {"merge_method": "tall_masks", "base_model": str(folders["base"]), "models": models,
                       "parameters": {"tall_lambda": 0.4}},
    }


@dataclass
class Pass:
    description: str
    seconds: float
    entries: int  # input entries read (parameters × checkpoints)
    share_seconds: float  # summed over the shares (the workers' busy time)


def timed_run(recipe: dict, out: Path, executor: RayExecutor | None) -> tuple[float, list[Pass]]:
    """Wall time of one run and, with Ray, each pass (executor.run call) with its entries and the workers' busy time."""
    passes: list[Pass] = []
    if executor is not None:
        real = executor.__class__.run.__get__(executor)  # the unwrapped method (this function wraps it once per run)

        def run(plan, device, part, names, sizes, args=(), **kw):  # type: ignore[no-untyped-def]
            start_log, start = len(executor.log), time.perf_counter()
            result = real(plan, device, part, names, sizes, args, **kw)
            entries = sum(plan.info(r).numel for job in plan.jobs if job.name in set(names) for r in job.reads)
            log = executor.log[start_log:]
            passes.append(Pass(kw.get("description", "merging"), time.perf_counter() - start, entries, sum(e.seconds for e in log)))
            return result

        executor.run = run  # type: ignore[method-assign]
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    mkl.run(Recipe.from_dict(recipe), out, progress=False, executor=executor, force=True)
    return time.perf_counter() - start, passes


def predict(passes: list[Pass], workers: int, overhead: float) -> float:
    """Time on ``workers`` workers: each pass's entries at the 1-worker rate, split evenly, plus the fixed overhead."""
    return overhead + sum(p.share_seconds / workers for p in passes)


def measure() -> dict[str, dict]:
    import ray

    torch.set_num_threads(1)  # one thread per worker (and the same count on the driver: the same bytes)
    folders = build_demo(WORK / "demo", seed=0, config_overrides=CONFIG) if not (WORK / "demo" / "checkpoints" / "base").exists() else {
        n: WORK / "demo" / "checkpoints" / n for n in ("base", "math", "code", "chat")}
    results: dict[str, dict] = {}
    for name, recipe in recipes(folders).items():
        timed_run(recipe, WORK / "out" / "local", None)  # the inputs in the page cache, as for the Ray runs after their warm-up
        local, _ = timed_run(recipe, WORK / "out" / "local", None)
        results[name] = {"local": local}
    for workers in (1, 2):
        ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        executor = RayExecutor()
        timed_run(recipes(folders)["tall_masks"], WORK / "out" / "warm", executor)  # workers started and imported once
        for name, recipe in recipes(folders).items():
            executor.log.clear()
            wall, passes = timed_run(recipe, WORK / "out" / f"ray{workers}", executor)
            results[name][workers] = {"wall": wall, "passes": passes}
        ray.shutdown()
    for name, r in results.items():
        one = r[1]
        busy = sum(p.share_seconds for p in one["passes"])
        r["overhead"] = one["wall"] - busy  # planning, reserving, scheduling, reductions, commit: not split by workers
        r["predicted_2"] = predict(one["passes"], 2, r["overhead"])
        r["rate"] = {p.description: p.entries / p.share_seconds for p in one["passes"]}  # entries per second per worker
    with _plan(recipes(folders)["ties_model_scope"]) as p:
        results["params"] = sum(j.out.numel for j in p.jobs)
    return results


class _plan:
    """A plan as a context manager (closed afterwards)."""

    def __init__(self, recipe: dict):
        self.plan = make_plan(Recipe.from_dict(recipe))

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self.plan

    def __exit__(self, *exc: object) -> None:
        self.plan.close()


# -- on paper -------------------------------------------------------------------------------------
@dataclass
class Scenario:
    name: str
    params: float  # parameters of one model
    largest: float  # entries of its largest tensor
    models: int  # checkpoints read per pass (fine-tunes + base)
    tasks: int
    passes: list[tuple[str, float]]  # (kind of pass, fraction of the checkpoints it reads)
    written: float  # bytes written
    method: str
    stored_bytes: int = 2  # bfloat16 inputs


def scenarios() -> list[Scenario]:
    p70, big70 = 70.6e9, 128256 * 8192  # Llama-3-70B: its embedding (and head) the largest tensor
    p7, big7 = 6.74e9, 32000 * 4096  # Llama-2-7B
    return [
        Scenario("8 × 70B TIES (scope: model)", p70, big70, 9, 8,
                 [("TIES thresholds", 1.0), ("TIES thresholds", 1.0), ("TIES majority sign", 1.0), ("merging", 1.0)],
                 p70 * 2, "ties"),
        Scenario("100-checkpoint TALL compression (7B)", p7, big7, 101, 100, [("compressing", 1.0)],
                 p7 * 4 + 100 * p7 / 8, "tall_masks"),
    ]


def rate_for(kind: str, measured: dict) -> float:
    """Entries per second per worker for a kind of pass (TIES passes from the TIES run, compression from TALL's)."""
    if kind == "compressing":
        return measured["tall_masks"]["rate"]["compressing"]
    return measured["ties_model_scope"]["rate"][kind]


def paper_time(s: Scenario, workers: int, measured: dict) -> float:
    """Predicted seconds: per pass, the larger of compute (entries over N workers at the measured rate) and
    storage (bytes over the shared file system's bandwidth), plus the driver's per-pass overhead."""
    total = 0.0
    overhead = measured["ties_model_scope"]["overhead"] / 4  # per pass, as measured here (planning, scheduling, reduce)
    for kind, fraction in s.passes:
        entries = s.params * s.models * fraction
        compute = entries / (workers * rate_for(kind, measured))
        storage = entries * s.stored_bytes / STORAGE
        total += max(compute, storage) + overhead
    return total


def paper_table(measured: dict) -> list[str]:
    lines = ["| workload | N workers | predicted time | read / worker | written / worker | memory / worker | passes | driver work |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in scenarios():
        method = get_method(s.method)
        memory = INTERPRETER_BYTES + s.largest * (method.working_copies(s.tasks) * 4 + 4)
        read = s.params * s.models * s.stored_bytes * sum(f for _, f in s.passes)
        for n in (1, 8, 64, 256):
            shares = 4 * n
            driver = (f"{len(s.passes) - 1} reductions of {shares} × {s.tasks} selectors (~{s.tasks * 65538 * 16 / 2**20:.0f} MiB each)"
                      if s.method == "ties" else f"{shares} shares' per-task sums and mask counts (~{s.tasks ** 2 * 8 / 1024:.0f} KiB each)")
            lines.append(f"| {s.name} | {n} | {_hours(paper_time(s, n, measured))} | {read / n / GiB:,.0f} GiB | "
                         f"{s.written / n / GiB:.1f} GiB | {memory / GiB:.0f} GiB | {len(s.passes)} | {driver} |")
    return lines


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def plot(measured: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [2**i for i in range(0, 11)]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in scenarios():
        ax.plot(ns, [paper_time(s, n, measured) / 3600 for n in ns], marker="o", label=s.name)
        floor = sum(s.params * s.models * f * s.stored_bytes / STORAGE for _, f in s.passes) / 3600
        ax.axhline(floor, linestyle=":", color=ax.lines[-1].get_color(), linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("Ray workers (one CPU thread each, rate measured on this machine)")
    ax.set_ylabel("predicted time (hours)")
    ax.set_title(f"Predicted time against workers (dotted: storage at {STORAGE / 1e9:.0f} GB/s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def report(measured: dict) -> str:
    lines = [
        "## Ray executor",
        "",
        "`benchmarks/bench_ray.py --write` (run once: the machine has 2 cores shared with other jobs, so the "
        "2-worker figures are what two workers got on a busy machine). A 41M-parameter Llama-shaped model "
        f"({measured['params'] / 1e6:.0f}M parameters, float32), 3 fine-tunes; every Ray worker and the local run use one torch thread. "
        "Every output below was byte-identical to the local executor's (tests/test_ray.py checks each method family).",
        "",
        "| workload | local | Ray, 1 worker | Ray, 2 workers (measured) | Ray, 2 workers (predicted) | per-worker rate |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in ("ties_model_scope", "tall_masks"):
        r = measured[name]
        rates = "; ".join(f"{k}: {v / 1e6:.0f}M entries/s" for k, v in r["rate"].items())
        lines.append(f"| {name} | {r['local']:.1f} s | {r[1]['wall']:.1f} s | {r[2]['wall']:.1f} s | {r['predicted_2']:.1f} s | {rates} |")
    lines += [
        "",
        "Predicted 2-worker time = the 1-worker run's fixed part (planning, reserving the shards, scheduling, reductions, "
        "commit: wall time minus the workers' busy time) + its busy time / 2. An entry is one parameter of one checkpoint read.",
        "",
        "On paper, from those rates (one CPU thread per worker; bfloat16 inputs; a shared file system assumed to deliver "
        f"{STORAGE / 1e9:.0f} GB/s in all, which bounds every pass from below; 4 shares per worker; memory per worker from "
        "the method's declared working copies of the largest tensor):",
        "",
        *paper_table(measured),
        "",
        "Bytes written per worker: each worker writes its own tensors at their offsets in the shared output shards; the driver "
        "writes only the headers, the index and the support files. The TIES merge reads every checkpoint 4 times (2 threshold "
        "passes for float32, the majority-sign pass, the merge); the TALL compression reads each once. A worker's memory does not "
        "grow with N or with the model size: it is the largest tensor's working copies. The 100-task TALL compression holds the "
        "100 task vectors of one tensor at once: that, not time, is what needs large workers.",
        "",
        "![predicted time against workers](benchmarks/ray_scaling.png)",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="append the section to BENCHMARKS.md")
    args = parser.parse_args()
    measured = measure()
    plot(measured)
    text = report(measured)
    print(text)
    if args.write:
        with open(ROOT / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()

"""``--device cuda`` against ``--device cpu`` for every method on one model: the outputs compared tensor by tensor and
both wall times recorded (issue 12's GPU goal). Runs where a CUDA device is; writes a markdown table.

    python benchmarks/gpu_check.py --size 40m --k 4 --out RESULTS.md [--methods ...]

Each method runs the recipe ``bench_speed.py`` writes for it (mergekit's parameters where mergekit has the method),
once on each device, in a fresh process (``python -m mergekit_lite.cli run RECIPE OUT -q --force --device D``; each
wall time includes start-up). Equal: every tensor bit for bit; else how many entries differ, the largest absolute
difference, whether it is within 1e-6 of the largest magnitude (float32 arithmetic in another order on the GPU),
and the largest difference relative to its tensor's largest update |θ − θ_0|.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_speed  # noqa: E402  (the models and recipes of the speed benchmark)


def load(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


@dataclass
class Comparison:
    """How the two devices' outputs compare: bit for bit, else where and by how much."""

    same: bool
    worst: float = 0.0  # the largest |cpu − cuda|
    scale: float = 0.0  # the largest |cpu|
    entries: int = 0  # entries that differ
    relative: float = 0.0  # the largest |cpu − cuda| over its tensor's largest |cpu − θ_0| (the merge's update)


def compare(cpu: Path, gpu: Path, base: Path | None) -> Comparison:
    """Every tensor of the two outputs, bit for bit; where they differ, the entries and their sizes."""
    a, b = load(cpu), load(gpu)
    if a.keys() != b.keys() or any(x.dtype != b[n].dtype or x.shape != b[n].shape for n, x in a.items()):
        return Comparison(False, float("inf"))
    theta0 = load(base) if base is not None else {}
    result = Comparison(True)
    for name, x in a.items():
        y = b[name]
        result.scale = max(result.scale, float(x.float().abs().max()))
        bits = torch.int16 if x.element_size() == 2 else torch.int32
        apart = x.view(bits) != y.view(bits)
        if not apart.any():
            continue
        difference = float((x.float() - y.float()).abs().max())
        update = float((x.float() - theta0[name].float()).abs().max()) if name in theta0 else float("nan")
        result.same = False
        result.worst = max(result.worst, difference)
        result.relative = max(result.relative, difference / update if update > 0 else float("inf"))
        result.entries += int(apart.sum())
    return result


def run(recipe: Path, out: Path, device: str, timeout: float) -> tuple[float, int, str]:
    cmd = [sys.executable, "-m", "mergekit_lite.cli", "run", str(recipe), str(out), "-q", "--force", "--device", device]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, -1, "timed out"
    return time.perf_counter() - t0, done.returncode, (done.stderr.strip().splitlines() or [""])[-1]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="40m", choices=sorted(bench_speed.SIZES))
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2
    from mergekit_lite.methods import METHODS

    model = bench_speed.build_model(args.size, args.k, args.work, print)
    shared = [m for m in bench_speed.MERGEKIT_RECIPES if m in METHODS]
    methods = args.methods or shared + sorted(set(METHODS) - set(shared))  # mergekit's methods first
    rows = [f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; model {args.size}, K = {args.k} (or the K a method takes)", "",
            "| method | K | cpu wall (s) | cuda wall (s) | cpu ÷ cuda | output | largest difference | of its tensor's largest update | largest magnitude |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    args.out.write_text("\n".join(rows) + "\n")
    for method in methods:
        k = next((k for k in (args.k, 1, 2) if not bench_speed.runs_at(method, k)), None)
        if k is None:
            continue
        if k > args.k:
            bench_speed.build_model(args.size, k, args.work, print)
        recipe = args.work / "recipes" / f"{method}.yml"
        bench_speed.write_recipe(recipe, method, model, k)
        cpu_time, cpu_rc, cpu_err = run(recipe, args.work / "out-cpu", "cpu", args.timeout)
        gpu_time, gpu_rc, gpu_err = run(recipe, args.work / "out-cuda", "cuda", args.timeout)
        if cpu_rc != 0 or gpu_rc != 0:
            line = f"| {method} | {k} | {cpu_time:.2f} | {gpu_time:.2f} | — | failed: cpu {cpu_rc} {cpu_err!r}; cuda {gpu_rc} {gpu_err!r} | | | |"
        else:
            c = compare(args.work / "out-cpu", args.work / "out-cuda", model.base)
            verdict = "bit for bit" if c.same else ("within 1e-6 of the largest magnitude" if c.worst <= 1e-6 * max(c.scale, 1.0) else "DIFFERS")
            if not c.same:
                verdict += f"; {c.entries} entries"
            line = (f"| {method} | {k} | {cpu_time:.2f} | {gpu_time:.2f} | {cpu_time / gpu_time:.2f} | {verdict} | {c.worst:.3g} | "
                    f"{c.relative:.3g} | {c.scale:.3g} |")
        print(line, flush=True)
        with args.out.open("a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Load: many fine-tunes, and models with many tensors — memory must stay flat, time linear.

(a) task arithmetic and TIES (model scope) over K = 8, 16, 32 fine-tunes of the demo-size model;
(b) task arithmetic over models of 1,000, 5,000 and 10,000 small tensors (K = 2).
Each run is a separate `mergekit-lite run` process: wall time and its own peak RSS (wait4).

    .venv/bin/python benchmarks/bench_load.py [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from mergekit_lite.demo import build_demo, finetune_like  # noqa: E402

WORK = ROOT / "benchmarks" / "work" / "load"
CLI = ROOT / ".venv" / "bin" / "mergekit-lite"


def timed(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process, started from bench_speed's small launcher
    (a child forked from this process would report this process's own RSS as its peak)."""
    from bench_speed import run_child

    result = run_child(args)
    if result.rc != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{result.stderr}")
    return result.wall, result.maxrss_kib / 1024


def many_models(k: int) -> tuple[Path, list[Path]]:
    folders = build_demo(WORK / "demo", seed=0) if not (WORK / "demo" / "checkpoints" / "base").exists() else {"base": WORK / "demo" / "checkpoints" / "base"}
    base = folders["base"]
    state = load_file(base / "model.safetensors")
    out = []
    for i in range(k):
        folder = WORK / f"ft{i:02d}"
        if not folder.exists():
            shutil.copytree(base, folder)
            save_file(finetune_like(state, ("math", "code", "chat")[i % 3], 500 + i), folder / "model.safetensors", metadata={"format": "pt"})
        out.append(folder)
    return base, out


def many_tensors(n: int) -> tuple[Path, list[Path]]:
    folders = []
    for role in range(3):
        folder = WORK / f"tensors{n}-{role}"
        if not folder.exists():
            folder.mkdir(parents=True)
            g = torch.Generator().manual_seed(role)
            save_file({f"block.{i}.weight": torch.randn(32, 32, generator=g) for i in range(n)}, folder / "model.safetensors")
        folders.append(folder)
    return folders[0], folders[1:]


def recipe(path: Path, method: str, base: Path, models: list[Path]) -> Path:
    path.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(base), "models": [{"model": str(m), "name": f"m{i}"} for i, m in enumerate(models)]}))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the '### Load' part of BENCHMARKS.md's Reliability section")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    rows_k, rows_n = [], []
    for method in ("task_arithmetic", "ties"):
        for k in (8, 16, 32):
            base, models = many_models(k)
            r = recipe(WORK / f"k{k}-{method}.yml", method, base, models)
            wall, rss = timed([str(CLI), "run", str(r), str(WORK / "out"), "--force", "-q"])
            rows_k.append((method, k, wall, rss))
            print(rows_k[-1], flush=True)
    for n in (1000, 5000, 10000):
        base, models = many_tensors(n)
        r = recipe(WORK / f"n{n}.yml", "task_arithmetic", base, models)
        wall, rss = timed([str(CLI), "run", str(r), str(WORK / "out"), "--force", "-q"])
        startup, _ = timed([str(CLI), "--version"])
        rows_n.append((n, wall, rss, (wall - startup) / n * 1e3))
        print(rows_n[-1], flush=True)
    table_k = "\n".join(
        ["| method | K fine-tunes | wall (s) | wall ÷ K (s) | peak RSS (MiB) |", "|---|---:|---:|---:|---:|"]
        + [f"| {m} | {k} | {w:.2f} | {w / k:.3f} | {r:.0f} |" for m, k, w, r in rows_k]
    )
    table_n = "\n".join(
        ["| tensors | wall (s) | (wall − start-up) per tensor (ms) | peak RSS (MiB) |", "|---:|---:|---:|---:|"]
        + [f"| {n:,} | {w:.2f} | {per:.3f} | {r:.0f} |" for n, w, r, per in rows_n]
    )
    section = (
        "### Load\n\n"
        "Many fine-tunes of the demo model (0.14M parameters; every input is read one tensor at a time):\n\n"
        + table_k
        + "\n\nModels with many small tensors (32×32 float32 each, K = 2, task arithmetic):\n\n"
        + table_n
        + "\n\nCommand: `.venv/bin/python benchmarks/bench_load.py --write` (each figure is one `mergekit-lite run` process; "
        "peak RSS from wait4).\n"
    )
    print(section)
    if args.write:
        path = ROOT / "BENCHMARKS.md"
        text = path.read_text() if path.exists() else "# Benchmarks\n"
        if "### Load" in text:
            text = re.sub(r"### Load\n.*?(?=\n## |\n### |\Z)", section.rstrip("\n") + "\n", text, flags=re.S)
        elif "## Reliability" in text:
            text = text.replace("## Reliability\n", "## Reliability\n\n" + section, 1)
        else:
            text = text.rstrip("\n") + "\n\n## Reliability\n\n" + section
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

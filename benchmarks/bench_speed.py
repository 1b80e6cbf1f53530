#!/usr/bin/env python3
"""Speed and memory benchmark: our CLI against the I/O floor, on synthetic Llama-style checkpoints.

    .venv/bin/python benchmarks/bench_speed.py                     # every registered method, 40M + 250M, K=4
    .venv/bin/python benchmarks/bench_speed.py --methods task_arithmetic --k 4 --write
    .venv/bin/python benchmarks/bench_speed.py --quick             # smoke check: 40M only, 1 repeat

What it does, per model size:
  1. builds (once; reused while the configuration is unchanged) a base checkpoint and K fine-tunes
     under ``benchmarks/work/`` -- sharded safetensors + index + config.json, written tensor by
     tensor so building never holds a whole model in memory;
  2. measures the I/O floor: ``cat`` of every input weight file to /dev/null, plus ``dd`` of one
     file the size of the merged output (no fsync -- the tool does not fsync either);
  3. times ``mergekit-lite run RECIPE OUT --force -q`` as a child process (wall time, and the
     child's peak RSS from ``os.wait4`` in a small launcher process), ``--dry-run`` of the same
     recipe, and ``mergekit-lite --version`` as interpreter start-up.
Every measurement is repeated ``--repeats`` times, interleaved, and the median is reported. The
page cache is warm (inputs are read once before timing starts), for the floor and for our run
alike. Each timed run first waits (``--wait-quiet``) for other processes to leave the CPUs.

See benchmarks/README.md for what the columns mean.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
CLI = VENV / "bin" / "mergekit-lite"
RESULTS = REPO / "BENCHMARKS.md"
SECTION = "## Speed and memory"
INTRO = "# Benchmarks\n\nMeasured results for mergekit-lite; each section is written by a script under `benchmarks/` (see benchmarks/README.md).\n"
MiB = 2**20

#: Bump when the way checkpoints are generated changes: the work folder's cache key includes it.
GENERATOR_VERSION = 1

#: Synthetic model sizes. Parameter counts: 40m -> 39.9M (float32), 250m -> 254.3M (bfloat16).
SIZES: dict[str, dict] = {
    "40m": {
        "dtype": "float32",
        "shard_bytes": 64 * MiB,
        "config": dict(
            vocab_size=32000,
            hidden_size=384,
            intermediate_size=1152,
            num_hidden_layers=8,
            num_attention_heads=6,
            num_key_value_heads=6,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        ),
    },
    "250m": {
        "dtype": "bfloat16",
        "shard_bytes": 200 * MiB,
        "config": dict(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=8,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        ),
    },
}


# -- environment ----------------------------------------------------------------------------------
def ensure_venv() -> None:
    """Refuse clearly without the project's venv; re-run under it when started with another Python."""
    if not VENV_PYTHON.exists() or not CLI.exists():
        sys.exit(
            f"error: the virtual environment is missing ({VENV_PYTHON} or {CLI} not found).\n"
            f"Create it with `make venv` in {REPO}, then run: .venv/bin/python benchmarks/bench_speed.py"
        )
    if Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]])


def machine() -> str:
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    return (
        f"{os.cpu_count()} CPU cores (nproc {len(os.sched_getaffinity(0))}, {cpu}), {mem / 2**30:.1f} GiB RAM, no GPU used; "
        f"Linux {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}"
    )


# -- synthetic checkpoints -------------------------------------------------------------------------
@dataclass
class Model:
    size: str
    dtype: str
    root: Path
    params: int
    stored_bytes: int
    largest: tuple[str, int, int]  # name, numel, stored bytes
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return self.root / "base"

    def finetune(self, i: int) -> Path:
        return self.root / f"ft{i}"


def _llama_config(spec: dict):
    import transformers
    from transformers import LlamaConfig

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return LlamaConfig(**spec["config"], **{key: spec["dtype"]})


def _shapes(config) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes, from a model built on the meta device (no memory, no init)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _cache_key(size: str) -> str:
    spec = SIZES[size]
    blob = json.dumps({"spec": spec, "version": GENERATOR_VERSION}, sort_keys=True)
    return f"llama-{size}-{spec['dtype']}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "little")


def _write_checkpoint(folder: Path, config, shapes: dict[str, tuple[int, ...]], shard_bytes: int, make) -> None:
    """Write sharded safetensors (one shard in memory at a time), the index, and config.json."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[_dtype_name(config)]
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups):
        file_name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in group:
            t = make(name, shapes[name])
            tensors[name] = t.contiguous()
            weight_map[name] = file_name
            total += t.numel() * t.element_size()
        save_file(tensors, str(tmp / file_name), metadata={"format": "pt"})
        del tensors
    with open(tmp / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    (folder / ".complete").write_text("ok\n")


def _dtype_name(config) -> str:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(d).removeprefix("torch.")


def build_model(size: str, k: int, work: Path, log) -> Model:
    """Build (or reuse) the base and fine-tunes ft1..ftK of one size under ``work``."""
    import torch
    from safetensors import safe_open

    spec = SIZES[size]
    dtype = getattr(torch, spec["dtype"])
    config = _llama_config(spec)
    shapes = _shapes(config)
    params = sum(math.prod(s) for s in shapes.values())
    largest_name = max(shapes, key=lambda n: math.prod(shapes[n]))
    largest_numel = math.prod(shapes[largest_name])
    root = work / "models" / _cache_key(size)
    model = Model(size, spec["dtype"], root, params, params * dtype.itemsize, (largest_name, largest_numel, largest_numel * dtype.itemsize), shapes)
    root.mkdir(parents=True, exist_ok=True)

    if not (model.base / ".complete").exists():
        log(f"building {size} base ({params / 1e6:.1f}M parameters, {spec['dtype']}) in {model.base}")
        t0 = time.perf_counter()

        def make_base(name: str, shape: tuple[int, ...]) -> "torch.Tensor":
            gen = torch.Generator().manual_seed(_seed(size, "base", name))
            if len(shape) == 1:  # RMSNorm weights: near one
                return (1.0 + 0.02 * torch.randn(shape, generator=gen)).to(dtype)
            return (0.02 * torch.randn(shape, generator=gen)).to(dtype)

        _write_checkpoint(model.base, config, shapes, spec["shard_bytes"], make_base)
        log(f"  done in {time.perf_counter() - t0:.1f}s")

    for i in range(1, k + 1):
        folder = model.finetune(i)
        if (folder / ".complete").exists():
            continue
        log(f"building {size} fine-tune ft{i} in {folder}")
        t0 = time.perf_counter()
        index = json.loads((model.base / "model.safetensors.index.json").read_text())["weight_map"]
        handles = {f: safe_open(str(model.base / f), framework="pt") for f in sorted(set(index.values()))}

        def make_ft(name: str, shape: tuple[int, ...], i: int = i) -> "torch.Tensor":
            """Base + a sparse edit (1% of entries) + a rank-4 update on matrices; small noise on vectors."""
            gen = torch.Generator().manual_seed(_seed(size, "ft", i, name))
            t = handles[index[name]].get_tensor(name).float()
            flat = t.view(-1)
            if t.dim() == 2:
                n = max(1, flat.numel() // 100)
                idx = torch.randint(0, flat.numel(), (n,), generator=gen)
                flat.index_add_(0, idx, 0.01 * torch.randn(n, generator=gen))
                u = torch.randn(shape[0], 4, generator=gen) * 0.01
                v = torch.randn(4, shape[1], generator=gen) * 0.01
                t.addmm_(u, v)
            else:
                t.add_(torch.randn(shape, generator=gen), alpha=0.002)
            return t.to(dtype)

        _write_checkpoint(folder, config, shapes, spec["shard_bytes"], make_ft)
        handles.clear()
        log(f"  done in {time.perf_counter() - t0:.1f}s")
    return model


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


# -- measuring -------------------------------------------------------------------------------------
#: A tiny launcher (``python -S -I``, ~10 MiB) that starts the measured command and reports its wall
#: time and ``os.wait4`` rusage as JSON. Why not fork the command from this script: on Linux a
#: process's ru_maxrss keeps the high-water mark of the memory it was forked from (exec does not
#: reset it), so a child forked from this script -- which has torch imported and has built models --
#: would report at least this script's RSS (measured: a --dry-run "peaked" at 1188 MiB that way).
_LAUNCHER = r"""
import json, os, signal, subprocess, sys, tempfile, threading, time
timeout = float(sys.argv[1]) or None
with tempfile.TemporaryFile() as err:
    t0 = time.perf_counter()
    proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=err)
    timer = threading.Timer(timeout, proc.kill) if timeout else None
    if timer:
        timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    killed = bool(timer) and not timer.is_alive() and os.WIFSIGNALED(status)
    if timer:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    err.seek(0)
    text = err.read().decode(errors="replace")[-4000:]
print(json.dumps({"wall": wall, "maxrss_kib": usage.ru_maxrss, "rc": proc.returncode, "killed": killed, "stderr": text}))
"""


@dataclass
class RunResult:
    wall: float
    maxrss_kib: int  # ru_maxrss: KiB on Linux
    rc: int
    stderr: str


def run_child(cmd: list[str], timeout: float | None = None) -> RunResult:
    """Run a command from the small launcher: its wall time and its own peak RSS (os.wait4)."""
    launcher = [sys.executable, "-S", "-I", "-c", _LAUNCHER, str(timeout or 0), *cmd]
    done = subprocess.run(launcher, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark launcher failed: {done.stderr.decode(errors='replace')}")
    r = json.loads(done.stdout)
    err = r["stderr"] + (f"\n(killed after {timeout:.0f}s)" if r["killed"] else "")
    return RunResult(r["wall"], r["maxrss_kib"], r["rc"], err)


def background_busy(seconds: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``seconds`` while this benchmark itself is idle: other people's load."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return 1 - (i1 - i0) / max(1, t1 - t0)


def wait_for_quiet(limit: float, threshold: float = 0.2) -> float:
    """Wait (up to ``limit`` seconds) until other processes use under ``threshold`` of the CPUs; returns the last load seen."""
    deadline = time.monotonic() + limit
    busy = background_busy()
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(1.0)
        busy = background_busy()
    return busy


def time_shell(cmd: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def floor_read(files: list[Path]) -> float:
    return time_shell("cat " + " ".join(shlex.quote(str(f)) for f in files) + " > /dev/null")


def floor_write(path: Path, nbytes: int) -> float:
    path.unlink(missing_ok=True)
    t = time_shell(f"dd if=/dev/zero of={shlex.quote(str(path))} bs=16M count={nbytes} iflag=count_bytes status=none")
    path.unlink(missing_ok=True)
    return t


#: Parameters that make each method do its real work (mergekit's default density 1.0 would skip the
#: trim): the papers' settings, as the benchmark has always timed them.
BENCH_PARAMS = {
    "task_arithmetic": "{lambda: 0.5}",
    "ties": "{density: 0.2, scope: model}",
    "dare_linear": "{density: 0.1}",
    "dare_ties": "{density: 0.1}",
    "breadcrumbs": "{density: 0.15, gamma: 0.006, scope: row}",
    "breadcrumbs_ties": "{density: 0.15, gamma: 0.006, scope: row}",
}


def fits(method: str, k: int) -> bool:
    """Whether the method takes K fine-tunes (slerp takes one besides the base, passthrough one model)."""
    from mergekit_lite.methods import METHODS

    m = METHODS[method]
    count = k + (1 if m.inputs == "weights" and m.base != "unused" else 0)
    return m.min_models <= count and (m.max_models is None or count <= m.max_models)


def write_recipe(path: Path, method: str, model: Model, k: int) -> None:
    lines = [f"merge_method: {method}", f"base_model: {json.dumps(str(model.base))}", "models:"]
    for i in range(1, k + 1):
        lines.append(f"  - model: {json.dumps(str(model.finetune(i)))}")
        lines.append(f"    name: ft{i}")
        if method == "task_arithmetic":
            lines.append("    parameters: {weight: 1.0}")
    if method in BENCH_PARAMS:
        lines.append(f"parameters: {BENCH_PARAMS[method]}")
    lines += ["dtype: float32", "tokenizer_source: base", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def check_task_arithmetic(out: Path, model: Model, k: int) -> str:
    """Spot-check one small tensor of the output against θ_0 + 0.5·Σ(θ_t − θ_0), computed here."""
    import torch
    from safetensors import safe_open

    def get(folder: Path, name: str) -> torch.Tensor:
        index_file = folder / "model.safetensors.index.json"
        if index_file.exists():
            file = folder / json.loads(index_file.read_text())["weight_map"][name]
        else:
            file = folder / "model.safetensors"
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name)

    name = "model.layers.0.self_attn.k_proj.weight"
    base = get(model.base, name).float()
    expect = base + 0.5 * sum(get(model.finetune(i), name).float() - base for i in range(1, k + 1))
    got = get(out, name)
    expect = expect.to(got.dtype).float()
    err = (got.float() - expect).abs().max().item()
    tol = 1e-5 if got.dtype == torch.float32 else 2 * 2**-8 * expect.abs().max().item()
    return "ok" if err <= tol else f"MISMATCH on {name}: max |error| {err:.3g} > {tol:.3g}"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@dataclass
class Row:
    size: str
    model: Model
    k: int
    method: str
    wall: float
    startup: float
    read: float
    write: float
    rss_mib: float
    dry_rss_mib: float
    dry_wall: float
    read_bytes: int
    write_bytes: int
    check: str = ""
    error: str = ""
    walls: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)

    @property
    def floor(self) -> float:
        return self.read + self.write


def profile_once(recipe: Path, out: Path, prof: Path, log) -> None:
    """cProfile one run of the CLI and print where the time goes."""
    import pstats

    shutil.rmtree(out, ignore_errors=True)
    prof.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(VENV_PYTHON), "-m", "cProfile", "-o", str(prof), "-m", "mergekit_lite.cli", "run", str(recipe), str(out), "--force", "-q"]
    log("profiling: " + " ".join(shlex.quote(c) for c in cmd))
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    stats = pstats.Stats(str(prof), stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)


# -- report ----------------------------------------------------------------------------------------
def fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def tables(rows: list[Row]) -> str:
    out = [
        "| model | params | dtype | K | method | ours wall (s, median) | floor (s) | ratio ours/floor | ratio (ours − startup)/floor "
        "| peak RSS (MiB) | largest tensor (MiB) | peak RSS ÷ largest tensor |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r.model
        largest = m.largest[2] / MiB
        if r.error:
            out.append(f"| {r.size} | {fmt_params(m.params)} | {m.dtype} | {r.k} | {r.method} | failed: {r.error} | {r.floor:.2f} | | | | {largest:.1f} | |")
            continue
        out.append(
            f"| {r.size} | {fmt_params(m.params)} | {m.dtype} | {r.k} | {r.method} | {r.wall:.2f} | {r.floor:.2f} "
            f"| {r.wall / r.floor:.1f} | {(r.wall - r.startup) / r.floor:.1f} | {r.rss_mib:.0f} | {largest:.1f} | {r.rss_mib / largest:.1f} |"
        )
    out += [
        "",
        "Floor breakdown and start-up (medians; the floor is `cat` of every input weight file to /dev/null plus `dd` of one "
        "file of the output's size, both with a warm page cache and no fsync):",
        "",
        "| model | K | method | read (GB) | read (s) | read (GB/s) | write (GB) | write (s) | start-up `--version` (s) | `--dry-run` (s) "
        "| ours − start-up (s) | ours, every repeat (s) | other CPU load before each (%) | output check |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.size} | {r.k} | {r.method} | {r.read_bytes / 1e9:.2f} | {r.read:.3f} | {r.read_bytes / 1e9 / r.read:.1f} | {r.write_bytes / 1e9:.2f} "
            f"| {r.write:.3f} | {r.startup:.2f} | {r.dry_wall:.2f} | {(r.wall - r.startup):.2f} | {', '.join(f'{w:.2f}' for w in r.walls)} "
            f"| {', '.join(f'{b * 100:.0f}' for b in r.busy)} | {r.check or ('failed' if r.error else 'not checked')} |"
        )
    # memory-vs-size table: one row per size, for the first method/K measured for it
    out += [
        "",
        "Peak memory does not grow with the model: it is the interpreter (the RSS of a `--dry-run`, which imports everything "
        "and opens every header but reads no tensor data) plus a few working copies of the largest tensor in the compute dtype "
        "(float32).",
        "",
        "| model | params | dtype | one model on disk (MiB) | K | method | dry-run RSS (MiB) | peak RSS (MiB) | peak − dry-run (MiB) "
        "| largest tensor in float32 (MiB) | (peak − dry-run) ÷ largest float32 tensor | peak RSS ÷ one model's size |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    firsts: dict[str, Row] = {}
    for r in rows:
        if not r.error and r.size not in firsts:
            firsts[r.size] = r
    for size, r in firsts.items():
        m = r.model
        f32 = m.largest[1] * 4 / MiB
        extra = r.rss_mib - r.dry_rss_mib
        out.append(
            f"| {size} | {fmt_params(m.params)} | {m.dtype} | {m.stored_bytes / MiB:.0f} | {r.k} | {r.method} | {r.dry_rss_mib:.0f} "
            f"| {r.rss_mib:.0f} | {extra:.0f} | {f32:.1f} | {extra / f32:.1f} | {r.rss_mib / (m.stored_bytes / MiB):.2f} |"
        )
    return "\n".join(out)


def write_results(section_body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else INTRO
    section = f"{SECTION}\n\n{section_body.rstrip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        if not text.endswith("\n"):
            text += "\n"
        text += "\n" + section
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        text = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    RESULTS.write_text(text)


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--methods", nargs="+", metavar="METHOD",
        help="methods to time (default: every method registered in mergekit_lite.methods.METHODS that writes a merged model; "
        "task_arithmetic gets weight 1.0 and lambda 0.5, the others their default parameters)",
    )
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), metavar="SIZE", help=f"model sizes (default: all: {' '.join(SIZES)})")
    p.add_argument("--k", nargs="+", type=int, default=[4], metavar="K", help="numbers of fine-tunes to merge (default: 4)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per measurement; the median is reported (default: 3)")
    p.add_argument("--quick", action="store_true", help="smoke check: the 40m model only, 1 repeat")
    p.add_argument("--write", action="store_true", help=f"replace the '{SECTION}' section of {RESULTS.name}")
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work", help="work folder for checkpoints and outputs (default: benchmarks/work)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before one merge run is killed and reported failed (default: 1800)")
    p.add_argument(
        "--wait-quiet", type=float, default=60, metavar="S",
        help="before each timed run, wait up to S seconds for other processes to leave the CPUs (under 20%% busy; default: 60)",
    )
    p.add_argument("--profile", action="store_true", help="also cProfile one run per (size, K, method) and print the top functions")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or ["40m"]
        args.repeats = 1
    args.sizes = args.sizes or list(SIZES)
    if args.repeats < 1 or any(k < 1 for k in args.k):
        p.error("--repeats and --k must be at least 1")
    return args


def main(argv: list[str]) -> int:
    ensure_venv()
    args = parse_args(argv)
    import torch  # noqa: F401  (after the venv check)
    from mergekit_lite.methods import METHODS

    def makes_model(name: str) -> bool:  # methods that write a collection (e.g. TALL-masks) have no merge to time
        return getattr(METHODS[name], "output", "model") == "model"

    unknown = [m for m in args.methods or [] if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; registered: {', '.join(sorted(METHODS))}", file=sys.stderr)
        return 2
    collections = [m for m in args.methods or [] if not makes_model(m)]
    if collections:
        print(f"error: {', '.join(collections)} write(s) a collection, not a merged model; this benchmark times `mergekit-lite run`", file=sys.stderr)
        return 2
    methods = args.methods or sorted((m for m in METHODS if makes_model(m) and all(fits(m, k) for k in args.k)), key=lambda m: (m != "task_arithmetic", m))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python benchmarks/bench_speed.py", *[shlex.quote(a) for a in argv]])
    env_line = machine()
    log(f"machine: {env_line}")

    rows: list[Row] = []
    for size in args.sizes:
        model = build_model(size, max(args.k), work, log)
        for k in args.k:
            inputs = weight_files(model.base) + [f for i in range(1, k + 1) for f in weight_files(model.finetune(i))]
            read_bytes = sum(f.stat().st_size for f in inputs)
            write_bytes = sum(f.stat().st_size for f in weight_files(model.base))
            floor_read(inputs)  # warm the page cache (untimed)
            for method in methods:
                recipe = work / "recipes" / f"{size}-{method}-k{k}.yml"
                out = work / "out" / f"{size}-{method}-k{k}"
                out.parent.mkdir(parents=True, exist_ok=True)
                write_recipe(recipe, method, model, k)
                reads, writes, walls, rss, dry_walls, dry_rss, startups, busy = [], [], [], [], [], [], [], []
                error = ""
                for rep in range(args.repeats):  # interleaved, so slow spells of a shared machine hit all alike
                    startups.append(run_child([str(CLI), "--version"]).wall)
                    dry = run_child([str(CLI), "run", str(recipe), str(out), "--dry-run", "--force", "-q"], args.timeout)
                    dry_walls.append(dry.wall)
                    dry_rss.append(dry.maxrss_kib / 1024)
                    reads.append(floor_read(inputs))
                    writes.append(floor_write(work / "out" / "floor-write.bin", write_bytes))
                    shutil.rmtree(out, ignore_errors=True)  # time the merge, not removing the last output
                    busy.append(wait_for_quiet(args.wait_quiet))
                    res = run_child([str(CLI), "run", str(recipe), str(out), "--force", "-q"], args.timeout)
                    if res.rc != 0:
                        error = (res.stderr.strip().splitlines() or [f"exit {res.rc}"])[-1][:200].replace("|", "/")
                        log(f"{size} K={k} {method}: FAILED (exit {res.rc}): {res.stderr.strip()[-2000:]}")
                        break
                    walls.append(res.wall)
                    rss.append(res.maxrss_kib / 1024)
                    log(
                        f"{size} K={k} {method} [{rep + 1}/{args.repeats}]: ours {res.wall:.2f}s, peak RSS {res.maxrss_kib / 1024:.0f} MiB; "
                        f"floor read {reads[-1]:.2f}s + write {writes[-1]:.2f}s; start-up {startups[-1]:.2f}s, dry run {dry_walls[-1]:.2f}s; "
                        f"other CPU load just before: {busy[-1]:.0%}"
                    )
                check = ""
                if not error and method == "task_arithmetic":
                    check = check_task_arithmetic(out, model, k)
                    log(f"  output check: {check}")
                rows.append(
                    Row(size, model, k, method, median(walls), median(startups), median(reads), median(writes), median(rss),
                        median(dry_rss), median(dry_walls), read_bytes, write_bytes, check, error, walls, busy)
                )
                if args.profile and not error:
                    profile_once(recipe, out, work / "prof" / f"{size}-{method}-k{k}.prof", log)
                shutil.rmtree(out, ignore_errors=True)

    body = tables(rows)
    footer = (
        f"\nCommand: `{command}` ({args.repeats} repeat(s) per measurement, medians shown; page cache warm for the floor and for our runs; "
        f"our wall time is the whole `mergekit-lite run RECIPE OUT --force -q` process, start-up included).\n\n"
        f"Machine: {env_line}.\n"
    )
    noisy = [b for r in rows for b in r.busy if b == b and b > 0.2]
    if noisy:
        footer += (
            f"\n**Warning:** other processes kept {max(noisy):.0%} of the CPUs busy just before {len(noisy)} of the timed runs; "
            "those timings are inflated (torch's two intra-op threads wait for a core). Re-run on a quiet machine.\n"
        )
    print(body + "\n" + footer)
    if args.write:
        write_results(body + "\n" + footer)
        log(f"wrote the '{SECTION}' section of {RESULTS}")
    return 1 if any(r.error or (r.check and r.check != "ok") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Speed and memory benchmark: our CLI side by side with mergekit 0.1.5, and against the I/O floor, on synthetic Llama-style checkpoints.

    .venv/bin/python benchmarks/bench_speed.py                     # every registered method, 40M + 250M, K=4
    .venv/bin/python benchmarks/bench_speed.py --methods task_arithmetic ties --k 4 --write
    .venv/bin/python benchmarks/bench_speed.py --methods task_arithmetic ties slerp --k 1 4 --quick   # smoke check
    .venv/bin/python benchmarks/bench_speed.py --no-mergekit       # ours only (the mergekit columns read "—")

What it does, per model size:
  1. builds (once; reused while the configuration is unchanged) a base checkpoint and K fine-tunes
     under ``benchmarks/work/`` -- sharded safetensors + index + config.json, written tensor by
     tensor so building never holds a whole model in memory;
  2. writes, per (method, K), ONE recipe that both tools read and that means the same to both: only
     mergekit's keys and parameter names (``MERGEKIT_RECIPES``), ``dtype`` = the model's dtype
     (mergekit's compute dtype, our output dtype); methods only we have (``consensus*``) get
     ``BENCH_PARAMS`` and are timed for us alone;
  3. measures the I/O floor: ``cat`` of every input weight file the recipe reads to /dev/null, plus
     the faster of two ``dd`` writes of one file the size of the merged output, through the page cache and
     past it (``oflag=direct``, as we write) (no fsync -- neither tool fsyncs);
  4. times ``mergekit-lite run RECIPE OUT --force -q`` and ``.venv-mergekit/bin/mergekit-yaml RECIPE
     OUT --quiet --lazy-unpickle --no-copy-tokenizer --out-shard-size N`` (N: our 5 GB default
     shard size in parameters of the output dtype; CPU and every other option at mergekit's default)
     as child processes through the same small launcher (wall time, and the child's peak RSS from
     ``os.wait4``); also ``--dry-run`` of our run and ``mergekit-lite --version`` as start-up.
Every measurement is repeated ``--repeats`` times, interleaved -- our run and mergekit's alternate,
ours first on odd repeats and mergekit first on even ones -- and the median is reported. The page
cache is warm (inputs are read once before timing starts) for the floor and both tools alike. Each
timed run first waits (``--wait-quiet``) for other processes to leave the CPUs.

Methods that take exactly one model besides the base (slerp, nearswap, arcee_fusion; passthrough
takes one model) run at K=1 only and nuslerp (two besides the base) at K=2 only; at other K they
are skipped with a note. Without ``.venv-mergekit/bin/mergekit-yaml`` (``make mergekit-venv``) only
our runs are timed, with a note.

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
MERGEKIT_VENV = REPO / ".venv-mergekit"
MERGEKIT_CLI = MERGEKIT_VENV / "bin" / "mergekit-yaml"
#: Our default output shard size in bytes (recipe ``output.shard_size``); mergekit's --out-shard-size counts parameters.
OUR_SHARD_BYTES = 5 * 10**9
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


def compile_ours() -> None:
    """Write our package's .pyc files before timing, as pip does when it installs a package (mergekit's venv has
    them): the editable install here has none when PYTHONDONTWRITEBYTECODE is set (it is on this machine), and
    compiling our ~56 modules at every start cost each timed run ~0.15 s."""
    subprocess.run([str(VENV_PYTHON), "-m", "compileall", "-q", str(REPO / "mergekit_lite")], check=True, stdout=subprocess.DEVNULL)


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
    # architectures: mergekit picks its tensor layout from it (a bare LlamaConfig leaves it unset)
    return LlamaConfig(**spec["config"], architectures=["LlamaForCausalLM"], **{key: spec["dtype"]})


def _ensure_architectures(folder: Path) -> None:
    """Add ``architectures`` to the config.json of a checkpoint built before it was written (the weights are unchanged)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if not config.get("architectures"):
        config = {"architectures": ["LlamaForCausalLM"], **config}
        tmp = path.with_name("config.json.partial")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


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
    _ensure_architectures(model.base)

    for i in range(1, k + 1):
        folder = model.finetune(i)
        if (folder / ".complete").exists():
            _ensure_architectures(folder)
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
    """The faster of two ``dd`` writes of ``nbytes``: through the page cache, and past it (``oflag=direct``, as
    mergekit-lite writes; GNU dd writes an unaligned last block without it)."""
    times = []
    for flags in ("", " oflag=direct"):
        path.unlink(missing_ok=True)
        times.append(time_shell(f"dd if=/dev/zero of={shlex.quote(str(path))} bs=16M count={nbytes} iflag=count_bytes{flags} status=none"))
    path.unlink(missing_ok=True)
    return min(times)


@dataclass(frozen=True)
class Shared:
    """How to write the one recipe both tools run for a method mergekit 0.1.5 has too."""

    params: str = ""  # method parameters, a YAML flow mapping ("": mergekit's defaults)
    weight: bool = False  # ``weight: 1.0`` on every model (mergekit requires it where the method has a weight)
    base: bool = True  # base_model given; False: the K fine-tunes alone (linear/karcher would average a base in)
    ks: tuple[int, int | None] = (1, None)  # the K (models besides the base) mergekit accepts, inclusive


#: One recipe per method that mergekit 0.1.5 and we both read, with only mergekit's parameter names and
#: mergekit's semantics (per-tensor density for the TIES family): the same work for both tools. Densities
#: below 1 make the sparsifiers do real work (mergekit's default 1.0 would skip the trim).
MERGEKIT_RECIPES: dict[str, Shared] = {
    "task_arithmetic": Shared("{lambda: 0.5}", weight=True),  # the output check expects lambda 0.5
    "ties": Shared("{density: 0.2}", weight=True),
    "dare_ties": Shared("{density: 0.1}", weight=True),
    "dare_linear": Shared("{density: 0.1}", weight=True),
    "breadcrumbs": Shared("{density: 0.15, gamma: 0.01}", weight=True),
    "breadcrumbs_ties": Shared("{density: 0.15, gamma: 0.01}", weight=True),
    "della": Shared("{density: 0.5, epsilon: 0.1}", weight=True),
    "della_linear": Shared("{density: 0.5, epsilon: 0.1}", weight=True),
    "linear": Shared(weight=True, base=False),
    "sce": Shared("{select_topk: 0.2}"),
    "model_stock": Shared(ks=(2, None)),
    "karcher": Shared(base=False),
    "multislerp": Shared(weight=True),
    "ram": Shared(),
    "ramplus_tl": Shared(),
    "slerp": Shared("{t: 0.5}", ks=(1, 1)),
    "nearswap": Shared("{t: 0.5}", ks=(1, 1)),
    "arcee_fusion": Shared(ks=(1, 1)),
    "nuslerp": Shared(weight=True, ks=(2, 2)),  # mergekit: exactly two models besides the base
    "passthrough": Shared(base=False, ks=(1, 1)),  # one model, no base
}

#: Methods that draw random masks: ours and mergekit's outputs differ entry by entry, by design.
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}

#: Parameters for the methods only we have (no mergekit counterpart; timed for us alone). The
#: consensus methods' defaults already do their real work; so do the singular-basis merges' (the
#: papers' settings, written out here: WUDI's time grows with its steps).
BENCH_PARAMS: dict[str, str] = {
    "tsv_m": "{rank_fraction: 1.0}",
    "iso_c": "{lambda: 1.0}",
    "iso_cts": "{common_space_fraction: 0.8}",
    "wudi": "{steps: 300, lr: 1.0e-5}",
}


def fits(method: str, k: int) -> bool:
    """Whether the method takes K fine-tunes (slerp takes one besides the base, passthrough one model)."""
    from mergekit_lite.methods import METHODS

    m = METHODS[method]
    count = k + (1 if m.inputs == "weights" and m.base != "unused" else 0)
    return m.min_models <= count and (m.max_models is None or count <= m.max_models)


def runs_at(method: str, k: int) -> str:
    """Empty when the method runs with K fine-tunes (in both tools, if mergekit has it); else why it does not."""
    shared = MERGEKIT_RECIPES.get(method)
    if shared:
        lo, hi = shared.ks
        if k < lo or (hi is not None and k > hi):
            count = {1: "one model", 2: "two models"}.get(lo, f"{lo} models")
            if lo == hi:
                return f"takes exactly {count} {'besides the base' if shared.base else 'and no base'} in mergekit 0.1.5: run at K={lo} only"
            return f"needs at least {count} besides the base in mergekit 0.1.5"
    if not fits(method, k):
        return f"does not take {k} fine-tune(s)"
    return ""


def write_recipe(path: Path, method: str, model: Model, k: int) -> list[Path]:
    """Write the recipe for (method, K); return the checkpoint folders it reads."""
    shared = MERGEKIT_RECIPES.get(method)
    use_base = shared.base if shared else True
    folders = ([model.base] if use_base else []) + [model.finetune(i) for i in range(1, k + 1)]
    lines = [f"merge_method: {method}"]
    if use_base:
        lines.append(f"base_model: {json.dumps(str(model.base))}")
    lines.append("models:")
    for i in range(1, k + 1):
        lines.append(f"  - model: {json.dumps(str(model.finetune(i)))}")
        if shared and shared.weight:
            lines.append("    parameters: {weight: 1.0}")
    params = shared.params if shared else BENCH_PARAMS.get(method, "")
    if params:
        lines.append(f"parameters: {params}")
    # the model's dtype: mergekit computes in it; we compute in float32 and write it
    lines += [f"dtype: {model.dtype}", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return folders


MERGEKIT_FLAGS = ("--quiet", "--lazy-unpickle", "--no-copy-tokenizer")


def mergekit_command(recipe: Path, out: Path, model: Model) -> list[str]:
    """mergekit-yaml on CPU with its default options, except: no progress bars (like our -q), lazy unpickling
    (a no-op for safetensors), no tokenizer to copy (the synthetic models have none), and our shard size."""
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[model.dtype]
    return [str(MERGEKIT_CLI), str(recipe), str(out), *MERGEKIT_FLAGS, "--out-shard-size", str(OUR_SHARD_BYTES // itemsize)]


def mergekit_version() -> str:
    done = subprocess.run(
        [str(MERGEKIT_VENV / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'), m.version('transformers'))"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=False,
    )
    parts = done.stdout.split()
    return f"mergekit {parts[0]} (torch {parts[1]}, transformers {parts[2]})" if len(parts) == 3 else "mergekit (version unknown)"


def _get_tensor(folder: Path, name: str):
    from safetensors import safe_open

    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        file = folder / json.loads(index_file.read_text())["weight_map"][name]
    else:
        file = folder / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(name)


def compare_outputs(ours: Path, theirs: Path, model: Model, method: str) -> str:
    """One tensor of our output against mergekit's: ‖ours − mk‖ / ‖mk − θ_0‖ (the change from the base);
    for random-mask methods, ‖ours − θ_0‖ / ‖mk − θ_0‖ (their masks differ, their sizes should not)."""
    name = "model.layers.0.self_attn.k_proj.weight"
    try:
        base = _get_tensor(model.base, name).double()
        a = _get_tensor(ours, name).double()
        b = _get_tensor(theirs, name).double()
    except Exception as exc:  # noqa: BLE001 - an informational column, never a crash
        return f"not compared ({type(exc).__name__})"
    change = (b - base).norm().item()
    if method in RANDOM_METHODS:
        return f"norm ratio {(a - base).norm().item() / change:.3f} (random masks)" if change else "no change"
    return f"{(a - b).norm().item() / change:.1e}" if change else f"{(a - b).norm().item():.1e} (abs.)"


def check_task_arithmetic(out: Path, model: Model, k: int) -> str:
    """Spot-check one small tensor of the output against θ_0 + 0.5·Σ(θ_t − θ_0), computed here."""
    import torch

    name = "model.layers.0.self_attn.k_proj.weight"
    base = _get_tensor(model.base, name).float()
    expect = base + 0.5 * sum(_get_tensor(model.finetune(i), name).float() - base for i in range(1, k + 1))
    got = _get_tensor(out, name)
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
    # mergekit's run of the same recipe; ``mk_absent`` says why there is none ("" when it ran)
    mk_absent: str = ""
    mk_wall: float = float("nan")
    mk_rss_mib: float = float("nan")
    mk_walls: list[float] = field(default_factory=list)
    mk_busy: list[float] = field(default_factory=list)
    mk_error: str = ""
    mk_check: str = ""
    agree: str = ""
    torch_import: float = float("nan")  # `python -c "import torch"` in our venv (median)

    @property
    def floor(self) -> float:
        return self.read + self.write

    def goal(self) -> str:
        """Issue 12's speed goal for this row and whether it is met: ours ≤ mergekit's wall ÷ 5, or, where mergekit
        is within 5× of the floor with torch's import (read + write + import torch), ours ≤ 1.5× that floor."""
        if self.error or self.mk_absent or self.mk_error or math.isnan(self.torch_import):
            return "—"
        floor = self.floor + self.torch_import
        if self.mk_wall <= 5 * floor:
            limit, what = 1.5 * floor, f"≤ 1.5 × {floor:.2f} s"
        else:
            limit, what = self.mk_wall / 5, "≥ 5×"
        return f"{what}: {'met' if self.wall <= limit else 'not met'} ({self.wall / limit:.2f} of the limit)"


def profile_once(recipe: Path, out: Path, prof: Path, log) -> None:
    """cProfile one run of the CLI and print where the time goes."""
    import pstats

    shutil.rmtree(out, ignore_errors=True)
    prof.parent.mkdir(parents=True, exist_ok=True)
    # not `-m cProfile -m mergekit_lite.cli`: the console entry ends the process with os._exit, before cProfile writes
    program = (
        "import cProfile, sys\n"
        "from mergekit_lite.cli import main\n"
        "profile = cProfile.Profile()\n"
        "profile.enable()\n"
        "try:\n    main(sys.argv[2:])\nexcept SystemExit:\n    pass\n"
        "profile.disable()\n"
        "profile.dump_stats(sys.argv[1])\n"
    )
    cmd = [str(VENV_PYTHON), "-c", program, str(prof), "run", str(recipe), str(out), "--force", "-q"]
    log("profiling: " + " ".join(shlex.quote(c) for c in cmd))
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    stats = pstats.Stats(str(prof), stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)


# -- report ----------------------------------------------------------------------------------------
def fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def tables(rows: list[Row]) -> str:
    dash = "—"
    out = [
        "| model | K | method | ours wall (s) | mergekit wall (s) | mergekit/ours speed ratio | ours peak RSS (MiB) "
        "| mergekit peak RSS (MiB) | RSS ratio ours/mergekit | floor (s) | ours/floor | import torch (s) | speed goal |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ours_ok = not r.error
        ours_wall = f"{r.wall:.2f}" if ours_ok else f"failed: {r.error}"
        ours_rss = f"{r.rss_mib:.0f}" if ours_ok else ""
        if r.mk_absent:
            mk_wall = mk_rss = speed = rss_ratio = dash
        elif r.mk_error:
            mk_wall, mk_rss, speed, rss_ratio = f"failed: {r.mk_error}", "", "", ""
        else:
            mk_wall, mk_rss = f"{r.mk_wall:.2f}", f"{r.mk_rss_mib:.0f}"
            speed = f"{r.mk_wall / r.wall:.2f}" if ours_ok else ""
            rss_ratio = f"{r.rss_mib / r.mk_rss_mib:.2f}" if ours_ok else ""
        vs_floor = f"{r.wall / r.floor:.1f}" if ours_ok else ""
        out.append(
            f"| {r.size} | {r.k} | {r.method} | {ours_wall} | {mk_wall} | {speed} | {ours_rss} | {mk_rss} | {rss_ratio} "
            f"| {r.floor:.2f} | {vs_floor} | {r.torch_import:.2f} | {r.goal()} |"
        )
    out += [
        "",
        "Floor breakdown and start-up (medians; the floor is `cat` of every input weight file the recipe reads to /dev/null "
        "plus the faster of two `dd` writes of one file of the output's size, through the page cache and past it "
        "(`oflag=direct`), with a warm page cache and no fsync):",
        "",
        "| model | K | method | read (GB) | read (s) | read (GB/s) | write (GB) | write (s) | start-up `--version` (s) | `--dry-run` (s) "
        "| ours − start-up (s) | (ours − start-up)/floor | ours, every repeat (s) | mergekit, every repeat (s) "
        "| other CPU load before each run, ours / mergekit (%) | output check | ours vs mergekit, one tensor |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---|",
    ]

    def pct(xs: list[float]) -> str:
        return ", ".join(f"{b * 100:.0f}" for b in xs) or dash

    for r in rows:
        mk_walls = ", ".join(f"{w:.2f}" for w in r.mk_walls) or (dash if r.mk_absent else "failed")
        check = r.check or ("failed" if r.error else "not checked")
        if r.mk_check:
            check = f"ours {check}; mergekit {r.mk_check}"
        out.append(
            f"| {r.size} | {r.k} | {r.method} | {r.read_bytes / 1e9:.2f} | {r.read:.3f} | {r.read_bytes / 1e9 / r.read:.1f} | {r.write_bytes / 1e9:.2f} "
            f"| {r.write:.3f} | {r.startup:.2f} | {r.dry_wall:.2f} | {(r.wall - r.startup):.2f} | {(r.wall - r.startup) / r.floor:.1f} "
            f"| {', '.join(f'{w:.2f}' for w in r.walls) or 'failed'} | {mk_walls} "
            f"| {pct(r.busy)} / {pct(r.mk_busy)} | {check} | {r.agree or dash} |"
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
        help="methods to time (default: every method registered in mergekit_lite.methods.METHODS that writes a merged model "
        "and takes one of the K given; the recipes are in MERGEKIT_RECIPES, mergekit's parameter names only; "
        "a (method, K) that does not fit is skipped with a note)",
    )
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), metavar="SIZE", help=f"model sizes (default: all: {' '.join(SIZES)})")
    p.add_argument("--k", nargs="+", type=int, default=[4], metavar="K", help="numbers of fine-tunes to merge (default: 4)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per measurement; the median is reported (default: 3)")
    p.add_argument("--mergekit-repeats", type=int, default=None, metavar="N",
                   help="run mergekit in the first N repeats only (default: every repeat); its merges take 5-20x ours, "
                        "so a table of every method with ours in a median of 3 and mergekit once takes a third of the time")
    p.add_argument("--quick", action="store_true", help="smoke check: the 40m model only, 1 repeat")
    p.add_argument("--write", action="store_true", help=f"replace the '{SECTION}' section of {RESULTS.name}")
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work", help="work folder for checkpoints and outputs (default: benchmarks/work)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before one merge run is killed and reported failed (default: 1800)")
    p.add_argument(
        "--wait-quiet", type=float, default=60, metavar="S",
        help="before each timed run, wait up to S seconds for other processes to leave the CPUs (under 20%% busy; default: 60)",
    )
    p.add_argument(
        "--no-mergekit", action="store_true",
        help=f"time only our CLI (default: also mergekit 0.1.5's mergekit-yaml from {MERGEKIT_CLI.relative_to(REPO)}, when it exists)",
    )
    p.add_argument("--profile", action="store_true", help="also cProfile one of our runs per (size, K, method) and print the top functions")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or ["40m"]
        args.repeats = 1
    args.sizes = args.sizes or list(SIZES)
    if args.repeats < 1 or any(k < 1 for k in args.k):
        p.error("--repeats and --k must be at least 1")
    if args.mergekit_repeats is None:
        args.mergekit_repeats = args.repeats
    if not 1 <= args.mergekit_repeats <= args.repeats:
        p.error("--mergekit-repeats must be from 1 to --repeats")
    return args


def main(argv: list[str]) -> int:
    ensure_venv()
    args = parse_args(argv)
    compile_ours()
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
    methods = args.methods or sorted(
        (m for m in METHODS if makes_model(m) and any(not runs_at(m, k) for k in args.k)), key=lambda m: (m != "task_arithmetic", m)
    )

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    notes: list[str] = []
    if args.no_mergekit:
        mk_missing = "not run (--no-mergekit)"
        mk_line = "mergekit: not run (--no-mergekit)"
    elif not MERGEKIT_CLI.exists():
        mk_missing = "not installed"
        mk_line = f"mergekit: not installed ({MERGEKIT_CLI} not found; `make mergekit-venv` creates it)"
        log(f"NOTE: {MERGEKIT_CLI} not found, so only our CLI is timed (the mergekit columns read \"—\"). "
            "Create it with `make mergekit-venv`, or pass --no-mergekit to skip it on purpose.")
        notes.append(f"mergekit was not timed: {MERGEKIT_CLI.relative_to(REPO)} was not found (`make mergekit-venv` creates it).")
    else:
        mk_missing = ""
        mk_line = mergekit_version()
        # untimed warm-up: the first start of a fresh venv compiles its .pyc files
        warm = run_child([str(MERGEKIT_CLI), "--help"], 600)
        if warm.rc != 0:
            log(f"NOTE: `{MERGEKIT_CLI} --help` failed (exit {warm.rc}); only our CLI is timed: {warm.stderr.strip()[-500:]}")
            mk_missing = "does not start"
            notes.append(f"mergekit was not timed: `mergekit-yaml --help` failed (exit {warm.rc}).")

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python benchmarks/bench_speed.py", *[shlex.quote(a) for a in argv]])
    env_line = machine()
    log(f"machine: {env_line}")
    log(mk_line)

    # one note per (method, reason), listing the K it skips
    by_reason: dict[tuple[str, str], list[int]] = {}
    for m in methods:
        for k in args.k:
            why = runs_at(m, k)
            if why:
                by_reason.setdefault((m, why), []).append(k)
    for (m, why), ks in by_reason.items():
        note = f"{m}: skipped at K={', '.join(map(str, ks))} ({why})."
        notes.append(note)
        log(f"NOTE: {note}")
    ours_only = [m for m in methods if m not in MERGEKIT_RECIPES]
    if ours_only and not mk_missing:
        notes.append(f"{', '.join(ours_only)}: ours only (no such method in mergekit 0.1.5); the mergekit columns read \"—\".")

    rows: list[Row] = []
    for size in args.sizes:
        model = build_model(size, max(args.k), work, log)
        for k in args.k:
            write_bytes = sum(f.stat().st_size for f in weight_files(model.base))
            floor_read(weight_files(model.base) + [f for i in range(1, k + 1) for f in weight_files(model.finetune(i))])  # warm the page cache (untimed)
            for method in methods:
                if runs_at(method, k):
                    continue
                recipe = work / "recipes" / f"{size}-{method}-k{k}.yml"
                out = work / "out" / f"{size}-{method}-k{k}"
                mk_out = work / "out" / f"{size}-{method}-k{k}-mergekit"
                out.parent.mkdir(parents=True, exist_ok=True)
                folders = write_recipe(recipe, method, model, k)
                inputs = [f for folder in folders for f in weight_files(folder)]
                read_bytes = sum(f.stat().st_size for f in inputs)
                absent = mk_missing or ("" if method in MERGEKIT_RECIPES else "ours only")
                reads, writes, walls, rss, dry_walls, dry_rss, startups, busy = [], [], [], [], [], [], [], []
                torch_imports: list[float] = []
                mk_walls, mk_rss, mk_busy = [], [], []
                error = mk_error = ""

                def timed(tool: str) -> None:
                    nonlocal error, mk_error
                    target = out if tool == "ours" else mk_out
                    cmd = [str(CLI), "run", str(recipe), str(out), "--force", "-q"] if tool == "ours" else mergekit_command(recipe, mk_out, model)
                    shutil.rmtree(target, ignore_errors=True)  # time the merge, not removing the last output
                    (busy if tool == "ours" else mk_busy).append(wait_for_quiet(args.wait_quiet))
                    res = run_child(cmd, args.timeout)
                    if res.rc != 0:
                        msg = (res.stderr.strip().splitlines() or [f"exit {res.rc}"])[-1][:200].replace("|", "/")
                        log(f"{size} K={k} {method}: {tool} FAILED (exit {res.rc}): {res.stderr.strip()[-2000:]}")
                        if tool == "ours":
                            error = msg
                        else:
                            mk_error = msg
                        return
                    (walls if tool == "ours" else mk_walls).append(res.wall)
                    (rss if tool == "ours" else mk_rss).append(res.maxrss_kib / 1024)

                for rep in range(args.repeats):  # interleaved, so slow spells of a shared machine hit all alike
                    startups.append(run_child([str(CLI), "--version"]).wall)
                    torch_imports.append(run_child([str(VENV_PYTHON), "-c", "import torch"]).wall)
                    dry = run_child([str(CLI), "run", str(recipe), str(out), "--dry-run", "--force", "-q"], args.timeout)
                    dry_walls.append(dry.wall)
                    dry_rss.append(dry.maxrss_kib / 1024)
                    reads.append(floor_read(inputs))
                    writes.append(floor_write(work / "out" / "floor-write.bin", write_bytes))
                    # ours and mergekit alternate; who goes first alternates too, so neither always follows the floor
                    order = ["ours", "mergekit"] if rep % 2 == 0 else ["mergekit", "ours"]
                    for tool in order:
                        if tool == "ours" and not error:
                            timed("ours")
                        elif tool == "mergekit" and not absent and not mk_error and rep < args.mergekit_repeats:
                            timed("mergekit")
                    if error and (absent or mk_error):
                        break
                    mk_part = (
                        "mergekit not run in this repeat (--mergekit-repeats)" if rep >= args.mergekit_repeats and not absent and not mk_error
                        else f"mergekit {mk_walls[-1]:.2f}s, peak RSS {mk_rss[-1]:.0f} MiB" if mk_walls and not mk_error
                        else f"mergekit {'failed' if mk_error else absent}"
                    )
                    ours_part = f"ours {walls[-1]:.2f}s, peak RSS {rss[-1]:.0f} MiB" if walls and not error else "ours failed"
                    log(
                        f"{size} K={k} {method} [{rep + 1}/{args.repeats}]: {ours_part}; {mk_part}; "
                        f"floor read {reads[-1]:.2f}s + write {writes[-1]:.2f}s; start-up {startups[-1]:.2f}s, dry run {dry_walls[-1]:.2f}s; "
                        f"other CPU load just before: ours {', '.join(f'{b:.0%}' for b in busy[-1:])}"
                        + (f", mergekit {mk_busy[-1]:.0%}" if mk_busy and rep < args.mergekit_repeats else "")
                    )
                check = mk_check = agree = ""
                if not error and method == "task_arithmetic":
                    check = check_task_arithmetic(out, model, k)
                    log(f"  output check, ours: {check}")
                if not absent and not mk_error and mk_walls:
                    if method == "task_arithmetic":
                        mk_check = check_task_arithmetic(mk_out, model, k)
                        log(f"  output check, mergekit: {mk_check}")
                    if not error:
                        agree = compare_outputs(out, mk_out, model, method)
                        log(f"  ours vs mergekit on one tensor: {agree}")
                row = Row(
                    size, model, k, method, median(walls), median(startups), median(reads), median(writes), median(rss),
                    median(dry_rss), median(dry_walls), read_bytes, write_bytes, check, error, walls, busy,
                    absent, median(mk_walls), median(mk_rss), mk_walls, mk_busy, mk_error, mk_check, agree,
                    torch_import=median(torch_imports),
                )
                rows.append(row)
                if args.profile and not error:
                    profile_once(recipe, out, work / "prof" / f"{size}-{method}-k{k}.prof", log)
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(mk_out, ignore_errors=True)

    body = tables(rows)
    mk_cmd = " ".join(["mergekit-yaml RECIPE OUT", *MERGEKIT_FLAGS, "--out-shard-size N"])
    mk_text = "" if mk_missing else (
        f"mergekit: `{mk_cmd}` (CPU, every other option at its default; N = our 5 GB shard size in parameters of the output dtype), "
        f"on the same recipe file, interleaved with ours (ours first on odd repeats, mergekit first on even ones). "
        f"*mergekit/ours speed ratio* = mergekit wall ÷ ours (above 1: we are faster); *RSS ratio* = our peak RSS ÷ mergekit's "
        f"(below 1: we use less)."
    )
    footer = (
        f"\nCommand: `{command}` ({args.repeats} repeat(s) per measurement"
        f"{f', mergekit in the first {args.mergekit_repeats} only' if args.mergekit_repeats < args.repeats else ''}"
        f", medians shown; page cache warm for the floor and for "
        f"every run; each wall time is the whole process, start-up included). Ours: `mergekit-lite run RECIPE OUT --force -q`."
        f"{' ' + mk_text if mk_text else ''}\n\nMachine: {env_line}. {mk_line}.\n"
    )
    if notes:
        footer += "\nNotes:\n\n" + "".join(f"* {n}\n" for n in notes)
    noisy = [b for r in rows for b in (*r.busy, *r.mk_busy) if b == b and b > 0.2]
    if noisy:
        footer += (
            f"\n**Warning:** other processes kept {max(noisy):.0%} of the CPUs busy just before {len(noisy)} of the timed runs; "
            "those timings are inflated (torch's intra-op threads wait for a core). Re-run on a quiet machine.\n"
        )
    print(body + "\n" + footer)
    if args.write:
        write_results(body + "\n" + footer)
        log(f"wrote the '{SECTION}' section of {RESULTS}")
    failed = any(r.error or r.mk_error or (r.check and r.check != "ok") or (r.mk_check and r.mk_check != "ok") for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

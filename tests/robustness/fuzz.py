#!/usr/bin/env python
"""Seeded robustness fuzzer: bad input never crashes with a traceback and never leaves partial output.

Every input kind (recipes as YAML text or Python structures, the CLI, mutated safetensors files,
sharded indexes, legacy .bin pickles, tampered collections, NaN/Inf weights) has a generator
driven by ``random.Random(f"{seed}/{kind}/{index}")``: one example is reproducible on its own
from (seed, kind, index). Each example is run in its own folder inside a sandbox and ends as

- ``accepted``: the input was valid enough and everything worked;
- ``rejected``: the library raised its own error type (``RecipeError``, ``CheckpointError``,
  ``MergeKitLiteError``...) with a one-line message naming the source/file, or the CLI exited 2
  with one ``error: ...`` line;
- ``FAILED``: anything else: another exception (a traceback), a message on several lines or not
  naming the input, CLI exit code 1, a ``.mergekit-lite-tmp-*`` folder or an output folder left
  after a failure, a file read or written outside the folders the operation may touch (watched
  with an audit hook and a snapshot of the sandbox), or code run by a pickle.

Use it from the command line (``make fuzz``)::

    python tests/robustness/fuzz.py --seed 0 --examples 300
    python tests/robustness/fuzz.py --seed 0 --kinds bin --only 17 -v     # one example again

or from tests: ``run_kind(kind, seed, count, root)`` returns a ``KindReport``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import re
import pickle
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# never reach a model hub: hub-like references in generated recipes must fail fast, offline
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import mergekit_lite  # noqa: E402
from mergekit_lite import Collection, Recipe  # noqa: E402
from mergekit_lite.checkpoint import open_checkpoint  # noqa: E402
from mergekit_lite.errors import CheckpointError, MergeKitLiteError, RecipeError  # noqa: E402
from mergekit_lite.methods import METHODS  # noqa: E402

TMP_PREFIX = ".mergekit-lite-tmp-"
ACCEPTED, REJECTED, FAILED = "accepted", "rejected", "failed"


# ============================================================================ results and checks
@dataclass
class Result:
    outcome: str
    label: str
    reason: str = ""  # for FAILED: crash | wrong-exception | multi-line | unnamed | exit-code | leftover | escape | code-ran | accepted-bad | round-trip
    detail: str = ""


@dataclass
class Failure:
    kind: str
    index: int
    label: str
    reason: str
    detail: str

    def reproduce(self, seed: int) -> str:
        return f"python tests/robustness/fuzz.py --seed {seed} --kinds {self.kind} --only {self.index} -v"


@dataclass
class KindReport:
    kind: str
    tried: int = 0
    accepted: int = 0
    rejected: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.failures:
            out[f.reason] = out.get(f.reason, 0) + 1
        return out


def one_line(message: str) -> bool:
    """True when ``message`` is one non-empty line (no \\n, \\r, \\x0b, \\x0c, \\x1c-\\x1e, \\x85, \\u2028, \\u2029)."""
    return bool(message) and message.splitlines() == [message]


def crash_site(exc: BaseException) -> str:
    """``Type: message at file:line in function``, using the innermost frame inside mergekit_lite."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "mergekit_lite" in f.filename] or frames
    where = f" at {Path(ours[-1].filename).name}:{ours[-1].lineno} in {ours[-1].name}" if ours else ""
    text = (str(exc).splitlines() or [""])[0][:160]
    return f"{type(exc).__name__}: {text}{where}"


def attempt(label: str, fn: Callable[[], Any], allowed: tuple[type[BaseException], ...], names: list[str] | None = None) -> tuple[Result, Any]:
    """Run ``fn``: accepted, rejected with an ``allowed`` one-line error naming one of ``names``, or FAILED."""
    try:
        value = fn()
    except allowed as exc:
        message = str(exc)
        if not one_line(message):
            return Result(FAILED, label, "multi-line", f"{type(exc).__name__}: {message[:300]!r}"), exc
        if names and not any(n in message for n in names):
            return Result(FAILED, label, "unnamed", f"{type(exc).__name__} does not name {names[0]!r}: {message[:200]}"), exc
        return Result(REJECTED, label, detail=f"{type(exc).__name__}: {message[:200]}"), exc
    except KeyboardInterrupt:
        raise
    except MergeKitLiteError as exc:  # ours, but not the kind this input should give (e.g. OutputError for a bad checkpoint)
        return Result(FAILED, label, "wrong-exception", f"expected {'/'.join(a.__name__ for a in allowed)}: {crash_site(exc)}"), exc
    except BaseException as exc:  # noqa: BLE001 - this is what the fuzzer looks for
        return Result(FAILED, label, "crash", crash_site(exc)), exc
    return Result(ACCEPTED, label), value


def leftovers(folder: Path) -> list[str]:
    """Temporary folders of the atomic writer anywhere under ``folder``."""
    found = []
    for dirpath, dirnames, _ in os.walk(folder):
        for d in dirnames:
            if d.startswith(TMP_PREFIX):
                found.append(os.path.relpath(os.path.join(dirpath, d), folder))
    return found


# ============================================================================ file-access watch
_EXEC_EVENTS = {"os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "pty.spawn", "ctypes.dlopen"}
_WRITE_EVENTS = {"os.mkdir": (0,), "os.rename": (0, 1), "os.replace": (0, 1), "os.remove": (0,), "os.rmdir": (0,), "shutil.rmtree": (0,),
                 "os.symlink": (1,), "os.link": (1,), "os.chmod": (0,), "os.truncate": (0,), "shutil.copyfile": (1,), "shutil.move": (0, 1)}


class Watch:
    """While active, records reads/writes of paths inside ``sandbox`` but outside the allowed folders,
    and any attempt to run a program (what a malicious pickle would do)."""

    def __init__(self, sandbox: Path, read_ok: list[Path], write_ok: list[Path]):
        self.sandbox = str(sandbox)
        self.read_ok = [str(p) for p in read_ok]
        self.write_ok = [str(p) for p in write_ok]
        self.violations: list[str] = []

    @staticmethod
    def _inside(path: str, roots: list[str]) -> bool:
        return any(path.startswith(r[:-1]) if r.endswith("*") else (path == r or path.startswith(r + os.sep)) for r in roots)

    def _path(self, value: Any) -> str | None:
        if isinstance(value, int) or value is None:
            return None
        try:
            text = os.fsdecode(os.fspath(value))
        except (TypeError, ValueError):
            return None
        return os.path.normpath(os.path.abspath(text))

    def _outside_write(self, path: str) -> None:
        """A write outside the sandbox: never expected (Python's own __pycache__ and the user's caches aside)."""
        if "__pycache__" not in path and not self._inside(path, _CACHES):
            self.violations.append(f"escape: wrote {path} (outside the sandbox)")

    def event(self, name: str, args: tuple[Any, ...]) -> None:
        if name in _EXEC_EVENTS:
            if name == "ctypes.dlopen" and args[:1] == (None,) and _called_from(_ALLOCATOR):
                return  # the CLI reaching glibc's mallopt in its own process (no library file, not an input's code)
            self.violations.append(f"code-ran: {name} {str(args)[:120]}")
            return
        if name == "open":
            path = self._path(args[0])
            if path is None:
                return
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            )
            if not self._inside(path, [self.sandbox]):
                if writes and os.path.isabs(os.fsdecode(os.fspath(args[0]))):
                    self._outside_write(path)
                return
            path = os.path.realpath(path)  # a symlink inside an allowed folder may point outside it
            if writes and not self._inside(path, self.write_ok):
                self.violations.append(f"escape: wrote {os.path.relpath(path, self.sandbox)}")
            elif not writes and not self._inside(path, self.read_ok + self.write_ok):
                self.violations.append(f"escape: read {os.path.relpath(path, self.sandbox)}")
            return
        positions = _WRITE_EVENTS.get(name)
        if positions is None:
            return
        if name in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod") and len(args) > 2 and args[-1] not in (None, -1):
            return  # relative to a directory descriptor (shutil.rmtree's walk); the rmtree event itself was checked
        for i in positions:
            path = self._path(args[i]) if i < len(args) else None
            if path is None:
                continue
            if not self._inside(path, [self.sandbox]):
                if os.path.isabs(os.fsdecode(os.fspath(args[i]))):
                    self._outside_write(path)
            elif not self._inside(path, self.write_ok):
                self.violations.append(f"escape: {name} {os.path.relpath(path, self.sandbox)}")


#: where libraries may legitimately write outside the sandbox (model hub and other caches)
_CACHES = [os.path.expanduser("~/.cache"), os.path.realpath(os.path.expanduser("~/.cache"))]
#: the one module of ours that opens the process's own symbols (ctypes.dlopen(None)) to tune malloc
_ALLOCATOR = os.path.join("mergekit_lite", "allocator.py")


def _called_from(suffix: str) -> bool:
    """Whether a frame of the current call stack runs code from a file ending in ``suffix``."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.endswith(suffix):
            return True
        frame = frame.f_back
    return False
_ACTIVE: Watch | None = None
_HOOKED = False


def _audit(name: str, args: tuple[Any, ...]) -> None:
    watch = _ACTIVE
    if watch is not None:
        watch.event(name, args)


class watching:
    """Context manager activating a ``Watch`` (the audit hook is installed once per process)."""

    def __init__(self, watch: Watch):
        self.watch = watch

    def __enter__(self) -> Watch:
        global _ACTIVE, _HOOKED
        if not _HOOKED:
            sys.addaudithook(_audit)
            _HOOKED = True
        _ACTIVE = self.watch
        return self.watch

    def __exit__(self, *exc: object) -> None:
        global _ACTIVE
        _ACTIVE = None


def snapshot(folder: Path, skip: list[Path] = ()) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every entry under ``folder``, except under ``skip``."""
    skipped = {str(p) for p in skip}
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skipped]
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            out[os.path.relpath(full, folder)] = (st.st_size if not os.path.isdir(full) else 0, st.st_mtime_ns if not os.path.isdir(full) else 0)
    return out


# ============================================================================ fixtures
@dataclass
class Fixtures:
    root: Path
    base: Path
    tasks: list[Path]
    broken: dict[str, Path]
    sample_safetensors: bytes
    sharded: Path
    sharded_bin: Path
    sample_bin: bytes
    collection: Path
    collection_embedded: Path
    decoys: Path

    @property
    def read_only(self) -> list[Path]:
        return [self.root / "fixtures"]


TINY_SHAPES = {
    "model.embed_tokens.weight": (16, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (12, 8),
    "model.norm.weight": (8,),
    "lm_head.weight": (16, 8),
}


def _tiny_state(seed: int, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if base is None:
        state = {k: torch.randn(s, generator=g) for k, s in TINY_SHAPES.items()}
        state["model.rotary.inv_freq_steps"] = torch.arange(4, dtype=torch.int64)
        return state
    return {k: (v + 0.05 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3) if v.is_floating_point() else v.clone()) for k, v in base.items()}


def _write_ckpt(folder: Path, state: dict[str, torch.Tensor], *, bin_format: bool = False, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if bin_format:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama", "tie_word_embeddings": False}), encoding="utf-8")
    return folder


def build_fixtures(root: Path) -> Fixtures:
    """Tiny checkpoints (valid and broken), sample files, a sharded checkpoint, two collections, decoys."""
    fx = root / "fixtures"
    fx.mkdir(parents=True)
    torch.manual_seed(0)  # the fixtures are the same bytes every run
    base_state = _tiny_state(0)
    base = _write_ckpt(fx / "base", base_state)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 128}', encoding="utf-8")
    tasks = [_write_ckpt(fx / f"t{i}", _tiny_state(i + 1, base_state)) for i in range(3)]

    broken: dict[str, Path] = {}
    t1 = _tiny_state(11, base_state)
    name = "model.layers.0.mlp.up_proj.weight"
    bad = dict(t1); bad[name] = bad[name].clone(); bad[name][1, 2] = float("nan")
    broken["nan"] = _write_ckpt(fx / "broken" / "nan", bad)
    bad = dict(t1); bad["model.norm.weight"] = bad["model.norm.weight"].clone(); bad["model.norm.weight"][3] = float("inf")
    broken["inf"] = _write_ckpt(fx / "broken" / "inf", bad)
    bad = dict(t1); bad[name] = torch.zeros(8, 12)
    broken["shape"] = _write_ckpt(fx / "broken" / "shape", bad)
    bad = dict(t1); del bad[name]
    broken["missing"] = _write_ckpt(fx / "broken" / "missing", bad)
    bad = dict(t1); bad["model.extra.weight"] = torch.zeros(3)
    broken["extra"] = _write_ckpt(fx / "broken" / "extra", bad)
    bad = dict(t1); bad[name] = bad[name].to(torch.int32)
    broken["int"] = _write_ckpt(fx / "broken" / "int", bad)
    broken["bf16"] = _write_ckpt(fx / "broken" / "bf16", {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in t1.items()})
    broken["bin"] = _write_ckpt(fx / "broken" / "bin", t1, bin_format=True)
    trunc = _write_ckpt(fx / "broken" / "trunc", t1)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) - 100])
    broken["trunc"] = trunc
    broken["empty"] = fx / "broken" / "empty"
    broken["empty"].mkdir(parents=True)
    evil = fx / "broken" / "evil"
    evil.mkdir(parents=True)
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload("system", str(root / "cases" / "PWNED"))))
    broken["evil"] = evil
    tied = _write_ckpt(fx / "broken" / "tied", {k: v for k, v in t1.items() if k != "lm_head.weight"}, config={"model_type": "llama", "tie_word_embeddings": True})
    broken["tied"] = tied

    sample = {
        "a.f32": torch.randn(3, 4), "b.bf16": torch.randn(5).to(torch.bfloat16), "c.i64": torch.arange(2),
        "d.bool": torch.tensor([True, False, True]), "e.empty": torch.zeros(0, 7, dtype=torch.float16), "f.u8": torch.arange(9, dtype=torch.uint8),
    }
    save_file(sample, fx / "sample.safetensors", metadata={"format": "pt"})
    sample_bytes = (fx / "sample.safetensors").read_bytes()

    sharded = fx / "sharded"
    sharded.mkdir()
    names = list(base_state)
    weight_map = {}
    for i, chunk in enumerate((names[:2], names[2:4], names[4:])):
        file = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: base_state[n].contiguous() for n in chunk}, sharded / file)
        weight_map.update({n: file for n in chunk})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}), encoding="utf-8")
    sharded_bin = fx / "sharded_bin"
    sharded_bin.mkdir()
    weight_map = {}
    for i, chunk in enumerate((names[:3], names[3:])):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: base_state[n] for n in chunk}, sharded_bin / file)
        weight_map.update({n: file for n in chunk})
    (sharded_bin / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}), encoding="utf-8")

    buffer = io.BytesIO()
    torch.save({"w": torch.randn(4, 4), "b": torch.zeros(4), "n": torch.arange(3)}, buffer)

    def tall(embed: bool) -> Path:
        recipe = Recipe.from_dict({
            "merge_method": "tall_masks", "base_model": str(base),
            "models": [{"model": str(t), "name": n} for t, n in zip(tasks, ("math", "code", "chat"))],
            "parameters": {"embed_base": embed},
        })
        return mergekit_lite.run(recipe, fx / ("collection_embedded" if embed else "collection"), progress=False)

    decoys = root / "decoys"
    decoys.mkdir()
    (decoys / "secret.txt").write_text("do not read me\n", encoding="utf-8")
    save_file({"model.norm.weight": torch.ones(8)}, decoys / "outside.safetensors")
    return Fixtures(root, base, tasks, broken, sample_bytes, sharded, sharded_bin, buffer.getvalue(), tall(False), tall(True), decoys)


# ============================================================================ junk values
SPECIAL_STRINGS = [
    "", " ", "x", "ü", "日本語", "🙂", "a\nb", "\r\n", "line\u2028sep", "nul\x00byte", "\x1b[31mred", "tab\there", "\x85",
    "../../etc/passwd", "/abs/path", "~nouser_fuzz/x", "org/name", "org/name@rev", "a+b", "5GB", "-1GB", "0", "1e999", "nan",
    "true", "null", "{", "[", "*", "&", "!!python/object", "%", "@", "model.layers.*", "*", "float32", "bfloat16", "int8",
    "task_arithmetic", "ties", "base", "none", "mean", "tensor", "model", "row", "auto", "math:sqrt", "no_such_mod_fuzz:f", ".", "..",
]
SPECIAL_NUMBERS = [0, -1, 1, 2, 7, 2**31, 2**63, -(2**63) - 1, 10**30, 0.0, -0.0, 1e-320, 1e308, -1e308, 0.5, -0.5, 1.5, 0.999999, 1.0000001,
                   float("nan"), float("inf"), float("-inf")]


def junk_string(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.5:
        return rng.choice(SPECIAL_STRINGS)
    if r < 0.6:
        return rng.choice("xa日\n") * rng.choice([100, 5000, 100_000])
    if r < 0.8:
        return "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(1, 12)))
    return "".join(chr(rng.randrange(0, 0x110000)) for _ in range(rng.randrange(1, 8)))  # includes surrogates and controls


def junk_scalar(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.15:
        return rng.choice([None, True, False])
    if r < 0.5:
        return rng.choice(SPECIAL_NUMBERS)
    if r < 0.55:
        return rng.choice([10**400, -(10**400), 10**5000])
    if r < 0.6:
        return rng.choice([b"bytes", (1, 2), frozenset({1}), complex(1, 2)])
    return junk_string(rng)


def deep(rng: random.Random, depth: int | None = None) -> Any:
    depth = depth or rng.choice([10, 70, 500, 3000])
    value: Any = junk_scalar(rng) if rng.random() < 0.5 else 1
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def cyclic(rng: random.Random) -> Any:
    if rng.random() < 0.5:
        a: list[Any] = [1]
        a.append(a)
        return a
    d: dict[str, Any] = {"a": 1}
    d["self"] = d
    return d


def junk(rng: random.Random, budget: int = 3) -> Any:
    """A value of a random type: scalar, list, mapping (odd keys), deep nesting, cycle."""
    r = rng.random()
    if budget <= 0 or r < 0.55:
        return junk_scalar(rng)
    if r < 0.7:
        return [junk(rng, budget - 1) for _ in range(rng.randrange(0, 4))]
    if r < 0.85:
        keys = [junk_string(rng) if rng.random() < 0.8 else rng.choice([1, None, True, 2.5]) for _ in range(rng.randrange(0, 4))]
        return {k: junk(rng, budget - 1) for k in keys}
    if r < 0.95:
        return deep(rng)
    return cyclic(rng)


# ============================================================================ recipes
def plausible(rng: random.Random, param: Any) -> Any:
    """A value a user might well write for a method parameter (valid most of the time)."""
    if param.kind is bool:
        return rng.choice([True, False])
    if param.kind is str:
        return rng.choice(list(param.choices or ("x",)))
    if param.kind is int:
        return rng.choice([0, 1, 2, 3])
    values = [0.0, 0.1, 0.2, 0.5, 1.0, -0.5, 2.0]
    if param.minimum is not None or param.maximum is not None:
        values = [v for v in values if (param.minimum is None or v >= param.minimum) and (param.maximum is None or v <= param.maximum)]
    if param.searchable and rng.random() < 0.1:
        return rng.sample(values, k=min(2, len(values)))
    return rng.choice(values)


def near_valid_recipe(rng: random.Random, refs: list[str], base_ref: str, methods: list[str] | None = None) -> dict[str, Any]:
    method = METHODS[rng.choice(methods or sorted(METHODS))]
    count = rng.randrange(1, 4)
    models = []
    for i in range(count):
        entry: dict[str, Any] = {"model": rng.choice(refs)}
        if rng.random() < 0.6:
            entry["name"] = f"task{i}" if rng.random() < 0.9 else junk_string(rng)
        per_model = [p for p in method.params if p.per_model]
        if per_model and rng.random() < 0.5:
            entry["parameters"] = {p.name: plausible(rng, p) for p in rng.sample(per_model, k=rng.randrange(1, len(per_model) + 1))}
        models.append(entry)
    data: dict[str, Any] = {"merge_method": method.name, "base_model": base_ref, "models": models}
    globals_ = [p for p in method.params if not p.per_model or rng.random() < 0.3]
    if globals_ and rng.random() < 0.7:
        data["parameters"] = {p.name: plausible(rng, p) for p in rng.sample(globals_, k=rng.randrange(1, len(globals_) + 1))}
    extras = {
        "dtype": lambda: rng.choice(["float32", "float64", "bfloat16", "float16"]),
        "out_dtype": lambda: rng.choice(["float32", "float16", "bfloat16", "float64"]),
        "tokenizer_source": lambda: rng.choice(["base", "none", "task0", "task1", "nope"]),
        "include": lambda: rng.choice([["model.layers.*"], ["*"], [], ["nothing.*"]]),
        "exclude": lambda: rng.choice([["*.embed_tokens.*"], ["lm_head.weight"], ["*"], []]),
        "output": lambda: {"shard_size": rng.choice(["1KB", "200B", 512, "5GB", "1GiB"])},
    }
    for key, make in extras.items():
        if rng.random() < 0.2:
            data[key] = make()
    return data


def _paths(value: Any, limit: int = 300) -> list[tuple[Any, Any]]:
    """(container, key) pairs of a structure, breadth first, bounded (cycles and depth are fine)."""
    out: list[tuple[Any, Any]] = []
    queue = [value]
    seen: set[int] = set()
    while queue and len(out) < limit:
        node = queue.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            for k in list(node)[:20]:
                out.append((node, k))
                queue.append(node[k])
        elif isinstance(node, list):
            for i in range(min(len(node), 20)):
                out.append((node, i))
                queue.append(node[i])
    return out


def mutate_structure(rng: random.Random, data: Any, count: int) -> tuple[Any, list[str]]:
    """Apply ``count`` random edits to a recipe-like structure; returns it and what was done."""
    done: list[str] = []
    for _ in range(count):
        slots = _paths(data)
        op = rng.randrange(12)
        if op == 0 or not slots:
            data = junk(rng)
            done.append("root=junk")
            continue
        container, key = rng.choice(slots)
        where = f"{type(container).__name__}[{str(key)[:20]!r}]"
        if op == 1:
            container[key] = junk(rng)
            done.append(f"{where}=junk")
        elif op == 2 and isinstance(container, dict):
            del container[key]
            done.append(f"del {where}")
        elif op == 3:
            container[key] = [container[key]] if rng.random() < 0.7 else {"value": container[key]}
            done.append(f"{where} wrapped (list for scalar)")
        elif op == 4:
            container[key] = rng.choice(SPECIAL_NUMBERS + [True, False, None, 10**400])
            done.append(f"{where}=number")
        elif op == 5:
            container[key] = junk_string(rng)
            done.append(f"{where}=string")
        elif op == 6 and isinstance(data, dict):
            data[junk_string(rng) if rng.random() < 0.7 else rng.choice(["modles", "parameter", "merge-method", "slices", "tokenizer", "chat_template", "dtype "])] = junk(rng)
            done.append("unknown key")
        elif op == 7 and isinstance(data, dict) and isinstance(data.get("models"), list) and data["models"]:
            try:
                data["models"].append(copy.deepcopy(data["models"][0]) if rng.random() < 0.8 else data["models"][0])
            except RecursionError:  # a deeply nested entry: share it instead
                data["models"].append(data["models"][0])
            done.append("duplicate model")
        elif op == 8 and isinstance(data, dict):
            data["models"] = rng.choice([[], None, {}, "m", [None], [{}], [{"model": ""}]])
            done.append("empty/odd models")
        elif op == 9:
            container[key] = deep(rng)
            done.append(f"{where}=deep")
        elif op == 10:
            container[key] = cyclic(rng)
            done.append(f"{where}=cyclic")
        else:
            if isinstance(data, dict):
                params = data.setdefault("parameters", {}) if isinstance(data.get("parameters", {}), dict) else {}
                name = rng.choice(["lambda", "weight", "density", "gamma", "seed", "consensus_k", "tall_lambda", "rescale", "scope", "merge", "aggregate", "mtl_dtype", "embed_base", "int8_mask", "normalize", "epsilon"])
                params[name] = rng.choice(SPECIAL_NUMBERS + [junk_scalar(rng), [0.1, 0.2], [], [[0.1]], True])
                done.append(f"parameters.{name}=odd")
    return data, done


YAML_TOKENS = [
    ":", " ", "\n", "- ", "[", "]", "{", "}", ",", "&a ", "*a", "*b", "!!python/object/apply:os.system ['true']", "!!python/name:os.system",
    "!!binary", "!!float", "!!int", "!!str", "!!set", "!!map", "!!omap", "!!timestamp", "? ", "<<: *a", "<<: {x: 1}", "---\n", "...\n",
    "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "#", "'", '"', "\\", "|", ">", "\t", "\x00", "\ufeff", "~", "null", ".nan", ".inf", "-.inf",
    "1e999", "0x1F", "0o17", "1_000", "2001-12-14", "yes", "no", "on", "off", "\u2028", "\x85", "9" * 5000, "[" * 300, "{a: " * 200,
    "merge_method: ties\n", "models: []\n", "parameters: {lambda: .nan}\n", "base_model: ", "  - model: x\n",
]


def mutate_text(rng: random.Random, text: str, count: int) -> tuple[str, list[str]]:
    done = []
    for _ in range(count):
        op = rng.randrange(8)
        pos = rng.randrange(len(text) + 1)
        if op <= 2:
            tok = rng.choice(YAML_TOKENS)
            text = text[:pos] + tok + text[pos:]
            done.append(f"insert {tok[:12]!r}")
        elif op == 3 and text:
            end = min(len(text), pos + rng.randrange(1, 20))
            text = text[:pos] + text[end:]
            done.append("delete span")
        elif op == 4:
            lines = text.split("\n")
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            text = "\n".join(lines)
            done.append("duplicate line")
        elif op == 5:
            text = text[:pos]
            done.append("truncate")
        elif op == 6:
            lines = text.split("\n")
            i = rng.randrange(len(lines))
            lines[i] = " " * rng.randrange(1, 5) + lines[i] if rng.random() < 0.5 else lines[i].lstrip()
            text = "\n".join(lines)
            done.append("indent")
        else:
            text = text[:pos] + chr(rng.randrange(0, 0x3000)) + text[pos + 1 :]
            done.append("replace char")
    return text, done


def recipe_text(rng: random.Random, refs: list[str], base_ref: str) -> tuple[str, str]:
    r = rng.random()
    if r < 0.08:
        n = rng.randrange(0, 200)
        return "".join(chr(rng.randrange(0, 0x300)) for _ in range(n)), "random text"
    if r < 0.12:
        return rng.choice([
            "a0: &a0 [1,1,1,1,1,1,1,1,1,1]\n" + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 8))
            + "merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: m}]\nparameters: {lambda: *a7}\n",
            "!!python/object/apply:os.system ['echo pwned']\n",
            "merge_method: !!python/name:os.system\nbase_model: b\nmodels: [{model: m}]\n",
            "[" * 5000 + "]" * 5000, "{a: " * 3000 + "1" + "}" * 3000, "parameters: {lambda: " + "9" * 5000 + "}\n",
            "merge_method: ties\nmerge_method: ties\nbase_model: b\nmodels: [{model: m}]\n", "\ufeffmerge_method: ties\n", "",
            "--- !!set {a, b}\n", "? [1, 2]\n: x\n", "base_model: !!binary aGVsbG8=\nmerge_method: ties\nmodels: [{model: m}]\n",
            "models: !!int nope\n", "dtype: !!float x\n", "base_model: !!timestamp 2001-99-99\n",
        ]), "special text"
    data = near_valid_recipe(rng, refs, base_ref)
    data, done = mutate_structure(rng, data, rng.randrange(0, 3))
    try:
        text = yaml.safe_dump(data, allow_unicode=rng.random() < 0.5, default_flow_style=rng.choice([None, True, False]), sort_keys=False)
    except (yaml.YAMLError, RecursionError, TypeError, ValueError):
        text = yaml.safe_dump(near_valid_recipe(rng, refs, base_ref), sort_keys=False)
        done.append("(undumpable: valid recipe)")
    text, more = mutate_text(rng, text, rng.randrange(0, 4))
    return text, "; ".join(done + more) or "valid"


def check_recipe(label: str, build: Callable[[], Recipe], source: str) -> Result:
    """A valid Recipe (which must round-trip through to_yaml), or a one-line RecipeError naming ``source``."""
    result, value = attempt(label, build, (RecipeError,), [source])
    if result.outcome == REJECTED and not str(value).startswith(f"{source}: "):
        return Result(FAILED, label, "unnamed", f"does not start with the source {source!r}: {str(value)[:200]}")
    if result.outcome == ACCEPTED:
        again, other = attempt(label, lambda: Recipe.from_text(value.to_yaml(), "round-trip"), (RecipeError,))
        if again.outcome != ACCEPTED or other != value:
            return Result(FAILED, label, "round-trip", f"an accepted recipe does not survive to_yaml/from_text: {again.detail or again.outcome}")
    return result


# ============================================================================ the kinds
class Kind:
    name = ""
    weight = 1.0  # share of --examples this kind runs (expensive kinds run fewer)

    def __init__(self, fx: Fixtures):
        self.fx = fx
        self.watch: Watch | None = None  # set by run_example: active only while the library works

    def attempt(self, label: str, fn: Callable[[], Any], allowed: tuple[type[BaseException], ...], names: list[str] | None = None) -> tuple[Result, Any]:
        """``attempt`` with the file-access watch active (inputs are prepared before, unwatched)."""
        assert self.watch is not None
        with watching(self.watch):
            return attempt(label, fn, allowed, names)

    def invoke(self, args: list[str]) -> Any:
        """Run the CLI in-process with the watch active."""
        from click.testing import CliRunner

        from mergekit_lite.cli import main

        assert self.watch is not None
        with watching(self.watch):
            return CliRunner().invoke(main, args, catch_exceptions=True)

    def example(self, rng: random.Random, case: Path) -> Result:  # pragma: no cover - abstract
        raise NotImplementedError

    # the folders an example may touch; subclasses widen them
    def reads(self, case: Path) -> list[Path]:
        return [case, *self.fx.read_only]

    def writes(self, case: Path) -> list[Path]:
        return [case]


class RecipeStruct(Kind):
    name = "recipe-struct"

    def example(self, rng: random.Random, case: Path) -> Result:
        refs = ["base", "org/model", "m1", "./x", "a/b/c"]
        data = near_valid_recipe(rng, refs, rng.choice(refs))
        data, done = mutate_structure(rng, data, rng.randrange(0, 5))
        label = "; ".join(done) or "valid"
        source = rng.choice(["recipe", "fuzz.yml", "my recipe.yml"])
        with watching(self.watch):
            return check_recipe(label, lambda: Recipe.from_dict(data, source), source)

    def writes(self, case: Path) -> list[Path]:
        return []


class RecipeYaml(Kind):
    name = "recipe-yaml"

    def example(self, rng: random.Random, case: Path) -> Result:
        text, label = recipe_text(rng, ["base", "org/model", "m1"], "base")
        with watching(self.watch):
            return check_recipe(label, lambda: Recipe.from_text(text, "fuzz.yml"), "fuzz.yml")

    def writes(self, case: Path) -> list[Path]:
        return []


class RecipeCli(Kind):
    """``validate``, ``run --dry-run`` and ``run`` on generated recipes over real (and broken) checkpoints."""

    name = "recipe-cli"
    weight = 0.5

    def example(self, rng: random.Random, case: Path) -> Result:
        fx = self.fx
        good = [str(t) for t in fx.tasks]
        broken = [str(p) for p in fx.broken.values()]
        odd = broken + [str(fx.decoys / "missing"), "org/not-cached-fuzz", "org/x@v1", str(fx.sharded), str(fx.sharded_bin)]
        refs = good if rng.random() < 0.5 else good * 4 + odd
        base_ref = str(fx.base) if rng.random() < 0.85 else rng.choice(odd + [str(fx.tasks[0])])
        data = near_valid_recipe(rng, refs, base_ref)
        data, done = mutate_structure(rng, data, rng.choice([0, 0, 0, 1, 2]))
        recipe = case / "recipe.yml"
        special = rng.random()
        if special < 0.03:
            recipe.mkdir()
            done.append("recipe is a folder")
        elif special < 0.06:
            recipe.write_bytes(b"merge_method: ties\n\xff\xfe\x00")
            done.append("recipe not UTF-8")
        elif special < 0.08:
            recipe = case / "absent.yml"
            done.append("recipe missing")
        else:
            try:
                recipe.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=rng.random() < 0.5), encoding="utf-8", errors="surrogatepass")
            except (yaml.YAMLError, RecursionError, TypeError, ValueError):
                recipe.write_text(yaml.safe_dump(near_valid_recipe(rng, refs, base_ref), sort_keys=False), encoding="utf-8")
                done.append("(undumpable: valid recipe)")
        out = case / "out"
        command = rng.choices(["validate", "dry-run", "run", "masks"], weights=[35, 35, 25, 5])[0]
        args = {
            "validate": ["validate", str(recipe)],
            "dry-run": ["run", str(recipe), str(out), "--dry-run"],
            "run": ["run", str(recipe), str(out), "-q"],
            "masks": ["masks", str(recipe), "--json", "-q"],
        }[command]
        method = data.get("merge_method") if isinstance(data, dict) else None
        label = f"{command}: " + ("; ".join(done) or "near-valid") + f" [{method if isinstance(method, str) else type(method).__name__}]"
        result = self.invoke(args)
        return cli_result(label, result, out if command == "run" else None, never=out if command != "run" else None)


def cli_result(label: str, result: Any, out: Path | None, never: Path | None = None) -> Result:
    """Exit 0 or 2, never a traceback; errors on one ``error:`` line; ``out`` exists exactly when exit 0."""
    stderr = result.stderr if hasattr(result, "stderr") else ""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return Result(FAILED, label, "crash", f"exit {result.exit_code}: {crash_site(result.exception)}")
    if result.exit_code not in (0, 2):
        return Result(FAILED, label, "exit-code", f"exit {result.exit_code}: {stderr[-300:]!r}")
    if never is not None and never.exists():
        return Result(FAILED, label, "leftover", f"{never.name} was written by a command that must write nothing")
    if result.exit_code == 2:
        lines = stderr.strip("\n").split("\n") if stderr else []
        usage = "Usage:" in stderr and "Error:" in stderr  # click's own argument errors
        lines = [ln for ln in lines if not ln.startswith("warning: ")]  # non-fatal notes come before the error
        # `validate` lists every problem: a header line, then one "  - " line per problem
        listed = len(lines) > 2 and re.fullmatch(r"error: \d+ problems in the recipe:", lines[0]) and all(ln.startswith("  - ") and one_line(ln) for ln in lines[1:])
        if not usage and not listed and (len(lines) != 1 or not lines[0].startswith("error: ") or not one_line(lines[0])):
            return Result(FAILED, label, "multi-line", f"stderr is not one 'error:' line: {stderr[:300]!r}")
        if out is not None and out.exists():
            return Result(FAILED, label, "leftover", f"output folder {out.name} exists after exit 2: {stderr.strip()[:200]}")
        return Result(REJECTED, label, detail=stderr.strip()[:200])
    if out is not None and not out.is_dir():
        return Result(FAILED, label, "leftover", "exit 0 but no output folder")
    return Result(ACCEPTED, label)


# -- safetensors ----------------------------------------------------------------------------------
def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict[str, Any] | str | bytes, body: bytes, pad: bool = True) -> bytes:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode("utf-8", "surrogatepass")
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_safetensors(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    header, body = _split(data)
    hlen = struct.unpack("<Q", data[:8])[0]
    names = [k for k, v in header.items() if isinstance(v, dict) and {"dtype", "shape", "data_offsets"} <= set(v) and isinstance(v["data_offsets"], list) and len(v["data_offsets"]) == 2]
    if not names:
        return data + b"\0", "trailing byte"
    name = rng.choice(names)
    entry = header[name]
    op = rng.randrange(16)
    if op == 0:
        cut = rng.randrange(len(data))
        return data[:cut], f"truncate at {cut}/{len(data)}"
    if op == 1:
        b = bytearray(data)
        for _ in range(rng.randrange(1, 9)):
            b[rng.randrange(min(len(b), 8 + hlen))] = rng.randrange(256)
        return bytes(b), "flip bytes in header"
    if op == 2:
        b = bytearray(data)
        for _ in range(rng.randrange(1, 9)):
            b[rng.randrange(8 + hlen, len(b))] = rng.randrange(256)
        return bytes(b), "flip bytes in data"
    if op == 3:
        value = rng.choice([0, 1, 2, hlen - 1, hlen + 1, len(data), len(data) + 1, 100 * 2**20 + 1, 2**63, 2**64 - 1, rng.randrange(2**64)])
        return struct.pack("<Q", value) + data[8:], f"header length = {value}"
    if op == 4:
        text = json.dumps(header)
        text, done = mutate_text(rng, text, rng.randrange(1, 4))
        return _join(text, body, pad=rng.random() < 0.5), "header JSON text: " + "; ".join(done)
    if op == 5:
        others = [header[n]["data_offsets"] for n in names if n != name]
        begin, end = entry["data_offsets"]
        choice = rng.randrange(6)
        if choice == 0 and others:
            o = rng.choice(others)
            entry["data_offsets"] = [o[0], o[0] + (end - begin)]
            what = "overlap"
        elif choice == 1:
            entry["data_offsets"] = [begin + 8, end + 8]
            what = "gap / shifted"
        elif choice == 2:
            entry["data_offsets"] = [begin, end + rng.choice([1, 8, len(body), 2**40])]
            what = "end out of range"
        elif choice == 3:
            entry["data_offsets"] = [-8, end - begin - 8]
            what = "negative"
        elif choice == 4:
            entry["data_offsets"] = rng.choice([[float(begin), float(end)], [str(begin), str(end)], [begin], [begin, end, end], None, {"a": 1}, [True, end], [begin, 1e400]])
            what = "non-integer / wrong arity"
        else:
            entry["data_offsets"] = [end, begin]
            what = "reversed"
        return _join(header, body), f"offsets {what} for {name}"
    if op == 6:
        entry["dtype"] = rng.choice(["F33", "", "f32", "F8", "I128", "COMPLEX64", 5, None, ["F32"], "BF16", "I8", "BOOL", "F64"])
        return _join(header, body), f"dtype {entry['dtype']!r} for {name}"
    if op == 7:
        entry["shape"] = rng.choice([[2**62, 2**62], [2**63], [0, 2**63], [0, 2**70], [-1], [1.5], ["3"], [True], None, 7, [], [1] * 100, [0] * 70, [3] * 200_000, [3] * 1000, list(reversed(entry["shape"])) + [1], [10**30]])
        return _join(header, body), f"shape {str(entry['shape'])[:40]} for {name}"
    if op == 8:
        key = rng.choice(["dtype", "shape", "data_offsets"])
        del entry[key]
        return _join(header, body), f"no {key} for {name}"
    if op == 9:
        header[name] = junk(rng, 2)
        try:
            return _join(header, body), f"entry for {name} = junk"
        except (TypeError, ValueError, RecursionError):
            header[name] = None
            return _join(header, body), f"entry for {name} = null"
    if op == 10:
        text = json.dumps(header)
        dup = json.dumps({name: entry})[1:-1]
        return _join("{" + dup + "," + text[1:], body), f"duplicate key {name}"
    if op == 11:
        header["__metadata__"] = rng.choice([[1], "x", 5, None, {"a": 1}, {"a": {"b": "c"}}, {"format": "pt"}, {}])
        return _join(header, body), f"__metadata__ = {str(header['__metadata__'])[:30]}"
    if op == 12:
        new = rng.choice(["a\nb", "\ud800", "", " ", "日本", "x" * 10000, "../x", "__metadata_"])
        header[new] = header.pop(name)
        return _join(header, body), f"rename {name} to {new[:12]!r}"
    if op == 13:
        extra = rng.choice([b"", b"\0" * 8, rng.randbytes(rng.randrange(1, 50))])
        return data + extra, "trailing bytes"
    if op == 14:
        return rng.choice([b"", b"\0" * 8, rng.randbytes(rng.randrange(1, 64)), b"\x02\0\0\0\0\0\0\0{}", b"\x08\0\0\0\0\0\0\0[1,2,3]", _join("[" * 5000 + "]" * 5000, b""), _join('{"a": ' + "9" * 5000 + "}", b"")]), "tiny / random file"
    header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [len(body), len(body) + 4]}
    return _join(header, body + b"\0\0\0\0"), f"valid re-layout ({name} replaced)"


def read_all(ref: Path | str) -> int:
    with open_checkpoint(ref) as ckpt:
        total = 0
        for name in ckpt.names:
            tensor = ckpt.get(name)
            info = ckpt.info(name)
            assert tuple(tensor.shape) == info.shape and tensor.dtype == info.dtype, f"{name}: read {tensor.dtype} {tuple(tensor.shape)}, header says {info}"
            total += tensor.numel()
        return total


class SafetensorsMutation(Kind):
    name = "safetensors-mutation"

    def example(self, rng: random.Random, case: Path) -> Result:
        data, label = mutate_safetensors(rng, self.fx.sample_safetensors)
        if rng.random() < 0.3:
            data, more = mutate_safetensors(rng, data) if len(data) > 8 and _parses(data) else (data, "")
            label += f" + {more}" if more else ""
        in_folder = rng.random() < 0.5
        target = (case / "ckpt" / "model.safetensors") if in_folder else (case / "weights.safetensors")
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(data)
        ref = target.parent if in_folder else target
        return self.attempt(label, lambda: read_all(ref), (CheckpointError,), [str(target)])[0]

    def writes(self, case: Path) -> list[Path]:
        return []


def _parses(data: bytes) -> bool:
    try:
        header, _ = _split(data)
        return isinstance(header, dict) and any(isinstance(v, dict) and "data_offsets" in v for v in header.values())
    except Exception:  # noqa: BLE001
        return False


# -- index files ----------------------------------------------------------------------------------
class IndexMutation(Kind):
    name = "index"

    def example(self, rng: random.Random, case: Path) -> Result:
        use_bin = rng.random() < 0.25
        src = self.fx.sharded_bin if use_bin else self.fx.sharded
        folder = case / "ckpt"
        shutil.copytree(src, folder)
        index_path = next(folder.glob("*.index.json"))
        index = json.loads(index_path.read_text())
        wm = index["weight_map"]
        name = rng.choice(list(wm))
        outside = self.fx.decoys / "outside.safetensors"
        op = rng.randrange(12)
        text = None
        if op == 0:
            wm[name] = rng.choice(["nope.safetensors", "../outside.safetensors", "../../decoys/outside.safetensors", str(outside), "/etc/passwd",
                                   "", ".", "..", "sub/x.safetensors", "..\\x.safetensors", "a\x00b.safetensors", "x" * 300 + ".safetensors",
                                   "日本.safetensors", "model.safetensors.index.json", "config.json", "~/x.safetensors", "./" + wm[name]])
            label = f"{name} -> {wm[name][:40]!r}"
        elif op == 1:
            wm[name] = rng.choice([1, None, True, [wm[name]], {"f": wm[name]}, 2.5])
            label = f"{name} -> {wm[name]!r}"
        elif op == 2:
            index["weight_map"] = rng.choice([[1, 2], "x", 5, None, {}, [["a", "b"]]])
            label = f"weight_map = {index['weight_map']!r}"
        elif op == 3:
            del index["weight_map"]
            label = "no weight_map"
        elif op == 4:
            index = rng.choice([[1], "x", 5, None])
            label = f"index = {index!r}"
        elif op == 5:
            text, done = mutate_text(rng, json.dumps(index), rng.randrange(1, 4))
            label = "index JSON text: " + "; ".join(done)
        elif op == 6:
            text = rng.choice(["[" * 5000 + "]" * 5000, '{"weight_map": ' + "9" * 5000 + "}", "", "\xff", '{"weight_map": {"a": "x", "a": "y"}}'])
            label = f"index text {text[:20]!r}"
        elif op == 7:
            victim = folder / wm[name]
            how = rng.randrange(4)
            if how == 0:
                victim.unlink()
                label = f"shard {wm[name]} deleted"
            elif how == 1:
                victim.unlink()
                victim.mkdir()
                label = f"shard {wm[name]} is a folder"
            elif how == 2:
                data = victim.read_bytes()
                victim.write_bytes(data[: rng.randrange(len(data))])
                label = f"shard {wm[name]} truncated"
            else:
                victim.unlink()
                os.symlink(outside, victim)
                label = f"shard {wm[name]} is a symlink outside"  # a hub cache is symlinks: allowed, but must fail cleanly
        elif op == 8:
            wm["not.in.any.shard"] = wm[name]
            label = "tensor missing from its shard"
        elif op == 9:
            other = rng.choice([f for f in set(wm.values())])
            wm[name] = other
            label = f"{name} moved to {other}"
        elif op == 10:
            wm[rng.choice(["a\nb", "\ud800x", "", "x" * 5000])] = wm[name]
            label = "odd tensor name in weight_map"
        else:
            index["metadata"] = junk(rng, 2)
            label = "metadata = junk"
        try:
            index_path.write_bytes((text if text is not None else json.dumps(index)).encode("utf-8", "surrogatepass"))
        except (TypeError, ValueError, RecursionError):
            index_path.write_text("{}", encoding="utf-8")
            label += " (undumpable -> {})"
        result, value = self.attempt(label, lambda: read_all(folder), (CheckpointError,), [str(folder)])
        return result

    def reads(self, case: Path) -> list[Path]:
        # a shard may legitimately be a symlink (the hub cache is made of them): reading through it is allowed
        return [case, self.fx.decoys / "outside.safetensors"]

    def writes(self, case: Path) -> list[Path]:
        return []


# -- .bin pickles -----------------------------------------------------------------------------------
class _Payload:
    """An object whose unpickling would run code: it creates ``marker`` (or runs a shell command)."""

    def __init__(self, how: str, marker: str):
        self.how, self.marker = how, marker

    def __reduce__(self) -> tuple[Any, ...]:
        import builtins
        import subprocess

        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        if self.how == "subprocess":
            return (subprocess.call, (["touch", self.marker],))
        if self.how == "exec":
            return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))
        if self.how == "eval":
            return (builtins.eval, (f"open({self.marker!r}, 'w')",))
        if self.how == "open":
            return (builtins.open, (self.marker, "w"))
        return (os.makedirs, (self.marker,))


def _legacy_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def _zip_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class BinMutation(Kind):
    name = "bin"

    def example(self, rng: random.Random, case: Path) -> Result:
        marker = case / "PWNED"
        op = rng.randrange(9)
        t = torch.randn(3, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        if op <= 1:
            how = rng.choice(["system", "subprocess", "exec", "eval", "open", "makedirs"])
            payload = rng.choice([_Payload(how, str(marker)), {"w": _Payload(how, str(marker))}, {"state_dict": {"w": t, "x": _Payload(how, str(marker))}}])
            fmt = rng.choice(["pickle", "zip", "legacy"])
            if fmt == "pickle":
                data = pickle.dumps(payload, protocol=rng.randrange(0, pickle.HIGHEST_PROTOCOL + 1))
            elif fmt == "zip":
                data = _zip_bytes(payload)
            else:
                data = _legacy_bytes(payload)
            label = f"code-running pickle ({how}, {fmt})"
        elif op == 2:
            obj = rng.choice([[t], (t,), t, 5, "x", None, {t.numel()}, {"a": {"b": t}}, {1: t}, {("a",): t}, {"a": 5}, {"a": "x"},
                              {"state_dict": {"a": 3}}, {"state_dict": {"a": t}, "epoch": 3}, {"a": t.numpy()}, {}, {"a": [t]}])
            label = f"payload {type(obj).__name__}: {str(obj)[:40]!r}"
            try:
                data = _zip_bytes(obj) if rng.random() < 0.7 else pickle.dumps(obj)
            except Exception:  # noqa: BLE001
                data = pickle.dumps(None)
        elif op == 3:
            obj = {"a": rng.choice([t.to_sparse(), torch.zeros(2, dtype=torch.complex64), torch.zeros(2, 2)[:, 0], torch.zeros(3).as_strided((2,), (0,)), torch.zeros(2, dtype=torch.float8_e5m2), torch.zeros(2, dtype=torch.uint16)])}
            label = f"tensor kind {obj['a'].layout} {obj['a'].dtype}"
            data = _zip_bytes(obj)
        elif op == 4:
            data = self.fx.sample_bin[: rng.randrange(len(self.fx.sample_bin))]
            label = "truncated zip"
        elif op == 5:
            b = bytearray(self.fx.sample_bin)
            for _ in range(rng.randrange(1, 6)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            data = bytes(b)
            label = "flipped bytes in zip"
        elif op == 6:
            legacy = _legacy_bytes({"w": t.repeat(4), "b": torch.zeros(2)})
            data = legacy[: rng.randrange(len(legacy))] if rng.random() < 0.7 else legacy
            label = "legacy format" + (" truncated" if len(data) < len(legacy) else "")
        elif op == 7:
            data = rng.choice([b"", b"PK\x03\x04", b"PK\x05\x06" + b"\0" * 18, rng.randbytes(rng.randrange(1, 300)), b"\x80\x02}q\x00.", b"\x80\x04\x95"])
            label = f"garbage ({len(data)} bytes)"
        else:
            data = self.fx.sample_bin
            label = "valid"
        in_folder = rng.random() < 0.5
        target = (case / "ckpt" / "pytorch_model.bin") if in_folder else (case / rng.choice(["w.bin", "w.pt", "w.pth"]))
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(data)
        result = self.attempt(label, lambda: read_all(target.parent if in_folder else target), (CheckpointError,), [str(target)])[0]
        if marker.exists():
            return Result(FAILED, label, "code-ran", "the pickle's payload created the marker file")
        if result.outcome == ACCEPTED and op <= 1:
            return Result(FAILED, label, "accepted-bad", "a pickle with a code-running payload was accepted")
        return result

    def writes(self, case: Path) -> list[Path]:
        return []


# -- collections -----------------------------------------------------------------------------------
def _set_checksum(folder: Path, manifest: Any, raw: str | None = None) -> None:
    text = raw if raw is not None else json.dumps(manifest, indent=1)
    (folder / "manifest.json").write_bytes(text.encode("utf-8", "surrogatepass"))
    (folder / "manifest.json.sha256").write_text(hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest() + "\n", encoding="ascii")


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": path.stat().st_size}


def tamper_manifest(rng: random.Random, folder: Path, decoys: Path, sandbox: Path) -> str:
    """Edit ``folder``'s manifest as an attacker who also fixes manifest.json.sha256 would; returns what was done."""
    m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    attacks = [
        "../x", "../../decoys/secret.txt", str(decoys / "secret.txt"), str(decoys / "outside.safetensors"), str(sandbox / "escaped"),
        "tasks/../../x", "masks/../../manifest.json", ".", "", "/", "a/./b", "masks//x", "~/x", "x\x00y", "C:\\x", "..\\x",
        "masks/000-math.safetensors/..", "x" * 300, "日本", "a\nb", "..",
    ]
    # a stem names the output folder of `extract --all` (OUT/<stem>): attacks that would land inside the sandbox
    stem_attacks = ["../../escaped", "../../../escaped", str(sandbox / "escaped"), "../x", "a/./b", "..", ".", "", "x\x00y", "a\nb", "日本", "x" * 300, "C:\\x"]
    task = rng.randrange(len(m["tasks"]))
    op = rng.randrange(14)
    if op == 0:
        bad = rng.choice(attacks)
        key = rng.choice(list(m["files"]))
        m["files"][bad] = m["files"].pop(key) if rng.random() < 0.5 else {"sha256": "0" * 64, "size": 1}
        what = f"files key {bad[:30]!r}"
    elif op == 1:
        bad = rng.choice(stem_attacks)
        m["tasks"][task]["stem"] = bad
        if rng.random() < 0.8:  # with no support files, the stem is used for nothing but the output folder name
            m["tasks"][task]["support_files"] = []
        what = f"task stem {bad[:30]!r}"
    elif op == 2:
        bad = rng.choice(attacks)
        m["tasks"][task]["mask_file"] = bad
        if rng.random() < 0.5 and bad:
            m["files"][bad] = m["files"].get(f"masks/{m['tasks'][task]['stem']}.safetensors", {"sha256": "0", "size": 0})
        what = f"mask_file {bad[:30]!r}"
    elif op == 3:
        bad = rng.choice(attacks)
        m["tasks"][task]["support_files"] = [bad]
        what = f"support file {bad[:30]!r}"
    elif op == 4:
        bad = rng.choice(attacks)
        where = rng.choice(["files", "weight_map", "index"])
        if where == "files":
            m["tau_mtl"]["files"] = [bad]
        elif where == "weight_map":
            m["tau_mtl"]["weight_map"][rng.choice(list(m["tau_mtl"]["weight_map"]))] = bad
        else:
            m["tau_mtl"]["index"] = bad
        what = f"tau_mtl.{where} {bad[:30]!r}"
    elif op == 5 and m["base"]["embedded"]:
        bad = rng.choice(attacks)
        m["base"]["path"] = bad
        what = f"embedded base path {bad[:30]!r}"
    elif op == 6:
        m["format_version"] = rng.choice([0, 2, "1", 1.0, True, None, -1, 10**30, [1]])
        what = f"format_version {m['format_version']!r}"
    elif op == 7:
        m["tasks"][task]["name"] = rng.choice(["a\nb", "../x", "", "日本語", "x" * 1000, 5, None, m["tasks"][(task + 1) % len(m["tasks"])]["name"], "\ud800"])
        what = f"task name {str(m['tasks'][task]['name'])[:20]!r}"
    elif op == 8:
        t = rng.choice(m["tensors"])
        field_ = rng.choice(["dtype", "shape", "stored", "name"])
        t[field_] = rng.choice({
            "dtype": ["int8", "save", "os", "Tensor", "", "float", "nn", 5, None, "bool", "float16"],
            "shape": [[4, 16], [2**40, 2**40], [-1], "ab", [], None, [0], [1.5], [10**30]],
            "stored": [True, False, "yes", None, 0],
            "name": ["nope", "", 5, None, m["tensors"][0]["name"]],
        }[field_])
        what = f"tensor {field_} {str(t[field_])[:20]!r}"
    elif op == 9:
        entry = m["tasks"][task]
        field_ = rng.choice(["dtypes", "tall_lambda", "density", "relative_error", "original_bytes", "lambda_scores", "source"])
        entry[field_] = rng.choice([None, "x", [], {}, -1, float("nan"), 10**30, {"model.norm.weight": rng.choice(["save", "int8", "os", 5])}])
        what = f"task {field_} = {str(entry[field_])[:20]!r}"
    elif op == 10:
        slots = _paths(m)
        container, key = rng.choice(slots)
        container[key] = junk(rng, 2)
        what = f"{str(key)[:20]!r} = junk"
    elif op == 11:
        slots = [(c, k) for c, k in _paths(m) if isinstance(c, dict)]
        container, key = rng.choice(slots)
        del container[key]
        what = f"delete {str(key)[:20]!r}"
    elif op == 12:
        # a file of the collection replaced by a symlink to a decoy, its manifest entry fixed to match
        rel = rng.choice([r for r in m["files"] if not r.startswith("base/")] or list(m["files"]))
        target = rng.choice([decoys / "secret.txt", decoys / "outside.safetensors"])
        (folder / rel).unlink()
        os.symlink(target, folder / rel)
        m["files"][rel] = _file_entry(target)
        what = f"{rel} is a symlink to {target.name} (checksums fixed)"
    else:
        rel = rng.choice(list(m["files"]))
        data = (folder / rel).read_bytes()
        b = bytearray(data)
        if b:
            b[rng.randrange(len(b))] ^= 0xFF
        (folder / rel).write_bytes(bytes(b[: rng.randrange(len(b) + 1)]) if rng.random() < 0.3 else bytes(b))
        if rng.random() < 0.5:
            m["files"][rel] = _file_entry(folder / rel)
            what = f"{rel} changed (checksums fixed)"
        else:
            what = f"{rel} changed"
    if rng.random() < 0.08:
        try:
            (folder / "manifest.json").write_text(json.dumps(m), encoding="utf-8")  # checksum left stale
        except (TypeError, ValueError, RecursionError):
            (folder / "manifest.json").write_text("{}", encoding="utf-8")
        return what + " (stale checksum)"
    try:
        _set_checksum(folder, m)
    except (TypeError, ValueError, RecursionError):
        _set_checksum(folder, None, "{}")
        what += " (undumpable -> {})"
    return what


class CollectionApi(Kind):
    """``Collection.open`` / ``summary`` / ``verify`` / ``extract`` on a tampered collection."""

    name = "collection-manifest"
    weight = 0.5

    def example(self, rng: random.Random, case: Path) -> Result:
        src = self.fx.collection_embedded if rng.random() < 0.3 else self.fx.collection
        folder = case / "coll"
        shutil.copytree(src, folder, symlinks=True)
        label = tamper_manifest(rng, folder, self.fx.decoys, self.fx.root)
        outs = case / "outs"
        outs.mkdir()
        targets: list[Path] = []

        def use() -> None:
            coll = Collection.open(folder)
            tasks = coll.tasks
            coll.summary()
            if rng.random() < 0.5:
                coll.verify()
            for i, task in enumerate(tasks[:2]):
                targets.append(outs / f"t{i}")
                coll.extract(task, targets[-1], progress=False)

        result = self.attempt(label, use, (MergeKitLiteError,))[0]
        if result.outcome == REJECTED and targets and targets[-1].exists():
            return Result(FAILED, label, "leftover", f"extract failed but {targets[-1].name} exists")
        return result

    def reads(self, case: Path) -> list[Path]:
        return [case, *self.fx.read_only]

    def writes(self, case: Path) -> list[Path]:
        return [case / "outs"]


class CollectionCli(Kind):
    """``mergekit-lite extract`` (one task, ``--all``) and ``inspect`` on a tampered collection."""

    name = "collection-cli"
    weight = 0.5

    def example(self, rng: random.Random, case: Path) -> Result:
        src = self.fx.collection_embedded if rng.random() < 0.3 else self.fx.collection
        folder = case / "coll"
        shutil.copytree(src, folder, symlinks=True)
        label = tamper_manifest(rng, folder, self.fx.decoys, self.fx.root)
        outs = case / "outs"
        outs.mkdir()
        out = outs / "out"
        command = rng.choice(["extract-all", "extract", "inspect"])
        if command == "extract-all":
            args = ["extract", str(folder), "--all", str(out), "-q"]
            # OUT/<stem> for every task, built in OUT's own temporary sibling (all or none): nothing else beside OUT
            self.watch.write_ok = [str(out), str(outs / ".mergekit-lite-tmp-out.") + "*"]
        elif command == "extract":
            args = ["extract", str(folder), rng.choice(["math", "code", "chat", "nope"]), str(out), "-q"]
        else:
            args = ["inspect", str(folder)] + (["--json"] if rng.random() < 0.5 else []) + (["--verify"] if rng.random() < 0.5 else [])
        result = self.invoke(args)
        return cli_result(f"{command}: {label}", result, out if command != "inspect" else None, never=out if command == "inspect" else None)

    def writes(self, case: Path) -> list[Path]:
        return [case / "outs"]


class NanInf(Kind):
    """NaN/Inf in an input tensor: a merge that reads it must refuse it (CheckpointError naming file and tensor)."""

    name = "nan-inf"
    weight = 0.25

    def example(self, rng: random.Random, case: Path) -> Result:
        fx = self.fx
        folders = {"base": fx.base, "t0": fx.tasks[0], "t1": fx.tasks[1]}
        copies = {k: case / k for k in folders}
        for k, src in folders.items():
            shutil.copytree(src, copies[k])
        victim = rng.choice(list(copies))
        state = {}
        with open_checkpoint(copies[victim]) as ckpt:
            for n in ckpt.names:
                state[n] = ckpt.get(n)
        name = rng.choice([n for n, t in state.items() if t.is_floating_point()])
        bad = state[name].clone().reshape(-1)
        for _ in range(rng.randrange(1, 3)):
            bad[rng.randrange(bad.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
        state[name] = bad.reshape(state[name].shape)
        if rng.random() < 0.3:
            state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in state.items()}
        save_file(state, copies[victim] / "model.safetensors")
        method = rng.choice(["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "consensus", "tall_masks"])
        exclude = rng.choice([[], [], [name], ["model.layers.*"]]) if method != "tall_masks" else []
        import fnmatch

        merged = not any(fnmatch.fnmatchcase(name, p) for p in exclude)
        data = {"merge_method": method, "base_model": str(copies["base"]), "models": [{"model": str(copies["t0"])}, {"model": str(copies["t1"])}]}
        if exclude:
            data["exclude"] = exclude
        label = f"{method}: NaN/Inf in {victim}/{name}{'' if merged else ' (excluded)'}"
        out = case / "out"
        target = copies[victim] / "model.safetensors"
        result, exc = self.attempt(label, lambda: mergekit_lite.run(Recipe.from_dict(data), out, progress=False), (MergeKitLiteError,), [str(target)] if merged else None)
        if result.outcome == REJECTED and merged and (not isinstance(exc, CheckpointError) or name not in str(exc)):
            return Result(FAILED, label, "unnamed", f"expected a CheckpointError naming {name}: {type(exc).__name__}: {str(exc)[:200]}")
        if result.outcome == ACCEPTED and merged:
            return Result(FAILED, label, "accepted-bad", "a merge read a NaN/Inf input without refusing it")
        if result.outcome == REJECTED and out.exists():
            return Result(FAILED, label, "leftover", "output folder exists after the error")
        return result

    def reads(self, case: Path) -> list[Path]:
        return [case]


KINDS: dict[str, type[Kind]] = {k.name: k for k in (RecipeStruct, RecipeYaml, RecipeCli, SafetensorsMutation, IndexMutation, BinMutation, CollectionApi, CollectionCli, NanInf)}


# ============================================================================ the runner
class Sandbox:
    """A folder holding the fixtures (built once) and one sub-folder per example."""

    def __init__(self, root: Path | None = None):
        self._owned = root is None
        self.root = Path(tempfile.mkdtemp(prefix="mkl-fuzz-")) if root is None else Path(root)
        self.root = self.root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "cases").mkdir(exist_ok=True)
        self.fixtures = build_fixtures(self.root)

    def close(self) -> None:
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)


def run_example(kind: Kind, sandbox: Sandbox, seed: int, index: int, keep: bool = False) -> Result:
    rng = random.Random(f"{seed}/{kind.name}/{index}")
    case = sandbox.root / "cases" / f"{kind.name}-{index}"
    if case.exists():
        shutil.rmtree(case)
    case.mkdir()
    before = snapshot(sandbox.root, skip=[case])
    watch = kind.watch = Watch(sandbox.root, kind.reads(case), kind.writes(case))
    try:
        result = kind.example(rng, case)
    except Exception as exc:  # noqa: BLE001 - a bug of the generator itself: reported, not hidden
        result = Result(FAILED, "(generator)", "harness-error", crash_site(exc) + " :: " + traceback.format_exc(limit=-3).replace("\n", " | ")[-400:])
    after = snapshot(sandbox.root, skip=[case])
    changed = sorted(set(before.items()) ^ set(after.items()))
    left = leftovers(case)
    also = f" (and: {result.reason}: {result.detail[:100]})" if result.outcome == FAILED else ""
    if watch.violations:  # the most serious findings win over the example's own verdict
        reason = "code-ran" if any(v.startswith("code-ran") for v in watch.violations) else "escape"
        result = Result(FAILED, result.label, reason, "; ".join(dict.fromkeys(watch.violations))[:300] + also)
    elif changed:
        result = Result(FAILED, result.label, "escape", f"changed outside its folder: {[c[0] for c in changed][:5]}{also}")
    elif left and result.outcome != FAILED:
        result = Result(FAILED, result.label, "leftover", f"temporary folders left: {left[:3]}")
    for rel, _ in changed:  # undo, so one example cannot spoil the next
        path = sandbox.root / rel
        if rel not in before and (path.is_symlink() or path.exists()) and not str(rel).startswith("fixtures"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    if not keep:
        shutil.rmtree(case, ignore_errors=True)
    return result


def run_kind(name: str, seed: int, count: int, sandbox: Sandbox, *, only: int | None = None, verbose: bool = False, keep: bool = False) -> KindReport:
    kind = KINDS[name](sandbox.fixtures)
    report = KindReport(name)
    start = time.perf_counter()
    indexes = [only] if only is not None else range(count)
    for i in indexes:
        result = run_example(kind, sandbox, seed, i, keep=keep or only is not None)
        report.tried += 1
        if result.outcome == ACCEPTED:
            report.accepted += 1
        elif result.outcome == REJECTED:
            report.rejected += 1
        else:
            report.failures.append(Failure(name, i, result.label, result.reason, result.detail))
        if verbose:
            print(f"  {name}[{i}] {result.outcome:<8} {result.reason:<12} {result.label[:70]!s} :: {result.detail[:160]}", flush=True)
    report.seconds = time.perf_counter() - start
    return report


def table(reports: list[KindReport]) -> str:
    head = f"{'input kind':<22}{'tried':>8}{'accepted':>10}{'rejected':>10}{'FAILED':>8}{'seconds':>9}  failure reasons"
    lines = [head, "-" * len(head)]
    for r in reports:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r.reasons().items()))
        lines.append(f"{r.kind:<22}{r.tried:>8}{r.accepted:>10}{r.rejected:>10}{r.failed:>8}{r.seconds:>9.1f}  {reasons}")
    total = KindReport("total", sum(r.tried for r in reports), sum(r.accepted for r in reports), sum(r.rejected for r in reports))
    total.failures = [f for r in reports for f in r.failures]
    total.seconds = sum(r.seconds for r in reports)
    lines.append("-" * len(head))
    lines.append(f"{'total':<22}{total.tried:>8}{total.accepted:>10}{total.rejected:>10}{total.failed:>8}{total.seconds:>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=1500, help="examples per input kind, times the kind's weight (default: 1500, ~3-5 min on 2 cores)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of: {', '.join(KINDS)}")
    parser.add_argument("--only", type=int, help="run one example (by index) of each chosen kind, keeping its folder")
    parser.add_argument("--show-failures", type=int, default=25, help="how many failures to list with a command reproducing each")
    parser.add_argument("--workdir", type=Path, help="sandbox folder (default: a new temporary folder, removed afterwards)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kind(s) {unknown}; choose from {list(KINDS)}")
    sandbox = Sandbox(args.workdir)
    print(f"mergekit-lite fuzz: seed {args.seed}, --examples {args.examples}, sandbox {sandbox.root}", flush=True)
    reports = []
    try:
        for name in kinds:
            count = max(1, round(args.examples * KINDS[name].weight))
            reports.append(run_kind(name, args.seed, count, sandbox, only=args.only, verbose=args.verbose))
            r = reports[-1]
            print(f"  {name:<22} {r.tried:>6} tried, {r.accepted:>5} accepted, {r.rejected:>5} rejected, {r.failed:>4} FAILED ({r.seconds:.1f}s)", flush=True)
    finally:
        if args.only is None:
            sandbox.close()
    print()
    print(table(reports))
    failures = [f for r in reports for f in r.failures]
    if failures:
        print(f"\n{len(failures)} FAILED; first {min(len(failures), args.show_failures)} (one per kind and reason first):")
        seen: set[tuple[str, str]] = set()
        ordered = [f for f in failures if (f.kind, f.reason) not in seen and not seen.add((f.kind, f.reason))]
        ordered += [f for f in failures if f not in ordered]
        for f in ordered[: args.show_failures]:
            print(f"- [{f.kind}#{f.index}] {f.reason}: {f.label[:90]}\n    {f.detail[:240]}\n    reproduce: {f.reproduce(args.seed)}")
    return 1 if failures else 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and the box is shared)
    sys.exit(main())

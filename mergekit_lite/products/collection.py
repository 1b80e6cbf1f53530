"""Compressed collections of fine-tunes (TALL-masks): write, open, verify, extract, inspect.

A collection stores the base (embedded, or referenced with the SHA-256 of its weight files),
the multi-task vector τ_MTL, and one bit per weight per task; task t comes back as
θ̂_t = θ_0 + m_t ⊙ τ_MTL. The format is described in docs/collection-format.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..ops.bitpack import pack_bits, packed_size, unpack_bits
from ..card import front_matter
from ..adapter import AdapterCheckpoint
from ..checkpoint import Checkpoint, TensorInfo, open_checkpoint, resolve_reference
from ..errors import CheckpointError, CollectionError, MergeKitLiteWarning, OutputError
from ..execute import TaskVectorPasses, compute_statistics, register_product, resolve_device
from ..methods import TensorContext, suggest
from ..methods.tall import multitask_vector
from ..search import load_evaluator, search_tall_lambdas
from ..statedict import LazyStateDict
from ..ops import tall_mask
from .mask_stats import MaskStats
from .tokenizer import TOKENIZER_MODEL_FILES, copy_sentence_transformers, has_tokenizer
from ..writer import (
    TOKENIZER_FILES,
    AtomicFolder,
    ShardedSafetensorsWriter,
    copy_support_files,
    sha256_file,
    write_json,
)

FORMAT = "mergekit-lite-collection"
#: Version 2 added each task's sentence-transformers files and the base's tokenizer for tasks without one.
FORMAT_VERSION = 2
#: Versions this code reads (version 1 collections have neither; see docs/collection-format.md).
READABLE_VERSIONS = (1, 2)
#: Where the base's tokenizer is kept, for tasks compressed from a folder without one, when the base is not embedded.
BASE_TOKENIZER = "base_tokenizer"
MANIFEST = "manifest.json"
MANIFEST_CHECKSUM = "manifest.json.sha256"
SUPPORT_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def task_file_stem(index: int, name: str) -> str:
    """A file-name-safe, unique stem for a task: its index and a sanitised name (no separators, no '..')."""
    clean = _UNSAFE.sub("_", name).strip("._") or "task"
    return f"{index:03d}-{clean[:64]}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_mtl_dtype(choice: str, jobs: list[TensorInfo]) -> torch.dtype:
    """'auto' stores τ_MTL in float32 (float64 if the model is float64); see docs/collection-format.md."""
    if choice != "auto":
        return getattr(torch, choice)
    return torch.float64 if any(j.dtype == torch.float64 for j in jobs) else torch.float32


# -- writing ------------------------------------------------------------------------------------
def compress(plan: Any, out_dir: str | os.PathLike[str], *, force: bool = False, device: str = "cpu", progress: bool = True) -> Path:
    """Write the recipe's models as a TALL-masks collection into ``out_dir`` (atomically)."""
    dev = resolve_device(device)
    recipe = plan.recipe
    names = plan.model_names
    count = len(names)
    stems = [task_file_stem(i, n) for i, n in enumerate(names)]
    compute_statistics(plan, dev, progress)
    merged = [plan.base.info(job.name) for job in plan.jobs if job.merge]
    base_infos = {job.name: plan.base.info(job.name) for job in plan.jobs}
    mtl_dtype = resolve_mtl_dtype(plan.params["mtl_dtype"], [base_infos[i.name] for i in merged])
    grids = [p["tall_lambda"] if isinstance(p["tall_lambda"], list) else None for p in plan.model_params]
    evaluator = load_evaluator(recipe.evaluator) if recipe.evaluator else None
    if evaluator is not None:  # an evaluator with no grid given searches the paper's grid
        given = {"tall_lambda"} & (set(recipe.parameters) | {k for m in recipe.models or [] for k in m.parameters})
        if not given:
            grids = [list(plan.method.param("tall_lambda").default_grid)] * count
    searching = any(g is not None for g in grids)
    ctx_params = {"aggregate": plan.params["aggregate"]}

    folder = AtomicFolder(out_dir, force=force)
    with folder as tmp:
        (tmp / "masks").mkdir()
        tau_writer = ShardedSafetensorsWriter(tmp, [TensorInfo(i.name, mtl_dtype, i.shape) for i in merged], recipe.output.shard_size, prefix="tau_mtl")
        source = TaskVectorPasses(plan, dev, progress)
        lambdas = [p["tall_lambda"] for p in plan.model_params]
        scores: list[dict[str, float] | None] = [None] * count
        tau_reader: Checkpoint | None = None
        if searching:
            # phase 1: τ_MTL only; then each task's λ by the evaluator on its reconstruction
            for name, deltas in source.tensors("τ_MTL"):
                kept = [d for _, d in deltas]
                ctx = TensorContext(name, names, ctx_params, plan.model_params, plan.model_statistics)
                tau_writer.write(name, multitask_vector(kept, ctx).to(mtl_dtype).cpu())
                del kept
            tau_writer.close()
            tau_reader = Checkpoint("τ_MTL", tmp, {n: tmp / f for n, f in tau_writer.shard_of.items()}, None)
            assert evaluator is not None
            lambdas, scores = search_tall_lambdas(
                evaluator, plan, tau_reader, grids, lambdas, dev, progress
            )
        mask_writers = [
            ShardedSafetensorsWriter(tmp / "masks", [TensorInfo(i.name, torch.uint8, (packed_size(i.numel),)) for i in merged], 2**62, prefix=stem)
            for stem in stems
        ]
        stats = MaskStats(names)
        error = [0.0] * count
        norm = [0.0] * count
        try:
            for name, deltas in source.tensors("TALL masks" if searching else "compressing"):
                kept = [d for _, d in deltas]  # the T task vectors, never stacked into one [T, ...] copy
                if tau_reader is None:
                    ctx = TensorContext(name, names, ctx_params, plan.model_params, plan.model_statistics)
                    stored = multitask_vector(kept, ctx).to(mtl_dtype)
                    tau_writer.write(name, stored.cpu())
                else:
                    stored = tau_reader.get(name).to(dev)
                tau = stored.to(kept[0].dtype)  # masks are built from the τ_MTL that extraction will use
                mask_list = []
                for t in range(count):
                    mask = tall_mask(kept[t], tau, lambdas[t])
                    mask_writers[t].write(name, pack_bits(mask).cpu())
                    error[t] += float(torch.linalg.vector_norm(torch.where(mask, tau, 0).sub_(kept[t]))) ** 2
                    norm[t] += float(torch.linalg.vector_norm(kept[t])) ** 2
                    mask_list.append(mask)
                del kept
                masks = torch.stack(mask_list)
                del mask_list
                stats.add(name, masks.cpu())
            if tau_reader is None:
                tau_writer.close()
            else:
                tau_reader.close()
            for w in mask_writers:
                w.close()
        finally:
            tau_writer.abort()
            for w in mask_writers:
                w.abort()
        files: dict[str, dict[str, Any]] = {}
        for file_name, (digest, size) in tau_writer.digests.items():
            files[file_name] = {"sha256": digest, "size": size}
        if len(tau_writer.shards) > 1:
            files[tau_writer.index_name] = _file_entry(tmp / tau_writer.index_name)
        for stem, w in zip(stems, mask_writers):
            for file_name, (digest, size) in w.digests.items():
                files[f"masks/{file_name}"] = {"sha256": digest, "size": size}
        base_entry = _store_base(plan, recipe, tmp, files)
        notes: list[str] = []
        own_tokenizer = [has_tokenizer(ckpt.folder) for ckpt in plan.models]
        base_tokenizer = _store_base_tokenizer(plan.base, base_entry, tmp, files) if not all(own_tokenizer) else None
        tasks = []
        for t, (name, stem, ckpt, entry) in enumerate(zip(names, stems, plan.models, [m for m in recipe.models if m.model != recipe.base_model])):
            copied: list[str] = []
            modules: list[str] = []
            if ckpt.folder is not None:
                (tmp / "tasks" / stem).mkdir(parents=True)
                copied = copy_support_files(ckpt.folder, tmp / "tasks" / stem, SUPPORT_FILES)
                if isinstance(ckpt, AdapterCheckpoint) and ckpt.base.folder is not None:  # a LoRA adapter's config is its base's
                    configs = [f for f in ("config.json", "generation_config.json") if f not in copied]
                    copied += copy_support_files(ckpt.base.folder, tmp / "tasks" / stem, configs)
                if (ckpt.folder / "modules.json").is_file():  # a sentence-transformers fine-tune: its own modules (pooling, dense head, ...)
                    modules = copy_sentence_transformers(ckpt.folder, tmp / "tasks" / stem, notes)
                for f in [*copied, *modules]:
                    files[f"tasks/{stem}/{f}"] = _file_entry(tmp / "tasks" / stem / f)
            dtypes = {i.name: _dtype_name(ckpt.info(i.name).dtype) for i in merged if ckpt.info(i.name).dtype != base_infos[i.name].dtype}
            tasks.append(
                {
                    "name": name,
                    "stem": stem,
                    "source": entry.model,
                    "tall_lambda": lambdas[t],
                    "lambda_scores": scores[t],
                    "mask_file": f"masks/{stem}.safetensors",
                    "density": stats.overall.density[t],
                    "relative_error": (error[t] / norm[t]) ** 0.5 if norm[t] else 0.0,
                    "original_bytes": ckpt.nbytes,
                    "support_files": copied,
                    "module_files": modules,
                    "tokenizer": "task" if own_tokenizer[t] else ("base" if base_tokenizer else None),
                    "dtypes": dtypes,
                }
            )
        _say_missing_tokenizers(tasks, plan.base, notes)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": f"mergekit-lite {__version__}",
            "aggregate": plan.params["aggregate"],
            "mtl_dtype": _dtype_name(mtl_dtype),
            "mask_bit_order": "big",
            "base": base_entry,
            "base_tokenizer": base_tokenizer,
            "tasks": tasks,
            "tensors": [
                {"name": job.name, "dtype": _dtype_name(base_infos[job.name].dtype), "shape": list(job.out.shape), "stored": job.merge}
                for job in plan.jobs
            ],
            "tau_mtl": {"files": sorted(tau_writer.digests), "index": tau_writer.index_name if len(tau_writer.shards) > 1 else None, "weight_map": tau_writer.shard_of},
            "mask_stats": {"overall": stats.overall.as_dict(names), "layers": {k: v.as_dict(names) for k, v in stats.layers.items()}},
            "files": files,
            "recipe": recipe.to_yaml(),
        }
        write_json(tmp / MANIFEST, manifest)
        (tmp / MANIFEST_CHECKSUM).write_text(sha256_file(tmp / MANIFEST) + "\n", encoding="ascii")
    for note in notes:
        warnings.warn(note, MergeKitLiteWarning, stacklevel=2)
    return folder.destination


def _store_base_tokenizer(base: Checkpoint, base_entry: dict[str, Any], tmp: Path, files: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Keep the base's tokenizer for the tasks that have none (an embedded base already holds it); None when the base has none."""
    if not has_tokenizer(base.folder):
        return None
    if base_entry["embedded"]:
        return {"path": "base", "files": [f for f in TOKENIZER_FILES if f"base/{f}" in files]}
    (tmp / BASE_TOKENIZER).mkdir()
    copied = copy_support_files(base.folder, tmp / BASE_TOKENIZER, TOKENIZER_FILES)
    for f in copied:
        files[f"{BASE_TOKENIZER}/{f}"] = _file_entry(tmp / BASE_TOKENIZER / f)
    return {"path": BASE_TOKENIZER, "files": copied}


def _say_missing_tokenizers(tasks: list[dict[str, Any]], base: Checkpoint, notes: list[str]) -> None:
    """One note for the tasks compressed from folders without tokenizer files: what their extraction will carry."""
    fallback = [repr(t["name"]) for t in tasks if t["tokenizer"] == "base"]
    none = [repr(t["name"]) for t in tasks if t["tokenizer"] is None]
    if fallback:
        notes.append(f"task(s) {', '.join(fallback)} have no tokenizer files; the collection keeps the base model's "
                     "tokenizer, and extracting them writes that one")
    if none:
        notes.append(f"task(s) {', '.join(none)} have no tokenizer files and neither has the base model {base.ref}; "
                     "their extractions will have no tokenizer")


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def _store_base(plan: Any, recipe: Any, tmp: Path, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Embed the base's weight and support files, or record where it is and the SHA-256 of its weights."""
    base: Checkpoint = plan.base
    local = Path(recipe.base_model).expanduser()
    if plan.params["embed_base"]:
        (tmp / "base").mkdir()
        for path in base.weight_files:
            shutil.copyfile(path, tmp / "base" / path.name)
            files[f"base/{path.name}"] = _file_entry(tmp / "base" / path.name)
        index = next((p for p in (base.folder or Path()).glob("*.index.json")), None) if base.folder else None
        if index is not None and len(base.weight_files) > 1:
            shutil.copyfile(index, tmp / "base" / index.name)
            files[f"base/{index.name}"] = _file_entry(tmp / "base" / index.name)
        for f in copy_support_files(base.folder, tmp / "base", SUPPORT_FILES):
            files[f"base/{f}"] = _file_entry(tmp / "base" / f)
        return {"embedded": True, "path": "base", "reference": recipe.base_model, "resolved_path": str(local.resolve()) if local.exists() else None}
    return {
        "embedded": False,
        "reference": recipe.base_model,
        "resolved_path": str(local.resolve()) if local.exists() else None,
        "weight_files": {p.name: _file_entry(p) for p in base.weight_files},
    }


# -- reading ------------------------------------------------------------------------------------
def has_tokenizer_files(names: list[str]) -> bool:
    """Whether these kept file names make a loadable tokenizer (tokenizer_config.json alone does not)."""
    return any(n in TOKENIZER_MODEL_FILES for n in names)


_STEM = re.compile(r"^\d{3}-[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REL = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_DTYPES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2"}


def _check_manifest(m: Any, where: Path) -> None:
    """Refuse a manifest whose keys or types are not what this version writes (an edited one may lie)."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CollectionError(f"{where}: invalid manifest: {what}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def rel_ok(v: Any) -> bool:
        return isinstance(v, str) and len(v) < 240 and bool(_REL.match(v)) and ".." not in v.split("/")

    files = m.get("files")
    need(isinstance(files, dict), "'files' must be an object")
    for rel, entry in files.items():
        need(rel_ok(rel), f"file entry {rel!r} is not a relative path inside the collection")
        need(isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and bool(_HEX.match(entry["sha256"])) and is_int(entry.get("size")), f"file entry {rel!r} needs sha256 and size")
    tasks = m.get("tasks")
    need(isinstance(tasks, list) and len(tasks) > 0, "'tasks' must be a non-empty list")
    stems = set()
    for i, t in enumerate(tasks):
        need(isinstance(t, dict), f"tasks[{i}] must be an object")
        need(isinstance(t.get("name"), str) and t["name"].isprintable() and 0 < len(t["name"]) < 1000, f"tasks[{i}].name must be printable text")
        need(isinstance(t.get("stem"), str) and bool(_STEM.match(t["stem"])) and t["stem"] not in stems, f"tasks[{i}].stem is not a safe, unique file stem")
        stems.add(t["stem"])
        need(t.get("mask_file") == f"masks/{t['stem']}.safetensors" and t["mask_file"] in files, f"tasks[{i}].mask_file must be masks/<stem>.safetensors and listed in files")
        need(all(is_num(t.get(k)) for k in ("tall_lambda", "density", "relative_error")) and is_int(t.get("original_bytes")), f"tasks[{i}] has non-numeric λ, density, error or size")
        need(isinstance(t.get("support_files"), list) and all(isinstance(f, str) and f in SUPPORT_FILES and f"tasks/{t['stem']}/{f}" in files for f in t["support_files"]), f"tasks[{i}].support_files lists unknown files")
        modules = t.get("module_files", [])
        need(isinstance(modules, list) and all(rel_ok(f) and f"tasks/{t['stem']}/{f}" in files for f in modules), f"tasks[{i}].module_files lists unknown files")
        need(t.get("tokenizer", "task") in ("task", "base", None), f"tasks[{i}].tokenizer must be task, base or null")
        need(isinstance(t.get("dtypes"), dict) and all(isinstance(k, str) and v in _DTYPES for k, v in t["dtypes"].items()), f"tasks[{i}].dtypes is invalid")
        need("lambda_scores" in t and (t["lambda_scores"] is None or isinstance(t["lambda_scores"], dict)), f"tasks[{i}].lambda_scores is invalid")
        need(isinstance(t.get("source"), str), f"tasks[{i}].source must be text")
    tensors = m.get("tensors")
    need(isinstance(tensors, list), "'tensors' must be a list")
    for i, t in enumerate(tensors):
        need(isinstance(t, dict) and isinstance(t.get("name"), str) and t.get("dtype") in _DTYPES and isinstance(t.get("stored"), bool), f"tensors[{i}] is invalid")
        need(isinstance(t.get("shape"), list) and len(t["shape"]) <= 64 and all(is_int(d) and d < 2**40 for d in t["shape"]), f"tensors[{i}].shape is invalid")
    tau = m.get("tau_mtl")
    need(isinstance(tau, dict) and isinstance(tau.get("files"), list) and all(isinstance(f, str) and f in files for f in tau["files"]), "'tau_mtl.files' must list files of the collection")
    need(isinstance(tau.get("weight_map"), dict) and all(isinstance(k, str) and v in tau["files"] for k, v in tau["weight_map"].items()), "'tau_mtl.weight_map' must map tensors to τ_MTL files")
    bt = m.get("base_tokenizer")
    need(bt is None or (isinstance(bt, dict) and bt.get("path") in ("base", BASE_TOKENIZER) and isinstance(bt.get("files"), list)
                        and all(isinstance(f, str) and f in TOKENIZER_FILES and f"{bt['path']}/{f}" in files for f in bt["files"])),
         "'base_tokenizer' must be null or {path, files} of tokenizer files in the collection")
    need(all(t.get("tokenizer") != "base" for t in tasks) or bt is not None, "a task takes the base's tokenizer but 'base_tokenizer' is null")
    base = m.get("base")
    need(isinstance(base, dict) and isinstance(base.get("embedded"), bool) and isinstance(base.get("reference"), str), "'base' needs embedded and reference")
    if base["embedded"]:
        need(base.get("path") == "base", "'base.path' must be 'base'")
    else:
        wf = base.get("weight_files")
        need(isinstance(wf, dict) and all(isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("sha256"), str) and is_int(v.get("size")) for k, v in wf.items()), "'base.weight_files' is invalid")
        need(base.get("resolved_path") is None or isinstance(base["resolved_path"], str), "'base.resolved_path' must be text")
    for key in ("aggregate", "mtl_dtype", "created_by", "recipe"):
        need(isinstance(m.get(key), str), f"'{key}' must be text")
    stats = m.get("mask_stats")
    need(isinstance(stats, dict) and isinstance(stats.get("overall"), dict), "'mask_stats.overall' is missing")
    overall = stats["overall"]
    need(isinstance(overall.get("histogram"), list) and all(is_int(v) for v in overall["histogram"]), "'mask_stats.overall.histogram' is invalid")
    need(is_num(overall.get("catastrophic_fraction")) and is_num(overall.get("selfish_fraction")), "'mask_stats.overall' fractions are invalid")


class Collection:
    """An opened collection. ``open`` checks the manifest and every file's presence and size; the
    SHA-256 of a file is checked when it is first used (``verify()`` checks them all)."""

    def __init__(self, path: Path, manifest: dict[str, Any], base_override: str | None = None):
        self.path = path
        self.manifest = manifest
        self.base_override = base_override
        self._verified: set[str] = set()

    @classmethod
    def open(cls, path: str | os.PathLike[str], base: str | None = None) -> "Collection":
        """Open a collection folder; ``base`` points at the base model if it moved since compression."""
        folder = Path(path)
        manifest_path = folder / MANIFEST
        if not folder.is_dir():
            raise CollectionError(f"{folder}: no such collection folder")
        if not manifest_path.is_file():
            raise CollectionError(f"{folder}: not a collection ({MANIFEST} is missing)")
        try:
            expected = (folder / MANIFEST_CHECKSUM).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            raise CollectionError(f"{folder / MANIFEST_CHECKSUM}: missing or unreadable; the collection is incomplete") from None
        if sha256_file(manifest_path) != expected:
            raise CollectionError(f"{manifest_path}: SHA-256 does not match {MANIFEST_CHECKSUM}; the manifest was changed or corrupted")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CollectionError(f"{manifest_path}: not valid JSON ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CollectionError(f"{manifest_path}: not a mergekit-lite collection manifest")
        version = manifest.get("format_version")
        if version not in READABLE_VERSIONS:
            raise CollectionError(f"{manifest_path}: format version {version!r}; this mergekit-lite reads versions "
                                  f"{', '.join(map(str, READABLE_VERSIONS))}, upgrade it")
        _check_manifest(manifest, manifest_path)
        collection = cls(folder, manifest, base)
        collection._check_files()
        return collection

    def _check_files(self) -> None:
        for rel, entry in self.manifest["files"].items():
            path = self._inside(rel)
            if not path.is_file() and not path.is_symlink():
                raise CollectionError(f"{path}: missing from the collection; it is incomplete")
            if path.stat().st_size != entry["size"]:
                raise CollectionError(f"{path}: has {path.stat().st_size} bytes, the manifest says {entry['size']}; the file is truncated or was changed")

    def _inside(self, rel: str) -> Path:
        """A manifest path, refused if it would point outside the collection folder."""
        parts = Path(rel).parts
        if os.path.isabs(rel) or ".." in parts or not parts:
            raise CollectionError(f"{self.path / MANIFEST}: file entry {rel!r} points outside the collection")
        path = self.path / rel
        root = self.path.resolve()
        for part in [path, *path.parents]:
            if part == self.path:
                break
            if part.is_symlink():
                raise CollectionError(f"{path}: is a symbolic link; a collection holds plain files only (copy it without links)")
        if not path.resolve().is_relative_to(root):
            raise CollectionError(f"{path}: resolves outside the collection")
        return path

    def _verify_file(self, rel: str) -> None:
        if rel in self._verified:
            return
        entry = self.manifest["files"].get(rel)
        if entry is None:
            raise CollectionError(f"{self.path / MANIFEST}: lists no checksum for {rel}")
        if sha256_file(self._inside(rel)) != entry["sha256"]:
            raise CollectionError(f"{self.path / rel}: SHA-256 does not match the manifest; the file is corrupted or was changed")
        self._verified.add(rel)

    def verify(self) -> int:
        """Check the SHA-256 of every file (and of a referenced base's weights); returns the number of files checked."""
        for rel in self.manifest["files"]:
            self._verify_file(rel)
        if not self.manifest["base"]["embedded"]:
            self.base_checkpoint().close()
        return len(self.manifest["files"])

    # -- contents --------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return [t["name"] for t in self.manifest["tasks"]]

    def task(self, name: str) -> dict[str, Any]:
        for entry in self.manifest["tasks"]:
            if entry["name"] == name:
                return entry
        raise CollectionError(f"{self.path}: no task {name!r}{suggest(name, self.tasks)} (tasks: {', '.join(self.tasks)})")

    def tokenizer_of(self, task: str) -> str | None:
        """Whose tokenizer an extraction of ``task`` carries: 'task' (its own), 'base' (the base's, kept in the
        collection because the task's folder had none) or None (no tokenizer at all)."""
        entry = self.task(task)
        if "tokenizer" in entry:  # format 2
            return entry["tokenizer"]
        if has_tokenizer_files(entry["support_files"]):  # format 1: decided from the files kept
            return "task"
        return "base" if self._base_tokenizer() is not None else None

    def _base_tokenizer(self) -> tuple[str, list[str]] | None:
        """(folder, file names) of the base's tokenizer kept in the collection, if any (format 1: an embedded base's)."""
        bt = self.manifest.get("base_tokenizer")
        if bt is not None:
            return bt["path"], list(bt["files"])
        if self.manifest["format_version"] == 1 and self.manifest["base"]["embedded"]:
            kept = [f for f in TOKENIZER_FILES if f"base/{f}" in self.manifest["files"]]
            return ("base", kept) if has_tokenizer_files(kept) else None
        return None

    def base_checkpoint(self) -> Checkpoint:
        """The base model: embedded, or the reference (or --base) checked against the recorded SHA-256."""
        base = self.manifest["base"]
        if base["embedded"]:
            for rel in self.manifest["files"]:
                if rel.startswith("base/"):
                    self._verify_file(rel)
            return open_checkpoint(self._inside(base["path"]))
        candidates = [self.base_override] if self.base_override else [base.get("resolved_path"), base["reference"]]
        ref = next((c for c in candidates if c and (Path(c).exists() or c == base["reference"])), base["reference"])
        try:
            ckpt = open_checkpoint(ref)
        except CheckpointError as exc:
            raise CollectionError(f"base model of {self.path} is not available ({exc}); pass --base PATH to where it is now") from None
        recorded = base["weight_files"]
        found = {p.name: p for p in ckpt.weight_files}
        if set(found) != set(recorded):
            ckpt.close()
            raise CollectionError(f"base model {ref}: has weight files {sorted(found)}, the collection was made from {sorted(recorded)}; it changed")
        key = ("base", str(ref))
        if key not in self._verified:
            for name, entry in recorded.items():
                if found[name].stat().st_size != entry["size"] or sha256_file(found[name]) != entry["sha256"]:
                    ckpt.close()
                    raise CollectionError(f"base model {ref}: {name} changed since the collection was made (SHA-256 differs); restore it or compress again")
            self._verified.add(key)
        return ckpt

    def load_state_dict(self, task: str) -> LazyStateDict:
        """θ̂_task = θ_0 + m_t ⊙ τ_MTL as a lazy state dict (each tensor computed on access), in the task's dtypes."""
        entry = self.task(task)
        tau_files = list(self.manifest["tau_mtl"]["files"])
        for rel in [*tau_files, entry["mask_file"]]:
            self._verify_file(rel)
        base = self.base_checkpoint()
        tau = Checkpoint("τ_MTL", self.path, {n: self._inside(f) for n, f in self.manifest["tau_mtl"]["weight_map"].items()}, None)
        mask = open_checkpoint(self._inside(entry["mask_file"]))
        specs = {t["name"]: t for t in self.manifest["tensors"]}

        def dtype_of(name: str) -> torch.dtype:
            return getattr(torch, entry["dtypes"].get(name, specs[name]["dtype"]))

        def compute(name: str) -> torch.Tensor:
            stored = base.get(name)
            if not specs[name]["stored"]:
                return stored
            tau_t = tau.get(name)
            dtype = torch.float64 if tau_t.dtype == torch.float64 else torch.float32
            try:
                keep = unpack_bits(mask.get(name), tau_t.shape)
            except ValueError as exc:
                raise CollectionError(f"{mask.ref}: mask of {name} is malformed ({exc})") from None
            return stored.to(dtype).add_(torch.where(keep, tau_t.to(dtype), 0)).to(dtype_of(name))

        infos = [TensorInfo(n, dtype_of(n), tuple(t["shape"])) for n, t in specs.items()]
        return LazyStateDict(infos, compute, owned=(base, tau, mask))

    def extract(self, task: str, out_dir: str | os.PathLike[str], *, force: bool = False, progress: bool = True, shard_size: int = 5 * 10**9) -> Path:
        """Write θ̂_task as a Hugging Face checkpoint with the task's own config and tokenizer files."""
        entry = self.task(task)
        AtomicFolder(out_dir, force=force).check()
        tokenizer = self.tokenizer_of(task)
        # the task's own files (config, tokenizer, sentence-transformers modules), then the base's tokenizer if it had none
        own = [f for f in entry["support_files"] if tokenizer == "task" or f not in TOKENIZER_FILES]  # never half a tokenizer of each
        copies = [(f"tasks/{entry['stem']}/{f}", f) for f in [*own, *entry.get("module_files", [])]]
        if tokenizer == "base":
            folder, names = self._base_tokenizer()  # type: ignore[misc]  (tokenizer_of says there is one)
            copies += [(f"{folder}/{f}", f) for f in names]
        for rel, _ in copies:
            self._verify_file(rel)
        state = self.load_state_dict(task)
        try:
            base = self.manifest["base"]
            # the hub id of a base that came from the hub; a local base (resolved to a folder when compressed) only in the body
            hub_base = None if base.get("resolved_path") else base["reference"]
            library = "sentence-transformers" if "modules.json" in entry.get("module_files", []) else "transformers"
            state.card = (
                front_matter(hub_base, ["mergekit-lite", "tall-masks"], library)
                + f"# {task}\n\nReconstructed from the TALL-masks collection `{self.path.name}` as θ_0 + m_t ⊙ τ_MTL "
                f"(λ_t = {entry['tall_lambda']}, mask density {entry['density']:.4f}, relative error "
                f"‖θ̂_t − θ_t‖/‖θ_t − θ_0‖ = {entry['relative_error']:.4f}). Original: `{entry['source']}`. "
                f"Base model: `{base['reference']}`.\n"
            )


            def finish(folder: Path) -> None:
                for rel, name in copies:
                    (folder / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(self._inside(rel), folder / name)

            path = state.save_pretrained(out_dir, shard_size=shard_size, force=force, progress=progress, description=f"extracting {task}", finish=finish)
        finally:
            state.close()
        if tokenizer == "base":
            warnings.warn(f"{path}: task {task!r} was compressed from a folder without tokenizer files; the base model's tokenizer "
                          "(kept in the collection) was written instead", MergeKitLiteWarning, stacklevel=2)
        elif tokenizer is None:
            warnings.warn(f"{path}: no tokenizer: task {task!r} was compressed from a folder without tokenizer files and the collection "
                          "holds no base tokenizer; copy them in (e.g. from the base model)", MergeKitLiteWarning, stacklevel=2)
        return path

    # -- reporting -------------------------------------------------------------------------
    def mask_stats(self) -> dict[str, Any]:
        """The mask statistics recorded at compression (overall and per layer)."""
        return self.manifest["mask_stats"]

    def summary(self) -> dict[str, Any]:
        """What `mergekit-lite inspect` shows: tasks, λ, densities, bytes on disk and the ratio."""
        m = self.manifest
        on_disk = sum(e["size"] for e in m["files"].values()) + (self.path / MANIFEST).stat().st_size
        base_bytes = sum(e["size"] for e in m["base"].get("weight_files", {}).values())
        originals = sum(t["original_bytes"] for t in m["tasks"])
        with_base = on_disk + base_bytes
        return {
            "path": str(self.path),
            "format_version": m["format_version"],
            "created_by": m["created_by"],
            "aggregate": m["aggregate"],
            "mtl_dtype": m["mtl_dtype"],
            "base": {k: v for k, v in m["base"].items() if k != "weight_files"} | {"bytes": base_bytes if not m["base"]["embedded"] else None},
            "tasks": [
                {k: t[k] for k in ("name", "tall_lambda", "density", "relative_error", "original_bytes", "lambda_scores", "source")}
                | {"tokenizer": self.tokenizer_of(t["name"]), "sentence_transformers": "modules.json" in t.get("module_files", [])}
                for t in m["tasks"]
            ],
            "bytes_on_disk": on_disk,
            "bytes_with_base": with_base,
            "original_bytes": originals,
            "ratio": originals / with_base if with_base else None,
            "mask_stats": m["mask_stats"]["overall"],
        }


register_product("collection", compress)

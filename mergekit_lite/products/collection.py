"""Compressed collections of fine-tunes: write, open, verify, extract, inspect.

A collection stores the base (embedded, or referenced with the SHA-256 of its weight files), a
shared vector and per-task parts, by scheme (docs/collection-format.md):

- TALL masks: τ_MTL and one bit per weight per task; θ̂_t = θ_0 + m_t ⊙ τ_MTL.
- EMR: the unified vector τ_uni, one bit per weight and one scalar per task; θ̂_t = θ_0 + λ_t · (m_t ⊙ τ_uni).
- TSV-C: per task and 2-D tensor the top-k singular triplets, θ̂_t = θ_0 + U_t diag(S_t) V_tᵀ;
  the other tensors as TALL masks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

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
from ..search import load_evaluator, search_tall_lambdas, tall_lambda_score
from ..statedict import LazyStateDict
from ..ops import emr_elect, emr_mask, emr_rescaler, low_rank_product, rank_budget, tall_mask, truncated_svd
from .mask_stats import MaskStats, mask_counts
from .tokenizer import TOKENIZER_MODEL_FILES, copy_sentence_transformers, has_tokenizer
from ..writer import (
    TOKENIZER_FILES,
    AtomicFolder,
    ShardedSafetensorsWriter,
    copy_support_files,
    sha256_file,
    write_at,
    write_json,
)

FORMAT = "mergekit-lite-collection"
#: Version 2 added each task's sentence-transformers files and the base's tokenizer for tasks without one;
#: version 3 the EMR and TSV-C schemes (TALL-masks collections are still written as version 2).
FORMAT_VERSION = 3
#: Versions this code reads (version 1 collections have neither; see docs/collection-format.md).
READABLE_VERSIONS = (1, 2, 3)
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
#: the scheme each collection method writes (docs/collection-format.md)
SCHEMES = {"tall_masks": "tall", "emr": "emr", "tsv_compress": "tsv"}
#: the format version each scheme writes: TALL collections stay version 2, so older mergekit-lite reads them
SCHEME_VERSIONS = {"tall": 2, "emr": 3, "tsv": 3}
#: factors of a TSV-C matrix in a task's factor file: <tensor>.U [m, k], <tensor>.S [k], <tensor>.Vh [k, n]
FACTOR_SUFFIXES = (".U", ".S", ".Vh")


def factor_infos(name: str, shape: tuple[int, ...], k: int, dtype: torch.dtype) -> list[TensorInfo]:
    """The three factor tensors a TSV-C task stores for one matrix."""
    m, n = shape
    return [TensorInfo(f"{name}.U", dtype, (m, k)), TensorInfo(f"{name}.S", dtype, (k,)), TensorInfo(f"{name}.Vh", dtype, (k, n))]


def _magnitude(tensor: torch.Tensor) -> float:
    return float(tensor.abs().sum(dtype=torch.float64))


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ summed in float64 (one temporary in the tensors' dtype); ⟨a, a⟩ and ⟨a, b⟩ round alike when a = b."""
    return float(torch.sum(a * b, dtype=torch.float64))


@dataclass(frozen=True)
class CompressSetup:
    """What compressing one tensor needs besides its task vectors (the same on the driver and on every worker)."""

    scheme: str
    count: int
    model_params: list[dict[str, Any]]
    ctx_params: dict[str, Any]
    mtl_dtype: torch.dtype
    ranks: dict[str, int]
    lambdas: list[Any]


@dataclass
class TensorPart:
    """One tensor's additions to the per-task sums (None: not this scheme's), and its mask counts."""

    error: list[float] | None = None
    norm: list[float] | None = None
    emr: list[list[float]] | None = None  # task_l1, masked_l1, task_means, masked_means, uni_sq, uni_dot
    counts: tuple[list[int], list[int], list[list[int]]] | None = None


class Totals:
    """Per-task sums over the tensors, added tensor by tensor in the plan's order (the same floats however the work is spread)."""

    def __init__(self, count: int):
        self.error, self.norm = [0.0] * count, [0.0] * count
        self.task_l1, self.masked_l1, self.task_means, self.masked_means, self.uni_sq, self.uni_dot = ([0.0] * count for _ in range(6))

    def add(self, part: TensorPart) -> None:
        emr = [self.task_l1, self.masked_l1, self.task_means, self.masked_means, self.uni_sq, self.uni_dot]
        for t in range(len(self.error)):
            if part.error is not None:
                self.error[t] += part.error[t]
            if part.norm is not None:
                self.norm[t] += part.norm[t]
            if part.emr is not None:
                for sums, values in zip(emr, part.emr):
                    sums[t] += values[t]


#: writes one stored tensor: (kind "tau" | "mask" | "factor", task index or -1, tensor name, tensor)
WriteFn = Callable[[str, int, str, torch.Tensor], None]


def tau_tensor(setup: CompressSetup, name: str, kept: list[torch.Tensor], names: list[str], statistics: dict[str, Any]) -> torch.Tensor:
    """τ_MTL of one tensor in its stored dtype."""
    ctx = TensorContext(name, names, setup.ctx_params, setup.model_params, statistics)
    return multitask_vector(kept, ctx).to(setup.mtl_dtype)


def compress_tensor(setup: CompressSetup, name: str, deltas: Iterable[tuple[int, torch.Tensor]], tau_stored: torch.Tensor | None,
                    write: WriteFn, names: list[str], statistics: dict[str, Any]) -> TensorPart:
    """Compress one tensor's task vectors: write its stored parts (``write``) and return its additions to the sums."""
    count = setup.count
    if name in setup.ranks:  # TSV-C: one task at a time, its top singular triplets
        error, norm = [0.0] * count, [0.0] * count
        for t, delta in deltas:
            factors = truncated_svd(delta, setup.ranks[name])
            stored = [f.to(setup.mtl_dtype) for f in factors[:3]]
            for suffix, tensor in zip(FACTOR_SUFFIXES, stored):
                write("factor", t, name + suffix, tensor.cpu())
            del factors
            approx = low_rank_product(*(f.to(delta.dtype) for f in stored))  # what extraction gives back
            error[t] = float(torch.linalg.vector_norm(approx.sub_(delta))) ** 2
            norm[t] = float(torch.linalg.vector_norm(delta)) ** 2
            del approx, delta, stored
        return TensorPart(error=error, norm=norm)
    kept = [d for _, d in deltas]  # the T task vectors, never stacked into one [T, ...] copy
    if tau_stored is not None:
        stored = tau_stored
    else:
        if setup.scheme == "emr":
            stored = emr_elect(kept).to(setup.mtl_dtype)
        else:
            stored = tau_tensor(setup, name, kept, names, statistics)
        write("tau", -1, name, stored.cpu())
    tau = stored.to(kept[0].dtype)  # masks are built from the stored vector that extraction will use
    part = TensorPart(norm=[0.0] * count)
    if setup.scheme == "emr":
        part.emr = [[0.0] * count for _ in range(6)]
    else:
        part.error = [0.0] * count
    mask_list = []
    for t in range(count):
        mask = emr_mask(kept[t], tau) if setup.scheme == "emr" else tall_mask(kept[t], tau, setup.lambdas[t])
        write("mask", t, name, pack_bits(mask).cpu())
        used = torch.where(mask, tau, 0)
        if setup.scheme == "emr":
            assert part.emr is not None
            part.norm[t] = _dot(kept[t], kept[t])  # the error is a difference of these sums: no float32 norm
            numel = max(kept[t].numel(), 1)
            own, kept_part = _magnitude(kept[t]), _magnitude(used)
            values = (own, kept_part, own / numel, kept_part / numel, _dot(used, used), _dot(used, kept[t]))
            for sums, value in zip(part.emr, values):
                sums[t] = value
        else:
            assert part.error is not None
            part.norm[t] = float(torch.linalg.vector_norm(kept[t])) ** 2
            part.error[t] = float(torch.linalg.vector_norm(used.sub_(kept[t]))) ** 2
        del used
        mask_list.append(mask)
    del kept
    masks = torch.stack(mask_list)
    del mask_list
    part.counts = mask_counts(masks.cpu())
    return part


def _local_writer(tau_writer: ShardedSafetensorsWriter, mask_writers: list[ShardedSafetensorsWriter],
                  factor_writers: list[ShardedSafetensorsWriter]) -> WriteFn:
    def write(kind: str, t: int, name: str, tensor: torch.Tensor) -> None:
        (tau_writer if kind == "tau" else mask_writers[t] if kind == "mask" else factor_writers[t]).write(name, tensor)

    return write


def _placed_writer(places: dict[str, Any]) -> WriteFn:
    def write(kind: str, t: int, name: str, tensor: torch.Tensor) -> None:
        write_at(places["tau"][name] if kind == "tau" else places["masks"][t][name] if kind == "mask" else places["factors"][t][name], tensor)

    return write


def tau_share(plan: Any, device: torch.device, names: list[str], setup: CompressSetup, places: dict[str, Any]) -> int:
    """On a worker: τ_MTL of a share of the merged tensors, written at its places (the λ search's phase 1)."""
    for name, deltas in TaskVectorPasses(plan, device, progress=False).only(names).tensors("τ_MTL"):
        write_at(places["tau"][name], tau_tensor(setup, name, [d for _, d in deltas], plan.model_names, plan.model_statistics).cpu())
    return len(names)


def compress_share(plan: Any, device: torch.device, names: list[str], setup: CompressSetup, places: dict[str, Any],
                   tau_files: dict[str, str] | None) -> list[tuple[str, TensorPart]]:
    """On a worker: compress a share of the merged tensors, writing at their places; each tensor's part, in order."""
    write = _placed_writer(places)
    tau_reader = Checkpoint("τ_MTL", None, {n: Path(f) for n, f in tau_files.items()}, None) if tau_files is not None else None
    out = []
    try:
        for name, deltas in TaskVectorPasses(plan, device, progress=False).only(names).tensors("compressing"):
            stored = tau_reader.get(name).to(device) if tau_reader is not None and name not in setup.ranks else None
            out.append((name, compress_tensor(setup, name, deltas, stored, write, plan.model_names, plan.model_statistics)))
    finally:
        if tau_reader is not None:
            tau_reader.close()
    return out


def score_tall_lambdas(plan: Any, device: torch.device, candidates: list[tuple[int, float]], tau_files: dict[str, str], evaluator: str) -> list[float]:
    """On a worker: the evaluator's score of each (task, λ) candidate of the TALL λ search."""
    tau = Checkpoint("τ_MTL", None, {n: Path(f) for n, f in tau_files.items()}, None)
    try:
        return [tall_lambda_score(load_evaluator(evaluator), plan, tau, t, lam, device) for t, lam in candidates]
    finally:
        tau.close()


def _distributed(executor: Any, plan: Any, device: torch.device, progress: bool, part: Callable[..., Any], names: list[str],
                 args: tuple[Any, ...], description: str, on_done: Callable[[list[str], Any], None]) -> list[Any]:
    """``part`` over shares of the merged tensors on the executor's workers (each share's input bytes as its size)."""
    jobs = {job.name: job for job in plan.jobs}
    sizes = [sum(plan.info(r).nbytes for r in jobs[n].reads) for n in names]
    return executor.run(plan, device, part, names, sizes, args, description=description, progress=progress, on_done=on_done)


def compress(plan: Any, out_dir: str | os.PathLike[str], *, force: bool = False, device: str = "cpu", progress: bool = True,
             executor: Any = None) -> Path:
    """Write the recipe's models as a collection (TALL masks, EMR or TSV-C, by the method) into ``out_dir`` (atomically)."""
    dev = resolve_device(device)
    recipe = plan.recipe
    scheme = SCHEMES[plan.method.name]
    names = plan.model_names
    count = len(names)
    stems = [task_file_stem(i, n) for i, n in enumerate(names)]
    compute_statistics(plan, dev, progress, executor)
    merged = [plan.base.info(job.name) for job in plan.jobs if job.merge]
    base_infos = {job.name: plan.base.info(job.name) for job in plan.jobs}
    mtl_dtype = resolve_mtl_dtype(plan.params["mtl_dtype"], [base_infos[i.name] for i in merged])
    ranks = {
        i.name: rank_budget(i.shape, count, plan.params.get("rank_fraction"), plan.params.get("rank"))
        for i in merged if scheme == "tsv" and len(i.shape) == 2
    }
    masked = [i for i in merged if i.name not in ranks]  # the tensors with a shared vector and one mask per task
    if scheme == "tall":
        grids = [p["tall_lambda"] if isinstance(p["tall_lambda"], list) else None for p in plan.model_params]
    else:
        grids = [None] * count
    evaluator = load_evaluator(recipe.evaluator) if recipe.evaluator else None
    if evaluator is not None:  # an evaluator with no grid given searches the paper's grid
        given = {"tall_lambda"} & (set(recipe.parameters) | {k for m in recipe.models or [] for k in m.parameters})
        if not given:
            grids = [list(plan.method.param("tall_lambda").default_grid)] * count
    searching = any(g is not None for g in grids)
    ctx_params = {"aggregate": plan.params.get("aggregate", "task_arithmetic")}

    setup = CompressSetup(scheme, count, list(plan.model_params), ctx_params, mtl_dtype, ranks, [p.get("tall_lambda") for p in plan.model_params])

    folder = AtomicFolder(out_dir, force=force)
    with folder as tmp:
        (tmp / "masks").mkdir()
        tau_writer = ShardedSafetensorsWriter(tmp, [TensorInfo(i.name, mtl_dtype, i.shape) for i in masked], recipe.output.shard_size, prefix="tau_mtl")
        source = TaskVectorPasses(plan, dev, progress)
        lambdas = list(setup.lambdas)
        scores: list[dict[str, float] | None] = [None] * count
        tau_reader: Checkpoint | None = None
        merged_names = [i.name for i in merged]
        if searching:
            # phase 1: τ_MTL only; then each task's λ by the evaluator on its reconstruction
            if executor is not None:
                places = {"tau": tau_writer.reserve()}
                _distributed(executor, plan, dev, progress, tau_share, merged_names, (setup, places), "τ_MTL",
                             lambda share, _r: [tau_writer.written_elsewhere(n) for n in share])
            else:
                for name, deltas in source.tensors("τ_MTL"):
                    tau_writer.write(name, tau_tensor(setup, name, [d for _, d in deltas], plan.model_names, plan.model_statistics).cpu())
            tau_writer.close()
            tau_reader = Checkpoint("τ_MTL", tmp, {n: tmp / f for n, f in tau_writer.shard_of.items()}, None)
            assert evaluator is not None
            scored = None
            if executor is not None:  # every (task, λ) candidate scored as its own Ray task
                todo = [(t, lam) for t, grid in enumerate(grids) if grid is not None for lam in grid]
                tau_files = {n: str(tmp / f) for n, f in tau_writer.shard_of.items()}
                results = executor.map(plan, dev, score_tall_lambdas, todo, (tau_files, recipe.evaluator), progress=progress)
                scored = {candidate: result[0] for candidate, result in zip(todo, results)}
            lambdas, scores = search_tall_lambdas(
                evaluator, plan, tau_reader, grids, lambdas, dev, progress, scored=scored
            )
            setup = dataclasses.replace(setup, lambdas=list(lambdas))
        mask_writers = [
            ShardedSafetensorsWriter(tmp / "masks", [TensorInfo(i.name, torch.uint8, (packed_size(i.numel),)) for i in masked], 2**62, prefix=stem)
            for stem in stems
        ]
        factor_writers: list[ShardedSafetensorsWriter] = []
        if scheme == "tsv":
            (tmp / "factors").mkdir()
            infos = [f for i in merged if i.name in ranks for f in factor_infos(i.name, i.shape, ranks[i.name], mtl_dtype)]
            factor_writers = [ShardedSafetensorsWriter(tmp / "factors", infos, 2**62, prefix=stem) for stem in stems]
        writers = [tau_writer, *mask_writers, *factor_writers]
        stats = MaskStats(names)
        totals = Totals(count)
        try:
            if executor is not None:
                places = {"masks": [w.reserve() for w in mask_writers], "factors": [w.reserve() for w in factor_writers]}
                if tau_reader is None:
                    places["tau"] = tau_writer.reserve()
                tau_files = {n: str(tmp / f) for n, f in tau_writer.shard_of.items()} if tau_reader is not None else None

                def written(share: list[str], _result: Any) -> None:
                    for name in share:
                        if name in ranks:
                            for w in factor_writers:
                                for suffix in FACTOR_SUFFIXES:
                                    w.written_elsewhere(name + suffix)
                            continue
                        if tau_reader is None:
                            tau_writer.written_elsewhere(name)
                        for w in mask_writers:
                            w.written_elsewhere(name)

                results = _distributed(executor, plan, dev, progress, compress_share, merged_names, (setup, places, tau_files),
                                       "TALL masks" if searching else "compressing", written)
                for share in results:  # in the plan's order, as the local loop adds them
                    for name, part in share:
                        totals.add(part)
                        if part.counts is not None:
                            stats.add_counts(name, *part.counts)
            else:
                for name, deltas in source.tensors("TALL masks" if searching else "compressing"):
                    stored = tau_reader.get(name).to(dev) if tau_reader is not None and name not in ranks else None
                    part = compress_tensor(setup, name, deltas, stored, _local_writer(tau_writer, mask_writers, factor_writers),
                                           plan.model_names, plan.model_statistics)
                    totals.add(part)
                    if part.counts is not None:
                        stats.add_counts(name, *part.counts)
            if tau_reader is None:
                tau_writer.close()
            else:
                tau_reader.close()
            for w in [*mask_writers, *factor_writers]:
                w.close()
        finally:
            for w in writers:
                w.abort()
        error, norm = totals.error, totals.norm
        task_l1, masked_l1, task_means, masked_means, uni_sq, uni_dot = (
            totals.task_l1, totals.masked_l1, totals.task_means, totals.masked_means, totals.uni_sq, totals.uni_dot)
        rescalers: list[float] = []
        if scheme == "emr":
            by_mean = plan.params["rescaler"] == "tensor_mean"
            for t in range(count):
                lam = emr_rescaler(task_means[t], masked_means[t]) if by_mean else emr_rescaler(task_l1[t], masked_l1[t])
                rescalers.append(lam)
                # ‖λ a − τ‖² = λ²‖a‖² − 2λ⟨a, τ⟩ + ‖τ‖², a = m_t ⊙ τ_uni
                error[t] = max(lam * lam * uni_sq[t] - 2 * lam * uni_dot[t] + norm[t], 0.0)
        files: dict[str, dict[str, Any]] = {}
        for file_name, (digest, size) in tau_writer.digests.items():
            files[file_name] = {"sha256": digest, "size": size}
        if len(tau_writer.shards) > 1:
            files[tau_writer.index_name] = _file_entry(tmp / tau_writer.index_name)
        for folder_name, group in (("masks", mask_writers), ("factors", factor_writers)):
            for w in group:
                for file_name, (digest, size) in w.digests.items():
                    files[f"{folder_name}/{file_name}"] = {"sha256": digest, "size": size}
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
            task: dict[str, Any] = {"name": name, "stem": stem, "source": entry.model}
            if scheme == "emr":
                task["rescaler"] = rescalers[t]
            else:
                task |= {"tall_lambda": lambdas[t], "lambda_scores": scores[t]}
            task["mask_file"] = f"masks/{stem}.safetensors"
            if scheme == "tsv":
                task["factor_file"] = f"factors/{stem}.safetensors"
            task |= {
                "density": stats.overall.density[t],
                "relative_error": (error[t] / norm[t]) ** 0.5 if norm[t] else 0.0,
                "original_bytes": ckpt.nbytes,
                "support_files": copied,
                "module_files": modules,
                "tokenizer": "task" if own_tokenizer[t] else ("base" if base_tokenizer else None),
                "dtypes": dtypes,
            }
            tasks.append(task)
        _say_missing_tokenizers(tasks, plan.base, notes)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": SCHEME_VERSIONS[scheme],
            "created_by": f"mergekit-lite {__version__}",
            "scheme": scheme,
            "aggregate": "emr_elect" if scheme == "emr" else ctx_params["aggregate"],
            "mtl_dtype": _dtype_name(mtl_dtype),
            "mask_bit_order": "big",
        }
        if scheme == "emr":
            manifest["rescaler"] = plan.params["rescaler"]
        if scheme == "tsv":
            manifest["factors"] = {"ranks": ranks, "rank_fraction": plan.params.get("rank_fraction"), "rank": plan.params.get("rank")}
        manifest |= {
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
    scheme = m.get("scheme", "tall")
    need(scheme in SCHEME_VERSIONS, f"'scheme' must be one of {', '.join(SCHEME_VERSIONS)}")
    need(scheme == "tall" or m.get("format_version", 0) >= SCHEME_VERSIONS[scheme], f"scheme {scheme} needs format version {SCHEME_VERSIONS[scheme]} or later")
    tasks = m.get("tasks")
    need(isinstance(tasks, list) and len(tasks) > 0, "'tasks' must be a non-empty list")
    stems = set()
    for i, t in enumerate(tasks):
        need(isinstance(t, dict), f"tasks[{i}] must be an object")
        need(isinstance(t.get("name"), str) and t["name"].isprintable() and 0 < len(t["name"]) < 1000, f"tasks[{i}].name must be printable text")
        need(isinstance(t.get("stem"), str) and bool(_STEM.match(t["stem"])) and t["stem"] not in stems, f"tasks[{i}].stem is not a safe, unique file stem")
        stems.add(t["stem"])
        need(t.get("mask_file") == f"masks/{t['stem']}.safetensors" and t["mask_file"] in files, f"tasks[{i}].mask_file must be masks/<stem>.safetensors and listed in files")
        need(all(is_num(t.get(k)) for k in ("rescaler" if scheme == "emr" else "tall_lambda", "density", "relative_error")) and is_int(t.get("original_bytes")), f"tasks[{i}] has non-numeric λ, density, error or size")
        if scheme == "emr":
            need(t["rescaler"] >= 0, f"tasks[{i}].rescaler must be >= 0")
        if scheme == "tsv":
            need(t.get("factor_file") == f"factors/{t['stem']}.safetensors" and t["factor_file"] in files, f"tasks[{i}].factor_file must be factors/<stem>.safetensors and listed in files")
        need(isinstance(t.get("support_files"), list) and all(isinstance(f, str) and f in SUPPORT_FILES and f"tasks/{t['stem']}/{f}" in files for f in t["support_files"]), f"tasks[{i}].support_files lists unknown files")
        modules = t.get("module_files", [])
        need(isinstance(modules, list) and all(rel_ok(f) and f"tasks/{t['stem']}/{f}" in files for f in modules), f"tasks[{i}].module_files lists unknown files")
        need(t.get("tokenizer", "task") in ("task", "base", None), f"tasks[{i}].tokenizer must be task, base or null")
        need(isinstance(t.get("dtypes"), dict) and all(isinstance(k, str) and v in _DTYPES for k, v in t["dtypes"].items()), f"tasks[{i}].dtypes is invalid")
        if scheme != "emr":
            need("lambda_scores" in t and (t["lambda_scores"] is None or isinstance(t["lambda_scores"], dict)), f"tasks[{i}].lambda_scores is invalid")
        need(isinstance(t.get("source"), str), f"tasks[{i}].source must be text")
    tensors = m.get("tensors")
    need(isinstance(tensors, list), "'tensors' must be a list")
    for i, t in enumerate(tensors):
        need(isinstance(t, dict) and isinstance(t.get("name"), str) and t.get("dtype") in _DTYPES and isinstance(t.get("stored"), bool), f"tensors[{i}] is invalid")
        need(isinstance(t.get("shape"), list) and len(t["shape"]) <= 64 and all(is_int(d) and d < 2**40 for d in t["shape"]), f"tensors[{i}].shape is invalid")
    if scheme == "tsv":
        factors = m.get("factors")
        ranks = factors.get("ranks") if isinstance(factors, dict) else None
        need(isinstance(ranks, dict), "'factors.ranks' must map tensors to ranks")
        shapes = {t["name"]: t["shape"] for t in tensors if t["stored"]}
        for name, k in ranks.items():
            shape = shapes.get(name)
            need(shape is not None and len(shape) == 2, f"'factors.ranks' names {name!r}, which is not a stored 2-D tensor")
            need(is_int(k) and 1 <= k <= min(shape), f"'factors.ranks' of {name!r} must be between 1 and {min(shape)}")
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

    @property
    def scheme(self) -> str:
        """'tall', 'emr' or 'tsv' (collections before version 3 are TALL masks)."""
        return self.manifest.get("scheme", "tall")

    def load_state_dict(self, task: str) -> LazyStateDict:
        """θ̂_task as a lazy state dict (each tensor computed on access), in the task's dtypes: θ_0 + m_t ⊙ τ_MTL
        (TALL), θ_0 + λ_t · (m_t ⊙ τ_uni) (EMR), θ_0 + U_t diag(S_t) V_tᵀ for TSV-C's matrices."""
        entry = self.task(task)
        scheme = self.scheme
        tau_files = list(self.manifest["tau_mtl"]["files"])
        own = [entry["mask_file"]] + ([entry["factor_file"]] if scheme == "tsv" else [])
        for rel in [*tau_files, *own]:
            self._verify_file(rel)
        ranks: dict[str, int] = self.manifest["factors"]["ranks"] if scheme == "tsv" else {}
        rescaler = float(entry["rescaler"]) if scheme == "emr" else None
        base = self.base_checkpoint()
        tau = Checkpoint("τ_MTL", self.path, {n: self._inside(f) for n, f in self.manifest["tau_mtl"]["weight_map"].items()}, None)
        mask = open_checkpoint(self._inside(entry["mask_file"]))
        factors = open_checkpoint(self._inside(entry["factor_file"])) if scheme == "tsv" else None
        specs = {t["name"]: t for t in self.manifest["tensors"]}

        def dtype_of(name: str) -> torch.dtype:
            return getattr(torch, entry["dtypes"].get(name, specs[name]["dtype"]))

        def low_rank(name: str) -> torch.Tensor:
            assert factors is not None
            u, s, vh = (factors.get(name + suffix) for suffix in FACTOR_SUFFIXES)
            m, n, k = *specs[name]["shape"], ranks[name]
            if tuple(u.shape) != (m, k) or tuple(s.shape) != (k,) or tuple(vh.shape) != (k, n):
                raise CollectionError(f"{factors.ref}: factors of {name} are malformed (U {list(u.shape)}, S {list(s.shape)}, Vh {list(vh.shape)}; "
                                      f"expected rank {k} of {[m, n]})")
            dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
            return low_rank_product(u.to(dtype), s.to(dtype), vh.to(dtype))

        def compute(name: str) -> torch.Tensor:
            stored = base.get(name)
            if not specs[name]["stored"]:
                return stored
            if name in ranks:
                update = low_rank(name)
                return stored.to(update.dtype).add_(update).to(dtype_of(name))
            tau_t = tau.get(name)
            dtype = torch.float64 if tau_t.dtype == torch.float64 else torch.float32
            try:
                keep = unpack_bits(mask.get(name), tau_t.shape)
            except ValueError as exc:
                raise CollectionError(f"{mask.ref}: mask of {name} is malformed ({exc})") from None
            update = torch.where(keep, tau_t.to(dtype), 0)
            if rescaler is not None:
                update.mul_(rescaler)
            return stored.to(dtype).add_(update).to(dtype_of(name))

        infos = [TensorInfo(n, dtype_of(n), tuple(t["shape"])) for n, t in specs.items()]
        owned = (base, tau, mask) if factors is None else (base, tau, mask, factors)
        return LazyStateDict(infos, compute, owned=owned)

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
            error = f"relative error ‖θ̂_t − θ_t‖/‖θ_t − θ_0‖ = {entry['relative_error']:.4f}"
            if self.scheme == "emr":
                how = (f"the EMR-Merging collection `{self.path.name}` as θ_0 + λ_t · (m_t ⊙ τ_uni) "
                       f"(λ_t = {entry['rescaler']:.4f}, mask density {entry['density']:.4f}, {error})")
            elif self.scheme == "tsv":
                ranks = sorted(set(self.manifest["factors"]["ranks"].values()))
                how = (f"the TSV-C collection `{self.path.name}`: each 2-D tensor as θ_0 + U_t diag(S_t) V_tᵀ "
                       f"(rank {'/'.join(map(str, ranks)) or '-'}), the others as θ_0 + m_t ⊙ τ_MTL (λ_t = {entry['tall_lambda']}; {error})")
            else:
                how = (f"the TALL-masks collection `{self.path.name}` as θ_0 + m_t ⊙ τ_MTL "
                       f"(λ_t = {entry['tall_lambda']}, mask density {entry['density']:.4f}, {error})")
            tag = {"tall": "tall-masks", "emr": "emr-merging", "tsv": "tsv-compress"}[self.scheme]
            state.card = (
                front_matter(hub_base, ["mergekit-lite", tag], library)
                + f"# {task}\n\nReconstructed from {how}. Original: `{entry['source']}`. "
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
        """What `mergekit-lite inspect` shows: scheme, tasks, λ, densities, ranks, bytes on disk and the ratio."""
        m = self.manifest
        on_disk = sum(e["size"] for e in m["files"].values()) + (self.path / MANIFEST).stat().st_size
        base_bytes = sum(e["size"] for e in m["base"].get("weight_files", {}).values())
        originals = sum(t["original_bytes"] for t in m["tasks"])
        with_base = on_disk + base_bytes
        keys = ("name", "rescaler" if self.scheme == "emr" else "tall_lambda", "density", "relative_error", "original_bytes", "source")
        ranks = m["factors"]["ranks"] if self.scheme == "tsv" else {}
        return {
            "path": str(self.path),
            "format_version": m["format_version"],
            "created_by": m["created_by"],
            "scheme": self.scheme,
            "aggregate": m["aggregate"],
            "mtl_dtype": m["mtl_dtype"],
            "base": {k: v for k, v in m["base"].items() if k != "weight_files"} | {"bytes": base_bytes if not m["base"]["embedded"] else None},
            "tasks": [
                {k: t[k] for k in keys} | ({"lambda_scores": t["lambda_scores"]} if self.scheme != "emr" else {})
                | {"tokenizer": self.tokenizer_of(t["name"]), "sentence_transformers": "modules.json" in t.get("module_files", [])}
                for t in m["tasks"]
            ],
            "rescaler": m.get("rescaler"),
            "factored_tensors": len(ranks),
            "ranks": sorted(set(ranks.values())),
            "bytes_on_disk": on_disk,
            "bytes_with_base": with_base,
            "original_bytes": originals,
            "ratio": originals / with_base if with_base else None,
            "mask_stats": m["mask_stats"]["overall"],
        }


register_product("collection", compress)

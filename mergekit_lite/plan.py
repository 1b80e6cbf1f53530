"""The plan: one entry per OUTPUT tensor, known from the checkpoints' headers alone.

Each entry names its inputs (which checkpoint, which tensor: slices renumber layers), how it is
made (merged by the recipe's method, or copied), and the method's parameters resolved for this
tensor (gradients over the layer's relative depth, filters on the tensor name, mergekit's
precedence). Nothing here reads tensor data.
"""

from __future__ import annotations

import fnmatch
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .adapter import is_adapter_reference, open_model, split_adapter_reference
from .checkpoint import ROW_WINDOW_BYTES, Checkpoint, TensorInfo
from .errors import CheckpointError, RecipeError
from .methods import MergeMethod
from .ops.tsv import rank_budget
from .ops.vocab import RowPlan
from .params import Settings, resolve
from .recipe import Recipe, default_name
from .units import human_bytes
from .vocabulary import Vocabulary, build_vocabulary, is_vocabulary_tensor
from .writer import plan_shards

#: Rough resident size of the interpreter with torch imported, for the dry-run estimate.
INTERPRETER_BYTES = 450 * 2**20

#: A transformer block's tensors: <prefix>.<layer index>.<rest> (model.layers.3.mlp..., encoder.layer.3..., transformer.h.3...).
LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|layer|h|blocks|block)\.)(?P<index>\d+)(?P<suffix>\..+)$")
#: Non-layer tensors that come before the blocks (embeddings); every other non-layer tensor comes after them.
PRE_LAYER_MARKERS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings")
#: config.json keys that hold the number of blocks.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class TensorRef:
    """One input tensor: which checkpoint of the plan (by index), which tensor name."""

    source: int
    name: str


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: merged from its inputs by the method, or copied from one input."""

    out: TensorInfo
    inputs: tuple[TensorRef, ...]  # merged: the method's inputs (task-vector methods: without the base); copied: the source
    merge: bool
    base: TensorRef | None = None  # task-vector methods: θ_0 of this tensor
    base_index: int | None = None  # weight-space methods: which input is the base
    model_names: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    model_params: tuple[dict[str, Any], ...] = ()
    t: float = 0.0  # relative depth of the layer (gradients)
    #: a vocabulary tensor whose rows are re-mapped onto the output vocabulary before the method runs: the plan
    #: over ``reads`` (copied: ``inputs`` holds every model's tensor, the one copied first)
    vocab: RowPlan | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return self.out.name

    @property
    def reads(self) -> tuple[TensorRef, ...]:
        """Every input tensor read to produce this output."""
        return self.inputs + ((self.base,) if self.base is not None else ())


@dataclass
class Plan:
    """What a run will do, known from headers alone: output tensors, their inputs, bytes, memory."""

    recipe: Recipe
    checkpoints: list[Checkpoint]  # every distinct input, by index (TensorRef.source)
    jobs: list[TensorJob]
    base: Checkpoint | None  # the recipe's base model (None when the method needs none and none is given)
    models: list[Checkpoint]  # models mode: the inputs whose task vectors are merged (task-vector methods) or the inputs
    model_names: list[str]
    params: dict[str, Any]  # the merge's parameters before per-tensor gradients and filters
    model_params: list[dict[str, Any]]
    compute_dtype: torch.dtype
    config_source: Checkpoint | None  # whose config.json / generation config the output carries
    config_updates: dict[str, Any] = field(default_factory=dict)  # e.g. num_hidden_layers after slicing
    model_statistics: dict[str, Any] = field(default_factory=dict)  # from the method's extra passes (TIES thresholds, ...)
    vocabulary: Vocabulary | None = None  # the output vocabulary (tokenizer_source / tokenizer: set), rows re-mapped per token
    vocabulary_missing: str | None = None  # why a vocabulary the recipe asks for could not be built (its source has no tokenizer)

    @property
    def method(self) -> MergeMethod:
        return self.recipe.method

    def info(self, ref: TensorRef) -> TensorInfo:
        return self.checkpoints[ref.source].info(ref.name)

    @property
    def bytes_to_write(self) -> int:
        """The merged checkpoint's tensor bytes; for a collection, τ_MTL (float32) plus one bit per weight per task,
        and for TSV-C's matrices T · k(m + n + 1) float32 factors instead."""
        if self.method.output == "collection":
            tasks = len(self.models)
            total = 0
            for job in self.jobs:
                if not job.merge:
                    continue
                n, shape = job.out.numel, job.out.shape
                if self.method.name == "tsv_compress" and len(shape) == 2:
                    k = rank_budget(shape, tasks, self.params.get("rank_fraction"), self.params.get("rank"))
                    total += tasks * 4 * k * (shape[0] + shape[1] + 1)
                else:
                    total += 4 * n + tasks * ((n + 7) // 8)
            return total
        return sum(job.out.nbytes for job in self.jobs)

    @property
    def passes(self) -> int:
        """How many times the inputs are read: 1, plus the passes of model-wide statistics."""
        return self.method.passes(self.params, self.compute_dtype)

    @property
    def bytes_per_pass(self) -> int:
        return sum(self.info(ref).nbytes for job in self.jobs for ref in job.reads)

    @property
    def bytes_to_read(self) -> int:
        """Bytes read from the inputs over all passes (statistics passes read the merged tensors again)."""
        merged = sum(self.info(ref).nbytes for job in self.jobs if job.merge for ref in job.reads)
        return self.bytes_per_pass + (self.passes - 1) * merged

    @property
    def largest_merged(self) -> TensorInfo | None:
        return max((job.out for job in self.jobs if job.merge), key=lambda i: i.numel, default=None)

    @property
    def peak_memory_estimate(self) -> int:
        """Interpreter + working copies of the largest merged tensor in the compute dtype + one stored copy + a
        window of mapped rows per checkpoint read (``ROW_WINDOW_BYTES``, page cache the kernel may take back, but
        counted in RSS); at least, for a re-mapped vocabulary tensor, every input's tensor and its re-mapped copy
        held at once. Plus the largest output tensor once more: the one being written while the next is made."""
        largest = self.largest_merged
        size = self.compute_dtype.itemsize
        remapped = max((sum(self.info(r).numel for r in j.reads) * size + len(j.reads) * j.out.numel * size + j.out.nbytes
                        for j in self.jobs if j.vocab is not None), default=0)
        writing = max((j.out.nbytes for j in self.jobs), default=0)  # written in the background (``BackgroundWrites``)
        if largest is None:
            return INTERPRETER_BYTES + writing + max(writing, remapped)
        inputs = max(len(j.inputs) for j in self.jobs if j.merge)
        copies = self.method.working_copies(inputs)
        windows = (inputs + 1) * min(ROW_WINDOW_BYTES, largest.nbytes)
        return INTERPRETER_BYTES + writing + max(int(largest.numel * (copies * size + 4)) + windows, remapped)

    def summary(self) -> str:
        merged = sum(1 for j in self.jobs if j.merge)
        largest = self.largest_merged
        shards = plan_shards((j.out for j in self.jobs), self.recipe.output.shard_size)
        varying = self.per_tensor_parameters()
        lines = [
            f"method:        {self.method.name} ({self.method.summary})",
            f"base:          {self.base.ref if self.base is not None else 'none'}",
            f"models:        {len(self.model_names)} ({', '.join(self.model_names)})",
            f"tensors:       {len(self.jobs)} ({merged} merged, {len(self.jobs) - merged} copied)",
            f"bytes to read: {human_bytes(self.bytes_to_read)}" + (f" ({self.passes} passes over the inputs)" if self.passes > 1 else ""),
            f"bytes to write: {human_bytes(self.bytes_to_write)} in {len(shards)} shard(s)",
            f"largest merged tensor: {largest.name} {list(largest.shape)}" if largest else "largest merged tensor: none",
            f"peak memory (estimate): {human_bytes(self.peak_memory_estimate)}",
            f"compute dtype: {str(self.compute_dtype).removeprefix('torch.')}",
        ]
        if varying:
            lines.append(f"per-tensor parameters: {', '.join(varying)} (gradients or filters)")
        if self.config_updates:
            lines.append("config changes: " + ", ".join(f"{k}={v}" for k, v in self.config_updates.items() if not isinstance(v, list)))
        return "\n".join(lines)

    def per_tensor_parameters(self) -> list[str]:
        """Parameters whose resolved value is not the same for every merged tensor (gradients, filters)."""
        seen: dict[tuple[str, int], set[str]] = {}  # (name, input index or -1 for the merge's own) -> values
        for job in self.jobs:
            if job.merge:
                for key, value in job.params.items():
                    seen.setdefault((key, -1), set()).add(repr(value))
                for i, own in enumerate(job.model_params):
                    for key, value in own.items():
                        seen.setdefault((key, i), set()).add(repr(value))
        return sorted({key for (key, _), values in seen.items() if len(values) > 1})

    def close(self) -> None:
        for ckpt in self.checkpoints:
            ckpt.close()


def selected(name: str, include: list[str] | None, exclude: list[str]) -> bool:
    """Whether the recipe's include/exclude globs select this tensor for merging."""
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def layer_count(ckpt: Checkpoint) -> int:
    """Blocks in a checkpoint: its config's layer count, else the highest layer index + 1 (0 if none)."""
    for key in LAYER_COUNT_KEYS:
        value = (ckpt.config or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    indices = [int(m.group("index")) for m in map(LAYER_NAME.match, ckpt.names) if m]
    return max(indices) + 1 if indices else 0


def relative_depth(name: str, layers: int) -> float:
    """mergekit's t for a tensor of a whole model: layer i of L → i/(L−1) (1 when L = 1); other tensors 0."""
    match = LAYER_NAME.match(name)
    if not match:
        return 0.0
    return int(match.group("index")) / (layers - 1) if layers > 1 else 1.0


def dtype_from_name(name: str) -> torch.dtype:
    return getattr(torch, name)


class _Builder:
    """Opens each distinct checkpoint once and turns (recipe, headers) into jobs."""

    def __init__(self, recipe: Recipe, stack: ExitStack):
        self.recipe = recipe
        self.method = recipe.method
        self.stack = stack
        self.checkpoints: list[Checkpoint] = []
        self.index: dict[str, int] = {}
        self.out_dtype = dtype_from_name(recipe.output_dtype) if recipe.output_dtype else None
        self.vocabulary: Vocabulary | None = None
        self.vocabulary_missing: str | None = None

    def build_vocabulary(self, base: int | None) -> None:
        """The output vocabulary the recipe asks for, from every opened input's tokenizer (before any job)."""
        self.vocabulary, self.vocabulary_missing = build_vocabulary(self.recipe, self.checkpoints, self.index, base)

    def open(self, ref: str) -> int:
        if ref not in self.index:
            base = self.recipe.base_model
            on_base = None  # an adapter folder is read on the recipe's base (BASE+ADAPTER names its own)
            if base is not None and ref != base and split_adapter_reference(ref) is None and is_adapter_reference(ref):
                on_base = self.checkpoints[self.open(base)]
            ckpt = open_model(ref, on_base)
            self.stack.callback(ckpt.close)
            self.index[ref] = len(self.checkpoints)
            self.checkpoints.append(ckpt)
        return self.index[ref]

    def job(
        self,
        out_name: str,
        refs: Sequence[str],
        names: Sequence[str],
        model_names: Sequence[str],
        base_ref: str | None,
        shared_levels: Sequence[Settings],
        input_levels: Sequence[Sequence[Settings]],
        t: float,
        where: str,
    ) -> TensorJob:
        """One output tensor from inputs (refs[i], names[i]); the base among them when it is one of the refs."""
        sources = [self.open(r) for r in refs]
        first = self.checkpoints[sources[0]]
        if names[0] not in first:
            raise CheckpointError(f"{refs[0]}: has no tensor {names[0]} ({where} needs it)")
        info = first.info(names[0])
        base_pos = refs.index(base_ref) if base_ref is not None and base_ref in refs else None
        keep_from = sources[base_pos] if base_pos is not None else sources[0]
        keep_name = names[base_pos] if base_pos is not None else names[0]
        keep_info = self.checkpoints[keep_from].info(keep_name) if keep_name in self.checkpoints[keep_from] else info
        merge = keep_info.is_float and selected(out_name, self.recipe.include, self.recipe.exclude)
        vocab = self.vocabulary if self.vocabulary is not None and keep_info.is_float and is_vocabulary_tensor(out_name) else None
        if vocab is not None:
            for ref, src, name in zip(refs, sources, names):
                self._check_vocabulary_input(ref, src, name, refs[0], keep_info, where, out_name)
        if not merge:  # copied as it is, from the base if it is an input, else from the first input
            if vocab is not None:  # ... with its rows re-mapped like the merged ones (mergekit's rule over every input)
                k = base_pos if base_pos is not None else 0
                order = [k] + [i for i in range(len(refs)) if i != k]
                plan = self._row_plan(vocab, [sources[i] for i in order], [names[i] for i in order], base_ref, [refs[i] for i in order], out_name)
                if plan is not None:
                    out = TensorInfo(out_name, keep_info.dtype, (vocab.rows, *keep_info.shape[1:]))
                    return TensorJob(out, tuple(TensorRef(sources[i], names[i]) for i in order), False, t=t, vocab=plan)
            return TensorJob(TensorInfo(out_name, keep_info.dtype, keep_info.shape), (TensorRef(keep_from, keep_name),), False, t=t)
        for ref, src, name in zip(refs, sources, names):
            ckpt = self.checkpoints[src]
            if name not in ckpt:
                raise CheckpointError(f"{ref}: has no tensor {name} ({where} needs it); use 'exclude' to copy {out_name} from the base instead")
            other = ckpt.info(name)
            if vocab is None and other.shape != keep_info.shape:
                if is_vocabulary_tensor(out_name) and other.shape[1:] == keep_info.shape[1:]:
                    raise CheckpointError(self._rows_differ(ref, name, other, refs[0], keep_info))
                raise CheckpointError(
                    f"{ref}: tensor {name} has shape {list(other.shape)}, {refs[0]} has {list(keep_info.shape)}; "
                    "the models are not fine-tunes of the same architecture"
                )
            if not other.is_float:
                raise CheckpointError(f"{ref}: tensor {name} is {other.dtype}, the others' is {keep_info.dtype}")
        dtype = self.out_dtype if self.out_dtype is not None else keep_info.dtype
        out = TensorInfo(out_name, dtype, keep_info.shape)
        if self.method.inputs == "task_vectors":
            if base_pos is None:
                raise RecipeError(f"{where}: the base model must be one of the inputs of {out_name} ({self.method.name} merges task vectors)")
            keep = [i for i in range(len(refs)) if refs[i] != base_ref]
            order = [*keep, base_pos]  # read order: the inputs, then the base
        else:
            keep = order = list(range(len(refs)))
        plan = None
        if vocab is not None:
            plan = self._row_plan(vocab, [sources[i] for i in order], [names[i] for i in order], base_ref, [refs[i] for i in order], out_name)
            if plan is not None:  # (None: every input already has the output vocabulary, row for row)
                out = TensorInfo(out_name, dtype, (vocab.rows, *keep_info.shape[1:]))
        if self.method.inputs == "task_vectors":
            shared, per_input = resolve(self.method, shared_levels, [input_levels[i] for i in keep], out_name, [names[i] for i in keep], t)
            return TensorJob(
                out, tuple(TensorRef(sources[i], names[i]) for i in keep), True, base=TensorRef(sources[base_pos], names[base_pos]),
                model_names=tuple(model_names[i] for i in keep), params=shared, model_params=tuple(per_input), t=t, vocab=plan,
            )
        shared, per_input = resolve(self.method, shared_levels, input_levels, out_name, names, t)
        return TensorJob(
            out, tuple(TensorRef(s, n) for s, n in zip(sources, names)), True, base_index=base_pos,
            model_names=tuple(model_names), params=shared, model_params=tuple(per_input), t=t, vocab=plan,
        )

    def _row_plan(self, vocab: Vocabulary, sources: list[int], names: list[str], base_ref: str | None, refs: list[str], out_name: str) -> RowPlan | None:
        """The vocabulary's row plan for one tensor read from ``sources`` in this order (the base among them, if it is)."""
        rows = [self.checkpoints[s].info(n).shape[0] for s, n in zip(sources, names)]
        base = refs.index(base_ref) if base_ref is not None and base_ref in refs else None
        return vocab.row_plan(sources, base, rows, out_name)

    def _check_vocabulary_input(self, ref: str, src: int, name: str, first: str, keep: TensorInfo, where: str, out_name: str) -> None:
        """A vocabulary tensor's input: present, floating point, and the same shape as the others past its rows."""
        ckpt = self.checkpoints[src]
        if name not in ckpt:
            raise CheckpointError(f"{ref}: has no tensor {name} ({where} needs it to re-map the vocabulary of {out_name})")
        other = ckpt.info(name)
        if not other.is_float:
            raise CheckpointError(f"{ref}: tensor {name} is {other.dtype}, the others' is {keep.dtype}")
        if len(other.shape) < 1 or other.shape[1:] != keep.shape[1:]:
            raise CheckpointError(
                f"{ref}: tensor {name} has shape {list(other.shape)}, {first} has {list(keep.shape)}; only the rows "
                "(one per token) may differ: the models are not fine-tunes of the same architecture"
            )

    def _rows_differ(self, ref: str, name: str, other: TensorInfo, first: str, keep: TensorInfo) -> str:
        """The one-line error for vocabulary tensors whose rows differ while no vocabulary is built."""
        why = (f"the vocabulary cannot be re-mapped: {self.vocabulary_missing}" if self.vocabulary_missing else
               "set 'tokenizer_source: union' (or a 'tokenizer:' block) to re-map rows per token (mergekit refuses this too)")
        return (f"{ref}: tensor {name} has {other.shape[0]} rows (one per token), {first} has {keep.shape[0]}: "
                f"the models' vocabularies differ; {why}")


def plan(recipe: Recipe) -> Plan:
    """Open every checkpoint's header and check them against each other; read no tensor data."""
    with ExitStack() as stack:
        builder = _Builder(recipe, stack)
        result = _plan_models(recipe, builder) if recipe.models is not None else _plan_slices(recipe, builder)
        stack.pop_all()
    return result


def _plan_models(recipe: Recipe, b: _Builder) -> Plan:
    """``models:`` — every tensor of the models, merged name for name (mergekit: one slice over all layers)."""
    method = recipe.method
    assert recipe.models is not None
    refs = [m.model for m in recipe.models]
    names = list(recipe.model_names)
    levels: list[list[Settings]] = [[m.parameters, recipe.parameters] for m in recipe.models]
    base = recipe.base_model
    if base is not None and method.base != "unused" and base not in refs:
        refs.append(base)  # as mergekit: the base is an input of every tensor
        names.append(default_name(base))
        levels.append([recipe.parameters])
    base_idx = b.open(base) if base is not None else None
    for r in refs:
        b.open(r)
    b.build_vocabulary(base_idx)
    layout = b.checkpoints[base_idx] if base_idx is not None else b.checkpoints[b.index[refs[0]]]
    layers = layer_count(layout)
    jobs = []
    out_names = list(layout.names)
    known = set(out_names)
    for ref, ckpt in ((r, b.checkpoints[b.index[r]]) for r in dict.fromkeys(refs)):
        extra = [n for n in ckpt.names if n not in known and selected(n, recipe.include, recipe.exclude)
                 and not (n == "lm_head.weight" and layout.ties_embeddings)]
        if extra:
            raise CheckpointError(
                f"{ref}: has {len(extra)} tensor(s) the {'base' if base is not None else 'first model'} lacks (e.g. {extra[0]}); "
                "check the base model, or list them under 'exclude' to drop them"
            )
    for name in out_names:
        jobs.append(b.job(name, refs, [name] * len(refs), names, base, [recipe.parameters], levels, relative_depth(name, layers), "models"))
    merged_inputs = [i for i, r in enumerate(refs) if not (method.inputs == "task_vectors" and r == base)]
    params, model_params = resolve(method, [recipe.parameters], [levels[i] for i in merged_inputs], "", [""] * len(merged_inputs), 0.0)
    return Plan(
        recipe, b.checkpoints, jobs, b.checkpoints[base_idx] if base_idx is not None else None,
        [b.checkpoints[b.index[refs[i]]] for i in merged_inputs], [names[i] for i in merged_inputs],
        params, model_params, dtype_from_name(recipe.compute_dtype), layout,
        _vocabulary_config(b, layout), vocabulary=b.vocabulary, vocabulary_missing=b.vocabulary_missing,
    )


def _layer_tensors(ckpt: Checkpoint) -> dict[int, list[tuple[str, str]]]:
    """Block index → (prefix, suffix) of each of its tensors, in the checkpoint's order (one scan of the names)."""
    out: dict[int, list[tuple[str, str]]] = {}
    for name in ckpt.names:
        m = LAYER_NAME.match(name)
        if m:
            out.setdefault(int(m.group("index")), []).append((m.group("prefix"), m.group("suffix")))
    return out


def _plan_slices(recipe: Recipe, b: _Builder) -> Plan:
    """``slices:`` — output layers renumbered consecutively; embeddings from the first slice's sources, the
    final norm and head from the last slice's (as mergekit); config's layer count updated."""
    assert recipe.slices is not None
    jobs: list[TensorJob] = []
    base_idx = b.open(recipe.base_model) if recipe.base_model is not None else None
    for sl in recipe.slices:
        for s in sl.sources:
            b.open(s.model)
    b.build_vocabulary(base_idx)
    first_ckpt = b.checkpoints[b.index[recipe.slices[0].sources[0].model]]
    non_layer = [n for n in first_ckpt.names if not LAYER_NAME.match(n)]
    pre = [n for n in non_layer if any(marker in n for marker in PRE_LAYER_MARKERS)]
    post = [n for n in non_layer if n not in pre]

    def edge_jobs(names: list[str], i: int) -> None:
        sl = recipe.slices[i]  # type: ignore[index]
        # as mergekit 0.1.5: only as many of the slice's sources as the first slice has
        sources = sl.sources[: len(recipe.slices[0].sources)]  # type: ignore[index]
        refs = [s.model for s in sources]
        levels = [[s.parameters, sl.parameters, recipe.parameters] for s in sources]
        for name in names:
            jobs.append(b.job(name, refs, [name] * len(refs), [default_name(r) for r in refs], sl.base_model or recipe.base_model,
                              [sl.parameters, recipe.parameters], levels, 0.0, f"slices[{i}]"))

    edge_jobs(pre, 0)
    out_layer = 0
    layer_sources: list[tuple[int, int]] = []  # (checkpoint, layer) each output layer was taken from (its first source)
    blocks: dict[int, dict[int, list[tuple[str, str]]]] = {}  # checkpoint → its blocks' tensors
    for i, sl in enumerate(recipe.slices):
        refs = [s.model for s in sl.sources]
        levels = [[s.parameters, sl.parameters, recipe.parameters] for s in sl.sources]
        count = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for s, ref in zip(sl.sources, refs):
            available = layer_count(b.checkpoints[b.index[ref]])
            if s.layer_range[1] > available:
                raise RecipeError(f"slices[{i}].sources: layer_range {list(s.layer_range)} goes past the {available} layers of {ref}")
        for offset in range(count):
            t = offset / (count - 1) if count > 1 else 1.0
            first = b.index[refs[0]]
            if first not in blocks:
                blocks[first] = _layer_tensors(b.checkpoints[first])
            tensors = blocks[first].get(sl.sources[0].layer_range[0] + offset, [])
            for prefix, suffix in tensors:
                names = [f"{prefix}{s.layer_range[0] + offset}{suffix}" for s in sl.sources]
                jobs.append(b.job(f"{prefix}{out_layer}{suffix}", refs, names, [default_name(r) for r in refs], sl.base_model or recipe.base_model,
                                  [sl.parameters, recipe.parameters], levels, t, f"slices[{i}]"))
            layer_sources.append((b.index[refs[0]], sl.sources[0].layer_range[0] + offset))
            out_layer += 1
    edge_jobs(post, len(recipe.slices) - 1)
    config_source = b.checkpoints[base_idx] if base_idx is not None else first_ckpt
    updates = _layer_config_updates(config_source, b.checkpoints, layer_sources) | _vocabulary_config(b, config_source)
    names = recipe.model_names
    models = [b.checkpoints[b.index[r]] for r in dict.fromkeys(s.model for sl in recipe.slices for s in sl.sources)]
    params, _ = resolve(recipe.method, [recipe.parameters], [], "", [], 0.0)
    return Plan(
        recipe, b.checkpoints, jobs, b.checkpoints[base_idx] if base_idx is not None else None, models, names,
        params, [], dtype_from_name(recipe.compute_dtype), config_source, updates,
        vocabulary=b.vocabulary, vocabulary_missing=b.vocabulary_missing,
    )


def _vocabulary_config(b: _Builder, config_source: Checkpoint) -> dict[str, Any]:
    """The output config's vocabulary size, when a vocabulary is built (as mergekit: its size, padded)."""
    return b.vocabulary.config_updates(config_source.config) if b.vocabulary is not None else {}


def _layer_config_updates(config_source: Checkpoint, checkpoints: list[Checkpoint], layer_sources: list[tuple[int, int]]) -> dict[str, Any]:
    """The output config's layer count, and per-layer lists (e.g. ``layer_types``) rebuilt from the layers used."""
    config = config_source.config or {}
    updates: dict[str, Any] = {}
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            updates[key] = len(layer_sources)
    for key, value in config.items():
        if isinstance(value, list) and key.startswith("layer") and len(value) == layer_count(config_source):
            rebuilt = []
            for src, layer in layer_sources:
                per_layer = (checkpoints[src].config or {}).get(key)
                rebuilt.append(per_layer[layer] if isinstance(per_layer, list) and layer < len(per_layer) else value[min(layer, len(value) - 1)])
            updates[key] = rebuilt
    return updates

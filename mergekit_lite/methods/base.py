"""What a merge method is: its parameters, what it consumes, how it computes one output tensor.

Each method is declared once; the recipe schema, the plan, ``--dry-run``, ``methods NAME`` and the
model card read the declaration. A method's function is pure math on tensors: it never sees a file.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch

from ..errors import RecipeError
from ..ops.fused import Keep, LinearForm
from ..ops.threads import map_strided, scratch


@dataclass(frozen=True)
class Param:
    """One parameter a method accepts, with its type, default and help text."""

    name: str
    kind: type
    default: Any
    doc: str
    #: may be given per model (models[i].parameters, slice sources); the global value is then the default
    per_model: bool = False
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    #: ``{search: [...]}`` is a grid searched with the recipe's evaluator
    searchable: bool = False
    #: the grid searched when an evaluator is given and the recipe sets no value
    default_grid: tuple[float, ...] | None = None
    #: may vary per tensor (a gradient or filter list); False for values needed model-wide
    per_tensor: bool = True
    #: no default: the recipe must give it (mergekit refuses a merge without it too)
    required: bool = False

    def coerce(self, value: Any) -> Any:
        """A numeric parameter's text that reads as a number becomes that number: YAML 1.1 reads ``1e-5``
        (no dot) as text, and mergekit accepts it as a number, so we do too."""
        if self.kind in (int, float) and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                return value
            return int(number) if self.kind is int and number.is_integer() else number
        return value

    def check(self, value: Any, where: str) -> Any:
        """Validate and normalise one scalar value; raise RecipeError naming ``where`` otherwise."""
        value = self.coerce(value)
        if self.kind is bool:
            if not isinstance(value, bool):
                raise RecipeError(f"{where}: expected true or false, got {value!r}")
            return value
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecipeError(f"{where}: expected a number, got {value!r}")
            if self.kind is int and not float(value).is_integer():
                raise RecipeError(f"{where}: expected a whole number, got {value!r}")
            if value != value or value in (float("inf"), float("-inf")):
                raise RecipeError(f"{where}: expected a finite number, got {value!r}")
            if self.minimum is not None and value < self.minimum:
                raise RecipeError(f"{where}: must be >= {self.minimum}, got {value!r}")
            if self.maximum is not None and value > self.maximum:
                raise RecipeError(f"{where}: must be <= {self.maximum}, got {value!r}")
            return self.kind(value)
        if self.kind is str:
            if not isinstance(value, str):
                raise RecipeError(f"{where}: expected text, got {value!r}")
            if self.choices and value not in self.choices:
                raise RecipeError(f"{where}: {value!r} is not one of {', '.join(self.choices)}{suggest(value, self.choices)}")
            return value
        return value


@dataclass
class TensorContext:
    """What a method may know about the output tensor it computes, beyond the tensors themselves."""

    name: str
    model_names: list[str]
    params: dict[str, Any]  # the method's global parameters, resolved for this tensor
    model_params: list[dict[str, Any]]  # per input model, resolved for this tensor
    model_statistics: dict[str, Any] = field(default_factory=dict)  # model-wide quantities from extra passes (TIES thresholds, ...)
    #: weight-space methods: which of the inputs is the base model (None: the base is not an input)
    base_index: int | None = None

    def weights(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor([p.get("weight", 1.0) for p in self.model_params], dtype=dtype, device=device)


class TaskVectorSource:
    """τ_1..τ_T of one tensor for methods that work in two phases: whole task vectors one model at a
    time (per-task statistics: a top-k trim, a random mask), then row chunks of every task at once
    (the element-wise election and merge). The tensors handed out are the caller's to read, not to
    change (they may be views of held tensors).
    """

    count: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    #: every tensor handed out is new and the caller's to change (so masks can be applied in place)
    hands_out_new: bool = False
    #: set by the executor: takes each row chunk of the merged task vector as it is made (its slice, None for
    #: the whole tensor), so that no whole merged tensor is held; None: the chunks are gathered into one
    keep_merged_rows: Callable[[slice | None, torch.Tensor], None] | None = None

    def whole(self, reuse: bool = False) -> Iterator[torch.Tensor]:
        """Each task's whole τ_t, in model order, one at a time. ``reuse``: the caller keeps nothing of a τ_t once
        it asks for the next, so a source that hands out new tensors may write each one into the last one's memory."""
        raise NotImplementedError

    def rows(self, t: int, start: int, stop: int, reuse: bool = False) -> torch.Tensor:
        """τ_t[start:stop] along the first dimension (the whole τ_t for a 0-d tensor). ``reuse``: the caller is done
        with these rows before this thread asks for any more, so a source that hands out new tensors may write them
        into this thread's buffer (``row_buffer``) instead of fresh memory."""
        raise NotImplementedError

    def chunks(self) -> list[tuple[int, int]]:
        """The row ranges to work on, in order, covering the first dimension."""
        raise NotImplementedError

    def native_sum_gram(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(Σ_t τ_t in the compute dtype, the float64 Gram matrix of the τ_t) made by the native kernel in one pass
        over the stored bytes (the sum with torch's roundings; each product exact, summed in float64 in the kernel's
        order); None where the kernel cannot read the inputs (the caller makes them with torch)."""
        return None

    def native_dare_masks(self, keeps: Sequence[Keep]) -> tuple[list[tuple[float, float]], list[torch.Tensor]] | None:
        """Each task's (‖τ_t‖₁, ‖τ_t ⊙ keep_t‖₁) and its whole keep-mask (one bit per entry, least significant bit
        first) for the native kernel's DARE ``keeps`` (draws, an L1 rescale), in one pass over the stored bytes; None
        where the kernel cannot read the inputs."""
        return None

    def native_scaled_sum(self, total: torch.Tensor, divisor: float, post_scale: float,
                          torch_merged: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        """Hand the output θ_0 + λ·((total ÷ divisor)·post_scale) to the executor, made by the native kernel in one
        pass (``total``: a sum of the τ_t, e.g. ``native_sum_gram``'s), where its bytes are those of ``torch_merged``
        (the method's torch steps from ``total`` to the merged task vector) and the executor's θ_0 + λ·merged; True
        then, and the method returns None. False: the method goes on with torch."""
        return False

    def stacked_rows(self, start: int, stop: int, reuse: bool = False) -> torch.Tensor:
        """[τ_1[start:stop], …, τ_T[start:stop]] as one new [T, …] tensor (each task's rows made in place there);
        ``reuse``: in this thread's buffer instead (``stack_buffer``), for a caller done with it before its next chunk."""
        rows = [self.rows(t, start, stop) for t in range(self.count)]
        out = self.stack_buffer(start, stop) if reuse else None
        return torch.stack(rows) if out is None else torch.stack(rows, out=out)

    def row_buffer(self, start: int, stop: int) -> torch.Tensor | None:
        """This thread's buffer for one task's rows [start, stop), reused from call to call (None off the CPU): a fresh
        2 MiB row chunk per task was faulted in anew (DARE-TIES K = 8: its L1 norms 2.99 → 1.75 CPU-s with a reused
        block, measured)."""
        if self.device.type != "cpu":
            return None
        shape = (stop - start, *self.shape[1:]) if self.shape else ()
        return scratch("task_rows", math.prod(shape), self.dtype).view(shape)

    def stack_buffer(self, start: int, stop: int) -> torch.Tensor | None:
        """This thread's [T, rows…] buffer for rows [start, stop), reused from chunk to chunk (None off the CPU): at K = 8
        a fresh stack of 2^20-entry float32 chunks is 32 MiB, malloc's mmap threshold here, so it would be mapped and
        faulted in anew for every chunk (Model Stock K = 8: 15 of 22 ms per chunk, measured)."""
        if self.device.type != "cpu":
            return None
        shape = (stop - start, *self.shape[1:]) if self.shape else ()
        return scratch("stacked_rows", self.count * math.prod(shape), self.dtype).view(self.count, *shape)


#: entries per row chunk; tensors of at least this many entries are merged in row chunks (two-phase methods:
#: from half as many, see ``execute.two_phase_min_entries``)
ROW_CHUNK_ENTRIES = 1 << 20
#: entries per row chunk of the weight-space methods that read their inputs again (``WeightInputs``: Multi-SLERP,
#: slerp, NuSLERP, Karcher, Arcee Fusion): each pass holds a chunk of several inputs per thread, which at 2^20
#: entries left the shared 32 MiB cache. Measured at 250M against 2^20 (interleaved): Multi-SLERP K = 4 2.72–3.05 →
#: 2.23–2.24 s, K = 8 3.56–3.82 → 3.12–3.25 (peak RSS −80 MB), Karcher K = 4 3.74 → 3.24, slerp and Arcee Fusion
#: unchanged; the entrywise methods (task arithmetic, linear, RAM) were not faster at 2^18 and keep 2^20
REREAD_CHUNK_ENTRIES = 1 << 18


class HeldTaskVectors(TaskVectorSource):
    """Task vectors already in memory (the λ search, re-mapped vocabularies, small tensors), handed
    out as views, in the same row chunks as re-read ones (so the same numbers, and no stacked copy)."""

    def __init__(self, deltas: Iterable[torch.Tensor], entries: int | None = None):
        self.deltas = list(deltas)
        if not self.deltas:
            raise ValueError("at least one model is required")
        self.count = len(self.deltas)
        self.shape = tuple(self.deltas[0].shape)
        self.dtype, self.device = self.deltas[0].dtype, self.deltas[0].device
        self.entries = ROW_CHUNK_ENTRIES if entries is None else entries

    def whole(self, reuse: bool = False) -> Iterator[torch.Tensor]:
        return iter(self.deltas)

    def rows(self, t: int, start: int, stop: int, reuse: bool = False) -> torch.Tensor:
        delta = self.deltas[t]
        return delta if delta.dim() == 0 or (start == 0 and stop >= delta.shape[0]) else delta[start:stop]

    def chunks(self) -> list[tuple[int, int]]:
        return row_chunks(self.shape, self.entries)


class WeightInputs:
    """The inputs' tensors of one job for weight-space methods that pass over them more than once (or
    in another order than the recipe's): ``read(i)`` hands out input i's whole tensor, a new tensor
    the caller may change, as often as asked."""

    count: int
    shape: tuple[int, ...]
    device: torch.device  # where the tensors handed out live
    dtype: torch.dtype  # the dtype of the tensors handed out (the compute dtype)
    #: the dtype the caller stores the output in (None: not known); a method that assembles its output chunk by
    #: chunk may store the chunks in it directly, the same rounding as converting the whole output afterwards
    out_dtype: torch.dtype | None = None

    def read(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, i: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of input i along the first dimension (the whole of a 0-d tensor), a new tensor."""
        raise NotImplementedError

    def chunks(self) -> list[tuple[int, int]]:
        """The row ranges to read by, in order, covering the first dimension (one when rows cannot be read apart)."""
        raise NotImplementedError

    def native_gram(self, indices: Sequence[int], base: int | None = None, diagonal: bool = False) -> torch.Tensor | None:
        """The float64 Gram matrix of inputs ``indices`` (of their differences from input ``base``; ``diagonal``: only
        their squared norms, the rest 0) made by the native kernel from their stored bytes (each product exact, summed
        in float64 in the kernel's order: it may differ from ``gram_by_rows``'s in the last bits); None where the kernel
        cannot read them (the caller makes it with torch)."""
        return None

    def native_combination(self, indices: Sequence[int], form: LinearForm, label: str,
                           torch_result: Callable[..., torch.Tensor],
                           base: int | None = None, out_dtype: torch.dtype | None = None, gate: torch.Tensor | None = None) -> torch.Tensor | None:
        """``form`` applied to inputs ``indices`` (Σ_t w_t·x_t; with ``base``, an input index, to their differences from
        it: a task-vector form) in ``out_dtype`` (default: the inputs' ``out_dtype``), made by the native kernel where
        it gives the bytes of ``torch_result(base rows or None, rows[, gate values])`` (the caller's torch code on
        float32 rows, checked on a sample once per ``label`` and form); ``gate``: the float32 tensor (of the output's
        shape) that the form's gated keep compares; None otherwise (the caller makes it with torch)."""
        return None


class HeldWeightInputs(WeightInputs):
    """Inputs already in memory (re-mapped vocabularies, small tensors): each read is a copy."""

    def __init__(self, tensors: Iterable[torch.Tensor], entries: int | None = None):
        self.tensors = list(tensors)
        self.count = len(self.tensors)
        self.shape = tuple(self.tensors[0].shape) if self.tensors else ()
        self.device = self.tensors[0].device if self.tensors else torch.device("cpu")
        self.dtype = self.tensors[0].dtype if self.tensors else torch.float32
        self.entries = ROW_CHUNK_ENTRIES if entries is None else entries

    def read(self, i: int) -> torch.Tensor:
        return self.tensors[i].clone()

    def rows(self, i: int, start: int, stop: int) -> torch.Tensor:
        tensor = self.tensors[i]
        return tensor.clone() if tensor.dim() == 0 else tensor[start:stop].clone()

    def chunks(self) -> list[tuple[int, int]]:
        return row_chunks(self.shape, self.entries)


def weighted_task_vector(delta: torch.Tensor, model_params: dict[str, Any], owned: bool) -> torch.Tensor:
    """w_t·τ_t (τ_t itself when w_t = 1: it is only read), in place when τ_t is the caller's to change."""
    w = model_params.get("weight", 1.0)
    return delta if w == 1.0 else delta.mul_(w) if owned else delta * w


def chunk_rows(source: TaskVectorSource, start: int, stop: int) -> slice | None:
    """The slice of one row chunk, or None when the chunk is the whole tensor."""
    whole = not source.shape or (start == 0 and stop >= source.shape[0])
    return None if whole else slice(start, stop)


def by_row_chunks(source: TaskVectorSource, part: Callable[[int, int, slice | None], torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor whose rows ``part(start, stop, rows)`` computes chunk by chunk (``rows`` None: the whole
    tensor, returned as it is); ``out``, if given, lends its memory to the result."""
    merged = out
    for start, stop in source.chunks():
        rows = chunk_rows(source, start, stop)
        chunk = part(start, stop, rows)
        if rows is None:
            return chunk
        if merged is None:
            merged = torch.empty(source.shape, dtype=chunk.dtype, device=chunk.device)
        merged[rows] = chunk
        del chunk
    assert merged is not None, "at least one row chunk"
    return merged


def merged_by_row_chunks(source: TaskVectorSource, part: Callable[[int, int, slice | None], torch.Tensor]) -> torch.Tensor | None:
    """The merged task vector whose rows ``part`` computes chunk by chunk (``by_row_chunks``); where the source
    takes the merged rows (``keep_merged_rows``), each chunk goes there as it is made, chunk i on thread i mod the
    thread count (``each_chunk``: ``part`` must be safe to run on several chunks at once), and None is returned.
    Measured at 250M against one chunk after another (medians of 5): DARE-TIES K = 8 11.16 → 9.94 s, TIES K = 4
    8.40 → 7.68, DELLA K = 4 (of 3) 11.74 → 10.39; DARE-TIES K = 4 and DARE-linear K = 8 unchanged, SCE K = 8
    8.80 → 9.30 (within this machine's noise)."""
    keep = source.keep_merged_rows
    if keep is None:
        return by_row_chunks(source, part)

    def merge_chunk(chunk: tuple[int, int]) -> None:
        rows = chunk_rows(source, *chunk)
        keep(rows, part(*chunk, rows))

    each_chunk(merge_chunk, source.chunks(), source.device)
    return None


def each_chunk(work: Callable[[tuple[int, int]], None], chunks: list[tuple[int, int]], device: torch.device) -> None:
    """``work`` for every row chunk: on the CPU, each chunk taken by whichever thread is free, each thread's kernels
    inline (``map_strided``: many short kernels, no hand-off per kernel); elsewhere one after another."""
    if device.type == "cpu":
        map_strided(work, chunks)
    else:
        for chunk in chunks:
            work(chunk)


def row_chunks(shape: tuple[int, ...], entries: int) -> list[tuple[int, int]]:
    """Row ranges along the first dimension of about ``entries`` entries each (at least one row)."""
    if not shape:
        return [(0, 1)]
    rows = shape[0]
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, entries // per_row)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)] or [(0, 0)]


#: task-vector methods: the task vectors of one tensor (read lazily, in model order) → one merged task vector
CombineFn = Callable[[Iterable[torch.Tensor], TensorContext], torch.Tensor]
#: two-phase task-vector methods: a source of whole task vectors and of their row chunks → one merged task vector
#: (None: its row chunks went to the source's ``keep_merged_rows``, see ``merged_by_row_chunks``)
CombineRowsFn = Callable[[TaskVectorSource, TensorContext], "torch.Tensor | None"]
#: weight-space methods: the inputs' tensors (read lazily, the base among them at ctx.base_index) → the output tensor
ComputeFn = Callable[[Iterator[torch.Tensor], TensorContext], torch.Tensor]
#: weight-space methods that read inputs again instead of holding them: the inputs → the output tensor
ComputeInputsFn = Callable[[WeightInputs, TensorContext], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: name, help, parameters, what it consumes, and the function for one output tensor.

    ``inputs == "task_vectors"``: the method's ``combine`` sees τ_t = θ_t − θ_0 of the non-base
    inputs and the output is θ_0 + λ · combine(τ); the base is required. ``inputs == "weights"``:
    ``compute`` sees the inputs' weights themselves (the base among them, if the recipe has one)
    and returns the output tensor; ``base`` says whether a base is needed.
    """

    name: str
    summary: str
    params: tuple[Param, ...]
    inputs: Literal["task_vectors", "weights"] = "task_vectors"
    combine: CombineFn | None = None
    #: the same merge from a TaskVectorSource, so the executor can hand out row chunks of large tensors
    #: instead of holding every task vector (``combine`` is then this over the held task vectors)
    combine_rows: CombineRowsFn | None = None
    compute: ComputeFn | None = None
    #: the same from re-readable inputs (the executor reads them again from the checkpoints)
    compute_inputs: ComputeInputsFn | None = None
    base: Literal["required", "optional", "unused"] = "required"
    min_models: int = 1
    max_models: int | None = None
    paper: str = ""
    #: working copies of the largest tensor (in the compute dtype) held at once with n inputs (the
    #: plan's inputs of one tensor: the base too where the method reads it as a model), not counting
    #: the stored output copy; fitted to benchmarks/bench_memory.py's measurements, which check it
    working_copies: Callable[[int], float] = lambda n: 4
    #: two-phase methods: entries per row chunk with n inputs (None: ``execute.two_phase_chunk_entries()``)
    chunk_entries: Callable[[int], int] | None = None
    #: model-wide statistics computed in extra passes before the merge (None: not needed)
    statistics: Callable[[Any, dict[str, Any], list[dict[str, Any]]], dict[str, Any]] | None = None
    #: whether, with these (per-tensor) parameters, each output entry depends only on the inputs' entries at
    #: the same place: the executor then computes a large tensor row chunk by row chunk from rows read off
    #: disk, holding no whole input (the same numbers: every entry sees the same operations)
    entrywise: Callable[[dict[str, Any]], bool] = lambda params: False
    #: the output for a tensor as a fixed linear combination of its inputs (ops.fused.LinearForm), which the
    #: native kernel computes in one pass with the same bytes as ``output_tensor``; None where it is not one
    linear_form: Callable[[TensorContext], LinearForm | None] = lambda ctx: None
    #: how many times the inputs are read, for the plan
    passes: Callable[[dict[str, Any], torch.dtype], int] = lambda params, dtype: 1
    #: whether ``combine`` is done with each task vector (keeps no reference to it or a view of it) before it
    #: asks for the next: the executor then reads whole inputs into two buffers in turn instead of fresh memory
    inputs_in_turn: bool = False
    #: what the method writes: a merged Hugging Face checkpoint, or a compressed collection
    output: str = "model"
    #: pairs of parameters a recipe may not give together (two ways to say one thing)
    exclusive: tuple[tuple[str, str], ...] = ()
    #: computed on the CPU whatever ``--device`` says: a result that a GPU's roundings would change beyond its last
    #: bits (a selection decided by a float32 quantity that is mostly rounding error; a float32 SVD, whose singular
    #: vectors a GPU's algorithm rounds otherwise), so every device gives the CPU's
    cpu_only: bool = False
    #: whether, with these per-model parameters, the output is the single model's tensor unchanged (passthrough at
    #: scale 1): the executor then hands on the stored tensor itself, no working copy made
    unchanged: Callable[[list[dict[str, Any]]], bool] | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def model_count(self) -> str:
        """'exactly 2', 'at least 1', '1 to 3' — for messages and help."""
        if self.max_models == self.min_models:
            return f"exactly {self.min_models}"
        if self.max_models is None:
            return f"at least {self.min_models}"
        return f"{self.min_models} to {self.max_models}"

    def output_tensor(self, base: torch.Tensor | None, models: Iterator[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
        """The output tensor in the compute dtype (``base`` and ``models`` already in it).

        Task-vector methods get the base apart and the non-base models; weight-space methods get
        every input in ``models`` (the base at ``ctx.base_index``) and ``base`` is None.
        """
        if self.inputs == "weights":
            assert self.compute is not None
            return self.compute(models, ctx)
        assert self.combine is not None and base is not None
        merged = self.combine(task_vectors(models, base), ctx)
        return base.add_(merged, alpha=ctx.params.get("lambda", 1.0))


def task_vectors(models: Iterator[torch.Tensor], base: torch.Tensor) -> Iterator[torch.Tensor]:
    """τ_t = θ_t − θ_0 in place, one at a time; no reference is kept here while the next model is read."""
    for model in models:
        model.sub_(base)
        yield model
        del model


def suggest(word: str, options: Iterable[str]) -> str:
    """'; did you mean X?' for the closest option, or ''."""
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise RecipeError(f"merge_method: unknown method {name!r}{suggest_method(name)} (available: {', '.join(sorted(METHODS))})")
    return METHODS[name]


#: mergekit 0.1.5's methods, to tell "not implemented here yet" from a typo
MERGEKIT_METHODS = frozenset({
    "linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_ties", "dare_linear",
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "model_stock", "nearswap", "arcee_fusion",
    "passthrough", "ram", "ramplus_tl",
})


def suggest_method(name: str) -> str:
    """What to say about an unknown method: a mergekit method we lack (never pointing to a look-alike
    as if it were the same, e.g. della_linear ≠ dare_linear), a typo's closest name, or nothing."""
    match = difflib.get_close_matches(name, list(METHODS), n=1, cutoff=0.6)
    if name in MERGEKIT_METHODS:
        other = f"; {match[0]!r} is a different algorithm" if match else ""
        return f" — a mergekit method that mergekit-lite does not have yet{other}"
    if not match:
        return ""
    other = match[0]
    if other.endswith(name) or name.endswith(other) or other.startswith(name) or name.startswith(other):
        return f"; {other!r} exists but is a different algorithm ({METHODS[other].summary})"
    return f"; did you mean {other!r}?"


def reduce_passes(source: Any, description: str, part: Callable[..., Any], merge: Callable[[list[Any]], Any], *args: Any) -> Any:
    """``part(source, description, *args)`` over the source's tensors; a source that splits its tensors
    among workers (``source.reduce``) runs ``part`` on each share and ``merge``s the results in order."""
    reduce = getattr(source, "reduce", None)
    return reduce(description, part, merge, *args) if reduce is not None else part(source, description, *args)

"""The local executor: reads each job's input tensors, runs the method, hands results to a product.

It knows the plan and the method declarations, never the products: they register by name
(``PRODUCTS``) and the top-level ``run`` picks the one the method declares.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Sequence

import torch

from .checkpoint import ROW_WINDOW_BYTES, Checkpoint, TensorInfo
from .errors import CheckpointError, MergeKitLiteError, RecipeError
from .methods import TensorContext
from .methods import base as base_module
from .methods.base import TaskVectorSource, WeightInputs, chunk_rows, each_chunk, row_chunks, task_vectors
from .ops import fused
from .ops.threads import map_strided, scratch, thread_count
from .ops.vocab import remap_rows
from .plan import Plan, TensorJob, TensorRef
from .progress import progress_bar
from .writer import Placement, write_at

#: output kind (a method's ``output``) → function(plan, out_dir, force=, device=, progress=) writing it
PRODUCTS: dict[str, Callable[..., Path]] = {}


def register_product(kind: str, write: Callable[..., Path]) -> None:
    PRODUCTS[kind] = write


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N', refusing CUDA when it is not available."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MergeKitLiteError(f"--device: {device!r} is not a device; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeKitLiteError("--device cuda: no CUDA device is available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise MergeKitLiteError(f"--device: {device!r} is not supported; use cpu or cuda")
    return dev


def read_for_merge(ckpt: Checkpoint, name: str, device: torch.device, dtype: torch.dtype, check: bool = True,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one input tensor in the compute dtype, refusing NaN/Inf (they would poison every merged weight);
    ``check=False`` for a tensor read again after a checked read; ``out``: a buffer (that dtype, device and shape)
    to convert it into instead of a new tensor."""
    tensor = ckpt.get(name).to(device=device, dtype=dtype) if out is None else out.copy_(ckpt.get(name))
    if check and not _all_finite(tensor):
        _refuse_non_finite(ckpt, name, tensor)
    return tensor


def read_rows_for_merge(ckpt: Checkpoint, name: str, start: int, stop: int, device: torch.device, dtype: torch.dtype,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, stop) of one input tensor in the compute dtype (only those bytes read; converted into ``out``
    if given: that dtype, device and shape), refusing NaN/Inf."""
    rows = ckpt.rows_as(name, start, stop, dtype, device, out)
    if not _all_finite(rows):
        _refuse_non_finite(ckpt, name, ckpt.get(name).to(dtype=dtype))
    return rows


def _all_finite(tensor: torch.Tensor) -> bool:
    # one reduction, no temporary: any NaN/Inf makes the sum non-finite (finite sums are confirmed exactly)
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _refuse_non_finite(ckpt: Checkpoint, name: str, tensor: torch.Tensor) -> NoReturn:
    bad = int((~torch.isfinite(tensor)).sum())
    raise CheckpointError(
        f"{ckpt.file_of(name)}: tensor {name} has {bad} NaN/Inf value(s); refusing to merge it "
        "(fix the checkpoint, or list the tensor under 'exclude' to copy it from the base)"
    )


def _read(plan: Plan, ref: TensorRef, device: torch.device, check: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    return read_for_merge(plan.checkpoints[ref.source], ref.name, device, plan.compute_dtype, check, out)


_READER: ThreadPoolExecutor | None = None


#: a job whose inputs hold fewer bytes than this reads them on the calling thread: handing a read to the reader
#: thread and waking the caller again takes 0.1-0.3 ms on this project's VM, more than reading a small tensor
#: (Model Stock K = 8 at 250M: 264 such hand-offs for its 33 norm vectors)
READ_AHEAD_MIN_BYTES = 1 << 20


def read_ahead(reads: Sequence[Callable[[], torch.Tensor]]) -> Iterator[torch.Tensor]:
    """Each read's tensor in order, the next one already being read in a background thread while the
    caller computes with this one (reads and torch kernels release the GIL): about max(read, compute)
    per model instead of their sum, for one more tensor in memory."""
    global _READER
    if _READER is None:
        _READER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergekit-lite-read")
    pending: Future[torch.Tensor] | None = _READER.submit(reads[0]) if reads else None
    for i in range(len(reads)):
        assert pending is not None
        try:
            tensor = pending.result()
        finally:
            pending = _READER.submit(reads[i + 1]) if i + 1 < len(reads) else None
        yield tensor
        del tensor


def context(plan: Plan, job: TensorJob) -> TensorContext:
    return TensorContext(job.name, list(job.model_names), job.params, list(job.model_params), plan.model_statistics, job.base_index)


def reads_in_turn(plan: Plan, refs: Sequence[TensorRef], device: torch.device) -> list[Callable[[], torch.Tensor]]:
    """Reads of tensors of one shape that alternate between two buffers, for ``read_ahead`` and a consumer done
    with each tensor before it asks for the next (read i + 2 goes where read i went): no fresh pages to fault in
    and zero for every input but the first two (RAM+ K = 8 at 250M: 11.7 → 11.4 s)."""
    buffers: list[torch.Tensor | None] = [None, None]

    def read(i: int) -> torch.Tensor:
        buffers[i % 2] = _read(plan, refs[i], device, out=buffers[i % 2])
        return buffers[i % 2]

    return [partial(read, i) for i in range(len(refs))]


def job_inputs(plan: Plan, job: TensorJob, device: torch.device) -> tuple[torch.Tensor | None, Iterator[torch.Tensor]]:
    """(θ_0 or None, the inputs' tensors) of a job in the compute dtype, read lazily; a vocabulary tensor's
    are read together and re-mapped onto the output vocabulary first (its rule looks at every input)."""
    if job.vocab is None:
        base = _read(plan, job.base, device) if job.base is not None else None
        if plan.method.inputs_in_turn and job.base is not None:
            return base, read_ahead(reads_in_turn(plan, job.inputs, device))
        reads = [partial(_read, plan, ref, device) for ref in job.inputs]
        if sum(plan.checkpoints[ref.source].info(ref.name).nbytes for ref in job.inputs) < READ_AHEAD_MIN_BYTES:
            return base, (read() for read in reads)  # small: each read costs less than handing it to the reader thread
        return base, read_ahead(reads)
    try:
        tensors = remap_rows([_read(plan, ref, device) for ref in job.reads], job.vocab)
    except ValueError as exc:  # pragma: no cover - the plan checked the rows from the headers
        raise CheckpointError(f"tensor {job.name}: cannot re-map its rows onto the output vocabulary: {exc}") from None
    base = tensors.pop() if job.base is not None else None
    return base, iter(tensors)


def merged_task_vector(plan: Plan, job: TensorJob, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ_0, combine(τ_1..τ_T)) of a task-vector method's job, before λ (for the λ search)."""
    assert job.base is not None and plan.method.combine is not None
    base, models = job_inputs(plan, job, device)
    assert base is not None
    return base, plan.method.combine(task_vectors(models, base), context(plan, job))


#: tensors of at least this many entries go to an entrywise method in row chunks of this many entries
ROW_CHUNK_ENTRIES = base_module.ROW_CHUNK_ENTRIES


def two_phase_min_entries() -> int:
    """Tensors of at least this many entries (half of ``ROW_CHUNK_ENTRIES``) go to a two-phase method
    (``combine_rows``) in row chunks, each task vector's rows read again, instead of holding every task vector.
    Measured at 250M, K = 4, against ``ROW_CHUNK_ENTRIES``: TIES 14.0–14.6 → 12.0–12.8 s, DARE-TIES 14.0–14.3 →
    12.0–12.4 s, DELLA 23.8–24.2 → 20.5 s, from the 512 × 1024 tensors that it takes from the held path."""
    return max(1, ROW_CHUNK_ENTRIES // 2)


def two_phase_chunk_entries() -> int:
    """Entries per row chunk of a two-phase method: half of ``ROW_CHUNK_ENTRIES``. Since both phases give each
    thread whole chunks (no hand-off per chunk), a smaller chunk keeps a chunk's K task vectors, masks and sums
    in the shared cache (at 2^20 entries and K = 8 they were 8 × 4 MiB). Measured at 250M, 2^20 → 2^19, medians of
    3–4 interleaved runs: DARE-TIES K = 4 5.88 → 5.40 s, K = 8 7.70 → 7.17; TIES K = 4 6.10 → 5.86; DELLA K = 4
    8.28 → 7.92; SCE K = 8 6.62 → 6.31; Model Stock K = 8 6.88 → 4.98; RAM+ K = 8 5.04 → 4.67; DARE-linear K = 4
    5.06 → 4.87. Sums kept per chunk (L1 norms, Gram matrices) are added up in chunk order, so the chunk size
    can move their last bits (DELLA, Model Stock and DARE-TIES K = 8 outputs differ in a few rounded entries)."""
    return ROW_CHUNK_ENTRIES // 2


def _rows_checked_once(plan: Plan, ref: TensorRef, start: int, stop: int, device: torch.device, checked: set[tuple[int, int]], key: tuple[int, int],
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, stop) of one input in the compute dtype (converted into ``out`` if given), checked for NaN/Inf
    unless ``key`` is in ``checked`` (these bytes were checked before), which it is afterwards."""
    ckpt = plan.checkpoints[ref.source]
    if key in checked:
        return ckpt.rows_as(ref.name, start, stop, plan.compute_dtype, device, out)
    rows = read_rows_for_merge(ckpt, ref.name, start, stop, device, plan.compute_dtype, out)
    checked.add(key)
    return rows


class RereadTaskVectors(TaskVectorSource):
    """τ_t = θ_t − θ_0 of one job, read from the checkpoints each time they are asked for: whole tensors,
    then row ranges (only those bytes; the page cache usually has them). θ_0 is held whole only while whole
    task vectors are handed out; rows subtract θ_0's rows, read once per chunk. Every read is checked for
    NaN/Inf the first time its bytes are read."""

    def __init__(self, plan: Plan, job: TensorJob, device: torch.device, entries: int):
        assert job.base is not None
        self.plan, self.job, self.device = plan, job, device
        self.count = len(job.inputs)
        self.shape = tuple(job.out.shape)
        self.dtype = plan.compute_dtype
        self.hands_out_new = True
        self.entries = entries
        self.checked: set[tuple[int, int]] = set()  # (input, first row) already checked; input -1: the base
        #: set by ``output_in_row_chunks``: takes the finished output (``native_scaled_sum``'s)
        self.keep_output: Callable[[torch.Tensor], None] | None = None
        #: per thread (a method may work on row chunks on several threads): the base rows of its current chunk
        self._base_rows: dict[int, tuple[int, int, torch.Tensor]] = {}

    def whole(self, reuse: bool = False) -> Iterator[torch.Tensor]:
        # the next model's tensor is asked of the kernel (page cache), not read ahead into memory: phase 1
        # is where a two-phase method holds the most, and one more tensor there would be its peak
        assert self.job.base is not None
        base = _read(self.plan, self.job.base, self.device)
        self.checked.update((-1, start) for start, _ in self.chunks())
        refs = self.job.inputs
        reused: torch.Tensor | None = None  # with ``reuse``: each τ_t written over the last (no fresh pages to fault in)
        for i, ref in enumerate(refs):
            if i + 1 < len(refs):
                self.plan.checkpoints[refs[i + 1].source].advise(refs[i + 1].name)
            delta = _read(self.plan, ref, self.device, out=reused).sub_(base)
            self.checked.update((i, start) for start, _ in self.chunks())
            yield delta
            if reuse:
                reused = delta
            del delta

    def rows(self, t: int, start: int, stop: int, reuse: bool = False) -> torch.Tensor:
        return self._read_rows(t, start, stop, out=self.row_buffer(start, stop) if reuse else None).sub_(self.base_rows(start, stop))

    def stacked_rows(self, start: int, stop: int, reuse: bool = False) -> torch.Tensor:
        # each input's rows converted straight into the stack and θ_0's rows taken off there: no per-task tensor
        # and no copy into the stack
        base = self.base_rows(start, stop)
        stacked = self.stack_buffer(start, stop) if reuse else None
        if stacked is None:
            stacked = torch.empty((self.count, *base.shape), dtype=base.dtype, device=base.device)
        for t in range(self.count):
            self._read_rows(t, start, stop, out=stacked[t]).sub_(base)
        return stacked

    def base_rows(self, start: int, stop: int) -> torch.Tensor:
        """θ_0's rows [start, stop) in the compute dtype, read once for the chunk this thread is merging (not to be changed)."""
        thread = threading.get_ident()
        cached = self._base_rows.get(thread)
        if cached is None or cached[:2] != (start, stop):
            self._base_rows.pop(thread, None)  # the previous chunk's rows go before the next ones are read
            cached = self._base_rows[thread] = (start, stop, self._read_rows(-1, start, stop))
        return cached[2]

    def release(self) -> None:
        """Let go of the base's cached rows (every thread's)."""
        self._base_rows.clear()

    def native_sum_gram(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        assert self.job.base is not None
        sources = _stored_sources(self.plan, [self.job.base, *self.job.inputs], self.job.out.numel, self.device,
                                  fused.MAX_GRAM_INPUTS + 1)  # the base besides
        if sources is None:
            return None
        # this thread's buffer, kept from tensor to tensor: no fresh pages to fault in for every tensor's sum (the
        # method is done with it before its next tensor)
        total = scratch("native_sum", self.job.out.numel, self.dtype).view(self.shape)
        gram = _gram_of_stored(sources, True, self.dtype, sum_into=total.view(-1))
        starts = [start for start, _ in self.chunks()]
        self.checked.update((t, start) for t in range(-1, self.count) for start in starts)  # every entry looked at
        return total, gram

    def native_dare_masks(self, keeps: Sequence[fused.Keep]) -> tuple[list[tuple[float, float]], list[torch.Tensor]] | None:
        assert self.job.base is not None
        sources = _stored_sources(self.plan, [self.job.base, *self.job.inputs], self.job.out.numel, self.device)
        if sources is None:
            return None
        masks = [torch.empty(fused.mask_bytes(self.job.out.numel), dtype=torch.uint8) for _ in keeps]  # each chunk's bits in place
        norms = _dare_norms_of_stored(sources, keeps, self.dtype, whole=masks)
        self.checked.update((t, start) for t in range(-1, self.count) for start, _ in self.chunks())  # every entry looked at
        return norms, masks

    def native_scaled_sum(self, total: torch.Tensor, divisor: float, post_scale: float,
                          torch_merged: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        sources = _stored_sources(self.plan, [self.job.base], self.job.out.numel, self.device) if fused.handles(self.job.out.dtype) else None
        if sources is None or self.keep_output is None or total.dtype != torch.float32 or not total.is_contiguous():
            return False
        lam = self.job.params.get("lambda", 1.0)
        form = fused.LinearForm((1.0,), float(divisor), lam, post_scale=post_scale, given_task_vectors=True)
        if not _kernel_matches(("scaled_sum",), [sources[0][2], torch.float32], True, self.job.out.dtype, form,
                               lambda base, inputs: plus_base(base, torch_merged(inputs[0]), lam)):
            return False
        out = torch.empty(self.shape, dtype=self.job.out.dtype)
        bad = _combine_stored(sources, True, out.view(-1), form, in_memory=[total.view(-1)])
        _refuse_if_bad(sources, True, 0 if bad == 0 else -1, self.plan.compute_dtype)  # an overflowed sum: IEEE arithmetic, as torch's
        self.keep_output(out)
        return True

    def _read_rows(self, t: int, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        ref = self.job.base if t < 0 else self.job.inputs[t]
        assert ref is not None
        return _rows_checked_once(self.plan, ref, start, stop, self.device, self.checked, (t, start), out)

    def chunks(self) -> list[tuple[int, int]]:
        return row_chunks(self.shape, self.entries)


def plus_base(base: torch.Tensor, merged: torch.Tensor, lam: float) -> torch.Tensor:
    """θ_0 + λ·merged, a two-phase method's output rows in the compute dtype (one rounding: torch's add with alpha)."""
    return torch.add(base, merged, alpha=lam)


def output_in_row_chunks(plan: Plan, job: TensorJob, device: torch.device) -> torch.Tensor:
    """A two-phase method's output tensor, on the CPU in its output dtype: θ_0 + λ·merged stored row chunk by
    row chunk as the method makes the merged rows (θ_0's rows read again), so that after phase 1 only the
    output and a few chunks are held. Every entry sees the operations of the whole tensor's sum: the same bytes."""
    native = _native_form(plan, job, device)
    if native is not None:  # DARE-linear: the native kernel's passes over the stored bytes
        return fused_output(plan, job, *native)
    entries = plan.method.chunk_entries(len(job.inputs)) if plan.method.chunk_entries is not None else two_phase_chunk_entries()
    source = RereadTaskVectors(plan, job, device, entries)
    lam = job.params.get("lambda", 1.0)
    out: torch.Tensor | None = None  # allocated at the first chunk, once phase 1 has freed its memory (less heap left in pieces)
    allocating = threading.Lock()  # a method may keep chunks from several threads

    def keep(rows: slice | None, merged: torch.Tensor) -> None:
        nonlocal out
        if out is None:
            with allocating:
                if out is None:
                    out = torch.empty(job.out.shape, dtype=job.out.dtype)
        start, stop = (0, source.shape[0] if source.shape else 1) if rows is None else (rows.start, rows.stop)
        (out if rows is None else out[rows]).copy_(plus_base(source.base_rows(start, stop), merged, lam))

    def keep_output(whole: torch.Tensor) -> None:
        nonlocal out
        out = whole

    source.keep_merged_rows, source.keep_output = keep, keep_output
    assert plan.method.combine_rows is not None
    try:
        merged = plan.method.combine_rows(source, context(plan, job))
        if merged is not None:  # a method that needs its whole merged tensor first (Model Stock's angle)
            whole = merged

            def keep_chunk(chunk: tuple[int, int]) -> None:
                rows = chunk_rows(source, *chunk)
                keep(rows, whole if rows is None else whole[rows])

            each_chunk(keep_chunk, source.chunks(), device)
            del merged, whole
    finally:  # source → keep → source is a cycle: broken here, so the output and the chunks go when the caller is done
        source.keep_merged_rows = source.keep_output = None
        source.release()
    assert out is not None, "every chunk was kept"
    return out


class ReadWeightInputs(WeightInputs):
    """A weight-space job's inputs, each read from its checkpoint whenever asked for (the page cache usually has it)."""

    def __init__(self, plan: Plan, job: TensorJob, device: torch.device):
        self.plan, self.job, self.device = plan, job, device
        self.dtype = plan.compute_dtype
        self.count = len(job.inputs)
        self.shape = tuple(job.out.shape)
        self.checked: set[int] = set()
        self.checked_rows: set[tuple[int, int]] = set()
        self.by_rows = bool(self.shape) and all(plan.checkpoints[ref.source].row_reads for ref in job.inputs)
        self.out_dtype = job.out.dtype

    def read(self, i: int) -> torch.Tensor:
        # NaN/Inf are looked for on the first read only: a pass over the tensor saved on each re-read
        tensor = _read(self.plan, self.job.inputs[i], self.device, check=i not in self.checked)
        self.checked.add(i)
        self.checked_rows.update((i, start) for start, _ in self.chunks())  # its rows are checked too
        return tensor

    def rows(self, i: int, start: int, stop: int) -> torch.Tensor:
        if not self.by_rows:
            tensor = self.read(i)
            return tensor if tensor.dim() == 0 or (start == 0 and stop >= tensor.shape[0]) else tensor[start:stop].clone()
        return _rows_checked_once(self.plan, self.job.inputs[i], start, stop, self.device, self.checked_rows, (i, start))

    def chunks(self) -> list[tuple[int, int]]:
        return row_chunks(self.shape, base_module.REREAD_CHUNK_ENTRIES) if self.by_rows else [(0, self.shape[0] if self.shape else 1)]

    def _native(self, indices: Sequence[int], most: int = fused.MAX_INPUTS) -> list[StoredSource] | None:
        if not self.by_rows:
            return None
        return _stored_sources(self.plan, [self.job.inputs[i] for i in indices], self.job.out.numel, self.device, most)

    def native_gram(self, indices: Sequence[int], base: int | None = None, diagonal: bool = False) -> torch.Tensor | None:
        looked_at = ([base] if base is not None else []) + list(indices)
        sources = self._native(looked_at, fused.MAX_GRAM_INPUTS + (base is not None))
        if sources is None:
            return None
        gram = _gram_of_stored(sources, base is not None, self.plan.compute_dtype, diagonal=diagonal)
        for i in looked_at:  # every entry looked at: later reads need not check again
            self.checked.add(i)
            self.checked_rows.update((i, start) for start, _ in self.chunks())
        return gram

    def native_combination(self, indices: Sequence[int], form: fused.LinearForm, label: str,
                           torch_result: Callable[..., torch.Tensor],
                           base: int | None = None, out_dtype: torch.dtype | None = None, gate: torch.Tensor | None = None) -> torch.Tensor | None:
        dtype = out_dtype or self.out_dtype
        has_base = base is not None
        sources = self._native(([base] if base is not None else []) + list(indices))
        if sources is None or dtype is None or not fused.handles(dtype) or form.of_task_vectors != has_base:
            return None
        gated = [k.gate_min is not None for k in form.keeps] if form.keeps is not None else []
        if any(gated) and (gate is None or gate.dtype != torch.float32 or gate.numel() != self.job.out.numel or gate.device.type != "cpu"):
            return None
        if not _kernel_matches((label,), [dtype for _, _, dtype in sources], has_base, dtype, form, torch_result):
            return None
        out = torch.empty(self.shape, dtype=dtype)
        gate_flat = gate.reshape(-1).contiguous() if gate is not None else None
        gates = [gate_flat if g else None for g in gated] if gate_flat is not None and gated else None
        _refuse_if_bad(sources, has_base, _combine_stored(sources, has_base, out.view(-1), form, gates=gates), self.plan.compute_dtype)
        return out


def window_bytes(plan: Plan, job: TensorJob) -> int:
    """The most bytes of mapped row windows (``Checkpoint.rows_as``) a job holds at once: one window per checkpoint
    it reads by row chunks, none for a job read whole. Page cache, but counted in the process's RSS."""
    by_rows = _entrywise_in_row_chunks(plan, job) or _in_row_chunks(plan, job) or (
        plan.method.compute_inputs is not None and job.vocab is None and bool(job.out.shape)
        and all(plan.checkpoints[ref.source].row_reads for ref in job.inputs))
    if not by_rows:
        return 0
    refs = {(ref.source, ref.name): ref for ref in job.reads}.values()
    return sum(min(ROW_WINDOW_BYTES, plan.checkpoints[ref.source].info(ref.name).nbytes) for ref in refs)


def _in_row_chunks(plan: Plan, job: TensorJob) -> bool:
    """Whether a job runs through its method's ``combine_rows`` on re-read row chunks."""
    return (
        plan.method.combine_rows is not None and job.vocab is None and job.base is not None and job.out.numel >= two_phase_min_entries()
        and all(plan.checkpoints[ref.source].row_reads for ref in job.inputs)
    )


def _entrywise_in_row_chunks(plan: Plan, job: TensorJob) -> bool:
    """Whether a job's output is computed row chunk by row chunk from re-read rows (an entrywise method)."""
    return (
        plan.method.entrywise(job.params) and job.vocab is None and job.out.numel >= ROW_CHUNK_ENTRIES and bool(job.out.shape)
        and all(plan.checkpoints[ref.source].row_reads for ref in job.reads)
    )


def entrywise_output(plan: Plan, job: TensorJob, device: torch.device) -> torch.Tensor:
    """An entrywise method's output tensor, on the CPU in its output dtype, made one row chunk at a time:
    each input's rows read (only those bytes), the method run on them, the rows stored. It holds the
    output and a few chunks instead of whole float32 copies of the inputs, and every entry goes through
    the same operations as in a whole-tensor merge, so the bytes are the same."""
    native = _native_form(plan, job, device)
    if native is not None:
        return fused_output(plan, job, *native)
    out = torch.empty(job.out.shape, dtype=job.out.dtype)
    ctx = context(plan, job)
    dtype = plan.compute_dtype

    def rows(ref: TensorRef, start: int, stop: int) -> torch.Tensor:
        return read_rows_for_merge(plan.checkpoints[ref.source], ref.name, start, stop, device, dtype)

    chunks = row_chunks(job.out.shape, ROW_CHUNK_ENTRIES)
    if device.type == "cpu" and thread_count() > 1 and len(chunks) > 1:
        # chunks in parallel, each thread's kernels inline (no read-ahead: each thread reads its own chunk's rows):
        # RAM K = 8 7.46 -> 6.25 s, task arithmetic K = 8 5.75 -> 5.22, linear K = 4 3.52 -> 3.31 (250M bfloat16)
        def merge_chunk(chunk: tuple[int, int]) -> None:
            start, stop = chunk
            base = rows(job.base, start, stop) if job.base is not None else None
            out[start:stop] = plan.method.output_tensor(base, (rows(ref, start, stop) for ref in job.inputs), ctx)

        map_strided(merge_chunk, chunks)
        return out
    firsts = (job.base,) if job.base is not None else ()
    # every read of the job in order (per chunk: the base's rows, then each input's), one read ahead
    reads = read_ahead([partial(rows, ref, start, stop) for start, stop in chunks for ref in (*firsts, *job.inputs)])
    for start, stop in chunks:
        base = next(reads) if job.base is not None else None
        models = islice(reads, len(job.inputs))
        out[start:stop] = plan.method.output_tensor(base, models, ctx)
        del base
        for _ in models:  # a method that stops early must not shift the next chunk's reads
            pass
    return out


#: entries per chunk of the native kernel's reads: each input's chunk (bfloat16: 512 KiB) read into this thread's
#: reused buffer stays in the shared cache for the pass (250M, K = 4, the whole merge: 2^17 0.52 s, 2^18 0.40 s,
#: 2^20 0.48 s in a prototype)
FUSED_CHUNK_ENTRIES = 1 << 18
#: entries of the sample on which the native kernel is compared with the method's torch path (vector lanes and a
#: scalar tail, some of them zeros of both signs)
FUSED_SAMPLE_ENTRIES = 67
_FUSED_CHECKED: dict[tuple[Any, ...], bool] = {}


#: one input of the native kernel: its checkpoint, tensor name and stored dtype
StoredSource = tuple[Checkpoint, str, torch.dtype]


def _stored_sources(plan: Plan, refs: Sequence[TensorRef], numel: int, device: torch.device,
                    most: int = fused.MAX_INPUTS) -> list[StoredSource] | None:
    """The refs as the native kernel's inputs, where it can read them (built and on, able to read files here, CPU,
    float32 arithmetic, float32/bfloat16 safetensors of ``numel`` entries, at most ``most`` of them); else None."""
    if device.type != "cpu" or plan.compute_dtype != torch.float32 or not fused.reads_files() or len(refs) > most:
        return None
    sources = []
    for ref in refs:
        ckpt = plan.checkpoints[ref.source]
        info = ckpt.info(ref.name)
        if not (fused.handles(info.dtype) and info.numel == numel and ckpt.reads_into(ref.name)):
            return None
        sources.append((ckpt, ref.name, info.dtype))
    return sources


def _each_stored_chunk(sources: Sequence[StoredSource], has_base: bool, work: Callable[[int, int, list[fused.Span]], int],
                       compute_dtype: torch.dtype) -> None:
    """``work(start, stop, spans)`` for every chunk of ``fused_chunks`` (on the threads), ``spans``
    where each source's entries [start, stop) are in its file: the kernel reads them itself, a stretch at a time, while
    it stays in the level-2 cache (against whole chunks read into buffers first: Model Stock K = 8 at 250M ~3.0 ->
    ~2.8 s, its Gram pass 1.39-1.47 -> 1.03-1.15 s in-process). ``work`` returns the kernel's answer: -1, or the input
    with a NaN/Inf entry (0 the base, the first source where ``has_base``; 1 + t input t), refused as the torch path
    refuses it; a read the kernel could not make is refused with the reader's own error."""
    where = _spans_of(sources)

    def chunk(span: tuple[int, int]) -> None:
        start, stop = span
        try:
            bad = work(start, stop, [fused.Span(fd, position + start * dtype.itemsize, dtype) for fd, position, dtype in where])
        except fused.ReadFailed as failure:
            _refuse_unreadable(sources, has_base, failure, (start, stop))
        _refuse_if_bad(sources, has_base, bad, compute_dtype)

    map_strided(chunk, fused_chunks(_numel_of(sources)))


def _numel_of(sources: Sequence[StoredSource]) -> int:
    return sources[0][0].info(sources[0][1]).numel


def _spans_of(sources: Sequence[StoredSource]) -> list[tuple[int, int, torch.dtype]]:
    """Each source's (descriptor, byte position of its entry 0, stored dtype)."""
    return [(*ckpt.file_span(name), dtype) for ckpt, name, dtype in sources]


def _stored_spans(sources: Sequence[StoredSource], has_base: bool) -> tuple[fused.Span | None, list[fused.Span]]:
    """The kernel's base (None without one: the first source where ``has_base``) and inputs, as spans of entry 0."""
    spans = [fused.Span(fd, position, dtype) for fd, position, dtype in _spans_of(sources)]
    return (spans[0], spans[1:]) if has_base else (None, spans)


def _source_at(sources: Sequence[StoredSource], has_base: bool, index: int) -> StoredSource:
    """The source the kernel numbers ``index`` (0 the base, 1 + t input t)."""
    return sources[index if has_base else index - 1]


def _refuse_if_bad(sources: Sequence[StoredSource], has_base: bool, bad: int, compute_dtype: torch.dtype) -> None:
    """The torch path's refusal of the source the kernel found a NaN/Inf entry in (``bad`` numbered as its answers;
    -1: none)."""
    if bad >= 0:
        ckpt, name, _ = _source_at(sources, has_base, bad)
        _refuse_non_finite(ckpt, name, ckpt.get(name).to(dtype=compute_dtype))


#: a tensor of fewer entries than this is one chunk of the kernel's (below it, a hand-off to the other thread costs
#: more than half the work saves)
FUSED_SPLIT_MIN = 1 << 16
#: the kernel's chunks start at multiples of this where they are longer (whole vectors and blocks in each)
FUSED_CHUNK_ALIGN = 1024


def fused_chunks(numel: int) -> list[tuple[int, int]]:
    """The native kernel's chunks of a tensor: at most FUSED_CHUNK_ENTRIES entries each, of about one length, an even
    number of them from FUSED_SPLIT_MIN entries up, so that two threads get the same work (11 chunks of 2^18 kept
    one thread waiting for a twelfth of the tensor). The chunks depend on the tensor alone, never
    on the thread count: sums made chunk by chunk are the same on any machine."""
    if numel <= 0:
        return []
    count = -(-numel // FUSED_CHUNK_ENTRIES)
    if count % 2 and numel >= FUSED_SPLIT_MIN:
        count += 1
    size = -(-numel // count)
    if size > FUSED_CHUNK_ALIGN:
        size = -(-size // FUSED_CHUNK_ALIGN) * FUSED_CHUNK_ALIGN
    return [(start, min(numel, start + size)) for start in range(0, numel, size)]


def _refuse_unreadable(sources: Sequence[StoredSource], has_base: bool, failure: fused.ReadFailed, chunk: tuple[int, int]) -> NoReturn:
    """The one-line error of the kernel's failed read of a source's entries (the failure's chunk, else ``chunk``): the
    checkpoint reader's own, from reading them again (the kernel's errno where that read succeeds; -1: the file
    ended)."""
    ckpt, name, dtype = _source_at(sources, has_base, failure.index)
    start, stop = failure.chunk or chunk
    ckpt.read_into(name, start * dtype.itemsize, memoryview(bytearray((stop - start) * dtype.itemsize)))
    err = failure.errno
    what = "the file ended" if err < 0 else os.strerror(err)
    raise CheckpointError(f"{ckpt.ref}: could not read entries {start}-{stop} of tensor {name}: {what}; the file may be truncated or corrupt")


def _gram_of_stored(sources: Sequence[StoredSource], has_base: bool, compute_dtype: torch.dtype,
                    sum_into: torch.Tensor | None = None, diagonal: bool = False) -> torch.Tensor:
    """The float64 Gram matrix of the sources (of their differences from the first, the base, where ``has_base``) by
    the native kernel in one call: its own threads take the chunks of ``fused_chunks``, the chunks' matrices added in
    chunk order (the same sum on any thread count); ``sum_into`` (flat float32) receives the sum of the (differences
    of the) sources; ``diagonal``: only the squared norms. Refusals as ``_each_stored_chunk``'s."""
    numel = _numel_of(sources)
    base, inputs = _stored_spans(sources, has_base)
    try:
        total, bad = fused.gram(base, inputs, sum_into, diagonal, n=numel, chunks=fused_chunks(numel), threads=thread_count())
    except fused.ReadFailed as failure:
        _refuse_unreadable(sources, has_base, failure, (0, numel))
    _refuse_if_bad(sources, has_base, bad, compute_dtype)
    return total


def _combine_stored(sources: Sequence[StoredSource], has_base: bool, out: torch.Tensor, form: fused.LinearForm,
                    in_memory: Sequence[torch.Tensor] = (), gates: Sequence[torch.Tensor | None] | None = None) -> int:
    """``out`` (flat) = the form over the sources (the first the base where ``has_base``), then ``in_memory`` (flat
    tensors of ``out``'s length), by the native kernel in one call whose own threads take the chunks of
    ``fused_chunks`` (entrywise: the same bytes on any thread count). Returns the kernel's non-finite answer (-1, or the
    input numbered as it numbers them) for the caller to refuse; a read it could not make is refused as
    ``_each_stored_chunk`` refuses it."""
    numel = out.numel()
    base, inputs = _stored_spans(sources, has_base)
    try:
        return fused.linear_combination_into(out, base, [*inputs, *in_memory], form, gates=gates, chunks=fused_chunks(numel),
                                             threads=thread_count())
    except fused.ReadFailed as failure:
        _refuse_unreadable(sources, has_base, failure, (0, numel))


def _dare_norms_of_stored(sources: Sequence[StoredSource], keeps: Sequence[fused.Keep], compute_dtype: torch.dtype,
                          masks: dict[int, list[torch.Tensor | None]] | None = None,
                          whole: Sequence[torch.Tensor] | None = None) -> list[tuple[float, float]]:
    """Each task's (‖τ_t‖₁, ‖τ_t ⊙ keep_t‖₁) over the whole tensor by the native kernel (the base the first source),
    chunk by chunk on the threads, the chunks' norms added in chunk order (the same sums on any thread count). Each
    chunk's keep-masks (one bit per entry: K/32 of a float32 copy), for the second pass: into ``masks`` by chunk
    start, or written in place into ``whole`` (each task's mask of the whole tensor, every task drawing; chunks start
    at multiples of 8 entries: at whole bytes)."""
    partial: dict[int, list[tuple[float, float]]] = {}

    def chunk_norms(start: int, stop: int, stored: list[fused.Span]) -> int:
        size = fused.mask_bytes(stop - start)
        if whole is not None:
            chunk_masks: list[torch.Tensor | None] = [mask[start // 8 : start // 8 + size] for mask in whole]
        else:
            chunk_masks = [None if k.draws is None else torch.empty(size, dtype=torch.uint8) for k in keeps]
        if masks is not None:
            masks[start] = chunk_masks
        partial[start], bad = fused.dare_norms(stored[0], stored[1:], keeps, first=start, masks_out=chunk_masks, n=stop - start)
        return bad

    _each_stored_chunk(sources, True, chunk_norms, compute_dtype)
    before, after = [0.0] * len(keeps), [0.0] * len(keeps)
    for start in sorted(partial):
        for t, (b, a) in enumerate(partial[start]):
            before[t] += b
            after[t] += a
    return list(zip(before, after))


def _kernel_matches(key: tuple[Any, ...], stored: Sequence[torch.dtype], has_base: bool, out_dtype: torch.dtype, form: fused.LinearForm,
                    torch_result: Callable[..., torch.Tensor]) -> bool:
    """Whether the native kernel gives the torch code's bytes for this form and these dtypes, ``torch_result(base,
    inputs)`` on float32 copies of a sample (``torch_result(base, inputs, gate values)`` for a gated keep), checked once
    per process and ``form.rounding_key()`` (the torch path's roundings, fused multiply-adds included, depend on its
    CPU kernels: not on the draws' states, an L1 factor, a post-scale or a gate's threshold)."""
    key = (*key, form.rounding_key(), tuple(stored), out_dtype)
    known = _FUSED_CHECKED.get(key)
    if known is None:
        generator = torch.Generator().manual_seed(0)

        def sample(dtype: torch.dtype) -> torch.Tensor:
            if form.keeps is not None:  # multiples of 1/64 below 4 in magnitude: L1 norms exact in any order, the same factor
                values = torch.randint(-256, 257, (FUSED_SAMPLE_ENTRIES,), generator=generator) / 64.0
            else:
                values = torch.randn(FUSED_SAMPLE_ENTRIES, generator=generator) * 4.0 ** torch.randint(-6, 7, (FUSED_SAMPLE_ENTRIES,), generator=generator)
            values[::13], values[6::13] = 0.0, -0.0
            return values.to(dtype)

        samples = [sample(dtype) for dtype in stored]
        base, inputs = (samples[0], samples[1:]) if has_base else (None, samples)

        def working(x: torch.Tensor) -> torch.Tensor:  # a float32 copy: the torch code changes its inputs in place
            return x.to(torch.float32, copy=True)

        gated = form.keeps is not None and any(k.gate_min is not None for k in form.keeps)
        gates = None
        if gated:  # gate values around each gated keep's threshold, some equal to it, one NaN
            assert form.keeps is not None
            gates = []
            for k in form.keeps:
                if k.gate_min is None:
                    gates.append(None)
                    continue
                gate = k.gate_min + torch.randn(FUSED_SAMPLE_ENTRIES, generator=generator) * max(abs(k.gate_min), 1.0)
                gate[::5], gate[3] = k.gate_min, float("nan")
                gates.append(gate.to(torch.float32))
        arguments = (None if base is None else working(base), [working(x) for x in inputs])
        expected = (torch_result(*arguments, next(g for g in gates if g is not None)) if gates is not None else torch_result(*arguments)).to(out_dtype)
        got = torch.empty(FUSED_SAMPLE_ENTRIES, dtype=out_dtype)
        if form.needs_norms:
            assert base is not None
            form = form.with_norms(fused.dare_norms(base, inputs, form.keeps or ())[0])
        fused.linear_combination_into(got, base, inputs, form, gates=gates)
        bits = torch.int16 if out_dtype.itemsize == 2 else torch.int32
        known = _FUSED_CHECKED[key] = torch.equal(got.view(bits), expected.view(bits))
    return known


def _native_form(plan: Plan, job: TensorJob, device: torch.device) -> tuple[fused.LinearForm, list[StoredSource]] | None:
    """The job's output as the native kernel's linear form, and its inputs as the kernel reads them (the base first),
    where the kernel can compute it (``_stored_sources``, an output dtype it writes, the same bytes as the method's
    torch code on a sample); else None."""
    sources = _stored_sources(plan, _base_first(job), job.out.numel, device) if fused.handles(job.out.dtype) else None
    if sources is None:
        return None
    ctx = context(plan, job)
    form = plan.method.linear_form(ctx)
    if form is None or form.of_task_vectors != (job.base is not None) or len(form.weights) != len(job.inputs):
        return None

    def method_result(base: torch.Tensor | None, inputs: list[torch.Tensor]) -> torch.Tensor:
        return plan.method.output_tensor(base, iter(inputs), ctx)

    stored = [dtype for _, _, dtype in sources]
    return (form, sources) if _kernel_matches((plan.method.name,), stored, job.base is not None, job.out.dtype, form, method_result) else None


def _base_first(job: TensorJob) -> tuple[TensorRef, ...]:
    """The job's reads in the kernel's order: the base (task vectors), then the inputs."""
    return ((job.base,) if job.base is not None else ()) + tuple(job.inputs)


def fused_output(plan: Plan, job: TensorJob, form: fused.LinearForm, sources: list[StoredSource]) -> torch.Tensor:
    """A linear-form job's output by the native kernel: chunk by chunk (on every thread), each input's stored bytes
    read into this thread's reused buffer and every entry combined in one pass; NaN/Inf refused as the torch path does.
    An L1 rescale (DARE) takes a pass before: each task's norms by chunk, added up in chunk order (any thread count)."""
    masks: dict[int, list[torch.Tensor | None]] = {}  # chunk start → each task's keep-mask, drawn in the norms pass
    if form.needs_norms:
        assert form.keeps is not None
        form = form.with_norms(_dare_norms_of_stored(sources, form.keeps, plan.compute_dtype, masks))
    out = torch.empty(job.out.shape, dtype=job.out.dtype)
    flat = out.view(-1)
    if not masks:  # no masks drawn per chunk: one call, on the kernel's own threads
        _refuse_if_bad(sources, job.base is not None, _combine_stored(sources, job.base is not None, flat, form), plan.compute_dtype)
        return out

    def combine(start: int, stop: int, stored: list[torch.Tensor]) -> int:
        base, inputs = (stored[0], stored[1:]) if job.base is not None else (None, stored)
        return fused.linear_combination_into(flat[start:stop], base, inputs, form, first=start, masks=masks.pop(start, None))

    _each_stored_chunk(sources, job.base is not None, combine, plan.compute_dtype)
    return out


def advise_inputs(plan: Plan, job: TensorJob) -> None:
    """Let the kernel read a job's input tensors into the page cache ahead of time (no memory of ours)."""
    refs = job.reads if job.merge or job.vocab is not None else job.inputs[:1]  # a copied tensor reads its first input only
    for ref in refs:
        plan.checkpoints[ref.source].advise(ref.name)


def producer(plan: Plan, device: torch.device) -> Callable[[TensorInfo], torch.Tensor]:
    """compute_tensor by output name, advising the kernel of the next job's inputs before each one."""
    jobs = {job.name: job for job in plan.jobs}
    following = {job.name: nxt for job, nxt in zip(plan.jobs, plan.jobs[1:])}

    def produce(info: TensorInfo) -> torch.Tensor:
        nxt = following.get(info.name)
        if nxt is not None:
            advise_inputs(plan, nxt)
        return compute_tensor(plan, jobs[info.name], device)

    return produce


def compute_tensor(plan: Plan, job: TensorJob, device: torch.device) -> torch.Tensor:
    """One output tensor, on the CPU in its output dtype: copied, or the method's result (on the CPU for a method
    that must be, ``MergeMethod.cpu_only``)."""
    if plan.method.cpu_only:
        device = torch.device("cpu")
    if not job.merge:
        if job.vocab is not None:  # the copied input's rows, re-mapped
            return next(job_inputs(plan, job, device)[1]).to(device="cpu", dtype=job.out.dtype)
        stored = plan.checkpoints[job.inputs[0].source].get(job.inputs[0].name)
        return stored.to(job.out.dtype) if stored.dtype != job.out.dtype else stored
    try:
        unchanged = _unchanged_input(plan, job)
        if unchanged is not None:
            return unchanged
        if _entrywise_in_row_chunks(plan, job):
            return entrywise_output(plan, job, device)
        if plan.method.compute_inputs is not None and job.vocab is None:
            out = plan.method.compute_inputs(ReadWeightInputs(plan, job, device), context(plan, job))
        elif _in_row_chunks(plan, job):
            return output_in_row_chunks(plan, job, device)
        else:
            base, models = job_inputs(plan, job, device)
            out = plan.method.output_tensor(base, models, context(plan, job))
    except ValueError as exc:  # a kernel's argument check: a parameter value this tensor cannot take
        raise RecipeError(f"tensor {job.name}: {exc}") from None
    return out.to(device="cpu", dtype=job.out.dtype)


#: stored dtype -> the compute dtypes that hold each of its values exactly
_HOLDS_EXACTLY = {
    torch.bfloat16: {torch.bfloat16, torch.float32, torch.float64},
    torch.float16: {torch.float16, torch.float32, torch.float64},
    torch.float32: {torch.float32, torch.float64},
}


def _unchanged_input(plan: Plan, job: TensorJob) -> torch.Tensor | None:
    """The stored input itself, checked for NaN/Inf, where the method's output is that input unchanged
    (``MergeMethod.unchanged``) and the way through the compute dtype would give the same bytes (the stored dtype is
    the output's and the compute dtype holds it exactly): no working copy of the tensor (a passthrough merge
    otherwise held two whole output buffers). None where that does not apply."""
    unchanged = plan.method.unchanged
    if unchanged is None or job.vocab is not None or len(job.inputs) != 1 or not unchanged(context(plan, job).model_params):
        return None
    info = plan.info(job.inputs[0])
    if info.dtype != job.out.dtype or plan.compute_dtype not in _HOLDS_EXACTLY.get(info.dtype, ()):
        return None
    ckpt = plan.checkpoints[job.inputs[0].source]
    stored = ckpt.get(job.inputs[0].name)
    if not _all_finite(stored):
        _refuse_non_finite(ckpt, job.inputs[0].name, stored.to(plan.compute_dtype))
    return stored


def write_jobs(plan: Plan, device: torch.device, names: Sequence[str], places: dict[str, Placement]) -> int:
    """A worker's share of a merged checkpoint: each named job's output written at its reserved place; its bytes."""
    jobs = {job.name: job for job in plan.jobs}
    done = 0
    for i, name in enumerate(names):
        if i + 1 < len(names):
            advise_inputs(plan, jobs[names[i + 1]])
        tensor = compute_tensor(plan, jobs[name], device)
        write_at(places[name], tensor)
        done += tensor.numel() * tensor.element_size()
        del tensor
    return done


def write_task_vectors(plan: Plan, device: torch.device, names: Sequence[str], places: dict[str, Placement]) -> int:
    """A worker's share of the λ search's scratch file: each named job's combined task vector before λ."""
    jobs = {job.name: job for job in plan.jobs}
    done = 0
    for name in names:
        tensor = merged_task_vector(plan, jobs[name], device)[1].cpu()
        write_at(places[name], tensor)
        done += tensor.numel() * tensor.element_size()
        del tensor
    return done


class TaskVectorPasses:
    """Passes over the merged tensors' task vectors, for methods that need model-wide statistics."""

    def __init__(self, plan: Plan, device: torch.device, progress: bool = True):
        self.plan = plan
        self.device = device
        self.progress = progress
        self.compute_dtype = plan.compute_dtype
        self.jobs = [job for job in plan.jobs if job.merge]
        self.total_numel = sum(job.out.numel for job in self.jobs)

    def only(self, names: Sequence[str]) -> "TaskVectorPasses":
        """The same passes over a share of the merged tensors (a worker's), ``total_numel`` still the whole model's."""
        share = set(names)
        part = TaskVectorPasses(self.plan, self.device, progress=False)
        part.jobs = [job for job in self.jobs if job.name in share]
        return part

    def tensors(self, description: str, tasks: Sequence[int] | None = None) -> Iterator[tuple[str, Iterator[tuple[int, torch.Tensor]]]]:
        """Per merged tensor: its name and (task index, τ_task) for the chosen tasks, read lazily."""
        plan, device = self.plan, self.device
        chosen = list(range(len(plan.models))) if tasks is None else list(tasks)
        total = sum(plan.info(j.base).nbytes + sum(plan.info(j.inputs[t]).nbytes for t in chosen) for j in self.jobs if j.base)
        with progress_bar(total, description, self.progress) as bar:
            for job in self.jobs:
                assert job.base is not None
                if job.vocab is not None:  # re-mapped together: every task's tensor is read anyway
                    base, models = job_inputs(plan, job, device)
                    assert base is not None
                    remapped = list(models)

                    def deltas(base: torch.Tensor = base, remapped: list[torch.Tensor] = remapped) -> Iterator[tuple[int, torch.Tensor]]:
                        for t in chosen:
                            yield t, remapped[t].sub_(base)
                else:
                    base = _read(plan, job.base, device)

                    def deltas(job: TensorJob = job, base: torch.Tensor = base) -> Iterator[tuple[int, torch.Tensor]]:  # type: ignore[misc]
                        for t in chosen:
                            yield t, _read(plan, job.inputs[t], device).sub_(base)

                yield job.name, deltas()
                bar.update(plan.info(job.base).nbytes + sum(plan.info(job.inputs[t]).nbytes for t in chosen))


def compute_statistics(plan: Plan, device: torch.device, progress: bool = True, executor: Any = None) -> dict[str, Any]:
    """Run the method's model-wide statistics passes (if any) and keep the result on the plan; with a
    distributed ``executor``, its passes reduce the workers' partial results."""
    if plan.method.statistics is not None and not plan.model_statistics:
        source = executor.passes(plan, device, progress) if executor is not None else TaskVectorPasses(plan, device, progress)
        plan.model_statistics = plan.method.statistics(source, plan.params, plan.model_params) or {}
    return plan.model_statistics


def execute(plan: Plan, out_dir: str | os.PathLike[str], *, force: bool = False, device: str = "cpu", progress: bool = True,
            executor: Any = None) -> Path:
    """Run a plan into ``out_dir`` with the product its method declares (a merged model, a collection, ...);
    ``executor``: None runs here, a ``RayExecutor`` spreads the jobs over a Ray cluster (same bytes)."""
    write = PRODUCTS.get(plan.method.output)
    if write is None:  # pragma: no cover - every declared output has a product
        raise MergeKitLiteError(f"no product writes {plan.method.output!r} outputs")
    if executor is None:
        return write(plan, out_dir, force=force, device=device, progress=progress)
    return write(plan, out_dir, force=force, device=device, progress=progress, executor=executor)

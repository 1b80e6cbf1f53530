"""The native fused kernel (``mergekit_lite/native/fused.c``), where it was built: a fixed linear combination of stored
inputs in one pass over their bytes, with the torch path's roundings.

A method whose output for a tensor is such a combination (task arithmetic, linear; slerp's second pass) describes it
as a ``LinearForm``; the executor reads the inputs' stored bytes in chunks and calls ``linear_combination_into``.
Whether the kernel gives the torch path's bytes on this machine is checked on a sample first
(``execute._kernel_matches``); the torch path stays the reference. ``gram`` makes float64 Gram matrices (slerp,
Model Stock, Multi-SLERP's norms). DARE-linear's form keeps part of each task vector (``Keep``: ``dare_mask``'s
draws, made in the kernel, and a rescale); its L1 rescale takes a first pass, ``dare_norms``. ``bracket_counts`` serves
exact order statistics (``ops.selection``), ``task_variance_into`` SCE's variance across tasks. Set
MERGEKIT_LITE_NATIVE=0 to use torch alone.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch

from .draws import UNIFORM_SCALE, tie_key

try:
    from .. import _fused
except ImportError:  # built without a C compiler (setup.py's optional extension): torch alone
    _fused = None

#: the stored dtypes the kernel reads and writes, by the code it knows them by
KINDS = {torch.float32: 0, torch.bfloat16: 1}
#: the most inputs one call takes (the kernel's own limits: a combination's, a Gram matrix's)
MAX_INPUTS = 4096
MAX_GRAM_INPUTS = 256


@dataclass(frozen=True)
class DareDraws:
    """DARE's keep draws of one tensor (``ops.sparsify.dare_mask``): its generator's PCG64DXSM state and increment at
    the tensor's entry 0, the tie key, and ⌈density·2^32⌉ (an entry is kept where its 32-bit uniform is below it)."""

    state: int
    inc: int
    key: int
    ceiling: int

    @classmethod
    def of(cls, generator: np.random.Generator, density: float) -> "DareDraws":
        if not isinstance(generator.bit_generator, np.random.PCG64DXSM):
            raise ValueError("DARE's draws come from a PCG64DXSM generator (ops.sparsify.generator_for)")
        state = generator.bit_generator.state["state"]
        return cls(state["state"], state["inc"], tie_key(generator), math.ceil(density * UNIFORM_SCALE))


@dataclass(frozen=True)
class Keep:
    """What survives of one task vector in a linear form, and how: its DARE draws (None: every entry), then the
    survivors multiplied (``"mul"``) or divided (``"div"``) by ``by``, or, ``"l1"``, multiplied by the ratio of its L1
    norms before and after the draws (found by ``dare_norms`` first; none where either is below ``l1_eps``)."""

    draws: DareDraws | None
    scale: str | None = None
    by: float = 0.0
    l1_eps: float = 0.0
    #: instead of draws: keep the entries whose gate value (a float32 tensor given with the call) is ≥ this (Arcee
    #: Fusion's importance against its threshold; a NaN keeps nothing)
    gate_min: float | None = None


_SCALES = {None: 0, "mul": 1, "div": 2}
_WORD = (1 << 64) - 1


@dataclass(frozen=True)
class LinearForm:
    """One tensor's output as Σ_t w_t·x_t ÷ divisor (``lam`` None: the inputs' weights, as linear), or of task
    vectors, θ_0 + λ·(Σ_t w_t·(x_t − θ_0) ÷ divisor) (task arithmetic). ``divisor`` None: no division."""

    weights: tuple[float, ...]
    divisor: float | None
    lam: float | None
    #: (no base) each product w_t·x_t rounded before it is added (torch's ``mul_`` then ``add_``), not fused
    rounded_products: bool = False
    #: (task vectors) what survives of each τ_t before it is weighted (DARE); None: all of it
    keeps: tuple[Keep, ...] | None = None
    #: the combination (÷ divisor) multiplied by this, a rounded product, before θ_0 + λ·… (Multi-SLERP's scale, with
    #: λ = 1: torch's ``mul_`` then ``add_``); None: no such step
    post_scale: float | None = None
    #: (task vectors) the inputs are the τ_t themselves (Model Stock's stored sum of them): θ_0 + λ·(Σ_t w_t·x_t ÷ …),
    #: θ_0 added, never taken off
    given_task_vectors: bool = False

    @property
    def of_task_vectors(self) -> bool:
        return self.lam is not None

    @property
    def needs_norms(self) -> bool:
        """Whether a pass of ``dare_norms`` must fix the L1 rescale first (``with_norms``)."""
        return self.keeps is not None and any(k.scale == "l1" for k in self.keeps)

    def with_norms(self, norms: Sequence[tuple[float, float]]) -> "LinearForm":
        """The form with each L1 rescale fixed from its task's (before, after) norms of the whole tensor."""
        assert self.keeps is not None and len(norms) == len(self.keeps)
        keeps = []
        for keep, (before, after) in zip(self.keeps, norms):
            if keep.scale == "l1":
                small = before < keep.l1_eps or after < keep.l1_eps
                keep = Keep(keep.draws) if small else Keep(keep.draws, "mul", before / after)
            keeps.append(keep)
        return replace(self, keeps=tuple(keeps))

    def rounding_key(self) -> tuple:
        """What the kernel's roundings depend on (not the draws' states, nor an L1 factor's value): the key under
        which a sample check of this form stands for every tensor's."""
        keeps = None if self.keeps is None else tuple((k.draws is not None, k.scale, k.by if k.scale == "div" else None, k.gate_min is not None)
                                                      for k in self.keeps)
        return (self.weights, self.divisor, self.lam, self.rounded_products, keeps, self.post_scale is not None, self.given_task_vectors)


def available() -> bool:
    """Whether the kernel was built and is not switched off (MERGEKIT_LITE_NATIVE=0)."""
    # safetensors' bytes are little-endian, and the kernel reads them as the host's numbers
    return _fused is not None and sys.byteorder == "little" and os.environ.get("MERGEKIT_LITE_NATIVE", "1") != "0"


def reads_files() -> bool:
    """Whether the kernel can read ``Span``s itself (``pread``; not on every OS): every pass over stored inputs does."""
    return available() and bool(getattr(_fused, "READS_FILES", 0))


def handles(dtype: torch.dtype) -> bool:
    return dtype in KINDS


def mask_bytes(n: int) -> int:
    """Bytes of one task's keep-mask of n entries, one bit per entry (``dare_norms``' ``masks_out``)."""
    return -(-n // 8)


def _keep_args(keeps: Sequence[Keep], n: int, masks_in: Sequence[torch.Tensor | None] | None = None,
               masks_out: Sequence[torch.Tensor | None] | None = None, gates: Sequence[torch.Tensor | None] | None = None) -> list[tuple]:
    for masks in (masks_in, masks_out):
        if masks is not None and (len(masks) != len(keeps) or any(
                m is not None and (m.dtype != torch.uint8 or not m.is_contiguous() or m.numel() < mask_bytes(n) or m.device.type != "cpu") for m in masks)):
            raise ValueError(f"keep-masks: one per input (or None), contiguous uint8 CPU tensors of {mask_bytes(n)} bytes")
    gated = [k.gate_min is not None for k in keeps]
    if any(gated) and (gates is None or len(gates) != len(keeps) or any(
            (g is None) == wanted or (g is not None and (g.dtype != torch.float32 or not g.is_contiguous() or g.numel() != n or g.device.type != "cpu"))
            for g, wanted in zip(gates, gated))):
        raise ValueError(f"gates: a contiguous float32 CPU tensor of {n} entries for each gated keep, None for the others")
    args = []
    for t, k in enumerate(keeps):
        if k.scale not in _SCALES:
            raise ValueError("an L1 rescale must be fixed first (LinearForm.with_norms)")
        d = k.draws
        drawn = (False, 0, 0, 0, 0, 0, 0) if d is None else (True, d.state >> 64, d.state & _WORD, d.inc >> 64, d.inc & _WORD, d.key, min(d.ceiling, _WORD))
        mask_in = masks_in[t] if masks_in is not None and d is not None else None
        mask_out = masks_out[t] if masks_out is not None and d is not None else None
        gate = gates[t] if gates is not None and k.gate_min is not None else None
        args.append((*drawn, _SCALES[k.scale], k.by, 0 if mask_in is None else mask_in.data_ptr(), 0 if mask_out is None else mask_out.data_ptr(),
                     0 if gate is None else gate.data_ptr(), 0.0 if k.gate_min is None else float(k.gate_min)))
    return args


@dataclass(frozen=True)
class Span:
    """A stored tensor's entries as the kernel reads them itself, by stretches that stay in the level-2 cache: its
    open file, the byte position of the first entry wanted, and its stored dtype."""

    fd: int
    position: int
    dtype: torch.dtype


class ReadFailed(Exception):
    """The kernel's read of a ``Span`` failed: ``index`` numbers it as a non-finite answer does (0 the base, 1 + t
    input t), ``errno`` is the read's (-1: the file ended first), ``chunk`` the entries [start, stop) being read where
    the call knows them. Nothing the call wrote is to be used."""

    def __init__(self, index: int, errno: int, chunk: tuple[int, int] | None = None):
        super().__init__(index, errno)
        self.index, self.errno, self.chunk = index, errno, chunk


def _operand(x: torch.Tensor | Span, n: int) -> tuple[Any, int]:
    """(the kernel's argument, its kind) for a tensor in memory (flat, contiguous, CPU, n entries) or a span."""
    if isinstance(x, Span):
        if x.dtype not in KINDS:
            raise ValueError("a span of float32 or bfloat16 entries")
        return (x.fd, x.position), KINDS[x.dtype]
    if x.device.type != "cpu" or not x.is_contiguous() or x.numel() != n or x.dtype not in KINDS:
        raise ValueError("flat contiguous CPU float32/bfloat16 tensors of one length")
    return x.data_ptr(), KINDS[x.dtype]


def _operands(base: torch.Tensor | Span | None, inputs: Sequence[torch.Tensor | Span], n: int) -> tuple[Any, int, list[Any], list[int]]:
    """The kernel's base argument (0: none) and kind, then its inputs' arguments and kinds (``_operand``)."""
    base_arg, base_kind = _operand(base, n) if base is not None else (0, 0)
    operands = [_operand(x, n) for x in inputs]
    return base_arg, base_kind, [arg for arg, _ in operands], [kind for _, kind in operands]


def dare_norms(base: torch.Tensor | Span, inputs: Sequence[torch.Tensor | Span], keeps: Sequence[Keep], first: int = 0,
               masks_out: Sequence[torch.Tensor | None] | None = None, n: int | None = None) -> tuple[list[tuple[float, float]], int]:
    """Per input, (‖τ_t‖₁, ‖τ_t ⊙ keep_t‖₁) of τ_t = x_t − base over these entries (flat, contiguous, CPU; ``first``: the
    flat index of entry 0 in the tensor, where the draws are), each |τ| exact in float64 and summed in the kernel's
    fixed order; and -1 or the first input with a NaN/Inf entry (as ``linear_combination_into``). ``masks_out``: per
    input with draws, a uint8 tensor of ``mask_bytes(n)`` that receives its keep-mask (for ``linear_combination_into``'s
    ``masks``: the second pass reads it instead of drawing again). Spans in place of tensors (then ``n`` says how many
    entries): the kernel reads them itself (``ReadFailed`` where it cannot), with the same sums."""
    assert _fused is not None, "the native kernel is not built"
    if n is None:
        assert isinstance(base, torch.Tensor), "n, for spans"
        n = base.numel()
    if len(keeps) != len(inputs) or not 0 < len(inputs) <= MAX_INPUTS:
        raise ValueError("dare_norms: one keep per input, 1 to 4096 inputs")
    plain = [Keep(k.draws) for k in keeps]  # the norms do not depend on the rescale
    bad, failed, errno, values = _fused.dare_norms(n, *_operands(base, inputs, n), _keep_args(plain, n, masks_out=masks_out), first)
    if failed >= 0:
        raise ReadFailed(failed, errno)
    return [(values[2 * t], values[2 * t + 1]) for t in range(len(inputs))], bad


def abs_sums(x: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[float, float]:
    """(Σ|x|, Σ|x|·keep) of a contiguous CPU float32 tensor (``keep``: a contiguous bool tensor of its size, None:
    all kept), in float64 in ``dare_norms``'s order: the same two floats as that pass's for the same task vector."""
    assert _fused is not None, "the native kernel is not built"
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError("abs_sums: a contiguous CPU float32 tensor")
    if keep is not None and (keep.device.type != "cpu" or keep.dtype != torch.bool or not keep.is_contiguous() or keep.numel() != x.numel()):
        raise ValueError("abs_sums: a contiguous CPU bool keep-mask of the tensor's size")
    return _fused.abs_sums(x.data_ptr(), x.numel(), 0 if keep is None else keep.data_ptr())


def linear_combination_into(out: torch.Tensor, base: torch.Tensor | Span | None, inputs: Sequence[torch.Tensor | Span], form: LinearForm,
                            first: int = 0, masks: Sequence[torch.Tensor | None] | None = None,
                            gates: Sequence[torch.Tensor | None] | None = None, chunks: Sequence[tuple[int, int]] | None = None,
                            threads: int = 1) -> int:
    """``out`` (flat, float32 or bfloat16) = the form applied entry by entry to ``inputs`` (and ``base``, for task
    vectors), all flat, contiguous, on the CPU and of ``out``'s length (``first``: the flat index of their entry 0 in
    the tensor, where a keep's draws are; ``masks``: keep-masks ``dare_norms`` wrote for these entries, used instead of
    the draws; ``gates``: the float32 values a gated keep compares, per input, for these entries). Returns -1, or the
    first input holding a NaN or infinite entry (0: the base, 1 + t: input t), whose entries the caller must then not
    use. A ``Span`` in place of a tensor: the kernel reads those entries from the file itself (``ReadFailed`` where it
    cannot). ``chunks`` (consecutive [start, stop) covering all entries; None: one): taken by up to ``threads``
    threads of the kernel's; entrywise, so the same bytes on any thread count (keep-masks: chunk starts at multiples of
    8)."""
    assert _fused is not None, "the native kernel is not built"
    n = out.numel()
    _operand(out, n)
    arguments = _operands(base, inputs, n)
    if len(inputs) != len(form.weights) or form.of_task_vectors != (base is not None) or (form.rounded_products and form.of_task_vectors) \
            or (form.keeps is not None and (not form.of_task_vectors or len(form.keeps) != len(inputs) or form.given_task_vectors)) or first < 0 \
            or (form.given_task_vectors and not form.of_task_vectors):
        raise ValueError("linear_combination_into: one weight per input, a base exactly for task vectors, rounded products without, keeps with "
                         "it (not with given task vectors)")
    keeps = None if form.keeps is None else _keep_args(form.keeps, n, masks_in=masks, gates=gates)
    bad, failed, errno, failed_start, failed_stop = _fused.linear_combination(
        out.data_ptr(), KINDS[out.dtype], n, *arguments, list(form.weights),
        form.divisor or 0.0, form.lam if form.lam is not None else 0.0, form.rounded_products, keeps, first, form.post_scale,
        form.given_task_vectors, _bounds(chunks), threads,
    )
    if failed >= 0:
        raise ReadFailed(failed, errno, (failed_start, failed_stop))
    return bad


def _bounds(chunks: Sequence[tuple[int, int]] | None) -> list[int] | None:
    """The kernel's chunk bounds (0, the first chunk's stop, …) of consecutive chunks; None: one chunk."""
    if chunks is None:
        return None
    bounds = [0, *(stop for _, stop in chunks)]
    if any(start != bounds[i] for i, (start, _) in enumerate(chunks)):
        raise ValueError("chunks must be consecutive")
    return bounds


def gram(base: torch.Tensor | Span | None, inputs: Sequence[torch.Tensor | Span], sum_into: torch.Tensor | None = None,
         diagonal: bool = False, n: int | None = None, chunks: Sequence[tuple[int, int]] | None = None,
         threads: int = 1) -> tuple[torch.Tensor, int]:
    """The float64 Gram matrix ⟨x_i, x_j⟩ of flat, contiguous float32/bfloat16 CPU tensors of one length (or of
    their differences from ``base``), each product exact and summed in float64 in a fixed order, and -1 or the first
    input with a NaN/Inf entry (as ``linear_combination_into``). ``sum_into`` (flat float32): receives x_0 + x_1 + …
    in that order, the bytes of torch's ``copy_`` then ``add_``. ``diagonal``: only the squared norms (the rest 0).
    Spans in place of tensors (then ``n`` says how many entries): the kernel reads them itself (``ReadFailed`` where it
    cannot), in stretches that give the same sums. ``chunks`` (consecutive [start, stop) covering all n; None: one):
    each chunk's matrix made on its own, on up to ``threads`` threads of the kernel's, and the matrices added in chunk
    order: the same sums on any thread count."""
    assert _fused is not None, "the native kernel is not built"
    if n is None:
        first = inputs[0]
        assert isinstance(first, torch.Tensor), "n, for spans"
        n = first.numel()
    if not 0 < len(inputs) <= MAX_GRAM_INPUTS or (sum_into is not None and (sum_into.dtype != torch.float32 or not sum_into.is_contiguous()
                                                                            or sum_into.numel() != n or sum_into.device.type != "cpu")):
        raise ValueError("gram: 1 to 256 inputs (a float32 sum of their length)")
    bad, failed, errno, failed_start, failed_stop, values = _fused.gram(
        n, *_operands(base, inputs, n), sum_into.data_ptr() if sum_into is not None else 0, diagonal, _bounds(chunks), threads)
    if failed >= 0:
        raise ReadFailed(failed, errno, (failed_start, failed_stop))
    return torch.tensor(values, dtype=torch.float64).view(len(inputs), len(inputs)), bad


def bracket_counts(values: np.ndarray, brackets: Sequence[tuple[float, float]], capacity: int) -> list[tuple[int, int, np.ndarray]] | None:
    """For a flat, contiguous float32/float64 array and each bracket (lo, hi): how many values are not ≥ lo, how many
    not ≤ hi (a NaN counts in both), and the values inside [lo, hi] in order: one pass over the values for every
    bracket (``ops.selection``'s order statistics). None where a bracket holds more than ``capacity`` values."""
    assert _fused is not None, "the native kernel is not built"
    if values.dtype not in (np.float32, np.float64) or values.ndim != 1 or not values.flags.c_contiguous:
        raise ValueError("bracket_counts: a flat contiguous float32/float64 array")
    if not 0 < len(brackets) <= 64:
        raise ValueError("bracket_counts: 1 to 64 brackets")
    room = min(capacity, values.size)
    outs = [np.empty(room + 1, dtype=values.dtype) for _ in brackets]  # one spare slot: the kernel's stores past the room
    counted = _fused.bracket_counts(values.ctypes.data, values.size, values.dtype == np.float64, [(float(lo), float(hi)) for lo, hi in brackets],
                                    [out.ctypes.data for out in outs], [room] * len(outs))
    if any(inside > room for _, _, inside in counted):
        return None
    return [(below, above, out[:inside]) for (below, above, inside), out in zip(counted, outs)]


def task_variance_into(out: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``out`` (float32, contiguous, CPU) = the population variance across ``inputs`` (the tasks' float32 values,
    contiguous, CPU, out's size) entry by entry, with ``torch.var``'s float64 arithmetic (``ops.sce.task_variance``)."""
    assert _fused is not None, "the native kernel is not built"
    n = out.numel()
    if out.dtype != torch.float32 or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError("task_variance_into: a contiguous float32 CPU output")
    if not inputs or any(x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu" or x.numel() != n for x in inputs):
        raise ValueError("task_variance_into: contiguous float32 CPU inputs of the output's size")
    _fused.task_variance([x.data_ptr() for x in inputs], n, out.data_ptr())
    return out

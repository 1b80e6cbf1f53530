"""Exact k-th largest magnitude over a stream of tensors (model-scope TIES trimming).

TIES-merging at model scope keeps, for each task vector, the entries whose magnitude is
>= the k-th largest magnitude over the *whole model* flattened (k = floor(density * n)).
The reference implementation concatenates the whole model in memory; here the model is
visited tensor by tensor, possibly several times (one *pass* = one read of the checkpoints),
and the exact threshold is found with memory independent of the model size.

Method: radix select on IEEE-754 bit patterns. For non-negative floats the order of the
bit patterns, read as integers, is the numeric order, so the k-th largest ``|x|`` is the
k-th largest integer ``bits(|x|)``. Each pass histograms the next 16 bits (65,536 bins) of
the entries whose higher bits equal the prefix found so far:

* float32: at most 2 passes (bits 31..16, then 15..0);
* float64: at most 4 passes (16 bits each, on ``int64`` views; the sign bit of ``|x|`` is 0,
  so the signed view is order-preserving).

Fewer passes are often enough. Alongside every histogram (except the last possible one)
each bin's smallest and largest bit pattern is tracked, so a pass ends the search when the
bin holding the answer has a single distinct value (min == max: ties, exact zeros, values
upcast from bf16/fp16 whose low bits are all zero), or when the answer is the bin's
largest (rank 1 in the bin, e.g. k = 1) or smallest (rank = bin count, e.g. k = n) entry.
For float64, when the bin holding the answer has at most :data:`COLLECT_LIMIT` entries and
two or more 16-bit digits are still unknown, the next pass gathers those entries and sorts
them, so it is the last one.

Conventions: ``-0.0`` and ``0.0`` are both magnitude 0; ``+inf``/``-inf`` count as the
largest magnitude; NaN entries are ignored (neither counted in :attr:`total` nor
candidates; the merge engine refuses NaN weights elsewhere).

Many selectors (one per task) can share a pass: feed each the same tensors, then call
:meth:`KthLargestMagnitude.end_pass` on each; :attr:`KthLargestMagnitude.done` says which
still need another pass.
"""

from __future__ import annotations

import operator
from typing import Callable, Iterable

import numpy as np
import torch

__all__ = ["COLLECT_LIMIT", "KthLargestMagnitude", "kth_largest_magnitude_streaming", "merge_partial_selectors"]

_DIGIT_BITS = 16
_NBINS = 1 << _DIGIT_BITS  # 65,536 digit values
# Histogram layout: bin 0 = entries below the current prefix (and NaN), bins 1..65536 =
# candidates by digit, bin 65537 = entries above the current prefix.
_HIST_LEN = _NBINS + 2

#: Largest number of candidates gathered in memory to finish in a single pass (float64).
COLLECT_LIMIT = 1 << 16

# Entries processed per step by observe(): bounded temporaries, cache/allocator friendly.
_CPU_CHUNK = 1 << 20
_DEVICE_CHUNK = 1 << 24

_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64}
_NP_INT = {torch.int32: np.int32, torch.int64: np.int64}
_NBITS = {torch.float32: 32, torch.float64: 64}


def _filled(value: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Small fixed-size bookkeeping is done with numpy (single-threaded): torch's thread pool
    # costs more than the work on 65,536 entries, a lot more on a busy machine.
    t = torch.from_numpy(np.full(_HIST_LEN, value, dtype=_NP_INT[dtype]))
    return t if device.type == "cpu" else t.to(device)


def _bits_to_float(bits: int, dtype: torch.dtype) -> float:
    return float(torch.tensor([bits], dtype=_INT_VIEW[dtype]).view(dtype).item())


class KthLargestMagnitude:
    """Exact k-th largest |x| over a stream of tensors, in memory independent of the stream's size (radix select on float bit patterns).

    Usage, one pass at a time::

        sel = KthLargestMagnitude(k, torch.float32)
        while not sel.done:
            for t in tensors_of_the_model():   # same tensors, same values, every pass
                sel.observe(t)
            sel.end_pass()
        threshold = sel.value                  # keep entries with |x| >= threshold

    Memory is O(65,536) per selector (a histogram and per-bin min/max, plus at most
    :data:`COLLECT_LIMIT` gathered candidates) plus temporaries the size of one fed tensor.
    The stream must present the same multiset of values in every pass (order and tensor
    boundaries may change); a mismatch that changes the candidate count raises
    ``RuntimeError``. Once :attr:`done`, :meth:`observe` and :meth:`end_pass` are no-ops, so
    a driver may keep feeding every selector of a shared pass.
    """

    def __init__(self, k: int, dtype: torch.dtype = torch.float32) -> None:
        if isinstance(k, bool):
            raise TypeError("k must be an int, not bool")
        k = operator.index(k)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if dtype not in _INT_VIEW:
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self._k = k
        self._dtype = dtype
        self._int_dtype = _INT_VIEW[dtype]
        self._nbits = _NBITS[dtype]
        # Rank (1 = largest) of the answer among the current candidates.
        self._rank = k
        # Bits >= self._known_shift of the answer are known and equal self._prefix.
        self._prefix = 0
        self._known_shift = self._nbits
        self._candidates: int | None = None  # candidate count (None before the first pass)
        self._collect = False  # next pass gathers the candidates instead of histogramming
        self._total: int | None = None
        self._nan: int | None = None
        self._passes = 0
        self._ones: dict[torch.device, torch.Tensor] = {}
        self._value: float | None = float("inf") if k == 0 else None
        self._reset_pass_state()

    # ------------------------------------------------------------------ properties
    @property
    def k(self) -> int:
        return self._k

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def done(self) -> bool:
        """True when the answer is known (immediately for k == 0: +inf, keep nothing)."""
        return self._value is not None

    @property
    def passes_needed(self) -> int:
        """Upper bound of the passes still needed (0 when done)."""
        if self.done:
            return 0
        if self._collect:
            return 1
        return self._known_shift // _DIGIT_BITS

    @property
    def passes_done(self) -> int:
        """Passes closed with :meth:`end_pass` while not done."""
        return self._passes

    @property
    def value(self) -> float:
        """The k-th largest magnitude (a python float exactly representable in ``dtype``)."""
        if self._value is None:
            raise RuntimeError(
                f"k-th largest magnitude not known yet ({self.passes_needed} more pass(es) at most)"
            )
        return self._value

    @property
    def total(self) -> int:
        """Number of (non-NaN) entries seen in the first pass (0 for k == 0: nothing is read)."""
        if self._total is None:
            if self._k == 0:
                return 0
            raise RuntimeError("total is known after the first pass")
        return self._total

    @property
    def nan_count(self) -> int:
        """Number of NaN entries (ignored) seen in the first pass."""
        if self._nan is None:
            if self._k == 0:
                return 0
            raise RuntimeError("nan_count is known after the first pass")
        return self._nan

    # ------------------------------------------------------------------ streaming
    def _reset_pass_state(self) -> None:
        self._hist: torch.Tensor | None = None
        self._bin_min: torch.Tensor | None = None
        self._bin_max: torch.Tensor | None = None
        self._gathered: list[torch.Tensor] = []

    def _bits(self, chunk: torch.Tensor) -> torch.Tensor:
        """Bit patterns of |chunk| (1-D) as signed ints; NaN maps to a negative pattern (bits of -inf)."""
        a = chunk.abs()
        # abs() returned a fresh tensor, so the in-place op doesn't touch the caller's data.
        # NaN -> -inf: its pattern is negative as a signed int, below every |x| (>= 0).
        a.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
        return a.view(self._int_dtype)

    def observe(self, values: torch.Tensor) -> None:
        """Feed one tensor (any shape, any device) of the current pass.

        The work runs on the values' device, in chunks (bounded temporaries); no reference
        to ``values`` is kept.
        """
        if self.done:
            return
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(values).__name__}")
        if values.dtype != self._dtype:
            raise ValueError(f"expected values of dtype {self._dtype}, got {values.dtype}")
        flat = values.detach().reshape(-1)
        n = flat.numel()
        if n == 0:
            return
        chunk = _CPU_CHUNK if flat.device.type == "cpu" else _DEVICE_CHUNK
        for start in range(0, n, chunk):
            bits = self._bits(flat[start : start + chunk])
            if self._collect:
                self._gather(bits)
            else:
                self._histogram(bits)

    def _gather(self, bits: torch.Tensor) -> None:
        # Candidates share the known prefix; NaN (negative) never matches.
        picked = bits[(bits >> self._known_shift) == self._prefix]
        if picked.numel():
            self._gathered.append(picked.to("cpu"))

    def _one(self, device: torch.device) -> torch.Tensor:
        one = self._ones.get(device)
        if one is None:
            one = self._ones[device] = torch.ones(1, dtype=torch.int64, device=device)
        return one

    def _histogram(self, bits: torch.Tensor) -> None:
        shift = self._known_shift - _DIGIT_BITS
        track = shift > 0  # at the last digit the histogram alone gives the exact answer
        if self._hist is None:
            dev = bits.device
            self._hist = _filled(0, torch.int64, dev)
            if track:
                self._bin_min = _filled(torch.iinfo(self._int_dtype).max, self._int_dtype, dev)
                self._bin_max = _filled(-1, self._int_dtype, dev)
        elif bits.device != self._hist.device:
            bits = bits.to(self._hist.device)
        # (at shift 0 nothing else reads bits: reuse the buffer, it is our own copy)
        key = bits >> shift if shift else bits
        # Relative to the prefix: candidates -> 1..65536, below (and NaN) -> 0, above -> 65537.
        # Clamp before subtracting so nothing overflows.
        base = self._prefix << _DIGIT_BITS
        key.clamp_(base - 1, base + _NBINS)
        key -= base - 1
        key = key.to(torch.int64)
        # scatter_add_ of a broadcast 1 (O(chunk), no 65,536-bin temporary per call)
        self._hist.scatter_add_(0, key, self._one(key.device).expand(key.numel()))
        if track:
            self._bin_min.scatter_reduce_(0, key, bits, reduce="amin")
            self._bin_max.scatter_reduce_(0, key, bits, reduce="amax")

    def merged(self, other: "KthLargestMagnitude") -> "KthLargestMagnitude":
        """A new selector holding both partial states of one pass (neither is changed).

        Two copies of a selector in the same search state, each fed part of a pass (e.g. on two
        workers), merge into the state one selector would have after being fed both parts: the
        histograms add, each bin's min and max are the smaller and larger, gathered candidates
        are pooled. Merging is associative and commutative, so partial states may be reduced in
        any grouping; the answer after :meth:`end_pass` is the same exact value.
        """
        mine = (self._k, self._dtype, self._prefix, self._known_shift, self._collect, self._candidates, self._passes, self._value)
        theirs = (other._k, other._dtype, other._prefix, other._known_shift, other._collect, other._candidates, other._passes, other._value)
        if mine != theirs:
            raise ValueError("cannot merge selectors in different search states (another k, dtype or pass)")
        out = KthLargestMagnitude.__new__(KthLargestMagnitude)
        out.__dict__.update(self.__dict__)
        out._ones = {}
        out._reset_pass_state()
        out._gathered = [*self._gathered, *other._gathered]
        parts = [s for s in (self, other) if s._hist is not None]
        if parts:
            device = parts[0]._hist.device
            out._hist = parts[0]._hist.clone()
            for p in parts[1:]:
                out._hist += p._hist.to(device)
            if parts[0]._bin_min is not None:
                out._bin_min = parts[0]._bin_min.clone()
                out._bin_max = parts[0]._bin_max.clone()
                for p in parts[1:]:
                    torch.minimum(out._bin_min, p._bin_min.to(device), out=out._bin_min)
                    torch.maximum(out._bin_max, p._bin_max.to(device), out=out._bin_max)
        return out

    def end_pass(self) -> None:
        """Close the current pass and narrow the search (or finish it)."""
        if self.done:
            self._reset_pass_state()
            return
        try:
            if self._collect:
                self._end_collect_pass()
            else:
                self._end_histogram_pass()
        finally:
            self._reset_pass_state()

    def _mismatch(self, seen: int) -> RuntimeError:
        return RuntimeError(
            f"the stream changed between passes: {seen} candidate entries in pass "
            f"{self._passes + 1}, expected {self._candidates}"
        )

    def _end_histogram_pass(self) -> None:
        if self._hist is None:
            hist = np.zeros(_HIST_LEN, dtype=np.int64)
        else:
            hist = self._hist.cpu().numpy()
        real = hist[1 : _NBINS + 1]
        seen = int(real.sum())
        first = self._candidates is None
        if first:
            self._nan = int(hist[0])
            self._total = seen
            self._candidates = seen
            if self._k > seen:
                raise ValueError(
                    f"k={self._k} exceeds the number of entries ({seen} non-NaN entries"
                    + (f", {self._nan} NaN ignored" if self._nan else "")
                    + ")"
                )
        elif seen != self._candidates:
            raise self._mismatch(seen)
        self._passes += 1

        # counts_ge[b] = number of candidates whose digit is >= b.
        counts_ge = np.cumsum(real[::-1])[::-1]
        b = int(np.count_nonzero(counts_ge >= self._rank)) - 1
        count = int(real[b])
        self._rank -= int(counts_ge[b]) - count
        self._candidates = count
        self._known_shift -= _DIGIT_BITS
        self._prefix = (self._prefix << _DIGIT_BITS) | b

        if self._known_shift == 0:
            self._value = _bits_to_float(self._prefix, self._dtype)
            return
        lo = int(self._bin_min[b + 1])
        hi = int(self._bin_max[b + 1])
        if lo == hi or self._rank == 1:
            self._value = _bits_to_float(hi, self._dtype)
        elif self._rank == count:
            self._value = _bits_to_float(lo, self._dtype)
        elif self._known_shift > _DIGIT_BITS and count <= COLLECT_LIMIT:
            self._collect = True

    def _end_collect_pass(self) -> None:
        parts = [g.numpy() for g in self._gathered]
        cand = np.concatenate(parts) if parts else np.zeros(0, dtype=_NP_INT[self._int_dtype])
        if cand.size != self._candidates:
            raise self._mismatch(cand.size)
        self._passes += 1
        pos = cand.size - self._rank  # ascending position of the rank-th largest
        self._value = _bits_to_float(int(np.partition(cand, pos)[pos]), self._dtype)


def kth_largest_magnitude_streaming(
    make_stream: Callable[[], Iterable[torch.Tensor]], k: int, dtype: torch.dtype = torch.float32
) -> float:
    """The exact k-th largest |x| over the tensors of ``make_stream()``.

    ``make_stream`` is called once per pass (at most 2 for float32, 4 for float64; never for
    k == 0, which gives +inf) and must yield the same values every time. NaN is ignored.
    """
    sel = KthLargestMagnitude(k, dtype)
    while not sel.done:
        for t in make_stream():
            sel.observe(t)
        sel.end_pass()
    return sel.value


def merge_partial_selectors(parts: list[list[KthLargestMagnitude]]) -> list[KthLargestMagnitude]:
    """Position by position, the merge of several workers' partial selectors of one pass."""
    out = list(parts[0])
    for part in parts[1:]:
        out = [a.merged(b) for a, b in zip(out, part)]
    return out

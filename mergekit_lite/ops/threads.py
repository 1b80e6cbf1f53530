"""Split single-threaded numpy work (sorts, random draws), or many short torch kernels, over the CPU threads torch is allowed.

numpy's sort and its random fills release the GIL but use one core each; torch's own kernels are
already parallel. Work is split into contiguous parts whose results do not depend on the split,
so outputs are the same for any thread count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
import threading
from typing import TypeVar

import numpy as np
import torch

Part = TypeVar("Part")
Result = TypeVar("Result")

_SCRATCH = threading.local()
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def thread_count() -> int:
    """How many parts to split into: torch's intra-op thread count (the user's ``--threads`` / OMP setting)."""
    return max(1, torch.get_num_threads())


def map_parts(work: Callable[[Part], Result], parts: Sequence[Part]) -> list[Result]:
    """``[work(p) for p in parts]``, the parts run on up to ``thread_count()`` threads: the first on the calling
    thread, which would otherwise wait (a sleeping thread takes 0.1–0.3 ms to wake on this project's VM)."""
    global _POOL, _POOL_SIZE
    if len(parts) <= 1 or thread_count() == 1:
        return [work(part) for part in parts]
    if _POOL is None or _POOL_SIZE != thread_count() - 1:
        if _POOL is not None:
            _POOL.shutdown(wait=False)
        _POOL_SIZE = thread_count() - 1
        _POOL = ThreadPoolExecutor(max_workers=_POOL_SIZE, thread_name_prefix="mergekit-lite-compute")
    others = [_POOL.submit(work, part) for part in parts[1:]]
    try:
        first = work(parts[0])
    finally:
        done = [future.result() for future in others]  # every part finished (or failed) before returning
    return [first, *done]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count on this thread set to ``count`` for the block, then put back."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def map_strided(work: Callable[[Part], None], items: Sequence[Part]) -> None:
    """``work(item)`` for every item, each taken in order by whichever of ``thread_count()`` threads is free (a thread
    slowed by other work takes fewer), each thread's torch kernels run inline (one torch thread each): for many short
    kernels, parallel over items instead of inside each kernel, where every kernel would wake the other threads
    (~0.1 ms each on this project's VM). A failure stops every thread at its next item and is raised."""
    threads = min(thread_count(), len(items))
    if threads <= 1:
        for item in items:
            work(item)
        return
    failed = threading.Event()
    taking = threading.Lock()
    upcoming = iter(items)

    def run(_: int) -> None:
        with torch_threads(1):
            while not failed.is_set():
                with taking:
                    item = next(upcoming, _NONE_LEFT)
                if item is _NONE_LEFT:
                    return
                try:
                    work(item)
                except BaseException:
                    failed.set()
                    raise

    map_parts(run, list(range(threads)))


_NONE_LEFT = object()


def split_evenly(count: int, parts: int, multiple: int = 1) -> list[tuple[int, int]]:
    """[start, stop) ranges covering range(count) in at most ``parts`` pieces, each start a multiple of ``multiple``."""
    if count <= 0:
        return []
    units = -(-count // multiple)
    per = -(-units // max(1, parts))
    return [(start * multiple, min((start + per) * multiple, count)) for start in range(0, units, per)]


def generator_at(generator: np.random.Generator, offset: int) -> np.random.Generator:
    """A copy of ``generator`` advanced by ``offset`` 64-bit outputs of its stream, the original untouched.

    PCG64DXSM jumps ahead in O(log offset), so part p of a long fill starts where the p − 1 parts
    before it would have left the stream: the same numbers as one sequential fill.
    """
    bits = type(generator.bit_generator)()
    bits.state = generator.bit_generator.state
    return np.random.Generator(bits.advance(offset) if offset else bits)


def scratch(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat CPU buffer of at least ``numel`` entries, this thread's own, reused from call to call.

    For temporaries of bounded size (a row block, a draw block) that would otherwise be mapped and
    page-faulted afresh for every block of every tensor. The caller must not keep it past its use.
    """
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buffer = buffers.get((name, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]

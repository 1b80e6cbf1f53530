"""Large tensors from huge pages; freed small blocks kept for reuse, freed large tensors back to the operating system.

Torch maps large CPU tensors with 4 KiB pages unless ``THP_MEM_ALLOC_ENABLE`` is set before its
first allocation; on this project's machine (a VM, where page faults are dear) a new 64 MiB
tensor then costs more than the arithmetic on it: ``x.abs()`` of 16.8M float32 entries took
116 ms with 4 KiB pages and 24 ms with transparent huge pages (measured, one thread).

Freed memory is kept for reuse below 32 MiB and returned above it. On that VM each fresh page of a
new block costs a page fault (a 4 MiB row chunk: ~500 faults, 2–4 ms, more than the arithmetic on
it), so blocks under 32 MiB (row chunks, their stacks and float64 temporaries, mask blocks) come
from malloc's heap and stay there when freed (no trimming), while whole large tensors (≥ 32 MiB)
are mapped on their own and unmapped when freed, so resident memory stays near the working set.
Measured at 250M parameters (bfloat16, largest tensor 131 MB in float32): SCE K = 4 49 → 26 s
(system time 30 → 7 s), TIES K = 8 47 → 42 s, peak RSS +1–7 %; on the memory benchmark's model
(largest tensor 64 MiB) 0.2–0.8 more copies of it at K = 8 (every method still ≤ 5.6).

Every thread allocates from the one heap. A block read ahead on the reader thread and freed on the main
one goes back to the arena it came from; with one arena per thread (glibc's default) the reader's arena
kept growing with 2 MiB-aligned blocks it could not reuse: a row-chunked task arithmetic at 250M, K = 8,
held 375 MB in that arena for 0.1 MB in use (peak RSS 690 MB; one arena: 386 MB, as fast).
"""

from __future__ import annotations

import ctypes
import os
import sys

#: mallopt's parameter numbers (glibc's malloc.h); setting the mmap threshold also stops its dynamic change
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
#: blocks of at least this many bytes are mapped on their own and unmapped when freed
MMAP_THRESHOLD_BYTES = 32 << 20
#: free memory at the top of the heap is given back only beyond this (never, in practice: it is reused)
TRIM_THRESHOLD_BYTES = 2**31 - 1


def use_huge_pages() -> None:
    """Ask torch for transparent huge pages on large CPU tensors (unless the user set
    ``THP_MEM_ALLOC_ENABLE``); takes effect only before torch's first allocation."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def return_large_buffers() -> bool:
    """Fix glibc's malloc for this process: blocks of 32 MiB or more mapped on their own (returned when
    freed), smaller ones kept in the heap for reuse (no trimming), one heap for every thread. A no-op
    elsewhere, or when the user set ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (and the
    arena count alone is left when ``MALLOC_ARENA_MAX`` is set). Returns whether it was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (or no symbol table): leave the allocator as it is
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(M_ARENA_MAX, 1)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))

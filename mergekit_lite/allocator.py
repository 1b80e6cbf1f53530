"""Large tensors from huge pages, and freed ones back to the operating system.

Torch maps large CPU tensors with 4 KiB pages unless ``THP_MEM_ALLOC_ENABLE`` is set before its
first allocation; on this project's machine (a VM, where page faults are dear) a new 64 MiB
tensor then costs more than the arithmetic on it: ``x.abs()`` of 16.8M float32 entries took
116 ms with 4 KiB pages and 24 ms with transparent huge pages (measured, one thread).

Freed tensors go back to the operating system, so a merge's resident memory is its working set:
glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), after
which tensors of up to that size come from its heap and, once freed, stay resident there between
tensors. Measured on the memory benchmark at K = 8 (copies of the largest tensor, largest tensor
64 MiB): Breadcrumbs-TIES 7.98 → 4.66 and consensus-TIES 6.69 → 4.84 with a fixed 8 MiB threshold,
the same computation. Blocks under 8 MiB (row chunks, small tensors) still reuse the heap.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: mallopt's parameter number for the mmap threshold (glibc's malloc.h); setting it also stops the dynamic raise
M_MMAP_THRESHOLD = -3
#: blocks of at least this many bytes are mapped on their own and unmapped when freed
MMAP_THRESHOLD_BYTES = 8 << 20


def use_huge_pages() -> None:
    """Ask torch for transparent huge pages on large CPU tensors (unless the user set
    ``THP_MEM_ALLOC_ENABLE``); takes effect only before torch's first allocation."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def return_large_buffers() -> bool:
    """Fix glibc's mmap threshold at 8 MiB for this process (no-op elsewhere, or when the user set
    ``MALLOC_MMAP_THRESHOLD_`` in the environment). Returns whether it was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (or no symbol table): leave the allocator as it is
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))

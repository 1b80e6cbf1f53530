"""Shorter busy-waits for torch's OpenMP threads, so numpy's work on this process's own threads gets the CPU.

After each parallel torch operation, libgomp's threads spin for the next one (300,000 rounds by default,
milliseconds) before they sleep. A merge interleaves torch operations with numpy sorts, draws and reads
on Python threads, which the spinning threads keep off the cores: on the project's 2-core machine,
250M parameters in bfloat16, DELLA K = 4 19.3/19.7 → 16.6/16.8 s and TIES K = 8 17.2/18.0 → 15.3/15.3 s
with 30,000 rounds; 10,000 was slower for Model Stock (4.7 s against 4.2), no wait at all (``passive``)
slower for every method (DELLA 26 s).
"""

from __future__ import annotations

import os

#: libgomp's spin rounds before a waiting thread sleeps (its default: 300,000)
SPIN_ROUNDS = 30_000


def shorten_spin_waits() -> None:
    """Set ``GOMP_SPINCOUNT`` unless the user set it or ``OMP_WAIT_POLICY``; takes effect only before torch
    is imported (libgomp reads it when it loads)."""
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_ROUNDS)


def no_blas_threads() -> None:
    """One OpenBLAS thread for numpy (``OPENBLAS_NUM_THREADS=1``) unless the user set it: nothing here multiplies
    matrices with numpy (torch has its own BLAS), and the idle threads numpy's OpenBLAS starts took ~1 % of the CPU
    time of a merge (``perf``); RAM K = 8 at 250M with both this and ``gc.freeze``: 5.98 → 5.71 s (median of 3).
    Takes effect only before numpy is imported."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

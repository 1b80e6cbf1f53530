"""The CLI's allocator settings (allocator.py): huge pages for torch, small freed blocks reused, freed large tensors leave the process."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, torch
from mergekit_lite.allocator import return_large_buffers
if {tune}:
    assert return_large_buffers()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
def mapped():  # bytes in blocks mapped on their own
    return libc.mallinfo2().hblkhd
before = mapped()
chunk = torch.empty(8 << 20, dtype=torch.uint8).fill_(1)  # a row chunk's float64 temporary
chunk_mapped = mapped() - before
del chunk
kept_free = libc.mallinfo2().fordblks  # free bytes kept in the heap for the next block
big = torch.empty(48 << 20, dtype=torch.uint8).fill_(1)
big_mapped = mapped() - before
del big
print(chunk_mapped, kept_free, big_mapped, mapped() - before)
"""


def _probe(tune: bool) -> list[int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["THP_MEM_ALLOC_ENABLE"] = "1"  # as the CLI runs
    out = subprocess.run([sys.executable, "-c", PROBE.format(tune=tune)], capture_output=True, text=True, env=env, check=True)
    return [int(v) for v in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc ≥ 2.33")
def test_small_blocks_stay_in_the_heap_for_reuse_and_a_freed_large_tensor_leaves_the_process():
    chunk_mapped, kept_free, big_mapped, left_mapped = _probe(tune=True)
    assert chunk_mapped == 0 and kept_free >= 8 << 20  # from the heap, and kept there when freed (no fresh pages next time)
    assert big_mapped >= 48 << 20 and left_mapped == 0  # mapped on its own, and unmapped when freed
    assert _probe(tune=False)[0] >= 8 << 20  # glibc's default maps the first such block afresh (and faults its pages)


def test_the_users_own_setting_wins(monkeypatch):
    from mergekit_lite.allocator import return_large_buffers

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert return_large_buffers() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert return_large_buffers() is False


@pytest.mark.parametrize(
    ("variable", "ours", "user_setting"),
    [("THP_MEM_ALLOC_ENABLE", "1", {"THP_MEM_ALLOC_ENABLE": "0"}), ("GOMP_SPINCOUNT", "30000", {"GOMP_SPINCOUNT": "5"}), ("GOMP_SPINCOUNT", None, {"OMP_WAIT_POLICY": "passive"})],
)
def test_the_cli_sets_torch_s_environment_before_torch_is_imported_unless_the_user_did(variable, ours, user_setting):
    probe = (
        "import os, sys\n"
        "from click.testing import CliRunner\n"
        "from mergekit_lite.cli import main\n"
        "assert 'torch' not in sys.modules\n"
        "CliRunner().invoke(main, ['methods'])\n"
        f"print(os.environ.get({variable!r}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    if ours is not None:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == ours
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**env, **user_setting}, check=True)
    assert out.stdout.strip() == user_setting.get(variable, "None")  # the user's choice stands


ARENAS = """
import ctypes, threading, torch
from mergekit_lite.allocator import return_large_buffers
if {tune}:
    assert return_large_buffers()
def read():  # a read-ahead thread's block, freed later on the main thread
    global block
    block = torch.empty(4 << 20, dtype=torch.uint8).fill_(1)
thread = threading.Thread(target=read)
thread.start(); thread.join()
del block
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" section per arena, on standard error
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "malloc_stats"), reason="glibc")
def test_every_thread_allocates_from_the_one_heap():
    # with an arena per thread, blocks read ahead on one thread and freed on another piled up unused in the reader's arena
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["THP_MEM_ALLOC_ENABLE"] = "1"

    def arenas(tune: bool) -> int:
        out = subprocess.run([sys.executable, "-c", ARENAS.format(tune=tune)], capture_output=True, text=True, env=env, check=True)
        return out.stderr.count("Arena ")

    assert arenas(tune=True) == 1
    assert arenas(tune=False) > 1  # glibc's default: the thread got an arena of its own

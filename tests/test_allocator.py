"""The CLI's allocator settings (allocator.py): huge pages for torch, small freed blocks reused, freed large tensors leave the process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import os, resource, torch
from mergekit_lite.allocator import return_large_buffers
if {tune}:
    assert return_large_buffers()
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
chunk = torch.empty(8 << 20, dtype=torch.uint8).fill_(1); del chunk
before = faults()
for _ in range(8):  # a row chunk's float64 temporary (8 MiB), freed and made again
    chunk = torch.empty(8 << 20, dtype=torch.uint8).fill_(1); del chunk
refaults = (faults() - before) / 8
before = resident()
big = torch.empty(48 << 20, dtype=torch.uint8).fill_(1); del big
print(refaults, resident() - before)
"""


def _probe(tune: bool) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["THP_MEM_ALLOC_ENABLE"] = "1"  # as the CLI runs
    out = subprocess.run([sys.executable, "-c", PROBE.format(tune=tune)], capture_output=True, text=True, env=env, check=True)
    refaults, kept = out.stdout.split()
    return float(refaults), int(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_small_blocks_are_reused_without_page_faults_and_a_freed_large_tensor_leaves_the_process():
    refaults, kept = _probe(tune=True)
    assert refaults < 16  # reused, not mapped and faulted again (glibc's default: ~500 faults each time)
    assert kept < 4 << 20
    assert _probe(tune=False)[0] > 100  # glibc's default maps it afresh each time: what the setting is for


def test_the_users_own_setting_wins(monkeypatch):
    from mergekit_lite.allocator import return_large_buffers

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert return_large_buffers() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert return_large_buffers() is False


def test_the_cli_asks_torch_for_huge_pages_before_torch_is_imported():
    probe = (
        "import os, sys\n"
        "from click.testing import CliRunner\n"
        "from mergekit_lite.cli import main\n"
        "assert 'torch' not in sys.modules\n"
        "CliRunner().invoke(main, ['methods'])\n"
        "print(os.environ.get('THP_MEM_ALLOC_ENABLE'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "1"
    env["THP_MEM_ALLOC_ENABLE"] = "0"  # the user's choice stands
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "0"

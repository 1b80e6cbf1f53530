"""The CLI's allocator settings (allocator.py): huge pages for torch, freed large tensors leave the process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import os, torch
from mergekit_lite.allocator import return_large_buffers
if {tune}:
    assert return_large_buffers()
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
big = torch.empty(24 << 20, dtype=torch.uint8).fill_(1); del big  # glibc would now raise its threshold to 24 MiB
before = resident()
mid = torch.empty(16 << 20, dtype=torch.uint8).fill_(1); del mid
print(resident() - before)
"""


def _kept_after_free(tune: bool) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(tune=tune)], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_16_mib_tensor_leaves_the_process_only_with_the_fixed_threshold():
    assert _kept_after_free(tune=True) < 4 << 20
    assert _kept_after_free(tune=False) > 12 << 20  # glibc's default keeps it resident: what the fix is for


def test_the_users_own_setting_wins(monkeypatch):
    from mergekit_lite.allocator import return_large_buffers

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
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

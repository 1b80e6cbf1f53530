"""Read-ahead: inputs come back in order, the next read runs while the caller works, errors surface where they belong."""

from __future__ import annotations

import threading

import pytest
import torch

from mergekit_lite.checkpoint import open_checkpoint
from mergekit_lite.execute import read_ahead


def test_reads_come_back_in_order_and_the_next_one_is_already_running():
    started = [threading.Event() for _ in range(4)]

    def read(i: int):
        def go() -> torch.Tensor:
            started[i].set()
            return torch.full((2,), float(i))
        return go

    got = []
    for i, tensor in enumerate(read_ahead([read(i) for i in range(4)])):
        if i + 1 < 4:  # while the caller holds tensor i, read i + 1 has started without being asked for
            assert started[i + 1].wait(timeout=10)
        got.append(float(tensor[0]))
    assert got == [0.0, 1.0, 2.0, 3.0]
    assert list(read_ahead([])) == []


def test_a_failing_read_raises_when_its_tensor_is_asked_for():
    def ok() -> torch.Tensor:
        return torch.zeros(1)

    def bad() -> torch.Tensor:
        raise OSError("disk gone")

    stream = read_ahead([ok, bad, ok])
    assert float(next(stream)[0]) == 0.0
    with pytest.raises(OSError, match="disk gone"):
        next(stream)


def test_advise_is_harmless_on_every_format(demo, tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "pytorch_model.bin")
    for ref in (demo["base"], tmp_path):
        with open_checkpoint(ref) as ckpt:
            for name in ckpt.names:
                ckpt.advise(name)
            assert ckpt.get(ckpt.names[0]).numel() > 0


@pytest.mark.parametrize("in_cache", [True, False])
def test_advice_is_given_only_for_a_file_not_already_in_the_page_cache(demo, monkeypatch, in_cache):
    import os

    from mergekit_lite import checkpoint

    if not hasattr(os, "posix_fadvise") or not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("no posix_fadvise or RWF_NOWAIT here")
    advised, probed = [], []
    real_preadv = os.preadv

    def preadv(fd, buffers, position, flags=0):
        if flags & os.RWF_NOWAIT:
            probed.append(position)
            if not in_cache:
                raise BlockingIOError(11, "would block")
        return real_preadv(fd, buffers, position, flags)

    monkeypatch.setattr(checkpoint.os, "preadv", preadv)
    monkeypatch.setattr(checkpoint.os, "posix_fadvise", lambda fd, position, length, advice: advised.append((position, length)))
    with open_checkpoint(demo["base"]) as ckpt:
        names = [n for n in ckpt.names if ckpt.info(n).nbytes]
        for name in names:
            ckpt.advise(name)
        files = ckpt.weight_files
    # probed once per file (at most CACHE_PROBES points), not per tensor
    assert files and 0 < len(probed) <= checkpoint.CACHE_PROBES * len(files)
    if in_cache:  # every point read, the file's last byte among them
        assert len(probed) == checkpoint.CACHE_PROBES and max(probed) == os.path.getsize(files[0]) - 1
    # a cached file gets no advice; one that is not gets it for every tensor, its exact byte range
    assert len(advised) == (0 if in_cache else len(names))
    assert all(length > 0 for _, length in advised)

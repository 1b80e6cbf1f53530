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

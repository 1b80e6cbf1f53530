"""The shard writer: tensors in any order land at their planned offsets; files read back with safetensors."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from mergekit_lite.checkpoint import TensorInfo
from mergekit_lite.errors import OutputError
from mergekit_lite.writer import ShardedSafetensorsWriter, sha256_file


@pytest.mark.parametrize("order", ["planned", "reversed", "shuffled"])
def test_any_order_gives_the_same_files(tmp_path, order):
    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(3, i + 1).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(9)}
    infos = [TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    names = list(tensors)
    if order == "reversed":
        names.reverse()
    elif order == "shuffled":
        random.Random(3).shuffle(names)
    folder = tmp_path / order
    folder.mkdir()
    writer = ShardedSafetensorsWriter(folder, infos, shard_size=60)
    for n in names:
        writer.write(n, tensors[n])
    writer.close()
    assert len(writer.shards) > 2
    index = json.loads((folder / writer.index_name).read_text())
    loaded = {}
    for file_name in sorted(set(index["weight_map"].values())):
        loaded.update(load_file(folder / file_name))
        assert writer.digests[file_name] == (sha256_file(folder / file_name), (folder / file_name).stat().st_size)
    assert set(loaded) == set(tensors)
    for n, t in tensors.items():
        assert torch.equal(loaded[n], t), n


def test_unplanned_duplicate_and_missing_tensors_are_refused(tmp_path):
    infos = [TensorInfo("a", torch.float32, (2,)), TensorInfo("b", torch.float32, (2,))]
    writer = ShardedSafetensorsWriter(tmp_path, infos, shard_size=10**9)
    with pytest.raises(OutputError, match="not in the plan"):
        writer.write("c", torch.zeros(2))
    with pytest.raises(OutputError, match="expected torch.float32 \\[2\\]"):
        writer.write("a", torch.zeros(3))
    writer.write("b", torch.zeros(2))
    with pytest.raises(OutputError, match="written twice"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(OutputError, match="only 1 of 2"):
        writer.close()
    writer.abort()

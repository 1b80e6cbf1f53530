"""The shard writer: tensors in any order land at their planned offsets; files read back with safetensors."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from mergekit_lite.checkpoint import TensorInfo
from mergekit_lite.errors import OutputError
from mergekit_lite.writer import BackgroundWrites, ShardedSafetensorsWriter, sha256_file


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


def test_reserved_shards_written_elsewhere_equal_the_ones_written_in_order(tmp_path):
    """Tensors written at reserved offsets (as Ray workers do), in reverse order, give the same files and digests."""
    from mergekit_lite.errors import OutputError
    from mergekit_lite.writer import ShardedSafetensorsWriter, write_at

    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(7 + i, 3, generator=gen) for i in range(5)}
    tensors["half"] = torch.randn(4, generator=gen).to(torch.bfloat16)
    infos = [TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ordered = ShardedSafetensorsWriter(tmp_path / "a", infos, 200)
    for name, tensor in tensors.items():
        ordered.write(name, tensor)
    ordered.close()
    reserved = ShardedSafetensorsWriter(tmp_path / "b", infos, 200)
    places = reserved.reserve()
    with pytest.raises(OutputError, match="expected"):
        write_at(places["t0"], tensors["t1"])
    for name in reversed(list(tensors)):
        write_at(places[name], tensors[name])
        reserved.written_elsewhere(name)
    reserved.close()
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) > 2 and files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert reserved.digests == ordered.digests
    with pytest.raises(OutputError, match="twice"):
        reserved.written_elsewhere("t0")


def test_without_digests_the_files_are_the_same_and_none_is_listed(tmp_path):
    tensors = {f"t{i}": torch.arange(4 * (i + 1), dtype=torch.float32) for i in range(5)}
    infos = [TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    files = {}
    for digests in (True, False):
        folder = tmp_path / str(digests)
        folder.mkdir()
        writer = ShardedSafetensorsWriter(folder, infos, shard_size=40, digests=digests)
        for n, t in tensors.items():
            writer.write(n, t)
        writer.close()
        assert bool(writer.digests) == digests
        files[digests] = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert files[True] == files[False]


def test_background_writes_keep_the_order_and_the_byte_limit():
    """One thread writes in the order given; ``put`` waits while more than ``limit`` bytes are pending."""
    written: list[str] = []
    pending = {"bytes": 0, "most": 0}
    lock = threading.Lock()

    def slow_write(name: str, tensor: torch.Tensor) -> None:  # slower than the puts: without the limit all 12 would pend
        time.sleep(0.01)
        with lock:
            written.append(name)
            pending["bytes"] -= tensor.numel() * tensor.element_size()

    names = [f"t{i}" for i in range(12)]
    with BackgroundWrites(slow_write, limit=100) as writes:
        for i, name in enumerate(names):
            tensor = torch.zeros(10 + i, dtype=torch.float32)  # 40-84 bytes: at most two fit under 100
            with lock:
                pending["bytes"] += tensor.numel() * 4
                pending["most"] = max(pending["most"], pending["bytes"])
            writes.put(name, tensor)
        writes.finish()
    assert written == names
    # a tensor is put while at most `limit` bytes (and one more tensor than fits) are pending: never 3 of them
    assert pending["most"] <= 100 + 84


def test_a_failed_background_write_is_raised_and_later_writes_are_dropped():
    written: list[str] = []

    def write(name: str, tensor: torch.Tensor) -> None:
        if name == "bad":
            raise OutputError("disk full")
        written.append(name)

    with pytest.raises(OutputError, match="disk full"):
        with BackgroundWrites(write, limit=10**9) as writes:
            writes.put("a", torch.zeros(1))
            writes.put("bad", torch.zeros(1))
            writes.finish()
    assert written == ["a"]

    started = threading.Event()

    def blocking(name: str, tensor: torch.Tensor) -> None:
        started.set()
        time.sleep(0.05)
        written.append(name)

    written.clear()
    with pytest.raises(RuntimeError, match="compute failed"):
        with BackgroundWrites(blocking, limit=10**9) as writes:
            writes.put("first", torch.zeros(1))
            writes.put("second", torch.zeros(1))
            started.wait(5)
            raise RuntimeError("compute failed")
    # leaving the block waited for the write under way and dropped the one not started
    assert written == ["first"]


def _shards_of(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _write_all_tensors(folder, infos, tensors, names, **options):
    folder.mkdir()
    writer = ShardedSafetensorsWriter(folder, infos, shard_size=70_000, **options)
    for n in names:
        writer.write(n, tensors[n])
    writer.close()
    return _shards_of(folder), writer


@pytest.mark.parametrize("order", ["planned", "one out of place"])
def test_direct_writes_give_the_bytes_of_ordinary_writes(tmp_path, monkeypatch, order):
    """Shards written past the page cache through a small buffer (tensors larger than it, unaligned ends, a tensor
    out of order handing over to pwrite midway) equal the ones written by pwrite alone, and load as written."""
    from mergekit_lite import direct_write

    import os

    (tmp_path / "probe").touch()
    probe = direct_write.open_direct(tmp_path / "probe")
    if probe is None:
        pytest.skip("this file system refuses O_DIRECT")
    os.close(probe)
    monkeypatch.setattr(direct_write, "BUFFER_BYTES", 3 * direct_write.ALIGN)
    direct_bytes = []
    real_write_all = direct_write._write_all

    def counting(fd, data, offset, direct=False):
        if direct:
            direct_bytes.append(len(data))
        real_write_all(fd, data, offset, direct)

    monkeypatch.setattr(direct_write, "_write_all", counting)
    gen = torch.Generator().manual_seed(1)
    sizes = [5000, 1, 40_000, 4096, 333, 12_289, 8, 30_000]
    tensors = {f"t{i}": torch.randn(n, generator=gen).to(torch.bfloat16 if i % 2 else torch.float32) for i, n in enumerate(sizes)}
    infos = [TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    names = list(tensors)
    if order != "planned":
        names.insert(1, names.pop(4))
    expected, _ = _write_all_tensors(tmp_path / "plain", infos, tensors, names, direct=False)
    assert not direct_bytes
    got, writer = _write_all_tensors(tmp_path / "direct", infos, tensors, names)
    assert len(writer.shards) > 1 and got == expected
    assert direct_bytes and all(n % direct_write.ALIGN == 0 for n in direct_bytes)
    loaded = {}
    for file_name in writer.shard_of.values():
        loaded.update(load_file(tmp_path / "direct" / file_name))
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_a_refused_direct_write_falls_back_to_ordinary_writes(tmp_path, monkeypatch):
    """A file system that accepts O_DIRECT at open but refuses the writes (EINVAL) still gets every byte."""
    import errno
    import os

    from mergekit_lite import direct_write

    monkeypatch.setattr(direct_write, "BUFFER_BYTES", 2 * direct_write.ALIGN)
    monkeypatch.setattr(direct_write, "open_direct", lambda path: os.open(path, os.O_WRONLY))
    monkeypatch.setattr("mergekit_lite.writer.open_direct", direct_write.open_direct)
    real_write_all = direct_write._write_all

    def refusing(fd, data, offset, direct=False):
        if direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        real_write_all(fd, data, offset, direct)

    monkeypatch.setattr(direct_write, "_write_all", refusing)
    tensors = {f"t{i}": torch.arange(1000 * (i + 1), dtype=torch.float32) for i in range(4)}
    infos = [TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    expected, _ = _write_all_tensors(tmp_path / "plain", infos, tensors, list(tensors), direct=False)
    got, _ = _write_all_tensors(tmp_path / "refused", infos, tensors, list(tensors))
    assert got == expected


def test_sequential_direct_writer_appends_in_order_whatever_the_pieces(tmp_path):
    """The buffer logic on its own (an ordinary descriptor standing in for the direct one): pieces of any size,
    across buffer ends, give the concatenation; ``spill`` hands over midway."""
    import os

    from mergekit_lite.direct_write import SequentialDirectWriter

    rng = random.Random(5)
    pieces = [bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 7, 4095, 4096, 9000, 20_000]))) for _ in range(12)]
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    stream = SequentialDirectWriter(fd, os.open(path, os.O_WRONLY))
    for piece in pieces[:8]:
        stream.append(torch.frombuffer(bytearray(piece), dtype=torch.uint8) if piece else torch.empty(0, dtype=torch.uint8))
    assert stream.end == sum(map(len, pieces[:8]))
    stream.spill()
    offset = stream.end
    for piece in pieces[8:]:
        os.pwrite(fd, piece, offset)
        offset += len(piece)
    os.close(fd)
    assert path.read_bytes() == b"".join(pieces)

"""Every input format reads the same tensors; hub ids resolve from an offline cache the test populates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_lite import CheckpointError, open_checkpoint
from mergekit_lite.checkpoint import looks_like_hub_id, split_revision

from helpers import load_state, ta_recipe, write_recipe


def _read_all(ref) -> dict[str, torch.Tensor]:
    with open_checkpoint(ref) as ckpt:
        return {name: ckpt.get(name) for name in ckpt.names}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _sharded_safetensors(src: Path, dst: Path, per_shard: int = 5) -> Path:
    state = load_state(src)
    dst.mkdir()
    names = list(state)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: state[n] for n in group}, dst / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def _bin(src: Path, dst: Path, shards: int = 1) -> Path:
    state = load_state(src)
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    names = list(state)
    size = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        group = names[i * size : (i + 1) * size]
        torch.save({n: state[n] for n in group}, dst / fname)
        weight_map.update({n: fname for n in group})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_folder_with_model_safetensors(demo):
    _assert_same(_read_all(demo["base"]), load_state(demo["base"]))


def test_single_safetensors_file(demo):
    _assert_same(_read_all(demo["base"] / "model.safetensors"), load_state(demo["base"]))


def test_sharded_safetensors_with_index(demo, tmp_path):
    folder = _sharded_safetensors(demo["base"], tmp_path / "sharded")
    assert len(list(folder.glob("*.safetensors"))) > 1
    _assert_same(_read_all(folder), load_state(demo["base"]))


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_and_sharded_bin(demo, tmp_path, shards):
    folder = _bin(demo["base"], tmp_path / "bin", shards)
    _assert_same(_read_all(folder), load_state(demo["base"]))


def test_header_only_until_asked(demo):
    """Opening reads names, shapes and dtypes; the dtype/shape come from the header."""
    with open_checkpoint(demo["base"]) as ckpt:
        info = ckpt.info("model.embed_tokens.weight")
        assert info.shape == (512, 64) and info.dtype == torch.float32
        assert info.nbytes == 512 * 64 * 4
        assert ckpt.nbytes == sum(t.numel() * 4 for t in load_state(demo["base"]).values())


def test_mixed_formats_merge_like_safetensors(demo, tmp_path):
    """A recipe whose inputs come in every format gives the same output as all-safetensors."""
    import mergekit_lite

    sharded = _sharded_safetensors(demo["math"], tmp_path / "math_sharded")
    binned = _bin(demo["code"], tmp_path / "code_bin", shards=2)
    single = demo["chat"] / "model.safetensors"
    data = ta_recipe(demo)
    data["models"][0]["model"], data["models"][1]["model"], data["models"][2]["model"] = str(sharded), str(binned), str(single)
    for m, n in zip(data["models"], ("math", "code", "chat")):
        m["name"] = n
    out_mixed = mergekit_lite.run(mergekit_lite.Recipe.from_dict(data), tmp_path / "mixed", progress=False)
    out_plain = mergekit_lite.run(mergekit_lite.Recipe.from_dict(ta_recipe(demo)), tmp_path / "plain", progress=False)
    _assert_same(load_state(out_mixed), load_state(out_plain))


def test_reference_parsing():
    assert split_revision("org/name@v1.0") == ("org/name", "v1.0")
    assert split_revision("org/name") == ("org/name", None)
    assert looks_like_hub_id("meta-llama/Llama-3.1-8B")
    assert not looks_like_hub_id("./models/x")
    assert not looks_like_hub_id("a/b/c")
    assert not looks_like_hub_id("/abs/path")


# -- hub ids through an offline cache -------------------------------------------------------------
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_hub_cache(cache: Path, repo_id: str, source: Path, revision_ref: str = "main") -> Path:
    """Lay out a Hugging Face cache entry for ``repo_id`` as huggingface_hub would after a download."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / revision_ref).write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub_cache(demo, tmp_path):
    cache = tmp_path / "hub"
    populate_hub_cache(cache, "demo-org/base", demo["base"])
    populate_hub_cache(cache, "demo-org/math", demo["math"], revision_ref="v1")
    return cache


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mergekit_lite.cli", *args], capture_output=True, text=True, env=full_env, cwd=cwd)


def test_hub_ids_resolve_from_offline_cache(demo, hub_cache, tmp_path):
    data = ta_recipe(demo)
    data["base_model"] = "demo-org/base"
    data["models"][0]["model"] = "demo-org/math@v1"
    recipe = write_recipe(tmp_path / "r.yml", data)
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    result = _cli("run", str(recipe), str(tmp_path / "hub_out"), "-q", env=env)
    assert result.returncode == 0, result.stderr
    plain = _cli("run", str(write_recipe(tmp_path / "p.yml", ta_recipe(demo))), str(tmp_path / "plain_out"), "-q")
    assert plain.returncode == 0, plain.stderr
    _assert_same(load_state(tmp_path / "hub_out"), load_state(tmp_path / "plain_out"))


def test_hub_id_missing_from_cache_is_a_clear_error(demo, hub_cache, tmp_path):
    data = ta_recipe(demo)
    data["models"][1]["model"] = "demo-org/not-downloaded"
    recipe = write_recipe(tmp_path / "r.yml", data)
    result = _cli("validate", str(recipe), env={"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "demo-org/not-downloaded" in result.stderr and "cache" in result.stderr
    assert "Traceback" not in result.stderr


def test_in_process_hub_resolution(demo, hub_cache, monkeypatch):
    """The Python API resolves hub ids too (huggingface_hub reads its settings at import; patch them)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    _assert_same(_read_all("demo-org/math@v1"), load_state(demo["math"]))
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        open_checkpoint("demo-org/math@v2")


def test_unsafe_pickle_is_refused(tmp_path):
    """A .bin whose payload would run code is refused by weights_only=True; nothing runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"w": torch.zeros(2), "x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        open_checkpoint(folder)
    assert not marker.exists()


def test_reads_are_independent_copies(demo):
    """Changing a tensor in place never changes what the next read returns (safe_open's views would)."""
    with open_checkpoint(demo["math"]) as ckpt:
        first = ckpt.get("model.norm.weight")
        original = first.clone()
        first.add_(1.0)
        assert torch.equal(ckpt.get("model.norm.weight"), original)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8, torch.bool])
def test_reader_agrees_with_safetensors_for_every_dtype(tmp_path, dtype):
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": (torch.randn(3, 5, generator=g) * 10).to(dtype),
        "scalar": torch.tensor(7).to(dtype),
        "empty": torch.zeros(0, 4, dtype=dtype),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    got = _read_all(tmp_path / "x.safetensors")
    want = load_file(tmp_path / "x.safetensors")
    _assert_same(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.bool])
def test_mapped_reads_are_the_files_bytes_and_independent_copies(tmp_path, monkeypatch, dtype):
    """Reads of at least MAP_MIN_BYTES are mapped copy-on-write: the same values as safetensors' reader, whole and
    by rows; a change to one stays in it (not in the file, not in the next read); an odd offset is read instead."""
    from safetensors.torch import load_file

    from mergekit_lite import checkpoint

    monkeypatch.setattr(checkpoint, "MAP_MIN_BYTES", 64)
    g = torch.Generator().manual_seed(1)
    tensors = {"big": (torch.randn(300, 70, generator=g) * 10).to(dtype), "odd": torch.ones(3, dtype=torch.int8),
               "after": (torch.randn(50, 33, generator=g) * 10).to(dtype)}  # at an offset that is not a page's
    path = tmp_path / "x.safetensors"
    save_file(tensors, path)
    before = path.read_bytes()
    want = load_file(path)
    mapped = []
    real = checkpoint._SafetensorsFile._mapped
    monkeypatch.setattr(checkpoint._SafetensorsFile, "_mapped", lambda self, *a: mapped.append(a) or real(self, *a))
    with open_checkpoint(path) as ckpt:
        for name in ("big", "after"):
            first = ckpt.get(name)
            assert torch.equal(first, want[name])
            assert torch.equal(ckpt.get_rows(name, 7, 19), want[name][7:19])
            first.view(torch.uint8).bitwise_xor_(1)  # written over: a private copy of the page, not the file
            assert torch.equal(ckpt.get(name), want[name]) and not torch.equal(first, want[name])
            del first
    assert len(mapped) >= 4 and path.read_bytes() == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_as_serves_row_chunks_from_shared_windows_as_owned_conversions(tmp_path, monkeypatch, dtype):
    """rows_as gives rows[start:stop].to(dtype) for any ranges, in or across windows, into ``out`` or new; consecutive
    chunks share a mapping; and writing into what it returned never shows in a later read of the same rows."""
    from mergekit_lite import checkpoint

    monkeypatch.setattr(checkpoint, "MAP_MIN_BYTES", 64)
    monkeypatch.setattr(checkpoint, "ROW_WINDOW_BYTES", 40 * 33 * dtype.itemsize)  # a window of 40 rows of "b"
    g = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(300, 70, generator=g).to(dtype), "b": torch.randn(301, 33, generator=g).to(dtype),
               "small": torch.randn(3, 2, generator=g).to(dtype), "v": torch.randn(500, generator=g).to(dtype)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, path)
    before = path.read_bytes()
    mapped = []
    real = checkpoint._SafetensorsFile._mapped
    monkeypatch.setattr(checkpoint._SafetensorsFile, "_mapped", lambda self, *a: mapped.append(a) or real(self, *a))
    with open_checkpoint(path) as ckpt:
        for start in range(0, 301, 10):  # "b" in chunks of 10 rows: 40-row windows, so about one mapping per 4 chunks
            got = ckpt.rows_as("b", start, start + 10, torch.float32)
            assert got.dtype == torch.float32 and torch.equal(got, tensors["b"][start : start + 10].float())
        assert 8 <= len(mapped) <= 9
        ranges = [(0, 5), (3, 9), (35, 45), (290, 400), (7, 7), (0, 301), (299, 301), (-2, 3)]
        g2 = torch.Generator().manual_seed(4)
        ranges += [tuple(sorted(torch.randint(0, 302, (2,), generator=g2).tolist())) for _ in range(40)]
        for name in ("a", "b", "small", "v", "b", "a"):  # interleaved tensors: each window replaced by the next
            for a, b in ranges:
                want = tensors[name][max(a, 0) : b]
                got = ckpt.rows_as(name, a, b, dtype)
                assert got.dtype == dtype and torch.equal(got, want), (name, a, b)
                got.view(torch.uint8).bitwise_xor_(1)  # the caller owns it: no later read may see this
                out = torch.full(want.shape, 7.0, dtype=torch.float64)
                assert ckpt.rows_as(name, a, b, torch.float64, out=out) is out and torch.equal(out, want.double())
    assert path.read_bytes() == before


def test_file_truncated_after_opening_is_a_clear_error_for_mapped_reads(tmp_path, monkeypatch):
    from mergekit_lite import checkpoint

    monkeypatch.setattr(checkpoint, "MAP_MIN_BYTES", 64)
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(100, 100)}, path)
    with open_checkpoint(path) as ckpt:
        os.truncate(path, path.stat().st_size - 1000)
        with pytest.raises(CheckpointError, match="x.safetensors: file ended while reading tensor a; it was truncated"):
            ckpt.get("a")


def test_read_into_fills_a_buffer_with_stored_bytes_and_refuses_what_is_not_there(tmp_path):
    """``read_into``: any byte range of a tensor's stored data into the caller's buffer; outside the tensor a
    ValueError; a file truncated after opening the same clear error as the other reads."""
    path = tmp_path / "x.safetensors"
    a = torch.arange(300, dtype=torch.float32).reshape(10, 30).to(torch.bfloat16)
    save_file({"a": a, "b": torch.ones(7)}, path)
    stored = a.reshape(-1).view(torch.uint8)
    with open_checkpoint(path) as ckpt:
        assert ckpt.reads_into("a") and ckpt.reads_into("b")
        for skip, size in [(0, 600), (2, 10), (598, 2), (100, 0)]:
            buffer = torch.full((size,), 255, dtype=torch.uint8)
            ckpt.read_into("a", skip, memoryview(buffer.numpy()))
            assert torch.equal(buffer, stored[skip : skip + size])
        with pytest.raises(ValueError):
            ckpt.read_into("a", 590, memoryview(bytearray(20)))
        os.truncate(path, path.stat().st_size - 300)
        with pytest.raises(CheckpointError, match="x.safetensors: file ended while reading tensor a; it was truncated"):
            ckpt.read_into("a", 0, memoryview(bytearray(600)))

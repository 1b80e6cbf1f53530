"""Writing outputs: streaming sharded safetensors, support files, model card; all inside an atomic folder.

Every output tensor's name, dtype and shape are known before the merge starts, so each shard's
header is written first and tensor bytes are appended as they are computed: memory never holds a
shard. The output is built in a temporary folder beside the destination and renamed into place
only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .checkpoint import SAFETENSORS_DTYPES, Checkpoint, TensorInfo
from .direct_write import SequentialDirectWriter, open_direct
from .errors import OutputError
from .progress import progress_bar

_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}

#: Tokenizer files copied from the tokenizer source when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "spm.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tekken.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class _Shard:
    file_name: str
    tensors: list[TensorInfo]
    header: bytes

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(infos: Iterable[TensorInfo], shard_size: int) -> list[list[TensorInfo]]:
    """Group tensors, in order, into shards of at most ``shard_size`` bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorInfo]] = []
    current: list[TensorInfo] = []
    size = 0
    for info in infos:
        if current and size + info.nbytes > shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(info)
        size += info.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def safetensors_header(tensors: list[TensorInfo], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding ``tensors`` in this order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for info in tensors:
        if info.dtype not in _DTYPE_CODES:
            raise OutputError(f"tensor {info.name}: dtype {info.dtype} cannot be stored in safetensors")
        header[info.name] = {"dtype": _DTYPE_CODES[info.dtype], "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


class ShardedSafetensorsWriter:
    """Writes tensors, in any order, straight to their planned offsets in pre-headed safetensors shards.

    Every tensor's shard and offset are known from the plan, so each write lands at its place
    (``os.pwrite``) and an executor may finish tensors in any order. A shard's SHA-256 is
    computed while writing when its tensors arrive in order, else read back once when it completes;
    ``digests=False`` skips it (a merged checkpoint lists none: ~0.5 ns per byte saved). While a shard's
    tensors arrive in order its bytes bypass the page cache (``direct_write``; ``direct=False``: never).
    """

    def __init__(self, folder: Path, infos: list[TensorInfo], shard_size: int, prefix: str = "model", metadata: dict[str, str] | None = None,
                 digests: bool = True, direct: bool = True):
        self.folder = Path(folder)
        self.hashing = digests
        self.direct = direct
        groups = plan_shards(infos, shard_size)
        count = len(groups)
        self.shards = [
            _Shard(
                f"{prefix}.safetensors" if count == 1 else f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors",
                group,
                safetensors_header(group, metadata),
            )
            for i, group in enumerate(groups)
        ]
        self.prefix = prefix
        #: name → (shard index, byte offset in the file, planned info)
        self._place: dict[str, tuple[int, int, TensorInfo]] = {}
        for i, shard in enumerate(self.shards):
            offset = len(shard.header)
            for info in shard.tensors:
                self._place[info.name] = (i, offset, info)
                offset += info.nbytes
        self._written: set[str] = set()
        self._left = [len(s.tensors) for s in self.shards]
        self._files: dict[int, int] = {}  # open shard → file descriptor
        self._hashes: dict[int, Any] = {}  # shard → running SHA-256 while its tensors come in order (None once not)
        self._in_order: dict[int, int | None] = {}  # shard → how many of its tensors arrived in order so far (None: not in order)
        self._streams: dict[int, SequentialDirectWriter] = {}  # open shard → its direct writes, while in order
        #: SHA-256 and size of every finished shard (none without ``digests``)
        self.digests: dict[str, tuple[str, int]] = {}

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor at its offset; it must have the planned dtype and shape, and come once."""
        if name not in self._place:
            raise OutputError(f"tensor {name}: not in the plan of this output")
        if name in self._written:
            raise OutputError(f"tensor {name}: written twice")
        index, offset, info = self._place[name]
        if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise OutputError(f"tensor {name}: expected {info.dtype} {list(info.shape)}, got {tensor.dtype} {list(tensor.shape)}")
        fd = self._files.get(index)
        if fd is None:
            fd = self._open(index)
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        data = flat.numpy()
        shard = self.shards[index]
        position = self._in_order[index]
        in_order = position is not None and position < len(shard.tensors) and shard.tensors[position].name == name
        self._in_order[index] = position + 1 if in_order and position is not None else None
        stream = self._streams.get(index)
        if stream is not None and in_order:
            self._guarded(index, stream.append, flat)
        else:
            if stream is not None:  # its bytes so far to the file; this tensor and the rest by pwrite
                self._guarded(index, self._streams.pop(index).spill)
            self._pwrite(fd, index, memoryview(data), offset)
        if self._hashes[index] is not None and in_order:
            self._hashes[index].update(data)
        else:
            self._hashes[index] = None
        self._written.add(name)
        self._left[index] -= 1
        if self._left[index] == 0:
            self._finish(index)

    def reserve(self) -> dict[str, "Placement"]:
        """Create every shard at its full size with its header, for tensors written by other processes
        (``write_at``): each tensor's file, byte offset and planned dtype and shape. Report each with
        ``written_elsewhere``; a shard's SHA-256 is read back once it is complete."""
        places: dict[str, Placement] = {}
        for index, shard in enumerate(self.shards):
            if not shard.tensors or index in self._files:
                continue
            fd = self._open(index)
            try:
                os.ftruncate(fd, len(shard.header) + shard.nbytes)
            except OSError as exc:
                raise OutputError(f"{self.folder / shard.file_name}: cannot reserve {len(shard.header) + shard.nbytes} bytes: {exc.strerror or exc}") from exc
            self._hashes[index] = None  # the bytes arrive from elsewhere: hashed by reading back
        for name, (index, offset, info) in self._place.items():
            places[name] = Placement(str(self.folder / self.shards[index].file_name), offset, info)
        return places

    def written_elsewhere(self, name: str) -> None:
        """Record that another process wrote a reserved tensor at its place."""
        if name not in self._place:
            raise OutputError(f"tensor {name}: not in the plan of this output")
        if name in self._written:
            raise OutputError(f"tensor {name}: written twice")
        index = self._place[name][0]
        self._hashes[index] = None
        self._written.add(name)
        self._left[index] -= 1
        if self._left[index] == 0:
            self._finish(index)

    def _open(self, index: int) -> int:
        shard = self.shards[index]
        path = self.folder / shard.file_name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        except OSError as exc:
            raise OutputError(f"{path}: cannot create: {exc.strerror or exc}") from exc
        self._files[index] = fd
        self._hashes[index] = hashlib.sha256(shard.header) if self.hashing else None
        self._in_order[index] = 0
        direct_fd = open_direct(path) if self.direct else None
        if direct_fd is None:
            self._pwrite(fd, index, memoryview(shard.header), 0)
        else:
            stream = self._streams[index] = SequentialDirectWriter(fd, direct_fd)
            self._guarded(index, stream.append, torch.frombuffer(bytearray(shard.header), dtype=torch.uint8))
        return fd

    def _guarded(self, index: int, write: Callable[..., None], *args: Any) -> None:
        """A direct-write step, its failure one line naming the shard."""
        try:
            write(*args)
        except OSError as exc:
            raise OutputError(f"{self.folder / self.shards[index].file_name}: write failed: {exc.strerror or exc}") from exc

    def _pwrite(self, fd: int, index: int, data: memoryview, offset: int) -> None:
        try:
            while len(data):
                done = os.pwrite(fd, data, offset)
                data, offset = data[done:], offset + done
        except OSError as exc:
            raise OutputError(f"{self.folder / self.shards[index].file_name}: write failed: {exc.strerror or exc}") from exc

    def _finish(self, index: int) -> None:
        shard = self.shards[index]
        stream = self._streams.pop(index, None)
        if stream is not None:
            self._guarded(index, stream.close)
        fd = self._files.pop(index)
        try:
            os.close(fd)
        except OSError as exc:
            raise OutputError(f"{self.folder / shard.file_name}: write failed: {exc.strerror or exc}") from exc
        digest = self._hashes.pop(index)
        if not self.hashing:
            return
        hexdigest = digest.hexdigest() if digest is not None else sha256_file(self.folder / shard.file_name)
        self.digests[shard.file_name] = (hexdigest, len(shard.header) + shard.nbytes)

    def close(self) -> None:
        """Check every planned tensor was written, write shards with no tensors at all, then the index if sharded."""
        missing = len(self._place) - len(self._written)
        if missing:
            raise OutputError(f"only {len(self._written)} of {len(self._place)} planned tensors were written")
        for shard in self.shards:
            if not shard.tensors:
                (self.folder / shard.file_name).write_bytes(shard.header)
                if self.hashing:
                    self.digests[shard.file_name] = (hashlib.sha256(shard.header).hexdigest(), len(shard.header))
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {t.name: s.file_name for s in self.shards for t in s.tensors},
            }
            write_json(self.folder / self.index_name, index)

    @property
    def index_name(self) -> str:
        return f"{self.prefix}.safetensors.index.json"

    @property
    def shard_of(self) -> dict[str, str]:
        """Which file each tensor is written to."""
        return {t.name: s.file_name for s in self.shards for t in s.tensors}

    def abort(self) -> None:
        """Close any shard still open (after a failure; the atomic folder removes the files)."""
        for stream in self._streams.values():
            stream.abandon()
        self._streams.clear()
        for fd in self._files.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._files.clear()


class BackgroundWrites:
    """Tensors handed to ``write(name, tensor)`` on one background thread, in the order given, while the caller
    computes the next ones: a merge costs about max(compute, write) instead of their sum (the write's copy into
    the page cache releases the GIL). At most ``limit`` bytes wait or are being written: beyond it, ``put`` waits
    for the oldest. A failed write is raised by the next ``put`` or by ``finish``; leaving the block on an error
    drops the writes not yet started and waits for the one under way (no write after the caller cleans up)."""

    def __init__(self, write: Callable[[str, torch.Tensor], None], limit: int):
        self._write = write
        self._limit = limit
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergekit-lite-writer")
        self._pending: deque[tuple[Future[None], int]] = deque()
        self._bytes = 0

    def put(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        while self._pending and (self._pending[0][0].done() or self._bytes + size > self._limit):
            self._wait_oldest()
        self._pending.append((self._pool.submit(self._write, name, tensor), size))
        self._bytes += size

    def finish(self) -> None:
        """Wait for every write handed over (raising the first failure)."""
        while self._pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, size = self._pending.popleft()
        self._bytes -= size
        future.result()

    def __enter__(self) -> "BackgroundWrites":
        return self

    def __exit__(self, *exc: object) -> None:
        for future, _ in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)


@dataclass(frozen=True)
class Placement:
    """Where one planned tensor goes: its shard file, the byte offset in it, its dtype and shape."""

    path: str
    offset: int
    info: TensorInfo


def write_at(place: Placement, tensor: torch.Tensor) -> None:
    """Write one tensor's bytes at its reserved place (another process owns the shard: ``reserve``)."""
    info = place.info
    if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
        raise OutputError(f"tensor {info.name}: expected {info.dtype} {list(info.shape)}, got {tensor.dtype} {list(tensor.shape)}")
    data = memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    try:
        fd = os.open(place.path, os.O_WRONLY)
    except OSError as exc:
        raise OutputError(f"{place.path}: cannot open the reserved shard: {exc.strerror or exc} (is the output folder on a file system every worker sees?)") from exc
    try:
        offset = place.offset
        while len(data):
            done = os.pwrite(fd, data, offset)
            data, offset = data[done:], offset + done
    except OSError as exc:
        raise OutputError(f"{place.path}: write failed: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


class AtomicFolder:
    """A temporary folder beside ``destination`` that replaces it only when the block completes.

    An existing destination is refused unless ``force``; on any failure the temporary folder is
    removed and the destination is left as it was. Temporary folders carry the writer's pid, so a
    later run removes those whose process died (a SIGKILL, a power cut) and, if a run died in the
    instant between moving the old output aside and moving the new one in, puts the old one back.
    """

    PREFIX = ".mergekit-lite-tmp-"

    def __init__(self, destination: str | os.PathLike[str], force: bool = False):
        self.destination = Path(destination).absolute()
        self.force = force
        self.path: Path | None = None

    @property
    def _work_prefix(self) -> str:
        return f"{self.PREFIX}{self.destination.name}.{os.getpid()}."

    def cleanup_stale(self) -> list[Path]:
        """Remove temporary folders of dead runs for this destination; restore an old output left aside."""
        dest, parent = self.destination, self.destination.parent
        removed: list[Path] = []
        if not parent.is_dir():
            return removed
        work, old = f"{self.PREFIX}{dest.name}.", f"{self.PREFIX}old.{dest.name}."
        for entry in parent.iterdir():
            for prefix, is_old in ((old, True), (work, False)):
                if not entry.name.startswith(prefix):
                    continue
                pid = entry.name[len(prefix) :].split(".")[0]
                if not pid.isdigit() or _alive(int(pid)):
                    break
                if is_old and not dest.exists() and (entry / dest.name).is_dir():
                    os.rename(entry / dest.name, dest)  # the new output never arrived: keep the old one
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
                break
        return removed

    def check(self) -> None:
        """Fail early if the destination cannot be used (after cleaning up after dead runs).

        A missing parent folder is fine when it can be created (``__enter__`` creates it, as mergekit does).
        """
        dest = self.destination
        existing = dest.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing != dest.parent:
            if not existing.is_dir():
                raise OutputError(f"{existing}: is not a folder, so the output's parent {dest.parent} cannot be created")
            if not os.access(existing, os.W_OK):
                raise OutputError(f"{existing}: not writable, so the output's parent {dest.parent} cannot be created")
            return
        self.cleanup_stale()
        if dest.exists() and not self.force:
            raise OutputError(f"{dest}: already exists; pass --force to replace it (or choose another output folder)")
        if dest.exists() and not dest.is_dir():
            raise OutputError(f"{dest}: exists and is not a folder; refusing to replace it")
        if not dest.parent.is_dir():
            raise OutputError(f"{dest.parent}: the parent of the output is not a folder")
        if not os.access(dest.parent, os.W_OK):
            raise OutputError(f"{dest.parent}: not writable")

    def __enter__(self) -> Path:
        self.check()
        try:
            if not self.destination.parent.is_dir():
                self.destination.parent.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"{self.destination.parent}: cannot create the output's parent folder: {exc.strerror or exc}") from exc
        try:
            self.path = Path(tempfile.mkdtemp(prefix=self._work_prefix, dir=self.destination.parent))
        except OSError as exc:
            raise OutputError(f"{self.destination.parent}: cannot create a temporary folder: {exc.strerror or exc}") from exc
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)  # mkdtemp makes 0700; the output should look like any folder
        return self.path

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self.path is not None
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            self._replace()
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def _replace(self) -> None:
        assert self.path is not None
        dest = self.destination
        old: Path | None = None
        if dest.exists():
            if not self.force:
                raise OutputError(f"{dest}: appeared while the merge ran; pass --force to replace it")
            old = Path(tempfile.mkdtemp(prefix=f"{self.PREFIX}old.{dest.name}.{os.getpid()}.", dir=dest.parent))
            os.rename(dest, old / dest.name)
        os.rename(self.path, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists (a reused pid counts as alive: never remove a live run's folder)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sha256_file(path: Path, chunk: int = 16 * 2**20) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def copy_support_files(source: Path | None, destination: Path, names: Iterable[str]) -> list[str]:
    """Copy the named files that exist in ``source`` (config, tokenizer, ...) and return what was copied."""
    copied = []
    if source is None:
        return copied
    for name in names:
        src = source / name
        if src.is_file():
            shutil.copyfile(src, destination / name)
            copied.append(name)
    return copied


def write_config(config: dict[str, Any] | None, destination: Path, dtype: torch.dtype | None, updates: dict[str, Any] | None = None) -> None:
    """Write the base's config.json with the output dtype recorded (both spellings transformers reads) and ``updates`` applied."""
    if config is None:
        return
    config = {**config, **(updates or {})}
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        if "dtype" in config or "torch_dtype" not in config:
            config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    write_json(destination / "config.json", config)


def write_checkpoint(
    out_dir: str | os.PathLike[str],
    jobs: list[TensorInfo],
    produce: Callable[[TensorInfo], torch.Tensor],
    *,
    support_from: Checkpoint | None,
    tokenizer_from: Checkpoint | None,
    card: str | None,
    out_dtype: torch.dtype | None,
    shard_size: int,
    force: bool = False,
    progress: bool = True,
    description: str = "merging",
    extra_files: Path | None = None,
    config_updates: dict[str, Any] | None = None,
    finish: Callable[[Path], Any] | None = None,
    fill: Callable[["ShardedSafetensorsWriter"], None] | None = None,
) -> Path:
    """Write a Hugging Face checkpoint atomically, producing tensors one at a time in ``jobs`` order.

    ``finish(folder)`` runs after the support files are in the (temporary) folder and before the card
    (the merged product writes its tokenizer files, chat template and sentence-transformers modules there);
    ``fill(writer)``, when given, writes every tensor instead of ``produce`` (a distributed executor)."""
    folder = AtomicFolder(out_dir, force=force)
    total = sum(j.nbytes for j in jobs)
    with folder as tmp:
        writer = ShardedSafetensorsWriter(tmp, jobs, shard_size, digests=False)  # a checkpoint lists no digests
        try:
            if fill is not None:  # another executor writes the tensors (and shows its own progress)
                fill(writer)
            else:
                # each tensor written while the next is computed; at most the largest tensor's bytes wait
                with progress_bar(total, description, progress) as bar, BackgroundWrites(writer.write, max((j.nbytes for j in jobs), default=0)) as writes:
                    for info in jobs:
                        writes.put(info.name, produce(info))
                        bar.update(info.nbytes)
                    writes.finish()
            writer.close()
        except OSError as exc:
            raise OutputError(f"{out_dir}: failed while writing: {exc.strerror or exc}; nothing was written") from exc
        finally:
            writer.abort()
        try:
            if support_from is not None:
                write_config(support_from.config, tmp, out_dtype, config_updates)
                copy_support_files(support_from.folder, tmp, ["generation_config.json"])
            if tokenizer_from is not None:
                copy_support_files(tokenizer_from.folder, tmp, TOKENIZER_FILES)
            if extra_files is not None:
                copy_support_files(extra_files, tmp, sorted(p.name for p in extra_files.iterdir() if p.is_file()))
            if finish is not None:
                finish(tmp)
            if card is not None:
                (tmp / "README.md").write_text(card, encoding="utf-8", errors="backslashreplace")
        except OSError as exc:
            raise OutputError(f"{out_dir}: could not write support files: {exc}") from exc
    return folder.destination

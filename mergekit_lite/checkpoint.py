"""Lazy checkpoint reading: names, shapes and dtypes from headers up front; tensor bytes on demand.

Reads Hugging Face folders (model.safetensors, sharded safetensors with an index, legacy
pytorch_model.bin and its sharded index), a single .safetensors/.bin file, or a hub id resolved
through huggingface_hub's cache (honouring HF_HUB_OFFLINE). Pickles are only ever loaded with
``weights_only=True``.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import CheckpointError
from .text import one_line

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}

_SUPPORTED_DTYPES = frozenset(SAFETENSORS_DTYPES.values())

#: Files worth fetching from a hub repository: weights, configs, tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja", "*.tiktoken"]

#: Names of input-embedding tensors that a tied ``lm_head.weight`` stands for.
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

#: Largest dimension, element count or byte offset a header may state (torch and file offsets are signed 64-bit).
_MAX_INT64 = 2**63 - 1
#: Most dimensions a header may give a tensor (real ones have 0-5; a million would take minutes to check).
_MAX_DIMS = 1024


def _bounded_nbytes(shape: tuple[int, ...], itemsize: int) -> int | None:
    """Bytes of a tensor of ``shape``, or None when beyond ``_MAX_INT64`` (stops early: never a huge product)."""
    if 0 in shape:
        return 0
    total = itemsize
    for d in shape:
        total *= d
        if total > _MAX_INT64:
            return None
    return total


def _show(value: object) -> str:
    """A name, reference or path for a one-line message (line breaks and control characters escaped)."""
    return one_line(str(value))


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, escaped and shortened for a one-line error."""
    lines = str(exc).strip().splitlines()
    text = _show(lines[0] if lines else type(exc).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exists(path: Path) -> bool:
    """``path.exists()``, but a path the OS cannot even look up (name too long, ...) is an error naming it."""
    try:
        return path.exists()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{_show(path)}: cannot be looked up ({_first_line(exc)})") from None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{_show(path)}: cannot be looked up ({_first_line(exc)})") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a key given twice would silently keep only the last entry."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {_show(key)!r} appears twice")
        out[key] = value
    return out


def _loads(text: str | bytes, *, unique_keys: bool = True) -> Any:
    """``json.loads`` that refuses duplicate keys (unless ``unique_keys`` is false); every failure is a
    ValueError with a one-line message.

    Besides JSONDecodeError, the json module raises RecursionError for deeply nested input and
    ValueError for integers of more than 4300 digits; both are turned into ValueError here.
    """
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys if unique_keys else None)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start})") from None
    except ValueError as exc:  # JSONDecodeError, duplicate keys, huge integers
        raise ValueError(_first_line(exc)) from None


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def split_revision(ref: str) -> tuple[str, str | None]:
    """Split ``org/name@revision`` into its parts (local paths that exist are never split)."""
    if "@" in ref and not os.path.exists(ref):
        name, _, revision = ref.rpartition("@")
        return name, revision or None
    return ref, None


def looks_like_hub_id(ref: str) -> bool:
    """True for ``org/name`` strings that could name a hub repository (not ./x, /x or x/y/z)."""
    return bool(_HUB_ID.match(ref)) and not ref.startswith(".")


def resolve_reference(ref: str) -> Path:
    """Turn a recipe's model reference into a local path: an existing path, or a hub id from the cache/hub."""
    name, revision = split_revision(ref)
    try:
        path = Path(name).expanduser()
    except RuntimeError:  # ~user of a user that does not exist
        path = Path(name)
    if _exists(path):
        if revision:
            raise CheckpointError(f"{_show(ref)}: a revision (@{_show(revision)}) only applies to hub ids, but {_show(name)} is a local path")
        return path
    if not looks_like_hub_id(name):
        raise CheckpointError(f"{_show(ref)}: no such file or folder, and not a hub id of the form org/name[@revision]")
    return download_from_hub(name, revision)


def download_from_hub(repo_id: str, revision: str | None, patterns: list[str] | None = None, label: str | None = None) -> Path:
    """Resolve a hub repository to its local snapshot folder (the cache first; offline mode is honoured).

    ``patterns``: the files to fetch (default: a checkpoint's); ``label``: how messages name the reference.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    shown = label or f"{_show(repo_id)}{'@' + _show(revision) if revision else ''}"
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns or HUB_PATTERNS)
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"{shown}: not a local path and not in the Hugging Face cache "
            "(offline or unreachable hub); download it first or give a local folder"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"{shown}: could not fetch from the hub: {_first_line(exc)}") from exc
    return Path(folder)


class Checkpoint:
    """One checkpoint opened lazily. ``names``/``info`` come from headers; ``get`` reads one tensor."""

    def __init__(self, ref: str, folder: Path | None, shards: dict[str, Path], config: dict[str, Any] | None):
        self.ref = ref
        self.folder = folder
        self.config = config
        self._shard_of: dict[str, Path] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._handles: dict[Path, Any] = {}
        self._window: tuple[str, int, int, torch.Tensor] | None = None  # rows_as: (tensor, first row, end row, its rows)
        self._load_headers(shards)
        self._aliases = self._tied_aliases()

    # -- opening ---------------------------------------------------------------------------
    def _load_headers(self, shards: dict[str, Path]) -> None:
        """Read every shard's header; ``shards`` maps a tensor name to its file ('*' = every tensor of the file)."""
        files = sorted(set(shards.values()), key=str)
        for file in files:
            if not _is_file(file):
                if _exists(file):
                    raise CheckpointError(f"{_show(file)}: not a regular file (a folder, pipe or device); a weight file of {_show(self.ref)} must be a file")
                raise CheckpointError(f"{_show(file)}: shard listed in the index of {_show(self.ref)} is missing; re-download the checkpoint")
            reader = _open_weight_file(file)
            self._handles[file] = reader
            for name in reader.keys():
                listed = shards.get(name, shards.get("*"))
                if listed is not None and listed != file:
                    continue  # the index says this tensor lives in another shard
                if name in self._infos:
                    raise CheckpointError(
                        f"{_show(file)}: tensor {_show(name)} also appears in {_show(self._shard_of[name])}; the checkpoint is inconsistent"
                    )
                self._infos[name] = reader.info(name)
                self._shard_of[name] = file
        missing = [n for n in shards if n != "*" and n not in self._infos]
        if missing:
            raise CheckpointError(
                f"{_show(self.ref)}: the index lists {len(missing)} tensor(s) not found in their shards (e.g. {_show(missing[0])}); "
                "re-download the checkpoint"
            )

    def _tied_aliases(self) -> dict[str, str]:
        """Map ``lm_head.weight`` to the input embedding when the config ties them and the file omits it."""
        if "lm_head.weight" in self._infos:
            return {}
        if not (self.config or {}).get("tie_word_embeddings", False):
            return {}
        embeddings = [n for n in self._infos if n.endswith(_EMBEDDING_SUFFIXES)]
        return {"lm_head.weight": embeddings[0]} if len(embeddings) == 1 else {}

    @property
    def ties_embeddings(self) -> bool:
        return bool((self.config or {}).get("tie_word_embeddings", False))

    # -- querying --------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Tensor names stored in the checkpoint, in file order."""
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos or name in self._aliases

    def info(self, name: str) -> TensorInfo:
        real = self._aliases.get(name, name)
        if real not in self._infos:
            raise CheckpointError(f"{_show(self.ref)}: has no tensor {_show(name)}")
        info = self._infos[real]
        return TensorInfo(name, info.dtype, info.shape)

    def file_of(self, name: str) -> Path:
        return self._shard_of[self._aliases.get(name, name)]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (CPU, stored dtype)."""
        real = self._aliases.get(name, name)
        file = self._shard_of.get(real)
        if file is None:
            raise CheckpointError(f"{_show(self.ref)}: has no tensor {_show(name)}")
        try:
            return self._handles[file].get(real)
        except OSError as exc:
            raise CheckpointError(f"{_show(file)}: could not read tensor {_show(real)}: {_first_line(exc)}; the file may be truncated or corrupt") from exc

    #: ``get_rows`` reads just those rows, with the same values as the rows of ``get``
    row_reads = True

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one tensor along its first dimension (CPU, stored dtype), reading only those bytes."""
        real = self._aliases.get(name, name)
        file = self._shard_of.get(real)
        if file is None:
            raise CheckpointError(f"{_show(self.ref)}: has no tensor {_show(name)}")
        try:
            return self._handles[file].get_rows(real, start, stop)
        except OSError as exc:
            raise CheckpointError(f"{_show(file)}: could not read tensor {_show(real)}: {_first_line(exc)}; the file may be truncated or corrupt") from exc

    def rows_as(self, name: str, start: int, stop: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of one tensor converted to ``dtype`` on ``device`` (or into ``out``: that dtype, device
        and shape): a new tensor the caller owns. Consecutive row ranges of a mapped tensor come from one window of
        ROW_WINDOW_BYTES mapped at once, not a mapping per call (each mapping made and dropped costs ~0.1 ms here)."""
        rows = self._window_rows(name, start, stop) if self.row_reads else None
        if rows is None:
            rows = self.get_rows(name, start, stop)
        return rows.to(device=device, dtype=dtype, copy=True) if out is None else out.copy_(rows)

    def _window_rows(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        """Rows [start, stop) as a view of the current window (mapped anew when they fall outside it; the last
        window goes first), None where the rows are read on their own (small tensors, long ranges, unmapped files).
        The view is shared with later calls: never handed out unconverted."""
        real = self._aliases.get(name, name)
        file = self._shard_of.get(real)
        info = self._infos.get(real)
        if file is None or info is None or not info.shape or info.shape[0] == 0 or not self._handles[file].maps_rows:
            return None
        rows = info.shape[0]
        row_bytes = info.nbytes // rows
        start, stop = max(0, min(start, rows)), max(0, min(stop, rows))
        if stop <= start or row_bytes == 0 or info.nbytes < MAP_MIN_BYTES or (stop - start) * row_bytes > ROW_WINDOW_BYTES:
            return None
        window = self._window
        if window is None or window[0] != real or not (window[1] <= start and stop <= window[2]):
            self._window = None
            last = min(rows, max(stop, start + ROW_WINDOW_BYTES // row_bytes))
            window = self._window = (real, start, last, self.get_rows(real, start, last))
        return window[3][start - window[1] : stop - window[1]]

    def reads_into(self, name: str) -> bool:
        """Whether ``read_into`` can serve this tensor (a safetensors file's; not a pickled .bin's)."""
        file = self._shard_of.get(self._aliases.get(name, name))
        return file is not None and getattr(self._handles[file], "reads_into", False)

    def file_span(self, name: str) -> tuple[int, int]:
        """(open file descriptor, byte position of the tensor's data) for a reader that reads the stored bytes itself
        (the native kernel; see ``reads_into``). The descriptor stays the checkpoint's: valid until it is closed."""
        real = self._aliases.get(name, name)
        return self._handles[self._shard_of[real]].span(real)

    def read_into(self, name: str, skip: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with one tensor's stored bytes from ``skip`` bytes into its data (see ``reads_into``)."""
        real = self._aliases.get(name, name)
        file = self._shard_of[real]
        try:
            self._handles[file].read_into(real, skip, buffer)
        except OSError as exc:
            raise CheckpointError(f"{_show(file)}: could not read tensor {_show(real)}: {_first_line(exc)}; the file may be truncated or corrupt") from exc

    def advise(self, name: str) -> None:
        """Ask the kernel to start reading one tensor's bytes into the page cache (returns at once; no memory of ours)."""
        real = self._aliases.get(name, name)
        file = self._shard_of.get(real)
        if file is not None:
            self._handles[file].advise(real)

    @property
    def weight_files(self) -> list[Path]:
        return sorted(self._handles, key=str)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def close(self) -> None:
        self._window = None
        for reader in self._handles.values():
            reader.close()
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.ref!r}, {len(self._infos)} tensors)"


# -- weight file readers ------------------------------------------------------------------------
#: reads of at least this many bytes are mapped (copy-on-write) instead of copied: converting straight from the
#: page cache skips the copy into fresh memory and its page faults (a 65 MB bfloat16 tensor read and converted to
#: float32: 43 ms with pread, 10 ms mapped); smaller reads use pread (a mapping costs two system calls)
MAP_MIN_BYTES = 1 << 20
#: ``Checkpoint.rows_as`` maps this many bytes of a tensor's rows at once and serves the row chunks inside from that
#: mapping: converting 250M bfloat16 entries in 2^20-entry chunks, a mapping per chunk 0.39 ns per entry, 8 MiB
#: windows 0.27, 32 MiB 0.27, the whole tensor 0.25 (dropping a touched mapping costs ~0.1 ms on this VM). Each
#: checkpoint holds one window: (K + 1) × 16 MiB of mapped pages more in RSS at most.
ROW_WINDOW_BYTES = 16 << 20
#: points of a file probed for being in the page cache before its first advice
CACHE_PROBES = 16


def _cached(fd: int, start: int, stop: int) -> bool:
    """Whether bytes spread evenly over [start, stop) (CACHE_PROBES of them, the last included) are in the page cache:
    a read that must not wait (``RWF_NOWAIT``) gets each. False where it cannot tell (no ``RWF_NOWAIT``, a file
    system without it)."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None or stop <= start:
        return False
    probe = bytearray(1)
    points = {start + (stop - 1 - start) * i // (CACHE_PROBES - 1) for i in range(CACHE_PROBES)}
    try:
        return all(os.preadv(fd, [probe], at, flag) == 1 for at in sorted(points))
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: cannot tell
        return False


class _SafetensorsFile:
    """Header-first reader over one .safetensors file: each read a new tensor, mapped on its own (≥ MAP_MIN_BYTES) or
    read with pread into fresh memory.

    safetensors' own ``safe_open`` hands out views on one private memory map of the file: the pages it touches
    stay resident while the file is open (RSS grows with the model; measured: reading 512 MB through it
    -> +517 MB RSS), and an in-place change to one returned tensor shows up in the next read of the
    same name. A mapping per read, owned by the tensor made on it, goes when the tensor goes: memory stays flat.
    """

    MAX_HEADER = 100 * 2**20  # the safetensors format's own limit
    maps_rows = True  # get_rows of ≥ MAP_MIN_BYTES is a mapping, not a copy: worth serving row chunks from a window
    reads_into = True  # read_into: stored bytes straight into a caller's buffer

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._warm: bool | None = None  # whether the file's bytes were in the page cache at the first advice
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"{_show(path)}: cannot be opened ({_first_line(exc)})") from exc
        try:
            self._infos, self._offsets, self._data_start = self._parse_header()
        except BaseException:
            self.close()
            raise

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{_show(self.path)}: not a valid safetensors file ({what}); it may be truncated or corrupt, download it again")

    def _parse_header(self) -> tuple[dict[str, TensorInfo], dict[str, tuple[int, int]], int]:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise self._fail("file shorter than the 8-byte header length")
        header_len = int.from_bytes(head, "little")
        if header_len > self.MAX_HEADER or 8 + header_len > size:
            raise self._fail(f"header length {header_len} is larger than the file ({size} bytes); the file is truncated")
        raw = os.pread(self._fd, header_len, 8)
        if len(raw) != header_len:
            raise self._fail(f"header is {header_len} bytes but only {len(raw)} could be read")
        try:
            header = _loads(raw)
        except ValueError as exc:
            raise self._fail(f"header is not valid JSON: {exc}") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not isinstance(metadata, dict):
            raise self._fail("__metadata__ is not a JSON object")
        data_start = 8 + header_len
        data_size = size - data_start
        infos: dict[str, TensorInfo] = {}
        offsets: dict[str, tuple[int, int]] = {}
        for name, entry in header.items():
            shown = _show(name)
            if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or not isinstance(entry.get("shape"), list):
                raise self._fail(f"entry for tensor {shown} is malformed")
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise self._fail(f"tensor {shown} has dtype {_show(entry['dtype'])[:40]!r}, which is not a safetensors dtype")
            span = entry.get("data_offsets")
            if not isinstance(span, list) or len(span) != 2:
                raise self._fail(f"entry for tensor {shown} is malformed")
            if len(entry["shape"]) > _MAX_DIMS:
                raise self._fail(f"tensor {shown} has {len(entry['shape'])} dimensions (at most {_MAX_DIMS})")
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            begin, end = span
            ints = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_INT64 for v in (*shape, begin, end))
            if not ints:
                raise self._fail(f"entry for tensor {shown} has an invalid shape or offsets")
            info = TensorInfo(name, dtype, shape)
            nbytes = _bounded_nbytes(shape, dtype.itemsize)
            if nbytes is None:
                raise self._fail(f"tensor {shown}: shape {_show(list(shape[:8]))[:200]}{'...' if len(shape) > 8 else ''} is too large to exist")
            if end - begin != nbytes:
                raise self._fail(
                    f"tensor {shown}: offsets [{begin}, {end}] do not match shape {_show(list(shape[:8]))[:200]}{'...' if len(shape) > 8 else ''} of {entry['dtype']}"
                )
            if end > data_size:
                raise CheckpointError(
                    f"{_show(self.path)}: file is truncated (tensor {shown} ends at byte {data_start + end}, the file has {size}); download it again"
                )
            infos[name], offsets[name] = info, (begin, end)
        covered = 0
        for begin, end in sorted(offsets.values()):
            if begin != covered:
                raise self._fail("tensor data offsets overlap or leave gaps")
            covered = end
        if covered != data_size:  # the format: the byte buffer is entirely indexed (no polyglot files)
            raise self._fail(f"{data_size - covered} bytes after the last tensor's data are not covered by the header")
        return infos, offsets, data_start

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def get(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        return self._read(name, info.shape, 0, info.nbytes)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        info = self._infos[name]
        if not info.shape:
            return self.get(name)
        rows = info.shape[0]
        start, stop = max(0, min(start, rows)), max(0, min(stop, rows))
        stop = max(start, stop)
        row_bytes = info.nbytes // rows if rows else 0
        return self._read(name, (stop - start, *info.shape[1:]), start * row_bytes, (stop - start) * row_bytes)

    def advise(self, name: str) -> None:
        info = self._infos[name]
        if self._fd is None or not info.nbytes or not hasattr(os, "posix_fadvise"):
            return
        if self._warm is None:  # decided once: per tensor, the advice's system call alone cost ~60 µs of the main thread
            self._warm = _cached(self._fd, self._data_start, os.fstat(self._fd).st_size)
        if self._warm:  # already read: advice would only walk the cache
            return
        try:
            os.posix_fadvise(self._fd, self._data_start + self._offsets[name][0], info.nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:  # advice only: a file system that refuses it reads the same bytes later
            pass

    def _read(self, name: str, shape: tuple[int, ...], skip: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` of tensor ``name`` from ``skip`` bytes into its data, as a new tensor of ``shape``."""
        info = self._infos[name]
        begin, _ = self._offsets[name]
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        if self._fd is None:
            raise CheckpointError(f"{_show(self.path)}: already closed")
        position = self._data_start + begin + skip
        if nbytes >= MAP_MIN_BYTES and position % info.dtype.itemsize == 0:
            mapped = self._mapped(name, position, nbytes)
            if mapped is not None:
                return torch.frombuffer(mapped[0], dtype=info.dtype, offset=mapped[1], count=nbytes // info.dtype.itemsize).view(shape)
        tensor = torch.empty(shape, dtype=info.dtype)
        self._read_exactly(name, position, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        return tensor

    def read_into(self, name: str, skip: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with tensor ``name``'s stored bytes from ``skip`` bytes into its data (no new memory)."""
        begin, end = self._offsets[name]
        if skip < 0 or begin + skip + len(buffer) > end:
            raise ValueError(f"bytes [{skip}, {skip + len(buffer)}) are outside tensor {name}")
        if self._fd is None:
            raise CheckpointError(f"{_show(self.path)}: already closed")
        self._read_exactly(name, self._data_start + begin + skip, buffer)

    def span(self, name: str) -> tuple[int, int]:
        if self._fd is None:
            raise CheckpointError(f"{_show(self.path)}: already closed")
        return self._fd, self._data_start + self._offsets[name][0]

    def _read_exactly(self, name: str, position: int, buffer: memoryview) -> None:
        assert self._fd is not None
        done = 0
        while done < len(buffer):
            n = os.preadv(self._fd, [buffer[done:]], position + done)
            if n <= 0:
                raise CheckpointError(f"{_show(self.path)}: file ended while reading tensor {_show(name)}; it was truncated after opening")
            done += n

    def _mapped(self, name: str, position: int, nbytes: int) -> tuple[mmap.mmap, int] | None:
        """A private copy-on-write mapping of the bytes [position, position + nbytes) and their offset in it; None
        where the file cannot be mapped (the caller reads it instead). The tensor made on it owns the mapping:
        unmapped when the tensor goes, changes to it never reach the file."""
        assert self._fd is not None
        if os.fstat(self._fd).st_size < position + nbytes:  # a mapped read past the end would kill the process (SIGBUS)
            raise CheckpointError(f"{_show(self.path)}: file ended while reading tensor {_show(name)}; it was truncated after opening")
        start = position - position % mmap.ALLOCATIONGRANULARITY
        try:
            return mmap.mmap(self._fd, position + nbytes - start, access=mmap.ACCESS_COPY, offset=start), position - start
        except (OSError, ValueError):  # a file system without mmap, or a descriptor that is not a regular file
            return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _TorchFile:
    """Reader over a legacy pytorch_model.bin, unpickled with weights_only=True and memory-mapped when possible."""

    def __init__(self, path: Path):
        import pickle

        self.path = path
        shown = _show(path)
        try:
            with warnings.catch_warnings():
                # torch warns (on stderr) about pickle protocols and storages of odd files before failing;
                # the failure itself is reported below, on one line
                warnings.simplefilter("ignore", UserWarning)
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc) and "zip" not in str(exc):
                        raise
                    state = torch.load(path, map_location="cpu", weights_only=True)  # pre-1.6 format: cannot be mapped
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{shown}: refused to unpickle (weights_only=True allows plain tensors only): {_first_line(exc)}") from exc
        except MemoryError:
            raise CheckpointError(f"{shown}: not a readable PyTorch checkpoint (it asks for more memory than there is); it may be corrupt") from None
        except Exception as exc:  # noqa: BLE001 - a corrupt pickle or zip raises nearly anything (EOFError, IndexError, KeyError, ...)
            detail = _first_line(exc)
            detail = type(exc).__name__ if detail == type(exc).__name__ else f"{type(exc).__name__}: {detail}"
            raise CheckpointError(f"{shown}: not a readable PyTorch checkpoint ({detail}); it may be truncated or corrupt") from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{shown}: expected a mapping of tensor names to tensors")
        for name, tensor in state.items():
            if not isinstance(name, str):
                raise CheckpointError(f"{shown}: tensor names must be text, found the key {_show(repr(name))[:80]}")
            if tensor.layout != torch.strided or tensor.is_quantized:
                raise CheckpointError(f"{shown}: tensor {_show(name)} is {'quantized' if tensor.is_quantized else str(tensor.layout)}; only dense tensors can be merged")
            if tensor.dtype not in _SUPPORTED_DTYPES:
                raise CheckpointError(f"{shown}: tensor {_show(name)} has dtype {tensor.dtype}, which cannot be merged or stored in safetensors")
        self._state: dict[str, torch.Tensor] = state

    def keys(self) -> list[str]:
        return list(self._state)

    def info(self, name: str) -> TensorInfo:
        t = self._state[name]
        return TensorInfo(name, t.dtype, tuple(t.shape))

    def get(self, name: str) -> torch.Tensor:
        return self._state[name].clone()

    maps_rows = False  # get_rows copies the rows out of the unpickled state

    def advise(self, name: str) -> None:
        """Nothing to do: the legacy file is unpickled (and memory-mapped) as a whole."""

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        tensor = self._state[name]
        return (tensor[start:stop] if tensor.dim() else tensor).clone()

    def close(self) -> None:
        self._state = {}


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _open_weight_file(path: Path) -> _SafetensorsFile | _TorchFile:
    if path.suffix == ".safetensors":
        return _SafetensorsFile(path)
    return _TorchFile(path)


#: One weight file's lazy reader (keys, info, get, close), for readers of other layouts (LoRA adapters).
open_weight_file = _open_weight_file


# -- entry point --------------------------------------------------------------------------------
def _read_json(path: Path, *, unique_keys: bool = True) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = _loads(f.read(), unique_keys=unique_keys)
    except OSError as exc:
        raise CheckpointError(f"{_show(path)}: cannot be read ({_first_line(exc)})") from exc
    except ValueError as exc:
        raise CheckpointError(f"{_show(path)}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{_show(path)}: expected a JSON object")
    return data


#: A JSON file that must hold an object, every failure a one-line CheckpointError naming it.
read_json_object = _read_json


def _index_shards(index_path: Path) -> dict[str, Path]:
    """Map each tensor of a sharded checkpoint's index to its shard file, refusing paths outside the folder."""
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{_show(index_path)}: has no 'weight_map' mapping; the index is not a Hugging Face index file")
    folder = index_path.parent.resolve()
    shards: dict[str, Path] = {}
    for name, file in weight_map.items():
        if (
            not isinstance(file, str) or not file or file in (".", "..") or os.path.isabs(file)
            or "/" in file or "\\" in file or "\0" in file
        ):
            raise CheckpointError(
                f"{_show(index_path)}: tensor {_show(name)} points at {_show(repr(file))[:200]}, which is not a file name inside the checkpoint folder"
            )
        if not file.endswith(_WEIGHT_SUFFIXES):
            raise CheckpointError(f"{_show(index_path)}: tensor {_show(name)} points at {_show(repr(file))[:200]}, which is not a weight file")
        shards[name] = folder / file
    return shards


def _folder_shards(folder: Path) -> dict[str, Path]:
    """Find the weights of a Hugging Face folder, preferring safetensors over legacy .bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if _is_file(folder / index_name):
            return _index_shards(folder / index_name)
    for file_name in ("model.safetensors", "pytorch_model.bin"):
        if _is_file(folder / file_name):
            return {"*": folder / file_name}
    if _is_file(folder / "adapter_config.json"):
        raise CheckpointError(
            f"{_show(folder)}: a PEFT adapter, not a full checkpoint; name it as a recipe model (on the recipe's base_model) "
            "or as BASE+ADAPTER"
        )
    singles = sorted(folder.glob("*.safetensors"))
    if len(singles) == 1:
        return {"*": singles[0]}
    raise CheckpointError(
        f"{_show(folder)}: not a checkpoint folder (no model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def open_checkpoint(ref: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint lazily from a folder, a weight file or a hub id (``org/name[@revision]``)."""
    ref = str(ref)
    path = resolve_reference(ref)
    if path.is_dir():
        folder: Path | None = path
        shards = _folder_shards(path)
    elif path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        folder = path.parent
        shards = {"*": path}
    else:
        raise CheckpointError(f"{_show(ref)}: not a checkpoint (expected a folder, a .safetensors or a .bin file)")
    config_path = folder / "config.json" if folder else None
    # config.json is read as transformers reads it (a repeated key keeps the last value); weight indexes must be unambiguous
    config = _read_json(config_path, unique_keys=False) if config_path and _is_file(config_path) else None
    try:
        return Checkpoint(ref, folder, shards, config)
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"{_show(ref)}: cannot read: {_first_line(exc)}") from exc


def iter_tensors(checkpoint: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time, in file order."""
    for name in checkpoint.names:
        yield name, checkpoint.get(name)

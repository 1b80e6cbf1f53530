"""PEFT LoRA adapters as inputs: an adapter reads as the fine-tune θ = θ_0 + ΔW, one tensor at a time.

A recipe model may be an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
local or a hub id) trained on the recipe's base model, or mergekit's ``BASE+ADAPTER``. Its tensor
``<module>.weight`` is the base's plus s · B @ A (computed in place when asked for, from the two
small factors read lazily), every other tensor is the base's: so every method, TALL mask and
collection sees an ordinary checkpoint, and the fine-tuned model is never materialised. Only the
adapter file's headers are read when it is opened; every mismatch is found then, before any work.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from .checkpoint import Checkpoint, TensorInfo, open_checkpoint, open_weight_file, read_json_object, resolve_reference, split_revision
from .errors import CheckpointError
from .ops.lora import add_lora_, lora_scaling
from .text import one_line

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: A full checkpoint's weight files: a folder with one of these is a checkpoint even if it has an adapter config too.
_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
#: Every key of a PEFT adapter file starts with this (the PeftModel's wrapper of the base model).
_PREFIX = "base_model.model."
#: ``<module>.<part>[.<adapter name>][.weight|.bias]`` for the parts of a LoRA layer.
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>(?!(?:weight|bias)$)[^.]+))?(?:\.(?P<kind>weight|bias))?$"
)

CheckpointLike = Union[Checkpoint, str, os.PathLike]


def _show(value: object) -> str:
    return one_line(str(value))


@dataclass
class _Term:
    """One change to a base tensor: s · B @ A (``vector`` None) or s · a bias vector (``vector`` its key)."""

    scaling: float
    lora_a: str | None = None
    lora_b: str | None = None
    transposed: bool = False
    vector: str | None = None


@dataclass
class _Edit:
    """What the adapter does to one base tensor: replace it (modules to save) and/or add terms."""

    replace: str | None = None
    terms: list[_Term] = field(default_factory=list)


def split_adapter_reference(ref: str) -> tuple[str, str] | None:
    """mergekit's ``BASE+ADAPTER`` → (BASE, ADAPTER); None for anything else (an existing path is never split)."""
    if "+" not in ref or os.path.exists(split_revision(ref)[0]):
        return None
    parts = ref.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        return None
    return parts[0].strip(), parts[1].strip()


def is_adapter_folder(path: Path) -> bool:
    """A folder with ``adapter_config.json`` and no full checkpoint's weight files."""
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not any((path / f).is_file() for f in _MODEL_FILES)


def is_adapter_reference(ref: str) -> bool:
    """Whether a recipe reference names a LoRA adapter: ``BASE+ADAPTER``, or an adapter folder (local or hub)."""
    if split_adapter_reference(ref) is not None:
        return True
    try:
        return is_adapter_folder(resolve_reference(ref))
    except CheckpointError:
        return False


def open_model(ref: str | os.PathLike[str], base: CheckpointLike | None = None) -> Checkpoint:
    """Open a recipe's model reference: a checkpoint, ``BASE+ADAPTER``, or an adapter on ``base``."""
    ref = str(ref)
    split = split_adapter_reference(ref)
    if split is not None:
        base_ckpt = open_checkpoint(split[0])
        try:
            return AdapterCheckpoint(split[1], base_ckpt, owns_base=True, shown=ref)
        except BaseException:
            base_ckpt.close()
            raise
    path = resolve_reference(ref)
    if not is_adapter_folder(path):
        return open_checkpoint(ref)
    if base is None:
        raise CheckpointError(
            f"{_show(ref)}: a LoRA adapter needs the base model it was trained on; set base_model in the recipe, or write BASE+{_show(ref)}"
        )
    if isinstance(base, Checkpoint):
        return AdapterCheckpoint(ref, base, owns_base=False)
    base_ckpt = open_checkpoint(base)
    try:
        return AdapterCheckpoint(ref, base_ckpt, owns_base=True)
    except BaseException:
        base_ckpt.close()
        raise


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json``, checked to be a plain LoRA adapter (other types and DoRA: one line naming them)."""
    path = folder / ADAPTER_CONFIG
    config = read_json_object(path)
    kind = config.get("peft_type")
    if not isinstance(kind, str) or kind.upper() != "LORA":
        raise CheckpointError(f"{_show(path)}: a PEFT adapter of type {_show(kind)!r}; only LoRA adapters can be merged")
    if config.get("use_dora"):
        raise CheckpointError(f"{_show(path)}: a DoRA adapter (use_dora: true); only plain LoRA adapters can be merged (DoRA's ΔW depends on the weight's norm)")
    if config.get("layer_replication"):
        raise CheckpointError(f"{_show(path)}: layer_replication changes the model's layers; such adapters cannot be merged")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{_show(path)}: lora_alpha is {_show(alpha)!r}, not a number")
    for key in ("alpha_pattern", "rank_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise CheckpointError(f"{_show(path)}: {key} is not a mapping of module patterns to numbers")
    return config


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern P with ``(.*\\.)?(P)$`` matching the module's name."""
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except re.error:
            if module == pattern or module.endswith("." + pattern):
                return value
    return default


class AdapterCheckpoint(Checkpoint):
    """A LoRA adapter on its base, read as the fine-tuned checkpoint: the base's tensors, with ΔW added where it applies."""

    def __init__(self, adapter: str, base: Checkpoint, *, owns_base: bool = False, shown: str | None = None):
        self.ref = shown or str(adapter)
        self.base = base
        self.owns_base = owns_base
        folder = resolve_reference(str(adapter))
        if not folder.is_dir() or not (folder / ADAPTER_CONFIG).is_file():
            raise CheckpointError(f"{_show(adapter)}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
        self.folder = folder
        self.config = base.config  # the fine-tune's config is its base's
        self.adapter_config = read_adapter_config(folder)
        file = next((folder / f for f in ADAPTER_WEIGHTS if (folder / f).is_file()), None)
        if file is None:
            raise CheckpointError(f"{_show(folder)}: an adapter without weights (no {' or '.join(ADAPTER_WEIGHTS)}); download it again")
        self.file = file
        self._reader = open_weight_file(file)
        try:
            self._edits = self._read_edits()
        except BaseException:
            self._reader.close()
            raise

    # -- opening: the adapter file's keys → edits of base tensors, checked from the headers ----------------
    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{_show(self.file)}: {what}")

    def _read_edits(self) -> dict[str, _Edit]:
        keys = self._reader.keys()
        if not keys:
            raise self._fail("the adapter has no weights")
        cfg = self.adapter_config
        alpha_pattern = cfg.get("alpha_pattern") or {}
        rslora = bool(cfg.get("use_rslora", False))
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        layers: dict[str, dict[str, str]] = {}  # module → part ("A", "B", "B.bias", "emb_A", "emb_B") → key
        edits: dict[str, _Edit] = {}
        for key in keys:
            info = self._reader.info(key)
            if not info.is_float:
                raise self._fail(f"tensor {_show(key)} is {info.dtype}, not floating point")
            name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            m = _LORA_KEY.match(name)
            if m is None:
                target = name.replace(".base_layer.", ".")
                if target not in self.base:
                    raise self._fail(f"tensor {_show(key)} is neither a LoRA factor nor a tensor of the base {_show(self.base.ref)} (no {_show(target)})")
                self._check_shape(key, target, info.shape, "a module to save")
                edits.setdefault(target, _Edit()).replace = key
                continue
            module, part, kind = m.group("module"), m.group("part"), m.group("kind")
            if part == "lora_magnitude_vector":
                raise self._fail(f"module {_show(module)} has a DoRA magnitude vector; only plain LoRA adapters can be merged")
            slot = {("lora_A", "weight"): "A", ("lora_B", "weight"): "B", ("lora_B", "bias"): "B.bias",
                    ("lora_embedding_A", None): "emb_A", ("lora_embedding_B", None): "emb_B"}.get((part, kind))
            if slot is None:
                raise self._fail(f"tensor {_show(key)} of module {_show(module)} is not a LoRA factor this reader knows")
            layers.setdefault(module, {})[slot] = key
        for module, parts in layers.items():
            embedding = "emb_A" in parts or "emb_B" in parts
            a, b = (parts.get("emb_A"), parts.get("emb_B")) if embedding else (parts.get("A"), parts.get("B"))
            if a is None or b is None:
                have, lacks = ("lora_A", "lora_B") if b is None else ("lora_B", "lora_A")
                raise self._fail(f"module {_show(module)} has {have} but no {lacks}")
            ia, ib = self._reader.info(a), self._reader.info(b)
            if len(ia.shape) != 2 or len(ib.shape) != 2:
                raise self._fail(f"module {_show(module)}: lora_A {list(ia.shape)} and lora_B {list(ib.shape)} are not matrices "
                                 "(convolution LoRA is not supported; only linear and embedding modules)")
            if ia.shape[0] != ib.shape[1]:
                raise self._fail(f"module {_show(module)}: lora_A {list(ia.shape)} and lora_B {list(ib.shape)} have different ranks")
            target = f"{module}.weight"
            if target not in self.base:
                raise self._fail(f"module {_show(module)} is not in the base {_show(self.base.ref)} (it has no tensor {_show(target)}); "
                                 "the adapter was trained on another model")
            base_shape = self.base.info(target).shape
            plain, flipped = (ib.shape[0], ia.shape[1]), (ia.shape[1], ib.shape[0])
            transposed = embedding or fan_in_fan_out
            if not embedding and fan_in_fan_out and tuple(base_shape) == plain and plain != flipped:
                transposed = False  # PEFT turns fan_in_fan_out off for an nn.Linear (a lm_head next to Conv1D layers)
            expected = flipped if transposed else plain
            if tuple(base_shape) != expected:
                raise self._fail(f"module {_show(module)}: lora_B @ lora_A gives {list(expected)}, but the base {_show(self.base.ref)} "
                                 f"has {_show(target)} {list(base_shape)}; the adapter was trained on another model")
            alpha = pattern_value(alpha_pattern, module, self.adapter_config.get("lora_alpha", 8))
            scaling = lora_scaling(float(alpha), int(ia.shape[0]), rslora)
            edits.setdefault(target, _Edit()).terms.append(_Term(scaling, a, b, transposed))
            if "B.bias" in parts:
                bias = f"{module}.bias"
                if bias not in self.base:
                    raise self._fail(f"module {_show(module)} has a LoRA bias but the base {_show(self.base.ref)} has no tensor {_show(bias)}")
                self._check_shape(parts["B.bias"], bias, self._reader.info(parts["B.bias"]).shape, "a LoRA bias")
                edits.setdefault(bias, _Edit()).terms.append(_Term(scaling, vector=parts["B.bias"]))
        return edits

    def _check_shape(self, key: str, target: str, shape: tuple[int, ...], what: str) -> None:
        base_shape = self.base.info(target).shape
        if tuple(shape) != tuple(base_shape):
            raise self._fail(f"tensor {_show(key)} ({what}) has shape {list(shape)}, the base {_show(self.base.ref)} has {_show(target)} "
                             f"{list(base_shape)} (a resized vocabulary cannot be merged as an adapter)")

    # -- the checkpoint interface: the base's names and shapes; tensors with ΔW added ---------------------
    @property
    def names(self) -> list[str]:
        return self.base.names

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    @property
    def ties_embeddings(self) -> bool:
        return self.base.ties_embeddings

    @property
    def edited(self) -> list[str]:
        """The base tensors the adapter changes."""
        return list(self._edits)

    def file_of(self, name: str) -> Path:
        return self.file if name in self._edits else self.base.file_of(name)

    def get(self, name: str) -> torch.Tensor:
        """θ_0 + ΔW for a tensor the adapter changes (in float32 at least: ΔW is not rounded to a bf16 base), else θ_0."""
        edit = self._edits.get(name)
        if edit is None:
            return self.base.get(name)
        stored = self._read(edit.replace) if edit.replace is not None else self.base.get(name)
        if not edit.terms:
            return stored
        dtype = torch.promote_types(stored.dtype, torch.float32)
        weight = stored.to(dtype)
        for term in edit.terms:
            if term.vector is not None:
                weight.add_(self._read(term.vector).to(dtype), alpha=term.scaling)
            else:
                assert term.lora_a is not None and term.lora_b is not None
                add_lora_(weight, self._read(term.lora_a), self._read(term.lora_b), term.scaling, term.transposed)
        return weight

    #: rows are not read on their own: ΔW's rows come from a product whose rounding may depend on its size
    row_reads = False

    def reads_into(self, name: str) -> bool:
        return False  # the stored bytes are the base's, not the adapted weight's

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        tensor = self.get(name)
        return tensor[start:stop].clone() if tensor.dim() else tensor

    def advise(self, name: str) -> None:
        self.base.advise(name)

    def _read(self, key: str) -> torch.Tensor:
        try:
            return self._reader.get(key)
        except OSError as exc:
            raise self._fail(f"could not read tensor {_show(key)}: {exc}; the file may be truncated") from exc

    @property
    def weight_files(self) -> list[Path]:
        return [self.file]

    @property
    def nbytes(self) -> int:
        return self.base.nbytes

    def close(self) -> None:
        self._reader.close()
        if self.owns_base:
            self.base.close()

    def __repr__(self) -> str:
        return f"AdapterCheckpoint({self.ref!r} on {self.base.ref!r}, {len(self._edits)} tensors changed)"

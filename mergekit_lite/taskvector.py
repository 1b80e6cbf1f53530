"""TaskVector: a lazy τ = θ_t − θ_0 over checkpoints on disk, with +, −, scalar * and apply_to.

In the spirit of mlfoundations/task_vectors, but nothing is loaded until a tensor is asked for:
a task vector is a linear combination of (fine-tune − base) pairs, evaluated one tensor at a time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Iterator, Union

import torch

from .adapter import open_model
from .checkpoint import Checkpoint, open_checkpoint
from .errors import CheckpointError
from .statedict import LazyStateDict

CheckpointLike = Union[Checkpoint, str, os.PathLike]


def _open(ckpt: CheckpointLike) -> Checkpoint:
    return ckpt if isinstance(ckpt, Checkpoint) else open_checkpoint(ckpt)


class TaskVector(Mapping):
    """Σ_i c_i (θ_i − θ_0) over the floating-point tensors of checkpoints on disk, computed per tensor on demand."""

    def __init__(self, finetuned: CheckpointLike, base: CheckpointLike, *, dtype: torch.dtype = torch.float32):
        """``finetuned``: a checkpoint, a LoRA adapter folder (read on ``base``) or BASE+ADAPTER."""
        b = _open(base)
        ft = finetuned if isinstance(finetuned, Checkpoint) else open_model(finetuned, b)
        self._terms: tuple[tuple[float, Checkpoint, Checkpoint], ...] = ((1.0, ft, b),)
        self.dtype = dtype
        self._names = _float_names(ft, b)

    @classmethod
    def _combine(cls, terms: tuple[tuple[float, Checkpoint, Checkpoint], ...], names: list[str], dtype: torch.dtype) -> "TaskVector":
        tv = cls.__new__(cls)
        tv._terms, tv._names, tv.dtype = terms, names, dtype
        return tv

    # -- Mapping: name -> tensor ---------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        total: torch.Tensor | None = None
        for coef, ft, base in self._terms:
            term = ft.get(name).to(self.dtype).sub_(base.get(name).to(self.dtype)).mul_(coef)
            total = term if total is None else total.add_(term)
        assert total is not None
        return total

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    # -- arithmetic ----------------------------------------------------------------------------
    def __add__(self, other: "TaskVector") -> "TaskVector":
        if not isinstance(other, TaskVector):
            return NotImplemented
        if set(self._names) != set(other._names):
            only = sorted(set(self._names) ^ set(other._names))
            raise CheckpointError(f"task vectors cover different tensors (e.g. {only[0]}); they are not from the same architecture")
        return TaskVector._combine(self._terms + other._terms, self._names, self.dtype)

    def __radd__(self, other: object) -> "TaskVector":
        if other == 0:  # so that sum([tv1, tv2, ...]) works
            return self
        return NotImplemented

    def __neg__(self) -> "TaskVector":
        return self * -1.0

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self + (-other)

    def __mul__(self, scale: float) -> "TaskVector":
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            return NotImplemented
        terms = tuple((coef * float(scale), ft, b) for coef, ft, b in self._terms)
        return TaskVector._combine(terms, self._names, self.dtype)

    __rmul__ = __mul__

    def __repr__(self) -> str:
        parts = " + ".join(f"{c:g}·({ft.ref} − {b.ref})" for c, ft, b in self._terms)
        return f"TaskVector({parts})"

    # -- using it ------------------------------------------------------------------------------
    def apply_to(self, base: CheckpointLike, scale: float = 1.0) -> "LazyStateDict":
        """θ = base + scale · τ, as a lazy state dict over ``base``'s tensors (non-float ones copied)."""
        b = _open(base)
        for name in self._names:
            if name not in b:
                raise CheckpointError(f"{b.ref}: has no tensor {name}, which the task vector changes")
            if b.info(name).shape != self._terms[0][1].info(name).shape:
                raise CheckpointError(f"{b.ref}: tensor {name} has another shape than in the task vector")
        from .card import front_matter

        tv, scale = self, float(scale)

        def compute(name: str) -> torch.Tensor:
            stored = b.get(name)
            if name not in tv:
                return stored
            return stored.to(tv.dtype).add_(tv[name], alpha=scale).to(stored.dtype)

        card = front_matter(b.ref, ["merge", "mergekit-lite"]) + f"# Merged model\n\n{self!r} applied with scale {scale:g}.\n"
        return LazyStateDict([b.info(n) for n in b.names], compute, support=b, card=card)


def _float_names(ft: Checkpoint, base: Checkpoint) -> list[str]:
    """Floating-point tensors both checkpoints have, checked for equal shapes."""
    names = []
    for name in base.names:
        info = base.info(name)
        if not info.is_float:
            continue
        if name not in ft:
            raise CheckpointError(f"{ft.ref}: has no tensor {name} (the base has it)")
        if ft.info(name).shape != info.shape:
            raise CheckpointError(f"{ft.ref}: tensor {name} has shape {list(ft.info(name).shape)}, the base has {list(info.shape)}")
        names.append(name)
    return names

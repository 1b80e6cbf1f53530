"""One lazy state dict: tensors computed on access, one at a time, written as a HF checkpoint on request.

Used for a task vector applied to a base, a task reconstructed from a collection, and the
candidate models the λ search hands to an evaluator.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .checkpoint import Checkpoint, TensorInfo
from .units import parse_size
from .writer import write_checkpoint


class LazyStateDict(Mapping):
    """Name → tensor, each computed by ``compute(name)`` when accessed; ``infos`` gives names, dtypes and shapes."""

    def __init__(
        self,
        infos: list[TensorInfo],
        compute: Callable[[str], torch.Tensor],
        *,
        support: Checkpoint | None = None,
        card: str | None = None,
        owned: Iterable[Checkpoint] = (),
    ):
        self.infos = infos
        self._by_name = {i.name: i for i in infos}
        self._compute = compute
        #: whose config, generation config and tokenizer a saved copy carries
        self.support = support
        self.card = card
        self._owned = list(owned)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._by_name:
            raise KeyError(name)
        return self._compute(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def info(self, name: str) -> TensorInfo:
        return self._by_name[name]

    def save_pretrained(
        self,
        out_dir: str | os.PathLike[str],
        *,
        shard_size: int | str = 5 * 10**9,
        out_dtype: torch.dtype | None = None,
        force: bool = False,
        progress: bool = False,
        description: str = "writing",
        extra_files: Path | None = None,
        finish: Callable[[Path], object] | None = None,
    ) -> Path:
        """Write these tensors as a Hugging Face checkpoint (config and tokenizer from ``support``), atomically;
        ``finish(folder)`` adds files to the (temporary) output folder before it is moved into place."""
        infos = [TensorInfo(i.name, out_dtype if (out_dtype is not None and i.is_float) else i.dtype, i.shape) for i in self.infos]
        return write_checkpoint(
            out_dir, infos, lambda info: self[info.name].to(info.dtype), support_from=self.support, tokenizer_from=self.support,
            card=self.card, out_dtype=out_dtype, shard_size=parse_size(shard_size), force=force, progress=progress,
            description=description, extra_files=extra_files, finish=finish,
        )

    def close(self) -> None:
        """Close the checkpoints this state dict reads from (when it owns them)."""
        for ckpt in self._owned:
            ckpt.close()

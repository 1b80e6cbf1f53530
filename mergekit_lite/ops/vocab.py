"""Re-mapping vocabulary rows (embeddings, output heads) onto an output vocabulary, token by token.

Each input has a map ``out id → its own row`` (-1 where its tokenizer lacks the token). An output row
is the input's own row when it has the token; otherwise a default row shared by every input:
a configured one (zero, a given row of a given input), else mergekit's rule for a token some inputs
lack — the only input that has it, else the base's row when the base has it, else the mean of the
inputs that have it (zero when none has it). Rows past the vocabulary (padding) are each input's
mean row. Pure tensor code: no tokenizers, no files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor


#: Tensors with one row per token (mergekit's architectures' ``vocabulary_axis: 0``), by the end of their name.
VOCABULARY_SUFFIXES = (
    "embed_tokens.weight", "tok_embeddings.weight", "word_embeddings.weight", "wte.weight", "embed_in.weight",
    "embed_out.weight", "lm_head.weight", "lm_head.bias", "lm_head.decoder.weight", "lm_head.linear.weight",
    "lm_head.linear.bias", "cls.predictions.decoder.weight", "cls.predictions.bias", "vocab_projector.weight",
    "vocab_projector.bias", "output_layer.weight",
)
#: ... and by their whole name, where the end alone would also name other tensors.
VOCABULARY_NAMES = ("output.weight", "shared.weight", "backbone.embeddings.weight")


def is_vocabulary_tensor(name: str) -> bool:
    """Whether a tensor has one row per token (embeddings, output heads and their biases)."""
    return name in VOCABULARY_NAMES or any(name == s or name.endswith("." + s) for s in VOCABULARY_SUFFIXES)


@dataclass(frozen=True)
class TokenRule:
    """A configured default for one output token: ``zero``, ``row`` (row ``row`` of input ``model``'s own
    tensor) or ``none`` (no source: an error if the token needs a default). ``force``: every input
    takes the default, even those that have the token."""

    kind: Literal["zero", "row", "none"]
    force: bool = False
    model: int = -1
    row: int = -1


@dataclass(frozen=True)
class RowPlan:
    """Where every output row of every input comes from (see the module docstring)."""

    own: Tensor          # [M, V] long: input m's own row for output token t, -1 where it takes the default
    default_slot: Tensor  # [V] long: t's position among the default rows, -1 where no default is needed
    part_slot: Tensor    # [P] long: default row each part adds to
    part_model: Tensor   # [P] long: input the part is read from
    part_row: Tensor     # [P] long: row of that input
    divisor: Tensor      # [K] float: a default row is the sum of its parts divided by this
    rows: int            # output rows: V, or more when padded

    @property
    def vocab_size(self) -> int:
        return int(self.own.shape[1])

    @property
    def inputs(self) -> int:
        return int(self.own.shape[0])

    def is_identity(self, input_rows: Sequence[int]) -> bool:
        """True when every input's output equals its own tensor (same tokens at the same ids, nothing padded)."""
        ids = torch.arange(self.vocab_size)
        return self.rows == self.vocab_size and all(r == self.rows for r in input_rows) and bool((self.own == ids).all())


def needs_default(maps: Tensor, forced: Tensor) -> Tensor:
    """[V] bool: output tokens that some input lacks, or that are forced to their configured default."""
    return (maps < 0).any(dim=0) | forced


def plan_rows(maps: Tensor, base: int | None, rules: Mapping[int, TokenRule], rows: int) -> RowPlan:
    """The row plan for inputs whose maps are ``maps`` [M, V] (-1: lacks the token); ``base`` is the base's
    position among them (None: no base among them); ``rules`` maps output ids to configured defaults."""
    if maps.dim() != 2 or maps.shape[0] < 1:
        raise ValueError(f"maps must be [inputs, vocabulary] with at least one input, got shape {tuple(maps.shape)}")
    m_count, v = maps.shape
    if rows < v:
        raise ValueError(f"rows ({rows}) must be at least the vocabulary size ({v})")
    if base is not None and not 0 <= base < m_count:
        raise ValueError(f"base must be an input position in [0, {m_count}), got {base}")
    maps = maps.long()
    present = maps >= 0
    forced = torch.zeros(v, dtype=torch.bool)
    for t, rule in rules.items():
        if not 0 <= t < v:
            raise ValueError(f"token id {t} is outside the vocabulary [0, {v})")
        forced[t] = rule.force
    need = needs_default(maps, forced)
    own = torch.where(present & ~forced, maps, torch.full_like(maps, -1))

    ruled = torch.zeros(v, dtype=torch.bool)
    ruled[list(rules)] = True
    needed = need.nonzero().flatten()
    default_slot = torch.full((v,), -1, dtype=torch.long)
    default_slot[needed] = torch.arange(len(needed))
    count = present.sum(dim=0)

    slots: list[Tensor] = []
    models: list[Tensor] = []
    sources: list[Tensor] = []
    divisor = torch.ones(len(needed), dtype=torch.float64)

    def add(ids: Tensor, model: Tensor) -> None:
        slots.append(default_slot[ids])
        models.append(model)
        sources.append(maps[model, ids])

    auto = need & ~ruled
    single = auto & (count == 1)
    ids = single.nonzero().flatten()
    add(ids, present[:, ids].long().argmax(dim=0))  # the only input that has it
    several = auto & (count >= 2)
    if base is not None:
        from_base = several & present[base]
        ids = from_base.nonzero().flatten()
        add(ids, torch.full_like(ids, base))
        several &= ~from_base
    for m in range(m_count):  # the mean of the inputs that have it
        ids = (several & present[m]).nonzero().flatten()
        add(ids, torch.full_like(ids, m))
    mean_ids = several.nonzero().flatten()
    divisor[default_slot[mean_ids]] = count[mean_ids].double()
    # auto tokens no input has: no part, a zero row
    for t, rule in rules.items():
        if not need[t]:
            continue
        if rule.kind == "none":
            raise ValueError(f"token id {t} needs a default row but its rule has no source")
        if rule.kind == "row":
            if not 0 <= rule.model < m_count:
                raise ValueError(f"token id {t}: rule input {rule.model} is not in [0, {m_count})")
            if rule.row < 0:
                raise ValueError(f"token id {t}: rule row {rule.row} is negative")
            slots.append(torch.tensor([default_slot[t]]))
            models.append(torch.tensor([rule.model]))
            sources.append(torch.tensor([rule.row]))
    cat = (lambda parts: torch.cat(parts).long()) if slots else (lambda parts: torch.zeros(0, dtype=torch.long))
    return RowPlan(own, default_slot, cat(slots), cat(models), cat(sources), divisor, rows)


def remap_rows(tensors: Sequence[Tensor], plan: RowPlan) -> list[Tensor]:
    """Each input tensor (rows first: [rows_m, ...]) re-mapped to ``plan.rows`` rows, in the promoted dtype."""
    if len(tensors) != plan.inputs:
        raise ValueError(f"expected {plan.inputs} tensors (one per input of the plan), got {len(tensors)}")
    rest = tensors[0].shape[1:]
    if any(t.dim() < 1 or t.shape[1:] != rest for t in tensors):
        raise ValueError(f"every tensor needs the same shape past the rows, got {[tuple(t.shape) for t in tensors]}")
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    device = tensors[0].device
    for m in range(plan.inputs):
        used = torch.cat([plan.own[m][plan.own[m] >= 0], plan.part_row[plan.part_model == m]])
        if len(used) and int(used.max()) >= tensors[m].shape[0]:
            raise ValueError(f"input {m} has {tensors[m].shape[0]} rows, but row {int(used.max())} is asked of it")
    k = len(plan.divisor)
    defaults = torch.zeros((k, *rest), dtype=dtype, device=device)
    for m in range(plan.inputs):
        pick = plan.part_model == m
        if bool(pick.any()):
            defaults.index_add_(0, plan.part_slot[pick].to(device), tensors[m][plan.part_row[pick].to(device)].to(dtype))
    defaults /= plan.divisor.to(device=device, dtype=dtype).reshape(k, *([1] * len(rest)))
    v = plan.vocab_size
    out = []
    for m in range(plan.inputs):
        own = plan.own[m].to(device)
        new = torch.empty((plan.rows, *rest), dtype=dtype, device=device)
        # one gather for every row (rows that take a default read row 0 here, then are overwritten)
        torch.index_select(tensors[m].to(dtype), 0, own.clamp(min=0), out=new[:v])
        lacks = (own < 0).nonzero().flatten()
        if len(lacks):
            new[lacks] = defaults[plan.default_slot.to(device)[lacks]]
        if plan.rows > v:
            new[v:] = new[:v].mean(dim=0)
        out.append(new)
    return out

"""The output vocabulary, with mergekit's semantics: which tokenizer the output gets, and for every input
model a map from output token ids to its own embedding rows.

Built when the recipe sets ``tokenizer_source`` (base | union | a model | a folder | a hub id) or a
``tokenizer:`` block, from the inputs' tokenizers loaded with transformers, before any weight is read:

* the base's tokenizer loses the tokens whose ids are past its embedding rows (config ``vocab_size``);
* ``base``: that tokenizer; a model, folder or hub id: its tokenizer as it is; ``union``: the base's,
  then every token of the other inputs it lacks (within their rows), regular tokens first, then added
  tokens with their own settings (special or not), inputs in recipe order;
* the keys of ``tokenizer.tokens`` it lacks are added as plain tokens;
* each input's map: output id → the id of the same token in its tokenizer (-1 when it lacks it, or the
  id is past its rows). An input without tokenizer files is taken to share the base's vocabulary.

The per-tensor rule for tokens some inputs lack is ``ops.vocab.plan_rows``; this module resolves the
recipe's per-token entries to it. Layering: used by the plan; the tokenizer files are written by products.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .checkpoint import Checkpoint, download_from_hub, looks_like_hub_id, split_revision
from .errors import CheckpointError, RecipeError
from .ops.vocab import VOCABULARY_NAMES, VOCABULARY_SUFFIXES, RowPlan, TokenRule, is_vocabulary_tensor, needs_default, plan_rows  # noqa: F401  (re-exported)
from .recipe import ModelTokenSource, Recipe, TokenizerOptions, ZeroSource, default_name
from .text import one_line, safe_repr

#: Files that make a folder's tokenizer loadable (tokenizer_config.json alone is not a tokenizer).
TOKENIZER_MODEL_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "spm.model",
    "vocab.txt",
    "vocab.json",
    "tekken.json",
)
#: What is fetched from the hub for a tokenizer-only source (no weights).
TOKENIZER_HUB_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]

def config_vocab_size(config: Mapping[str, Any] | None) -> int | None:
    """The embedding rows a config declares: ``vocab_size``, or ``text_config.vocab_size`` (multimodal models)."""
    config = config or {}
    for holder in (config, config.get("text_config")):
        value = holder.get("vocab_size") if isinstance(holder, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def has_tokenizer(folder: Path | None) -> bool:
    """Whether a folder holds a loadable tokenizer's vocabulary (tokenizer.json, a SentencePiece model, vocab files, ...)."""
    if folder is None:
        return False
    try:
        return any((folder / name).is_file() for name in TOKENIZER_MODEL_FILES) or any(folder.glob("*.tiktoken"))
    except OSError:
        return False


def resolve_tokenizer_folder(value: str, where: str = "tokenizer_source") -> Path:
    """A tokenizer source that is not an input of the merge: an existing folder, or a hub id from the
    Hugging Face cache (fetched if online: tokenizer and config files only, never weights)."""
    name, revision = split_revision(value)
    path = Path(name).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError):
        exists = False
    if exists:
        if revision:
            raise CheckpointError(f"{where}: {one_line(value)!r}: a revision (@...) only applies to hub ids, but {one_line(name)} is a local path")
        if not path.is_dir():
            raise CheckpointError(f"{where}: {one_line(value)!r} is a file; give the folder that holds the tokenizer files")
        return path
    if not looks_like_hub_id(name):
        raise CheckpointError(f"{where}: {one_line(value)!r}: no such folder, and not a hub id of the form org/name[@revision]")
    return download_from_hub(name, revision, TOKENIZER_HUB_PATTERNS, label=f"{where}: {one_line(value)!r}")


def load_tokenizer(folder: Path, what: str) -> Any:
    """A transformers (fast) tokenizer from a folder; a one-line CheckpointError naming ``what`` if it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises whatever the files provoke (OSError, ValueError, KeyError, ...)
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{what}: the tokenizer in {one_line(str(folder))} cannot be loaded ({type(exc).__name__}: {one_line(detail)})") from None
    return tokenizer


def strip_to_rows(tokenizer: Any, rows: int, what: str) -> tuple[Any, int]:
    """The tokenizer without the tokens whose ids are ``rows`` or more (they have no embedding row), and how
    many were dropped. As mergekit, only a fast BPE tokenizer can be cut down this way."""
    vocab = tokenizer.get_vocab()
    unused = {token for token, i in vocab.items() if i >= rows}
    if not unused:
        return tokenizer, 0
    backend = getattr(tokenizer, "backend_tokenizer", None)
    data = json.loads(backend.to_str()) if backend is not None else None
    model = (data or {}).get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(
            f"{what}: its tokenizer has {len(unused)} token(s) past the {rows} embedding rows and is not a fast BPE tokenizer "
            f"({model.get('type') or 'not a fast tokenizer'}); it cannot be cut down to its rows (mergekit cannot either)"
        )
    from tokenizers import Tokenizer

    data["added_tokens"] = [t for t in data.get("added_tokens") or [] if t.get("id", 0) < rows]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if t not in unused}

    def kept(merge: Any) -> bool:  # neither its parts nor what it makes were dropped (mergekit checks the parts only)
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        return not any(p in unused for p in parts) and "".join(parts) not in unused

    model["merges"] = [m for m in model.get("merges") or [] if kept(m)]
    stripped = copy.deepcopy(tokenizer)
    stripped._tokenizer = Tokenizer.from_str(json.dumps(data))
    return stripped, len(unused)


@dataclass
class _Input:
    """One input model's tokenizer, as the vocabulary sees it."""

    name: str
    vocab: dict[str, int]   # token → id, as its tokenizer says (the base's: cut down to its rows)
    limit: int              # ids from here on have no embedding row
    tokenizer: Any = None   # None: no tokenizer files (the base's vocabulary is assumed)


@dataclass
class Vocabulary:
    """The output vocabulary and every input's map onto it (see the module docstring)."""

    settings: TokenizerOptions
    shown: str                      # where it comes from, for messages
    tokenizer: Any                  # the output tokenizer (transformers)
    tokens: list[str]               # output id → token
    rows: int                       # embedding rows of the output (the vocabulary, padded)
    maps: dict[int, torch.Tensor]   # checkpoint index → [len(tokens)] long: its row for each output token, -1 if it lacks it
    vocabs: dict[int, dict[str, int]]  # checkpoint index → its tokenizer's vocabulary (for model_token sources)
    names: dict[int, str]           # checkpoint index → the model's name, for messages
    refs: dict[str, int]            # input reference → checkpoint index
    recipe: Recipe
    copy_from: Path | None = None   # the output tokenizer is this folder's, unchanged: copy its files as they are
    source_folder: Path | None = None  # the folder the output tokenizer was built from
    added: int = 0                  # tokens added to the source tokenizer
    stripped: int = 0               # tokens cut from the base's tokenizer (past its rows)
    notes: list[str] = field(default_factory=list)
    remapped: list[str] = field(default_factory=list)  # tensors whose rows are re-mapped
    _plans: dict[Any, RowPlan | None] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def describe(self) -> str:
        """One line: where the vocabulary comes from, its size, its rows, and what is re-mapped."""
        pad = self.settings.pad_to_multiple_of
        text = f"{self.shown}: {self.size} tokens"
        if self.added:
            text += f" ({self.added} added)"
        if self.stripped:
            text += f" ({self.stripped} past the base's rows dropped)"
        text += f", {self.rows} embedding rows" + (f" (pad_to_multiple_of {pad})" if pad and self.rows != self.size else "")
        if self.remapped:
            text += f"; rows re-mapped per token in {', '.join(self.remapped)}"
        else:
            text += "; every input already has this vocabulary: rows are merged as they are"
        return text

    def config_updates(self, config: Mapping[str, Any] | None) -> dict[str, Any]:
        """The output config's vocabulary size (mergekit sets it whenever it builds a vocabulary)."""
        config = config or {}
        if isinstance(config.get("vocab_size"), int) or not isinstance(config.get("text_config"), dict):
            return {} if config.get("vocab_size") == self.rows else {"vocab_size": self.rows}
        text = dict(config["text_config"])
        if text.get("vocab_size") == self.rows:
            return {}
        text["vocab_size"] = self.rows
        return {"text_config": text}

    def row_plan(self, sources: Sequence[int], base: int | None, input_rows: Sequence[int], tensor: str) -> RowPlan | None:
        """How the rows of ``tensor`` are re-mapped for inputs ``sources`` (checkpoint indices, in the order
        they are read; ``base``: the base's position among them); None when nothing changes."""
        key = (tuple(sources), base, tuple(input_rows))
        if key not in self._plans:
            maps = torch.stack([self.maps[s] for s in sources])
            rules = self._rules(sources, maps, input_rows, tensor)
            plan = plan_rows(maps, base, rules, self.rows)
            self._plans[key] = None if plan.is_identity(input_rows) else plan
        plan = self._plans[key]
        if plan is not None and tensor not in self.remapped:
            self.remapped.append(tensor)
        return plan

    def _rules(self, sources: Sequence[int], maps: torch.Tensor, input_rows: Sequence[int], tensor: str) -> dict[int, TokenRule]:
        """The recipe's ``tokenizer.tokens`` entries resolved to rows of this tensor's inputs."""
        entries = self.settings.tokens or {}
        index = {token: i for i, token in enumerate(self.tokens)}
        forced = torch.zeros(len(self.tokens), dtype=torch.bool)
        for token, entry in entries.items():
            forced[index[token]] = entry.force
        need = needs_default(maps, forced)
        rules: dict[int, TokenRule] = {}
        for token, entry in entries.items():
            t = index[token]
            where = f"tokenizer.tokens[{safe_repr(token, 60)}]"
            source = entry.source
            if source is None:
                if need[t]:
                    why = "it is forced" if entry.force else ("no input has this token" if bool((maps[:, t] < 0).all()) else
                                                             f"{', '.join(self._lacking(sources, maps, t))} lack(s) it")
                    raise RecipeError(f"{where}: needs a source for {tensor} ({why}): a model, {{kind: model_token, ...}} or {{kind: zero}}")
                rules[t] = TokenRule("none", entry.force)
                continue
            if isinstance(source, ZeroSource):
                rules[t] = TokenRule("zero", entry.force)
                continue
            ref = source.model if isinstance(source, ModelTokenSource) else source
            ckpt = self.refs.get(self.recipe.input_reference(ref) or ref)
            if ckpt is None or ckpt not in sources:
                if not need[t]:
                    continue
                shown = self.names[ckpt] if ckpt is not None else one_line(ref)
                raise RecipeError(f"{where}: its source {shown!r} is not an input of {tensor}; choose one of "
                                  f"{', '.join(self.names[s] for s in sources)}")
            pos = list(sources).index(ckpt)
            if isinstance(source, ModelTokenSource):
                if source.token is not None:
                    row = self.vocabs[ckpt].get(source.token)
                    if row is None:
                        raise RecipeError(f"{where}.source.token: {self.names[ckpt]!r} has no token {safe_repr(source.token, 60)} in its tokenizer")
                else:
                    row = int(source.token_id)  # type: ignore[arg-type]
                if row >= input_rows[pos]:
                    raise RecipeError(f"{where}.source: row {row} is past the {input_rows[pos]} rows of {tensor} in {self.names[ckpt]!r}")
            else:
                row = int(maps[pos, t])
                if row < 0 and need[t]:
                    raise RecipeError(f"{where}.source: {self.names[ckpt]!r} has no token {safe_repr(token, 60)}; "
                                      "use {kind: model_token, model: ..., token: ...} to take another token's row")
            rules[t] = TokenRule("row", entry.force, pos, row) if row >= 0 else TokenRule("none", entry.force)
        return rules

    def _lacking(self, sources: Sequence[int], maps: torch.Tensor, t: int) -> list[str]:
        return [self.names[s] for i, s in enumerate(sources) if int(maps[i, t]) < 0]


def build_vocabulary(recipe: Recipe, checkpoints: list[Checkpoint], refs: Mapping[str, int], base: int | None) -> tuple[Vocabulary | None, str | None]:
    """The output vocabulary the recipe asks for (None when it asks for none), or (None, why) when its source
    has no tokenizer files to build it from. ``refs``: input reference → index in ``checkpoints``;
    ``base``: the base model's index (None: the first input stands in, as the base of the vocabulary)."""
    settings = recipe.vocabulary_settings
    if settings is None:
        return None, None
    order = list(dict.fromkeys([*([base] if base is not None else []), *(refs[r] for r in recipe.input_references if r in refs)]))
    base_index = order[0]
    names = {i: _name(recipe, checkpoints[i]) for i in order}
    base_ckpt = checkpoints[base_index]
    role = "base model" if base is not None else "first model"
    if not has_tokenizer(base_ckpt.folder):
        return None, f"the {role} {one_line(base_ckpt.ref)} has no tokenizer files to build the vocabulary from"
    source = settings.source
    base_tok = load_tokenizer(base_ckpt.folder, f"{role} {one_line(base_ckpt.ref)}")  # type: ignore[arg-type]
    base_rows = config_vocab_size(base_ckpt.config) or len(base_tok.get_vocab())
    base_tok, stripped = strip_to_rows(base_tok, base_rows, f"{role} {one_line(base_ckpt.ref)}")
    inputs: dict[int, _Input] = {base_index: _Input(names[base_index], base_tok.get_vocab(), base_rows, base_tok)}
    notes: list[str] = []
    for i in order[1:]:
        ckpt = checkpoints[i]
        if not has_tokenizer(ckpt.folder):
            notes.append(f"{one_line(ckpt.ref)} has no tokenizer files: it is taken to share the {role}'s vocabulary (as mergekit does)")
            vocab = inputs[base_index].vocab
            inputs[i] = _Input(names[i], vocab, config_vocab_size(ckpt.config) or len(vocab))
            continue
        tok = load_tokenizer(ckpt.folder, f"model {names[i]!r} ({one_line(ckpt.ref)})")  # type: ignore[arg-type]
        vocab = tok.get_vocab()
        inputs[i] = _Input(names[i], vocab, config_vocab_size(ckpt.config) or len(vocab), tok)

    copy_from: Path | None = None
    if source == "base":
        out, folder, shown = base_tok, base_ckpt.folder, f"the {role}'s tokenizer ({names[base_index]})"
        copy_from = folder if not stripped else None
    elif source == "union":
        out, folder = _union(base_tok, [inputs[i] for i in order], notes), base_ckpt.folder
        shown = f"union of the tokenizers of {', '.join(names[i] for i in order)}"
        copy_from = folder if len(out) == len(base_tok) and not stripped else None
    else:
        ref = recipe.input_reference(source)
        if ref is not None and ref in refs:
            folder, shown = checkpoints[refs[ref]].folder, f"the tokenizer of model {names[refs[ref]]!r}"
        else:
            folder, shown = resolve_tokenizer_folder(source, "tokenizer.source" if recipe.tokenizer is not None else "tokenizer_source"), f"the tokenizer of {one_line(source)}"
        if not has_tokenizer(folder):
            return None, f"{shown} ({one_line(str(folder))}) has no tokenizer files"
        out = load_tokenizer(folder, shown)  # type: ignore[arg-type]
        copy_from = folder
    start = len(base_tok) if source == "union" else len(out)
    extra = [t for t in (settings.tokens or {}) if t not in out.get_vocab()]
    if extra:  # as plain tokens (mergekit's add_tokens)
        out = copy.deepcopy(out) if out is base_tok else out
        out.add_tokens(extra)
        copy_from = None
    vocab = out.get_vocab()
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        if not 0 <= i < len(vocab) or tokens[i]:
            raise CheckpointError(f"{shown}: token ids are not 0..{len(vocab) - 1} without gaps (id {i} of {safe_repr(token, 40)}); "
                                  "such a tokenizer cannot index embedding rows")
        tokens[i] = token
    size = len(tokens)
    pad = settings.pad_to_multiple_of
    rows = math.ceil(size / pad) * pad if pad else size
    maps = {i: _map(tokens, inp) for i, inp in inputs.items()}
    configured = set(settings.tokens or {})
    nowhere = torch.stack(list(maps.values())).lt(0).all(dim=0).nonzero().flatten().tolist()
    unconfigured_nowhere = [tokens[i] for i in nowhere if tokens[i] not in configured]
    if unconfigured_nowhere:
        notes.append(f"{len(unconfigured_nowhere)} token(s) of the output vocabulary are in no input's tokenizer "
                     f"(e.g. {safe_repr(unconfigured_nowhere[0], 40)}): their embedding rows are zeros (as mergekit)")
    return Vocabulary(
        settings, shown, out, tokens, rows, maps, {i: inp.vocab for i, inp in inputs.items()}, names,
        {r: refs[r] for r in refs}, recipe, copy_from, folder, len(out) - start, stripped, notes,
    ), None


def _name(recipe: Recipe, ckpt: Checkpoint) -> str:
    """An input's name for messages: its recipe name when it has one, else the last part of its reference."""
    for name in recipe.model_names:
        if recipe.input_reference(name) == ckpt.ref:
            return name
    return default_name(ckpt.ref)


def _union(base: Any, inputs: list[_Input], notes: list[str]) -> Any:
    """The base's tokenizer plus every token of the inputs it lacks (within their rows): regular tokens
    first (inputs in order, each by id), then added tokens with their first-seen settings."""
    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    differing: list[str] = []
    for inp in inputs:
        if inp.tokenizer is None:
            continue
        decoder = inp.tokenizer.added_tokens_decoder
        contents = {info.content for info in decoder.values()}
        for token, i in sorted(inp.vocab.items(), key=lambda kv: kv[1]):
            if i < inp.limit and token not in contents:
                regular.setdefault(token)
        for i, info in sorted(decoder.items()):
            if i >= inp.limit:
                continue
            if info.content not in added:
                added[info.content] = info
            elif added[info.content] != info and info.content not in differing:
                differing.append(info.content)
    if differing:
        notes.append(f"token(s) {', '.join(safe_repr(t, 40) for t in differing[:3])} are added with different settings in different "
                     "tokenizers; the first one's are kept (as mergekit)")
    out = copy.deepcopy(base)
    known = base.get_vocab()
    new = [t for t in regular if t not in added and t not in known]
    if new:
        out.add_tokens(new)
    fresh = [info for content, info in added.items() if content not in out.get_vocab()]
    if fresh:
        out.add_tokens(fresh)
    return out


def _map(tokens: list[str], inp: _Input) -> torch.Tensor:
    """Output id → the input's row for the same token (-1 when it lacks it or the id is past its rows)."""
    rows = [inp.vocab.get(t, -1) for t in tokens]
    return torch.tensor([r if r < inp.limit else -1 for r in rows], dtype=torch.long)

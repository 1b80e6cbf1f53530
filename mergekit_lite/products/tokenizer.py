"""The tokenizer side of an output: where its tokenizer files come from, its chat template, and the
sentence-transformers files that keep an embedding model loadable as one.

Nothing here loads a tokenizer: files are copied as they are, unless the plan built a vocabulary that
differs from its source's (``vocabulary.py``: a union that gained tokens, added or dropped tokens),
which is saved as transformers saves it. A chat template (when the recipe sets one) is written
where transformers reads it: ``chat_template.jinja`` (what
transformers 5 writes and reads first; 4.x releases read it since late 2024) and the
``chat_template`` key of ``tokenizer_config.json`` (what older releases read), the same text in both.

``tokenizer_plan(plan)`` decides everything from the inputs' small files before any weight is
read, so ``validate`` and ``run --dry-run`` can say what the output will hold, and a bad
``tokenizer_source`` fails before the merge starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, split_revision
from ..errors import CheckpointError, OutputError
from ..chat_templates import BUILTIN_CHAT_TEMPLATES
from ..text import one_line
from ..vocabulary import (  # noqa: F401  (TOKENIZER_HUB_PATTERNS, resolve_tokenizer_folder: part of this module's API)
    TOKENIZER_HUB_PATTERNS,
    TOKENIZER_MODEL_FILES,
    Vocabulary,
    has_tokenizer,
    resolve_tokenizer_folder,
)
from ..writer import TOKENIZER_FILES, copy_support_files, write_json

#: transformers' folder of named extra chat templates (``additional_chat_templates/<name>.jinja``).
EXTRA_TEMPLATES_DIR = "additional_chat_templates"

#: sentence-transformers' files at the root of a model folder (plus ``sentence_*_config.json``).
ST_ROOT_FILES = ("modules.json", "config_sentence_transformers.json")
_ST_MODULE_CONFIG = re.compile(r"^sentence_[A-Za-z0-9_-]+_config\.json$")
#: A module folder named in modules.json: relative, plain names only (it becomes a path we write).
_SAFE_REL = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".h5", ".msgpack")
#: Bounds on what a module folder may hold (real ones: a config and at most a dense layer's weights).
_MAX_MODULE_FILES = 64
_MAX_MODULE_BYTES = 2 * 2**30

def read_chat_template(folder: Path | None) -> str | None:
    """The default chat template of a tokenizer folder, as transformers' AutoTokenizer finds it:
    ``chat_template.jinja`` first, else ``tokenizer_config.json``'s ``chat_template`` (a text, or a
    list of named templates whose ``default`` is taken). None when there is none or it cannot be read."""
    if folder is None:
        return None
    try:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        config_path = folder / "tokenizer_config.json"
        if not config_path.is_file():
            return None
        template = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


# -- the plan -----------------------------------------------------------------------------------
@dataclass
class TokenizerPlan:
    """What the output's tokenizer files will be, decided from the inputs' small files alone."""

    source: str                      # tokenizer_source as the recipe says it
    folder: Path | None              # where tokenizer files are copied from (None: nowhere)
    shown: str                       # the source for messages: "base model demo/checkpoints/base"
    chat_template: str | None = None  # text written into the output (None: the source's files as they are)
    template_from: str = ""          # where the chat template comes from, for messages and the card
    st_folder: Path | None = None    # sentence-transformers files are carried from here
    missing: str | None = None       # why the output will have no tokenizer (None: it will have one)
    notes: list[str] = field(default_factory=list)  # non-fatal findings (warning: lines)
    vocabulary: Vocabulary | None = None  # the vocabulary built for the output (tokenizer_source / tokenizer: set)

    @property
    def sentence_transformers(self) -> bool:
        return self.st_folder is not None

    @property
    def built(self) -> bool:
        """Whether the output tokenizer differs from its source's files (tokens added or dropped): written by transformers."""
        return self.vocabulary is not None and self.vocabulary.copy_from is None

    def describe(self) -> str:
        """One line for --dry-run, validate and the card."""
        if self.missing:
            return f"none ({self.missing})"
        if self.vocabulary is not None:
            text = self.vocabulary.describe()
            text += "; files written by transformers (save_pretrained)" if self.built else f"; files copied from {one_line(str(self.folder))}"
        else:
            text = f"from {self.shown}"
        if self.template_from:
            text += f"; chat template: {self.template_from}"
        if self.sentence_transformers:
            text += "; sentence-transformers modules carried"
        return text


def tokenizer_plan(plan: Any) -> TokenizerPlan:
    """The output's tokenizer plan for a merge plan (computed once per plan, then remembered on it)."""
    cached = getattr(plan, "_tokenizer_plan", None)
    if cached is None:
        cached = _make_plan(plan)
        setattr(plan, "_tokenizer_plan", cached)
    return cached


def _input_order(plan: Any) -> list[Checkpoint]:
    """Every input checkpoint once: the base first, then the others in the recipe's order."""
    ordered = [plan.base] if plan.base is not None else []
    ordered += [c for c in plan.checkpoints if c is not plan.base]
    return ordered


def _by_ref(plan: Any, ref: str) -> Checkpoint | None:
    return next((c for c in plan.checkpoints if c.ref == ref), None)


def _make_plan(plan: Any) -> TokenizerPlan:
    recipe = plan.recipe
    settings = recipe.vocabulary_settings
    value = settings.source if settings is not None else (recipe.tokenizer_source or "base")
    vocabulary = getattr(plan, "vocabulary", None)
    folder: Path | None = None
    if recipe.tokenizer_source == "none":
        tp = TokenizerPlan("none", None, "nowhere", missing="tokenizer_source is none")
    elif vocabulary is not None:
        folder = vocabulary.copy_from or vocabulary.source_folder
        tp = TokenizerPlan(value, folder, vocabulary.shown, vocabulary=vocabulary)
        tp.notes += vocabulary.notes
    else:
        ckpt: Checkpoint | None = None
        if value in ("base", "union"):
            ckpt = plan.base if plan.base is not None else plan.config_source
            role = "base model" if plan.base is not None else "first model"
        elif recipe.input_reference(value) is not None:
            ckpt = _by_ref(plan, recipe.input_reference(value))
            role = f"model {value!r}" if value in recipe.model_names else "input"
        if ckpt is not None:
            folder = ckpt.folder
            shown = f"{role} {one_line(ckpt.ref)}"
        else:
            folder = resolve_tokenizer_folder(value, "tokenizer.source" if recipe.tokenizer is not None else "tokenizer_source")
            shown = one_line(value) if Path(split_revision(value)[0]).expanduser().exists() else f"{one_line(value)} ({one_line(str(folder))})"
        tp = TokenizerPlan(value, folder, shown)
        if not has_tokenizer(folder):
            tp.missing = (f"{shown} has no tokenizer files ({', '.join(TOKENIZER_MODEL_FILES[:5])}, ...); "
                          "copy them into the output, or set tokenizer_source to a model, folder or hub id that has them")
    template = recipe.chat_template
    if template is not None:
        if tp.missing:
            tp.missing += "; the chat template was not written"
        else:
            _plan_chat_template(plan, tp, template)
    tp.st_folder = _sentence_transformers_folder(plan.config_source, folder)
    return tp


def _plan_chat_template(plan: Any, tp: TokenizerPlan, value: str) -> None:
    if value == "auto":
        found = [(c, read_chat_template(c.folder)) for c in _input_order(plan)]
        found = [(c, t) for c, t in found if t]
        if not found:
            tp.notes.append("chat_template: auto: none of the inputs' tokenizers has a chat template; the tokenizer files are copied as they are")
            return
        counts = Counter(t.strip() for _, t in found)  # compared without surrounding whitespace, as mergekit does
        votes = max(counts.values())
        owner, text = next((c, t) for c, t in found if counts[t.strip()] == votes)  # a tie: the first in input order (base first)
        tp.template_from = f"auto: the template of {one_line(owner.ref)}, used by {votes} of the {len(found)} inputs that have one"
        own = read_chat_template(tp.folder)
        if own is not None and own.strip() == text.strip():
            tp.template_from += " (the tokenizer source's own: its files are kept as they are)"
            return  # named extra templates (tool_use, rag, ...) stay too
        tp.chat_template = text
    elif value in BUILTIN_CHAT_TEMPLATES:
        tp.chat_template = BUILTIN_CHAT_TEMPLATES[value]
        tp.template_from = f"{value} (built-in)"
    else:
        tp.chat_template = value
        tp.template_from = "the recipe's Jinja text"
    config = tp.folder / "tokenizer_config.json" if tp.folder is not None else None
    if config is not None and config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"{one_line(str(config))}: cannot be read as JSON ({one_line(str(exc))[:200]}); the chat template cannot be written into it") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{one_line(str(config))}: not a JSON object; the chat template cannot be written into it")


def _sentence_transformers_folder(config_source: Checkpoint | None, tokenizer_folder: Path | None) -> Path | None:
    """Where the sentence-transformers files come from: the config's source (it describes the model's
    modules), else the tokenizer source; None when neither is a sentence-transformers folder."""
    for folder in (config_source.folder if config_source is not None else None, tokenizer_folder):
        if is_sentence_transformers(folder):
            return folder
    return None


# -- writing ------------------------------------------------------------------------------------
def write_tokenizer(tp: TokenizerPlan, out: Path) -> list[str]:
    """Copy the tokenizer (and sentence-transformers) files into ``out``; write the chat template.
    Returns the relative paths written. Adds to ``tp.notes`` what it skipped."""
    written: list[str] = []
    if tp.built and not tp.missing:
        written += _save_built(tp, out)
    elif tp.folder is not None and not tp.missing:
        names = [n for n in TOKENIZER_FILES if tp.chat_template is None or n not in ("chat_template.jinja", "chat_template.json")]
        names += sorted(p.name for p in tp.folder.glob("*.tiktoken") if _SAFE_REL.match(p.name))  # tiktoken vocabularies
        written += copy_support_files(tp.folder, out, names)
        extra = tp.folder / EXTRA_TEMPLATES_DIR
        if tp.chat_template is None and extra.is_dir():
            (out / EXTRA_TEMPLATES_DIR).mkdir(exist_ok=True)
            for f in sorted(extra.glob("*.jinja")):
                if f.is_file() and _SAFE_REL.match(f.name):
                    shutil.copyfile(f, out / EXTRA_TEMPLATES_DIR / f.name)
                    written.append(f"{EXTRA_TEMPLATES_DIR}/{f.name}")
        if tp.chat_template is not None:
            written += _write_chat_template(tp, out)
    if tp.st_folder is not None:
        written += _copy_sentence_transformers(tp, out)
    return written


def _save_built(tp: TokenizerPlan, out: Path) -> list[str]:
    """The built tokenizer (a vocabulary that differs from its source's files), saved as transformers saves it."""
    assert tp.vocabulary is not None
    before = {p.name for p in out.iterdir()}
    try:
        tp.vocabulary.tokenizer.save_pretrained(str(out))
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the tokenizer files: {exc.strerror or exc}") from exc
    written = sorted(p.name for p in out.iterdir() if p.name not in before and p.is_file())
    if tp.chat_template is not None:
        written += [n for n in _write_chat_template(tp, out) if n not in written]
    return written


def _write_chat_template(tp: TokenizerPlan, out: Path) -> list[str]:
    assert tp.chat_template is not None and tp.folder is not None
    text = tp.chat_template
    (out / "chat_template.jinja").write_text(text, encoding="utf-8")
    written = ["chat_template.jinja"]
    config = out / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        data["chat_template"] = text
        write_json(config, data)
    legacy = tp.folder / "chat_template.json"  # a processor's template (multimodal models): same text
    if legacy.is_file():
        try:
            data = json.loads(legacy.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            data = {}
        write_json(out / "chat_template.json", {**(data if isinstance(data, dict) else {}), "chat_template": text})
        written.append("chat_template.json")
    return written


def _copy_sentence_transformers(tp: TokenizerPlan, out: Path) -> list[str]:
    """The merge's sentence-transformers files; a module's own weights are copied, not merged, and that is said."""
    assert tp.st_folder is not None
    written = copy_sentence_transformers(tp.st_folder, out, tp.notes)
    weights: dict[str, list[str]] = {}
    for rel in written:
        module, _, inner = rel.partition("/")
        if inner and inner.endswith(_WEIGHT_SUFFIXES):
            weights.setdefault(module, []).append(inner)
    for module, files in weights.items():
        tp.notes.append(f"sentence-transformers module {module}: its weights ({', '.join(files)}) are copied from {one_line(str(tp.st_folder))} as they are, not merged")
    return written


def copy_sentence_transformers(src: Path, out: Path, notes: list[str]) -> list[str]:
    """modules.json, the root configs, and each module folder it names (the transformer module, at
    the root, is the model itself), from ``src`` into ``out``. Returns the relative paths written;
    adds to ``notes`` what it skipped (a module path leaving the folder, an oversized module)."""
    names = [*ST_ROOT_FILES, *sorted(p.name for p in src.iterdir() if _ST_MODULE_CONFIG.match(p.name))]
    written = copy_support_files(src, out, names)
    try:
        modules = json.loads((src / "modules.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        notes.append(f"{one_line(str(src / 'modules.json'))}: not valid JSON; it was copied as it is, without module folders")
        return written
    for module in modules if isinstance(modules, list) else []:
        rel = module.get("path") if isinstance(module, dict) else None
        if not isinstance(rel, str) or rel in ("", "."):
            continue
        rel = rel.strip("/")
        if not _SAFE_REL.match(rel) or any(part in ("..", ".") for part in rel.split("/")):
            notes.append(f"{one_line(str(src / 'modules.json'))}: module path {one_line(rel)!r} is not a plain relative folder; not copied")
            continue
        folder = src / rel
        if not folder.is_dir():
            continue  # e.g. Normalize, which has no files
        files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
        if len(files) > _MAX_MODULE_FILES or sum(p.stat().st_size for p in files) > _MAX_MODULE_BYTES:
            notes.append(f"{one_line(str(folder))}: more than {_MAX_MODULE_FILES} files or {_MAX_MODULE_BYTES >> 30} GiB; the module was not copied")
            continue
        for p in files:
            inner = p.relative_to(folder).as_posix()
            if not _SAFE_REL.match(inner):
                continue
            target = out / rel / inner
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(p, target)
            except OSError as exc:
                raise OutputError(f"{target}: cannot copy the sentence-transformers module file: {exc.strerror or exc}") from exc
            written.append(f"{rel}/{inner}")
    return written


def is_sentence_transformers(folder: Path | None) -> bool:
    """Whether a folder is a sentence-transformers model (it has modules.json)."""
    return folder is not None and (folder / "modules.json").is_file()


def loading_hint(folder: str | os.PathLike[str]) -> list[str]:
    """How to load a written model folder: the transformers Auto class of its config (and SentenceTransformer for those folders)."""
    from ..card import auto_class

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        config = None
    lines = []
    if (folder / "modules.json").is_file():
        lines.append(f"load it with: SentenceTransformer({str(folder)!r})  (sentence-transformers)")
    lines.append(f"{'or' if lines else 'load it with'}: {auto_class(config)}.from_pretrained({str(folder)!r})")
    return lines

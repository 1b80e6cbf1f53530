"""The recipe: a YAML file (mergekit's key names where the concept is shared), validated with pydantic.

Every problem is reported as one ``RecipeError`` naming the key path (``models[1].parameters.weight``)
and, for misspellings, the closest valid name. mergekit keys we do not support are refused by name.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import RecipeError
from .methods import get_method, suggest

#: mergekit keys that have no equivalent here yet, with what to do instead.
UNSUPPORTED_KEYS = {
    "slices": "layer slices are not supported yet; merge whole models with 'models:'",
    "modules": "per-module recipes are not supported yet; use include/exclude patterns",
    "tokenizer": "tokenizer merging is not supported yet; use tokenizer_source: base | <model name> | none",
    "chat_template": "chat templates are not supported yet; the base model's tokenizer files are copied as they are",
}

COMPUTE_DTYPES = ("float32", "float64")
STORAGE_DTYPES = ("float32", "float16", "bfloat16", "float64")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
#: Largest shard size accepted (a file offset must fit in a signed 64-bit integer).
MAX_SIZE = 2**63 - 1
#: Largest magnitude of an integer recipe value; beyond it no float or 64-bit integer holds it.
MAX_INT = 2**63 - 1
#: Characters that must never appear in a reference or a name: they break lines, or cannot be encoded.
_BAD_CATEGORIES = ("Cc", "Cs", "Zl", "Zp")
#: How deep YAML/lists/mappings may nest before a recipe is refused (real recipes nest 3-4 levels).
MAX_DEPTH = 64
#: How many values (keys, items, scalars; YAML aliases expanded) a recipe may hold: real ones hold hundreds.
MAX_VALUES = 20_000


def parse_size(value: int | str) -> int:
    """Bytes from ``5GB`` (decimal, as Hugging Face uses), ``512MiB`` (binary) or a plain integer."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 5GB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value)) if isinstance(value, (str, float)) else None
        if not match:
            raise ValueError(f"expected a size like 5GB or 500MB, got {safe_repr(value)}")
        try:
            size = int(Decimal(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
        except (InvalidOperation, ValueError, OverflowError):
            raise ValueError(f"expected a size like 5GB or 500MB, got {safe_repr(value)}") from None
    if size <= 0:
        raise ValueError(f"must be a positive size, got {safe_repr(value)}")
    if size > MAX_SIZE:
        raise ValueError(f"must be at most {MAX_SIZE} bytes, got {safe_repr(value)}")
    return size


def one_line(text: str) -> str:
    """``text`` with every line break, control character and lone surrogate escaped (\\n, \\x00, \\ud800)."""
    if all(unicodedata.category(c) not in _BAD_CATEGORIES for c in text):
        return text
    return "".join(c if unicodedata.category(c) not in _BAD_CATEGORIES else repr(c)[1:-1] for c in text)


def safe_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)`` for a message: one line, at most ``limit`` characters, never raising."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        return f"<an integer of {len(str(abs(value))) if value.bit_length() < 10000 else 'thousands of'} digits>"
    try:
        text = repr(value)
    except (ValueError, RecursionError, TypeError):  # huge ints, nesting, odd objects
        text = f"<{type(value).__name__}>"
    text = one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    """One fine-tuned model of the recipe."""

    model: str = Field(min_length=1)
    name: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class OutputOptions(_Strict):
    """How the output is written."""

    shard_size: int = 5 * 10**9

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)


class Recipe(_Strict):
    """A validated recipe. Build it with ``Recipe.from_yaml(path)`` or ``Recipe.from_dict(data)``."""

    merge_method: str
    base_model: str = Field(min_length=1)
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "float64", "float16", "bfloat16"] = "float32"
    out_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    tokenizer_source: str = "base"
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    output: OutputOptions = Field(default_factory=OutputOptions)
    evaluator: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> "Recipe":
        """Validate a parsed recipe; every error is one RecipeError naming ``source`` and the key path."""
        source = one_line(str(source))
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: expected a mapping of recipe keys (merge_method, base_model, models, ...)")
        for key, why in UNSUPPORTED_KEYS.items():
            if key in data:
                raise RecipeError(f"{source}: {key}: {why}")
        problem = _check_structure(data)
        if problem:
            raise RecipeError(f"{source}: {problem}")
        try:
            recipe = cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(f"{source}: {_describe(exc)}") from None
        except RecursionError:  # pragma: no cover - _check_structure bounds the depth first
            raise RecipeError(f"{source}: nested too deeply to be a recipe") from None
        try:
            recipe.check()
        except RecipeError as exc:
            raise RecipeError(one_line(f"{source}: {exc}")) from None
        return recipe

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> "Recipe":
        """Read and validate a recipe file."""
        path = Path(path)
        shown = one_line(str(path))
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError(f"{shown}: recipe file not found") from None
        except IsADirectoryError:
            raise RecipeError(f"{shown}: is a folder, not a recipe file") from None
        except UnicodeDecodeError as exc:
            raise RecipeError(f"{shown}: not a text file (byte {exc.start} is not UTF-8)") from None
        except (OSError, ValueError) as exc:
            raise RecipeError(f"{shown}: cannot read recipe: {one_line(str(exc))}") from None
        return cls.from_text(text, str(path))

    @classmethod
    def from_text(cls, text: str, source: str = "recipe") -> "Recipe":
        shown = one_line(str(source))
        try:
            data = yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: builds plain data only
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["unreadable"])[0]
            raise RecipeError(one_line(f"{shown}: not valid YAML{where}: {problem}")) from None
        except RecursionError:
            raise RecipeError(f"{shown}: not valid YAML: nested too deeply to be a recipe") from None
        except Exception as exc:  # noqa: BLE001 - PyYAML's scalar constructors fail with whatever they hit:
            # ValueError (an integer of 5000 digits, !!float x), IndexError (!!int ''), KeyError (!!bool x),
            # AttributeError (!!timestamp x)
            detail = (str(exc).splitlines() or [""])[0][:200]
            raise RecipeError(one_line(f"{shown}: not valid YAML: a value cannot be read ({type(exc).__name__}: {detail})")) from None
        return cls.from_dict(data, source)

    def to_yaml(self) -> str:
        """The recipe as YAML, defaults included, for the model card and manifests."""
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False)

    # -- semantic checks ---------------------------------------------------------------------
    def check(self) -> None:
        """Checks that need more than types: method parameters, names, tokenizer source."""
        for where, text in [("base_model", self.base_model), *((f"models[{i}].model", m.model) for i, m in enumerate(self.models))]:
            if not text.strip() or _has_bad_characters(text):
                raise RecipeError(f"{where}: {safe_repr(text)} is not a usable path or hub id (empty, or has control characters)")
        for i, entry in enumerate(self.models):
            if "+" in entry.model and not os.path.exists(entry.model):
                raise RecipeError(f"models[{i}].model: 'model+lora' references are not supported yet; merge the LoRA first")
        params, per_model = self.method.resolve(self.parameters, [m.parameters for m in self.models])
        if self.evaluator is None:
            for where, values in [("parameters", params), *((f"models[{i}].parameters", p) for i, p in enumerate(per_model))]:
                for key, value in values.items():
                    if isinstance(value, list):
                        raise RecipeError(f"{where}.{key}: a list of values is a search grid and needs 'evaluator: module:function'")
        if self.method.output == "collection" and (self.include is not None or self.exclude):
            raise RecipeError("include/exclude: a collection stores every tensor of every model; remove include/exclude")
        seen: dict[str, int] = {}
        for i, name in enumerate(self.model_names):
            if not name or name in (".", "..") or "/" in name or "\\" in name or _has_bad_characters(name):
                raise RecipeError(f"models[{i}].name: {safe_repr(name)} is not a usable name (no separators or control characters, not empty)")
            if name in seen:
                raise RecipeError(
                    f"models[{i}].name: {name!r} is already the name of models[{seen[name]}]; give each model a distinct 'name:'"
                )
            seen[name] = i
        if self.tokenizer_source not in ("base", "none", *self.model_names):
            options = ["base", "none", *self.model_names]
            raise RecipeError(
                f"tokenizer_source: {self.tokenizer_source!r} is not base, none or a model name{suggest(self.tokenizer_source, options)}"
            )

    @property
    def method(self):  # -> MergeMethod (annotation avoided: pydantic would treat it as a field type)
        return get_method(self.merge_method)

    @property
    def model_names(self) -> list[str]:
        """Each model's task name: its ``name`` or the last part of its path/repo id."""
        return [m.name if m.name is not None else default_name(m.model) for m in self.models]

    @property
    def compute_dtype(self) -> str:
        """The arithmetic dtype: float32 unless float64 is asked; half types (mergekit's habit) compute in float32."""
        return self.dtype if self.dtype in COMPUTE_DTYPES else "float32"

    @property
    def output_dtype(self) -> str | None:
        """The stored dtype of merged tensors: out_dtype, else a half ``dtype`` (mergekit semantics), else the base's."""
        if self.out_dtype:
            return self.out_dtype
        return self.dtype if self.dtype not in COMPUTE_DTYPES else None

    def resolved_parameters(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return self.method.resolve(self.parameters, [m.parameters for m in self.models])


def default_name(reference: str) -> str:
    """'org/name@rev' -> 'name'; '/a/b/ckpt/' -> 'ckpt'; 'x.safetensors' -> 'x'."""
    ref = reference.rstrip("/\\")
    if "@" in ref and not os.path.exists(ref):
        ref = ref.rpartition("@")[0]
    name = Path(ref).name
    for suffix in (".safetensors", ".bin"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


_LEVEL_FIELDS = {
    (): Recipe.model_fields,
    ("models",): ModelEntry.model_fields,
    ("output",): OutputOptions.model_fields,
}


def _describe(exc: ValidationError) -> str:
    """Turn pydantic's report into one line: the key path, what is wrong, and a suggestion."""
    error = exc.errors()[0]
    loc = error["loc"]
    path = _loc_path(loc)
    if error["type"] == "extra_forbidden":
        key = str(loc[-1])
        level = tuple(str(p) for p in loc[:-1] if not isinstance(p, int))
        fields = _LEVEL_FIELDS.get(level, {})
        return one_line(f"{path}: unknown key{suggest(key, fields)}")
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    message = (str(error["msg"]).splitlines() or [""])[0]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    got = error.get("input")
    detail = "" if isinstance(got, (dict, list)) or got is None or " got " in message else f" (got {safe_repr(got)})"
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    return one_line(f"{path}: {message}{detail}{more}")


def _loc_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        text = part if isinstance(part, str) else safe_repr(part, 40)
        out += f"[{part}]" if isinstance(part, int) else (f".{text}" if out else text)
    return one_line(out) or "recipe"


def _has_bad_characters(text: str) -> bool:
    return any(unicodedata.category(c) in _BAD_CATEGORIES for c in text)


def _check_structure(data: Any) -> str | None:
    """Problems pydantic and the method checks cannot report on one line, or only slowly: nesting
    deeper than ``MAX_DEPTH`` (or cyclic), more than ``MAX_VALUES`` values (a YAML alias bomb),
    integers beyond 64 bits, a size that is not finite, and lists of lists in parameters.
    Returns the first one found, or None."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    seen = 0
    while stack:
        value, loc = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            return f"{_loc_path(loc[:3])}: the recipe holds more than {MAX_VALUES} values (YAML aliases expanded); a recipe is a few hundred at most"
        if len(loc) > MAX_DEPTH:
            return f"{_loc_path(loc[:3])}: nested more than {MAX_DEPTH} levels deep (or refers to itself); a recipe is a few levels of plain keys"
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            return f"{_loc_path(loc)}: the number {safe_repr(value)} is too large (at most {MAX_INT} in magnitude)"
        if isinstance(value, float) and not math.isfinite(value) and loc[-1:] == ("shard_size",):
            return f"{_loc_path(loc)}: expected a size like 5GB, got {safe_repr(value)}"
        if isinstance(value, (list, tuple)) and _in_parameters(loc) and any(isinstance(v, (list, tuple, dict, set)) for v in value):
            return f"{_loc_path(loc)}: a list of values (a search grid) holds plain numbers, not lists or mappings"
        if isinstance(value, dict):
            stack.extend((v, (*loc, k)) for k, v in reversed(list(value.items())))
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend((v, (*loc, i)) for i, v in reversed(list(enumerate(value))))
    return None


def _in_parameters(loc: tuple[Any, ...]) -> bool:
    """True for the value of one parameter: parameters.<key> or models[i].parameters.<key>."""
    return (len(loc) == 2 and loc[0] == "parameters") or (len(loc) == 4 and loc[0] == "models" and loc[2] == "parameters")


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (plain data only) that refuses a key given twice in one mapping:
    with the stock loader the last one silently wins (``parameters:`` twice loses the first)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"key {safe_repr(key, 60)} is given twice", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)

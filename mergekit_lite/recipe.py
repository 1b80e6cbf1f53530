"""The recipe: a YAML file (mergekit's key names where the concept is shared), validated with pydantic.

Every problem is reported as one ``RecipeError`` naming the key path (``models[1].parameters.weight``)
and, for misspellings, the closest valid name. mergekit keys we do not support are refused by name.
"""

from __future__ import annotations

import os
import re
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


def parse_size(value: int | str) -> int:
    """Bytes from ``5GB`` (decimal, as Hugging Face uses), ``512MiB`` (binary) or a plain integer."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 5GB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"expected a size like 5GB or 500MB, got {value!r}")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if size <= 0:
        raise ValueError(f"must be a positive size, got {value!r}")
    return size


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
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: expected a mapping of recipe keys (merge_method, base_model, models, ...)")
        for key, why in UNSUPPORTED_KEYS.items():
            if key in data:
                raise RecipeError(f"{source}: {key}: {why}")
        try:
            recipe = cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(f"{source}: {_describe(exc)}") from None
        try:
            recipe.check()
        except RecipeError as exc:
            raise RecipeError(f"{source}: {exc}") from None
        return recipe

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> "Recipe":
        """Read and validate a recipe file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError(f"{path}: recipe file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
        return cls.from_text(text, str(path))

    @classmethod
    def from_text(cls, text: str, source: str = "recipe") -> "Recipe":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise RecipeError(f"{source}: not valid YAML{where}: {problem}") from None
        return cls.from_dict(data, source)

    def to_yaml(self) -> str:
        """The recipe as YAML, defaults included, for the model card and manifests."""
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False)

    # -- semantic checks ---------------------------------------------------------------------
    def check(self) -> None:
        """Checks that need more than types: method parameters, names, tokenizer source."""
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
            if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
                raise RecipeError(f"models[{i}].name: {name!r} is not a usable name (no separators, not empty)")
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
        return f"{path}: unknown key{suggest(key, fields)}"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    got = error.get("input")
    detail = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    return f"{path}: {message}{detail}{more}"


def _loc_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "recipe"

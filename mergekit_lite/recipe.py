"""The recipe: a YAML file (mergekit's key names where the concept is shared), validated with pydantic.

Every problem is reported as one ``RecipeError`` naming the key path (``models[1].parameters.weight``)
and, for misspellings, the closest valid name. mergekit keys we do not support are refused by name.
"""

from __future__ import annotations

import math
import re
import os
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .adapter import split_adapter_reference
from .checkpoint import looks_like_hub_id, split_revision
from .errors import RecipeError
from .text import MAX_INT, _BAD_CATEGORIES, one_line, safe_repr  # noqa: F401  (one_line, safe_repr: part of this module's API)
from .units import parse_size  # noqa: F401  (parse_size is part of this module's API)
from .methods import METHODS, get_method, suggest
from .chat_templates import chat_template_problem
from .params import check_setting, is_search, resolve

#: mergekit keys that have no equivalent here yet, with what to do instead.
UNSUPPORTED_KEYS = {
    "modules": "per-module recipes are not supported yet; use include/exclude patterns",
}

#: parameter names of mergekit's methods (also those we do not implement yet), recognised when misplaced at the top level
MERGEKIT_PARAMETER_NAMES = frozenset(
    {
        "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "t", "scale", "filter_wise",
        "select_topk", "nuslerp_flatten", "nuslerp_row_wise", "max_iter", "tol", "normalize_weights", "eps", "r", "alpha",
        # names of older mergekit releases that published configs still carry
        "embed_slerp", "consensus_method", "sparsification_method",
    }
)

COMPUTE_DTYPES = ("float32", "float64")
STORAGE_DTYPES = ("float32", "float16", "bfloat16", "float64")

#: How deep YAML/lists/mappings may nest before a recipe is refused (real recipes nest 3-4 levels).
MAX_DEPTH = 64
#: How many values (keys, items, scalars; YAML aliases expanded) a recipe may hold: real ones hold hundreds.
MAX_VALUES = 20_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("parameters", mode="before", check_fields=False)
    @classmethod
    def _no_parameters(cls, value: Any) -> Any:
        """``parameters:`` with nothing under it (YAML null) means no parameters, as in mergekit."""
        return {} if value is None else value


class ModelEntry(_Strict):
    """One model of the recipe (``models:``)."""

    model: str = Field(min_length=1)
    name: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class SliceSource(_Strict):
    """One input of a slice: layers [start, end) of a model, with parameters for them."""

    model: str = Field(min_length=1)
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError(f"expected [start, end) with 0 <= start < end, got {list(value)}")
        return value


class SliceEntry(_Strict):
    """One output slice (``slices:``): its sources' layers are merged into consecutive output layers."""

    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    #: declared by mergekit 0.1.5 and unused there; accepted with a warning
    residual_weight: float | None = None


class OutputOptions(_Strict):
    """How the output is written."""

    shard_size: int = 5 * 10**9

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)


class ModelTokenSource(_Strict):
    """A token's embedding taken from one row of one input model: by its token there, or by its id."""

    kind: Literal["model_token"]
    model: str = Field(min_length=1)
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> "ModelTokenSource":
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        return self


class ZeroSource(_Strict):
    """A token's embedding set to zeros."""

    kind: Literal["zero"]


class TokenEntry(_Strict):
    """One entry of ``tokenizer.tokens`` (mergekit's schema): where the token's embedding comes from
    (a model's name or reference, ``{kind: model_token, ...}`` or ``{kind: zero}``) and whether every model
    takes it (``force``) or only the models that lack the token."""

    source: Union[Annotated[Union[ModelTokenSource, ZeroSource], Field(discriminator="kind")], str, None] = None
    force: bool = False


class TokenizerOptions(_Strict):
    """mergekit's ``tokenizer:`` block: the output vocabulary and per-token embedding sources."""

    source: str = Field(default="union", min_length=1)
    tokens: dict[str, TokenEntry] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class Recipe(_Strict):
    """A validated recipe. Build it with ``Recipe.from_yaml(path)`` or ``Recipe.from_dict(data)``."""

    merge_method: str
    base_model: str | None = Field(default=None, min_length=1)
    models: list[ModelEntry] | None = Field(default=None, min_length=1)
    slices: list[SliceEntry] | None = Field(default=None, min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "float64", "float16", "bfloat16"] = "float32"
    out_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    #: unset: the base's tokenizer files are copied and embeddings merged row by row (mergekit's default);
    #: base | union | a model's name | a folder | a hub id: mergekit's vocabulary (rows re-mapped per token); none
    tokenizer_source: str | None = Field(default=None, min_length=1)
    tokenizer: TokenizerOptions | None = None
    #: auto | a built-in template name | Jinja text (see products/tokenizer.py)
    chat_template: str | None = Field(default=None, min_length=1)
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    output: OutputOptions = Field(default_factory=OutputOptions)
    evaluator: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    #: non-fatal notes about the recipe (a misplaced mergekit key that has no effect, ...)
    _warnings: list[str] = PrivateAttr(default_factory=list)

    def __eq__(self, other: object) -> bool:
        """Recipes are equal when they say the same (the notes found while reading, which name the file, aside)."""
        return isinstance(other, Recipe) and self.model_dump() == other.model_dump()

    __hash__ = _Strict.__hash__

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> "Recipe":
        """Validate a parsed recipe; every problem is reported in one RecipeError naming ``source`` and the key path."""
        source = one_line(str(source))
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: expected a mapping of recipe keys (merge_method, base_model, models, ...)")
        for key, why in UNSUPPORTED_KEYS.items():
            if key in data:
                raise RecipeError(f"{source}: {key}: {why}")
        problem = _check_structure(data)
        if problem:
            raise RecipeError(f"{source}: {problem}")
        data, warnings = _drop_misplaced_parameters(data)
        if "merge_method" in data and isinstance(data["merge_method"], str):
            try:
                get_method(data["merge_method"])
            except RecipeError as exc:  # an unknown method is the first thing to say
                raise RecipeError(one_line(f"{source}: {exc}")) from None
        try:
            recipe = cls.model_validate(data)
        except ValidationError as exc:
            problems = [one_line(f"{source}: {p}") for p in _describe_all(exc)]
            raise RecipeError(problems[0] + _more(problems), problems=problems) from None
        except RecursionError:  # pragma: no cover - _check_structure bounds the depth first
            raise RecipeError(f"{source}: nested too deeply to be a recipe") from None
        problems = [one_line(f"{source}: {p}") for p in recipe.problems()]
        if problems:
            raise RecipeError(problems[0] + _more(problems), problems=problems)
        recipe._warnings.extend(one_line(f"{source}: {w}") for w in [*warnings, *recipe.notes()])
        if recipe.slices:
            for i, sl in enumerate(recipe.slices):
                if sl.residual_weight is not None:
                    recipe._warnings.append(f"{source}: slices[{i}].residual_weight has no effect (mergekit 0.1.5 does not use it either)")
        return recipe

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> "Recipe":
        """Read and validate a recipe file."""
        return cls.from_text(read_recipe_text(path), str(path))

    @classmethod
    def from_text(cls, text: str, source: str = "recipe") -> "Recipe":
        """Validate a recipe given as YAML text (one document; several are a chain, see chain.py)."""
        documents = parse_documents(text, source)
        if len(documents) > 1:
            raise RecipeError(one_line(
                f"{source}: holds {len(documents)} YAML documents (separated by ---), a chain of merges; "
                "run it with `mergekit-lite run` or mergekit_lite.run (README: Chains)"
            ))
        return cls.from_dict(documents[0] if documents else None, source)

    def to_yaml(self) -> str:
        """The recipe as YAML, defaults included, for the model card and manifests."""
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False)

    # -- semantic checks ---------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every problem that needs more than types (method parameters, names, inputs), all at once."""
        method = get_method(self.merge_method)
        problems: list[str] = []
        if (self.models is None) == (self.slices is None):
            problems.append("models/slices: give either 'models:' (whole models) or 'slices:' (layer ranges), not both or neither")
        refs = [("base_model", self.base_model)] if self.base_model is not None else []
        refs += [(f"models[{i}].model", m.model) for i, m in enumerate(self.models or [])]
        refs += [(f"slices[{i}].sources[{j}].model", s.model) for i, sl in enumerate(self.slices or []) for j, s in enumerate(sl.sources)]
        refs += [(f"slices[{i}].base_model", sl.base_model) for i, sl in enumerate(self.slices or []) if sl.base_model is not None]
        for where, text in refs:
            if not text.strip() or _has_bad_characters(text):
                problems.append(f"{where}: {safe_repr(text)} is not a usable path or hub id (empty, or has control characters)")
            elif "+" in text and not os.path.exists(split_revision(text)[0]) and split_adapter_reference(text) is None:
                problems.append(f"{where}: {safe_repr(text)}: write a base model and its LoRA adapter as BASE+ADAPTER (one '+' between two references)")
        if method.base == "required":
            slices_without = [i for i, sl in enumerate(self.slices or []) if sl.base_model is None]
            if self.base_model is None and (self.models is not None or slices_without):
                problems.append(f"base_model: {method.name} needs a base model (it {'merges task vectors θ_t − θ_0' if method.inputs == 'task_vectors' else 'interpolates from the base'}); add 'base_model:'")
        problems += self._parameter_problems(method)
        problems += self._missing_required(method)
        problems += [f"parameters: give {a} or {b}, not both" for a, b in method.exclusive if a in self.parameters and b in self.parameters]
        if method.output == "collection" and self.evaluator is not None and not any(p.searchable for p in method.params):
            problems.append(f"evaluator: {method.name} has no parameter an evaluator can search; remove 'evaluator'")
        if self.models is not None:
            problems += self._count_problems(method, [m.model for m in self.models], "models")
        for i, sl in enumerate(self.slices or []):
            lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
            if len(lengths) > 1:
                problems.append(f"slices[{i}].sources: every source of a slice needs the same number of layers, got {sorted(lengths)}")
            problems += self._count_problems(method, [s.model for s in sl.sources], f"slices[{i}].sources", sl.base_model or self.base_model)
        if self.slices is not None and not problems:
            whole_model = method.output == "collection" or method.passes(resolve(method, [self.parameters], [], "", [], 0.0)[0], None) > 1
            if whole_model:  # model-wide statistics (TIES at scope: model, ...) are taken over whole models
                problems.append(f"slices: {method.name} with these parameters works on whole models (model-wide statistics); use 'models:'")
        if self.evaluator is None:
            for where, key in self._searches():
                problems.append(f"{where}.{key}: {{search: [...]}} is a search grid and needs 'evaluator: module:function'")
        if method.output == "collection" and (self.include is not None or self.exclude):
            problems.append("include/exclude: a collection stores every tensor of every model; remove include/exclude")
        seen: dict[str, int] = {}
        for i, name in enumerate(self.model_names if self.models is not None else []):
            if not name or name in (".", "..") or "/" in name or "\\" in name or _has_bad_characters(name):
                problems.append(f"models[{i}].name: {safe_repr(name)} is not a usable name (no separators or control characters, not empty)")
            elif name in seen:
                problems.append(f"models[{i}].name: {name!r} is already the name of models[{seen[name]}]; give each model a distinct 'name:'")
            seen[name] = i
        problems += self._tokenizer_problems(method)
        return problems

    def _tokenizer_problems(self, method: Any) -> list[str]:
        """tokenizer_source / the tokenizer block (sources, per-token entries, padding) and chat_template."""
        problems = []
        value = self.tokenizer_source
        if value is not None and self.tokenizer is not None:
            problems.append("tokenizer/tokenizer_source: give one of them, not both (mergekit refuses both too); "
                            "tokenizer: {source: ...} takes what tokenizer_source would say")
        if value is not None:
            problems += self._source_problems("tokenizer_source", value, allow_none=True)
        if self.tokenizer is not None:
            problems += self._source_problems("tokenizer.source", self.tokenizer.source, allow_none=False)
            for token, entry in (self.tokenizer.tokens or {}).items():
                where = f"tokenizer.tokens[{safe_repr(token, 60)}]"
                if not token:
                    problems.append(f"{where}: a token must be non-empty text")
                ref = entry.source.model if isinstance(entry.source, ModelTokenSource) else entry.source
                if isinstance(ref, str) and self.input_reference(ref) is None:
                    problems.append(
                        f"{where}.source{'.model' if isinstance(entry.source, ModelTokenSource) else ''}: {safe_repr(ref)} is not one of "
                        f"the merged models (give a model's name: {', '.join(self.model_names) or 'none'}, or its reference as in the recipe)"
                        f"{suggest(ref, [*self.model_names, *self.input_references])}"
                    )
                if entry.force and entry.source is None:
                    problems.append(f"{where}: force: true needs a source (a model, {{kind: model_token, ...}} or {{kind: zero}})")
        if method.output == "collection" and self.vocabulary_settings is not None:
            problems.append("tokenizer/tokenizer_source: a collection keeps each task's own tokenizer files and embeddings; "
                            "remove it (or use none)")
        if self.chat_template is not None:
            problem = chat_template_problem(self.chat_template)
            if problem:
                problems.append(problem)
            elif value == "none":
                problems.append("chat_template: needs a tokenizer to write it into, but tokenizer_source is none")
            elif method.output == "collection":
                problems.append("chat_template: a collection keeps each task's own tokenizer files; remove chat_template")
        return problems

    def _source_problems(self, where: str, value: str, allow_none: bool) -> list[str]:
        """A tokenizer source: base | union | (none) | a model's name | an existing folder | a hub id."""
        keywords = ["base", "union", *(["none"] if allow_none else [])]
        if value in keywords or value in self.model_names:
            return []
        if value == "none":
            return [f"{where}: none is not a vocabulary; remove the tokenizer block, or use tokenizer_source: none"]
        name = split_revision(value)[0]
        try:
            exists = os.path.exists(os.path.expanduser(name))
        except (ValueError, RuntimeError):
            exists = False
        if _has_bad_characters(value) or not value.strip():
            return [f"{where}: {safe_repr(value)} is not a usable path or hub id (empty, or has control characters)"]
        if not exists and not looks_like_hub_id(name):
            options = [*keywords, *self.model_names]
            return [
                f"{where}: {safe_repr(value)} is not {', '.join(keywords)}, a model's name ({', '.join(self.model_names) or 'none'}), "
                f"an existing folder or a hub id (org/name){suggest(value, options)}"
            ]
        return []

    @property
    def vocabulary_settings(self) -> TokenizerOptions | None:
        """The output vocabulary to build, with mergekit's semantics (rows re-mapped per token): the tokenizer
        block, or tokenizer_source when it is set to a source; None when it is unset (the base's files are
        copied, embeddings merged row by row) or none."""
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_source is not None and self.tokenizer_source != "none":
            return TokenizerOptions(source=self.tokenizer_source)
        return None

    @property
    def input_references(self) -> list[str]:
        """Every input model's reference as the recipe gives it (base first), once each."""
        refs = [self.base_model] if self.base_model is not None else []
        refs += [m.model for m in self.models or []]
        refs += [s.model for sl in self.slices or [] for s in sl.sources]
        refs += [sl.base_model for sl in self.slices or [] if sl.base_model is not None]
        return list(dict.fromkeys(refs))

    def input_reference(self, text: str) -> str | None:
        """The input reference a recipe field names: a model's name, or an input's reference itself; None if neither."""
        if self.models is not None and text in self.model_names:
            return self.models[self.model_names.index(text)].model
        if self.slices is not None and text in self.model_names:
            refs = list(dict.fromkeys(s.model for sl in self.slices for s in sl.sources))
            return refs[self.model_names.index(text)]
        return text if text in self.input_references else None

    def _count_problems(self, method: Any, refs: list[str], where: str, base: str | None = None) -> list[str]:
        """Too few or too many inputs for the method (counted as the method counts them)."""
        base = base if base is not None else self.base_model
        if method.inputs == "task_vectors":
            count = sum(1 for r in refs if r != base)
            what = "models besides the base"
        else:
            count = len(refs) + (1 if base is not None and method.base != "unused" and base not in refs else 0)
            what = "models (the base included)" if method.base != "unused" else "models"
        if count < method.min_models or (method.max_models is not None and count > method.max_models):
            return [f"{where}: {method.name} takes {method.model_count} {what}, got {count}"]
        return []

    def _parameter_levels(self) -> list[tuple[str, dict[str, Any], bool]]:
        """(where, parameters, per-model level?) for every ``parameters:`` mapping of the recipe."""
        levels = [("parameters", self.parameters, False)]
        levels += [(f"models[{i}].parameters", m.parameters, True) for i, m in enumerate(self.models or [])]
        for i, sl in enumerate(self.slices or []):
            levels.append((f"slices[{i}].parameters", sl.parameters, False))
            levels += [(f"slices[{i}].sources[{j}].parameters", s.parameters, True) for j, s in enumerate(sl.sources)]
        return levels

    def _parameter_problems(self, method: Any) -> list[str]:
        names = [p.name for p in method.params]
        problems = []
        for where, params, per_model in self._parameter_levels():
            for key, value in params.items():
                param = method.param(key)
                if param is None and key in MERGEKIT_PARAMETER_NAMES:
                    continue  # reported by notes(): mergekit's name, not this method's — ignored, as mergekit does
                elif param is None:
                    problems.append(f"{where}.{key}: {method.name} has no parameter {key!r}{suggest(str(key), names)}")
                elif per_model and not param.per_model:
                    problems.append(f"{where}.{key}: {key!r} applies to the whole merge; move it to the top-level parameters")
                else:
                    problems += check_setting(param, value, f"{where}.{key}")
        return problems

    def notes(self) -> list[str]:
        """Non-fatal findings: mergekit parameter names this method does not use (mergekit ignores them too)."""
        method = get_method(self.merge_method)
        found = []
        for where, params, _ in self._parameter_levels():
            for key in params:
                if method.param(key) is None and key in MERGEKIT_PARAMETER_NAMES:
                    found.append(f"{where}.{key}: {method.name} does not use {key!r}; it has no effect (mergekit ignores it too)")
        return found

    def _missing_required(self, method: Any) -> list[str]:
        """Required parameters (no default) that some merged tensor would not get."""
        problems = []
        for param in (p for p in method.params if p.required):
            everywhere = param.name in self.parameters
            if not everywhere and param.per_model and self.models is not None:
                everywhere = all(param.name in m.parameters for m in self.models)
            if not everywhere and self.slices is not None:
                everywhere = all(param.name in sl.parameters or (param.per_model and all(param.name in s.parameters for s in sl.sources))
                                 for sl in self.slices)
            if not everywhere:
                problems.append(f"parameters.{param.name}: {method.name} needs {param.name!r} ({param.doc})")
        return problems

    def _searches(self) -> list[tuple[str, str]]:
        return [(where, key) for where, params, _ in self._parameter_levels() for key, value in params.items() if is_search(value)]

    @property
    def warnings(self) -> list[str]:
        """Non-fatal notes found while reading the recipe (printed by the CLI as ``warning:`` lines)."""
        return list(self._warnings)

    @property
    def method(self):  # -> MergeMethod (annotation avoided: pydantic would treat it as a field type)
        return get_method(self.merge_method)

    @property
    def model_names(self) -> list[str]:
        """Each model's task name: its ``name`` or the last part of its path/repo id (slices: each distinct source model)."""
        if self.models is not None:
            return [m.name if m.name is not None else default_name(m.model) for m in self.models]
        refs = list(dict.fromkeys(s.model for sl in self.slices or [] for s in sl.sources))
        return [default_name(r) for r in refs]

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
        """The parameters of the whole merge and of each model, before any per-tensor gradient or filter."""
        models = self.models or []
        return resolve(self.method, [self.parameters], [[m.parameters, self.parameters] for m in models], "", [""] * len(models), 0.0)


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


def read_recipe_text(path: str | os.PathLike[str]) -> str:
    """A recipe file's text, or one RecipeError line naming the file (missing, a folder, not UTF-8)."""
    path = Path(path)
    shown = one_line(str(path))
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{shown}: recipe file not found") from None
    except IsADirectoryError:
        raise RecipeError(f"{shown}: is a folder, not a recipe file") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{shown}: not a text file (byte {exc.start} is not UTF-8)") from None
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{shown}: cannot read recipe: {one_line(str(exc))}") from None


def parse_documents(text: str, source: str = "recipe") -> list[Any]:
    """Every non-empty YAML document of ``text`` as plain data (a SafeLoader refusing duplicate keys);
    a YAML problem is one RecipeError line with its line and column."""
    shown = one_line(str(source))
    try:
        documents = list(yaml.load_all(text, Loader=_RecipeLoader))  # a SafeLoader: builds plain data only
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
    return [d for d in documents if d is not None]


_LEVEL_FIELDS = {
    (): Recipe.model_fields,
    ("tokenizer",): TokenizerOptions.model_fields,
    ("tokenizer", "tokens", "*"): TokenEntry.model_fields,
    ("tokenizer", "tokens", "*", "source", "model_token"): ModelTokenSource.model_fields,
    ("tokenizer", "tokens", "*", "source", "zero"): ZeroSource.model_fields,
    ("models",): ModelEntry.model_fields,
    ("slices",): SliceEntry.model_fields,
    ("slices", "sources"): SliceSource.model_fields,
    ("output",): OutputOptions.model_fields,
}


#: pydantic's names for the branches of a union in an error's location (not recipe keys): left out of messages
_BRANCH = re.compile(r"^(tagged-union|function-after|function-before|function-wrap|union)\[")


def _describe_all(exc: ValidationError) -> list[str]:
    """pydantic's report as one line per problem: the key path, what is wrong, and a suggestion.
    Where a field takes text or a mapping and a mapping was given, only the mapping's own problems are said."""
    errors = []
    for error in exc.errors():
        if error["loc"] and error["loc"][-1] == "str" and isinstance(error.get("input"), dict):
            continue
        errors.append({**error, "loc": tuple(p for p in error["loc"] if not (isinstance(p, str) and _BRANCH.match(p)))})
    return [_describe_error(error) for error in errors]


def _describe_error(error: Any) -> str:
    loc = error["loc"]
    path = _loc_path(loc)
    if error["type"] == "extra_forbidden":
        key = str(loc[-1])
        level = tuple(str(p) for p in loc[:-1] if not isinstance(p, int))
        if level[:2] == ("tokenizer", "tokens") and len(level) > 2:
            level = (*level[:2], "*", *level[3:])  # a token's entry: the token is a key of its own
        fields = _LEVEL_FIELDS.get(level, {})
        return one_line(f"{path}: unknown key{suggest(key, fields)}")
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    message = (str(error["msg"]).splitlines() or [""])[0]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    got = error.get("input")
    detail = "" if isinstance(got, (dict, list)) or got is None or " got " in message else f" (got {safe_repr(got)})"
    return one_line(f"{path}: {message}{detail}")


def _more(problems: list[str]) -> str:
    return f" (and {len(problems) - 1} more problem(s); `mergekit-lite validate` lists them all)" if len(problems) > 1 else ""


def _drop_misplaced_parameters(data: dict[Any, Any]) -> tuple[dict[Any, Any], list[str]]:
    """Remove top-level keys that are merge parameters (``normalize: true`` beside ``parameters:``, as
    published configs have): mergekit ignores them, so they run with a warning saying where they belong.
    A key that is neither a recipe key nor a parameter name stays, and pydantic reports it as unknown."""
    known = set(Recipe.model_fields)
    parameter_names = {p.name for m in METHODS.values() for p in m.params} | MERGEKIT_PARAMETER_NAMES
    kept, warnings = {}, []
    for key, value in data.items():
        if isinstance(key, str) and key not in known and key in parameter_names:
            warnings.append(f"{key}: has no effect at the top level (mergekit ignores it too); it belongs under 'parameters:'")
            continue
        kept[key] = value
    return kept, warnings


def _loc_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        text = part if isinstance(part, str) else safe_repr(part, 40)
        if i == 2 and tuple(loc[:2]) == ("tokenizer", "tokens"):  # a token: shown as a quoted key
            out += f"[{safe_repr(part, 60)}]"
            continue
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
        if isinstance(value, (list, tuple)) and _in_parameters(loc) and any(isinstance(v, (list, tuple, set)) for v in value):
            return f"{_loc_path(loc)}: a gradient holds plain values and a filter list {{filter, value}} entries, not lists"
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

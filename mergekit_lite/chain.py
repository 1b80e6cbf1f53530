"""Chains: multi-document recipes (mergekit-multi's format), where a later merge reads an earlier one's output.

Each YAML document is a recipe; ``name: x`` makes it a step whose output later documents use by
writing ``x`` where a model goes (``base_model``, ``models[].model``, slice sources, ``tokenizer_source``).
The unnamed document is the final merge (written to OUT_DIR); named steps go to the intermediate
folder. This module parses and checks a chain (names, references, cycles, order) and says, from a
stamp file in each output, whether a step's output is complete and made by the same recipe.
Running steps is the API's job (api.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .checkpoint import split_revision
from .errors import RecipeError
from .methods import suggest
from .recipe import Recipe, parse_documents, read_recipe_text
from .text import _BAD_CATEGORIES, one_line, safe_repr

#: The file in a step's output that records which recipe made it and what the output holds.
STAMP = "mergekit-lite-step.json"
STAMP_FORMAT = "mergekit-lite-step"
#: Bumped when what a step digest covers changes (old outputs are then rebuilt, never reused wrongly).
CHAIN_FORMAT = 1
#: Characters a step name may not hold: it becomes a folder name, and '@' / '+' mean a revision / a LoRA in a reference.
_NAME_FORBIDDEN = set("/\\@+")


@dataclass(frozen=True)
class Step:
    """One document of a chain: its recipe as written (other steps referred to by name) and what it reads."""

    name: str | None  # None: the unnamed final merge
    document: int  # 1-based position in the file
    recipe: Recipe
    needs: tuple[str, ...]  # the steps whose outputs it reads, in order of first use
    tokenizer_source: str | None  # as written (None: unset) (a step's name is kept here; ``recipe`` holds a stand-in while checked)

    @property
    def label(self) -> str:
        return repr(self.name) if self.name is not None else "final"


@dataclass
class Chain:
    """A checked chain: steps in the order they run (every step after the steps it reads), the final one last."""

    source: str
    steps: list[Step]
    warnings: list[str] = field(default_factory=list)
    _digests: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def final(self) -> Step:
        return self.steps[-1]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps if s.name is not None]

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> "Chain":
        return cls.from_documents(parse_documents(read_recipe_text(path), str(path)), str(path))

    @classmethod
    def from_text(cls, text: str, source: str = "chain") -> "Chain":
        return cls.from_documents(parse_documents(text, source), source)

    @classmethod
    def from_documents(cls, documents: list[Any], source: str = "chain") -> "Chain":
        """Check every document, the names and the references between them; every problem in one RecipeError."""
        source = one_line(str(source))
        if not documents:
            raise RecipeError(f"{source}: holds no recipe")
        problems: list[str] = []
        named: dict[str, int] = {}
        unnamed: list[int] = []
        bodies: list[tuple[str | None, int, dict[str, Any]]] = []
        for number, doc in enumerate(documents, 1):
            if not isinstance(doc, dict):
                problems.append(f"{source}, document {number}: expected a mapping of recipe keys (merge_method, models, ..., and name:)")
                continue
            name = doc.get("name")
            if "name" not in doc:
                unnamed.append(number)
            elif (why := _name_problem(name)) is not None:
                problems.append(f"{source}, document {number}: name: {why}")
                continue
            elif name in named:
                problems.append(f"{source}, document {number}: name: {name!r} is already the name of document {named[name]}; give each step its own name")
                continue
            else:
                named[name] = number
            bodies.append((name, number, {k: v for k, v in doc.items() if k != "name"}))
        if len(unnamed) > 1:
            problems.append(f"{source}: documents {', '.join(map(str, unnamed))} have no name; only the final merge may be unnamed, give the others 'name:'")
        steps: list[Step] = []
        for name, number, body in bodies:
            where = f"{source}, document {number}" + (f" (step {name!r})" if name is not None else " (final)")
            tokenizer = body.get("tokenizer_source")
            if isinstance(tokenizer, str) and tokenizer in named:
                body = {**body, "tokenizer_source": "base"}  # a stand-in while checked: the step's output is not there yet
            try:
                recipe = Recipe.from_dict(body, where)
            except RecipeError as exc:
                problems.extend(exc.problems)
                continue
            needs, found = _step_references(recipe, tokenizer if isinstance(tokenizer, str) else recipe.tokenizer_source, named, where)
            problems += found
            steps.append(Step(name, number, recipe, needs, tokenizer if isinstance(tokenizer, str) else recipe.tokenizer_source))
        if problems:
            raise RecipeError(problems[0] + _more(problems), problems=problems)
        by_name = {s.name: s for s in steps if s.name is not None}
        problems += _cycle_problems(steps, by_name, source)
        users = {n for s in steps for n in s.needs}
        for s in steps:
            if s.name in users and s.recipe.method.output != "model":
                problems.append(f"{source}, document {s.document} (step {s.name!r}): {s.recipe.merge_method} writes a collection, not a model, "
                                "so no other step can read it; only the final merge may be a collection")
        final = [s for s in steps if s.name is None]
        if not final:
            ends = [s for s in steps if s.name not in users]
            if len(ends) > 1:
                problems.append(f"{source}: steps {', '.join(repr(s.name) for s in ends)} are used by no other step, so which is the output? "
                                "Leave the final merge's 'name:' out (mergekit-multi's convention); it is written to OUT_DIR")
            final = ends
        if problems:
            raise RecipeError(problems[0] + _more(problems), problems=problems)
        chain = cls(source, _run_order(steps, final[0]))
        chain.warnings = [w for s in chain.steps for w in s.recipe.warnings]
        return chain

    # -- what a step is -------------------------------------------------------------------------------
    def digest(self, step: Step) -> str:
        """SHA-256 of everything that decides a step's output: its recipe with references resolved (other
        steps by their own digests, local paths made absolute) and the mergekit-lite version."""
        key = step.document
        if key not in self._digests:
            names = set(self.names)

            def ref(value: str) -> str:
                return f"step:{value}" if value in names else _absolute(value)

            data = map_references(step.recipe.model_dump(mode="json"), ref)
            tokenizer = step.tokenizer_source
            data["tokenizer_source"] = ref(tokenizer) if tokenizer is not None and tokenizer not in ("base", "none", "union", *step.recipe.model_names) else tokenizer
            body = {
                "chain_format": CHAIN_FORMAT,
                "mergekit_lite": __version__,
                "recipe": data,
                "inputs": {n: self.digest(self.step(n)) for n in step.needs},
            }
            self._digests[key] = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
        return self._digests[key]

    def resolved(self, step: Step, folders: dict[str, Path]) -> Recipe:
        """The step's recipe with every step reference replaced by that step's output folder (ready to plan)."""

        def ref(value: str) -> str:
            return str(folders[value]) if value in folders else value

        data = map_references(step.recipe.model_dump(mode="json", exclude_none=True), ref)
        tokenizer = step.tokenizer_source
        data["tokenizer_source"] = str(folders[tokenizer]) if tokenizer in folders and tokenizer not in step.recipe.model_names else tokenizer
        where = f"{self.source}, document {step.document}" + (f" (step {step.name!r})" if step.name is not None else " (final)")
        return Recipe.from_dict(data, where)


def load_recipe(path: str | os.PathLike[str]) -> Recipe | Chain:
    """A recipe file: one plain document is a Recipe (read exactly as ``Recipe.from_yaml``); several
    documents, or one with ``name:``, are a Chain."""
    text = read_recipe_text(path)
    documents = parse_documents(text, str(path))
    if len(documents) <= 1 and not (documents and isinstance(documents[0], dict) and "name" in documents[0]):
        return Recipe.from_text(text, str(path))
    return Chain.from_documents(documents, str(path))


def default_intermediate_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Where a chain's named steps go unless told: beside OUT_DIR, as ``<OUT_DIR>-intermediate``."""
    out = Path(out_dir).absolute()
    return out.with_name(f"{out.name}-intermediate")


def map_references(data: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """A copy of a dumped recipe with every model reference (base_model, models, slice sources and bases) passed through ``fn``."""
    out = dict(data)
    if isinstance(out.get("base_model"), str):
        out["base_model"] = fn(out["base_model"])
    if isinstance(out.get("models"), list):
        out["models"] = [{**m, "model": fn(m["model"])} for m in out["models"]]
    if isinstance(out.get("slices"), list):
        out["slices"] = [
            {
                **sl,
                "sources": [{**s, "model": fn(s["model"])} for s in sl["sources"]],
                **({"base_model": fn(sl["base_model"])} if isinstance(sl.get("base_model"), str) else {}),
            }
            for sl in out["slices"]
        ]
    return out


# -- stamps: is a step's output complete, and made by this recipe? -----------------------------------
def write_stamp(folder: Path, step: Step, digest: str) -> None:
    """Record the step's digest and every file of its output (with its size) in ``folder``; written last."""
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STAMP}
    data = {"format": STAMP_FORMAT, "version": CHAIN_FORMAT, "step": step.name, "digest": digest, "files": files}
    (folder / STAMP).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def output_state(folder: Path, digest: str) -> str:
    """'absent' (no folder), 'foreign' (not a step's output: no readable stamp), 'changed' (made by another
    recipe), 'incomplete' (a recorded file is missing or has another size) or 'current'."""
    if not folder.exists() and not folder.is_symlink():
        return "absent"
    try:
        data = json.loads((folder / STAMP).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return "foreign"
    if not isinstance(data, dict) or data.get("format") != STAMP_FORMAT or not isinstance(data.get("files"), dict):
        return "foreign"
    if data.get("digest") != digest:
        return "changed"
    for rel, size in data["files"].items():
        try:
            if not isinstance(rel, str) or ".." in Path(rel).parts or (folder / rel).stat().st_size != size:
                return "incomplete"
        except (OSError, ValueError):
            return "incomplete"
    return "current"


# -- checks ---------------------------------------------------------------------------------------
def _name_problem(name: Any) -> str | None:
    if not isinstance(name, str):
        return f"must be text, got {safe_repr(name)}"
    if not name.strip() or name in (".", "..") or name != name.strip():
        return f"{safe_repr(name)} is not usable: it names the step's output folder (not empty, no surrounding spaces, not . or ..)"
    if any(c in _NAME_FORBIDDEN for c in name) or any(unicodedata.category(c) in _BAD_CATEGORIES for c in name):
        return f"{safe_repr(name)} is not usable: a step name becomes a folder name and is written where a model goes (no / \\ @ + or control characters)"
    return None


def _step_references(recipe: Recipe, tokenizer: str | None, steps: dict[str, int], where: str) -> tuple[tuple[str, ...], list[str]]:
    """The steps a recipe reads, and problems: a reference that is neither a step nor an existing path, or both."""
    refs = [("base_model", recipe.base_model)] if recipe.base_model is not None else []
    refs += [(f"models[{i}].model", m.model) for i, m in enumerate(recipe.models or [])]
    for i, sl in enumerate(recipe.slices or []):
        refs += [(f"slices[{i}].sources[{j}].model", s.model) for j, s in enumerate(sl.sources)]
        refs += [(f"slices[{i}].base_model", sl.base_model)] if sl.base_model is not None else []
    if tokenizer in steps and tokenizer not in recipe.model_names:
        refs.append(("tokenizer_source", tokenizer))
    needs: list[str] = []
    problems = []
    for key, value in refs:
        if value in steps:
            if _exists(value):
                problems.append(f"{where}: {key}: {value!r} is the name of a step of this chain and also an existing path "
                                f"({Path(value).expanduser().absolute()}); rename the step, or write the path as ./{value}")
            elif value not in needs:
                needs.append(value)
        elif "/" not in split_revision(value)[0] and "\\" not in value and not _exists(value):
            problems.append(f"{where}: {key}: {safe_repr(value)} is neither a step of this chain ({', '.join(steps) or 'none is named'}) "
                            f"nor an existing path{suggest(value, steps)}")
    return tuple(needs), problems


def _cycle_problems(steps: list[Step], by_name: dict[str, Step], source: str) -> list[str]:
    """One problem per cycle of steps reading each other's outputs, as 'a → b → a'."""
    state: dict[str, int] = {}  # 1: on the path being explored, 2: done
    found: list[str] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for need in by_name[name].needs:
            if state.get(need) == 1:
                cycle = path[path.index(need):] + [name, need] if need in path else [name, need]
                found.append(f"{source}: steps read each other's outputs in a cycle: {' → '.join(repr(n) for n in cycle)}; "
                             "a step can only use steps that do not use it")
            elif need not in state:
                visit(need, path + [name])
        state[name] = 2

    for s in steps:
        if s.name is not None and s.name not in state:
            visit(s.name, [])
    return found


def _run_order(steps: list[Step], final: Step) -> list[Step]:
    """Every step after the steps it reads; otherwise in document order, the final merge last."""
    done: set[str | None] = set()
    order: list[Step] = []
    pending = sorted(steps, key=lambda s: (s is final, s.document))
    while pending:
        ready = next(s for s in pending if all(n in done for n in s.needs))
        pending.remove(ready)
        order.append(ready)
        done.add(ready.name)
    return order


def _exists(reference: str) -> bool:
    try:
        return os.path.lexists(os.path.expanduser(split_revision(reference)[0]))
    except (ValueError, RuntimeError):
        return False


def _absolute(reference: str) -> str:
    """A local path as an absolute one (a chain's digest must not depend on the folder it is run from); others as they are."""
    name, revision = split_revision(reference)
    if revision is None and _exists(name):
        return str(Path(name).expanduser().absolute())
    return reference


def _more(problems: list[str]) -> str:
    return f" (and {len(problems) - 1} more problem(s); `mergekit-lite validate` lists them all)" if len(problems) > 1 else ""

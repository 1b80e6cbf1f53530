"""Parameter values as recipes write them, and their resolution for one tensor (mergekit's rules).

A value is a scalar; a list of scalars (a *gradient*: interpolated over the layer's relative depth
t ∈ [0, 1]); a list of ``{filter, value}`` entries (the first whose filter is a substring of the
tensor name wins; no filter, or ``*``, matches everything; values may be gradients); or, for
searchable parameters, ``{search: [...]}`` (a grid for the evaluator). Settings are looked up from
the most specific level to the least (slice source > slice > model > global); a level whose value
resolves to nothing for this tensor (no filter matched) falls through to the next.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from .errors import RecipeError
from .methods.base import MergeMethod, Param

#: one level of settings (a ``parameters:`` mapping), or None where a level has none
Settings = Mapping[str, Any] | None


def is_search(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"search"}


def check_setting(param: Param, value: Any, where: str) -> list[str]:
    """Problems with one recipe value for ``param`` (empty when it is usable)."""
    if is_search(value):
        grid = value["search"]
        if not param.searchable:
            return [f"{where}: {param.name} cannot be searched; give a value"]
        if not isinstance(grid, list) or not grid:
            return [f"{where}.search: a search grid is a non-empty list of numbers"]
        return _collect(lambda: [param.check(v, f"{where}.search[{i}]") for i, v in enumerate(grid)])
    if isinstance(value, dict):
        keys = ", ".join(map(str, value))
        hint = " ({search: [...]} searches a grid)" if param.searchable else ""
        return [f"{where}: expected a value, a list (gradient) or a list of {{filter, value}} entries, got a mapping with {keys}{hint}"]
    if isinstance(value, list):
        if not value:
            return [f"{where}: an empty list gives no value"]
        if not param.per_tensor:
            return [f"{where}: {param.name} applies to the whole model; give one value, not a gradient or filter list"]
        if all(isinstance(v, dict) for v in value):
            problems: list[str] = []
            for i, entry in enumerate(value):
                extra = set(entry) - {"filter", "value"}
                if extra or "value" not in entry:
                    problems.append(f"{where}[{i}]: a filter entry has 'filter' (optional) and 'value' keys, got {', '.join(map(str, entry)) or 'nothing'}")
                    continue
                if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                    problems.append(f"{where}[{i}].filter: expected text (a substring of tensor names), got {entry['filter']!r}")
                problems += check_setting(param, entry["value"], f"{where}[{i}].value")
            return problems
        if any(isinstance(v, (dict, list)) for v in value):
            return [f"{where}: a gradient is a list of plain values; a filter list holds only {{filter, value}} entries"]
        return _collect(lambda: [param.check(v, f"{where}[{i}]") for i, v in enumerate(value)])
    return _collect(lambda: param.check(value, where))


def _collect(fn: Any) -> list[str]:
    try:
        fn()
    except RecipeError as exc:
        return [str(exc)]
    return []


def evaluate_setting(value: Any, tensor_name: str, t: float) -> Any:
    """The value of one setting for a tensor at relative depth t, or None when no filter matches.

    Gradients of numbers interpolate linearly between neighbouring entries (position t·(n−1));
    gradients of other values pick entry ⌊t·(n−1)⌋; a search grid is returned as its list.
    """
    if is_search(value):
        return list(value["search"])
    if not isinstance(value, list):
        return value
    if all(isinstance(v, dict) for v in value):
        for entry in value:
            flt = entry.get("filter")
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return evaluate_setting(entry["value"], tensor_name, t)
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return value[int(t * (len(value) - 1))]
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


def _coerced(param: Param, value: Any) -> Any:
    """``value`` with every scalar passed through ``param.coerce`` (inside gradients and filter entries too)."""
    if is_search(value):
        return {"search": [param.coerce(v) for v in value["search"]]}
    if isinstance(value, list):
        return [{**v, "value": _coerced(param, v["value"])} if isinstance(v, dict) else param.coerce(v) for v in value]
    return param.coerce(value)


def resolve_param(param: Param, levels: Iterable[Settings], tensor_name: str, t: float) -> Any:
    """The first level's value that resolves for this tensor, else the parameter's default.

    A whole-number parameter whose gradient lands between whole numbers is refused (as mergekit does).
    """
    for settings in levels:
        if settings is not None and param.name in settings:
            value = evaluate_setting(_coerced(param, settings[param.name]), tensor_name, t)
            if value is None:
                continue
            if param.kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
                if param.kind is int and not float(value).is_integer():
                    raise RecipeError(f"{param.name}: the gradient gives {value:g} for {tensor_name}; {param.name} takes whole numbers")
                return param.kind(value)
            return value
    return param.default


def resolve(
    method: MergeMethod,
    shared_levels: Sequence[Settings],
    input_levels: Sequence[Sequence[Settings]],
    output_name: str,
    input_names: Sequence[str],
    t: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The method's parameters for one output tensor: global ones, and per input (filters see the input's tensor name)."""
    shared = {p.name: resolve_param(p, shared_levels, output_name, t) for p in method.params if not p.per_model}
    per_input = [
        {p.name: resolve_param(p, levels, name, t) for p in method.params if p.per_model}
        for levels, name in zip(input_levels, input_names)
    ]
    for p in method.params:  # a per-model parameter's global value also lands in the shared dict (the model card shows it)
        if p.per_model:
            shared[p.name] = resolve_param(p, shared_levels, output_name, t)
    return shared, per_input

"""Recipes: whatever the YAML text or Python structure, the outcome is a valid Recipe or one
``RecipeError`` on one line that starts with the source; the CLI exits 0 or 2, never 1.

Hypothesis drives the generators here (derandomized, no database: the same examples every run);
fuzz.py drives its own seeded ones for ``make fuzz``. Below them, one regression test per defect
fixed in recipe.py.
"""

from __future__ import annotations

import math
import time

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz
from mergekit_lite import Recipe, RecipeError
from mergekit_lite.cli import main
from mergekit_lite.methods import METHODS
from mergekit_lite.recipe import parse_size

SETTINGS = settings(
    derandomize=True, database=None, deadline=None, max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# -- strategies -------------------------------------------------------------------------------------
odd_text = st.one_of(
    st.sampled_from(fuzz.SPECIAL_STRINGS),
    st.text(max_size=12),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=8),
    st.builds(lambda c, n: c * n, st.sampled_from("x日\n"), st.sampled_from([1000, 20_000])),
)
odd_number = st.one_of(
    st.sampled_from(fuzz.SPECIAL_NUMBERS),
    st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([10**400, -(10**400), 2**63, -(2**63) - 1]),
    st.builds(pow, st.just(-10), st.sampled_from([5001, 5002])),  # too long for repr(): built, not listed
)
scalar = st.one_of(st.none(), st.booleans(), odd_number, odd_text, st.binary(max_size=4))
#: the values that broke recipe.py before (huge integers, line breaks, non-finite numbers), drawn often on purpose
hostile = st.one_of(
    st.sampled_from([10**400, -(10**400), 2**64, float("nan"), float("inf"), "a\nb", "x\u2028y", "\r", "nul\x00", "\ud800", "9" * 400 + "TB"]),
    st.builds(pow, st.just(-10), st.just(5001)),
)
hostile_key = st.sampled_from(["a\nb", "x\u2028y", "k\r", "\x85", "\ud800", "lambda\n", "weight\x0b"])
junk = st.recursive(
    scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(odd_text, st.integers(), st.none(), st.booleans()), inner, max_size=4),
        st.tuples(inner),
    ),
    max_leaves=12,
)


def _nest(depth: int, leaf, as_list: bool):
    for _ in range(depth):
        leaf = [leaf] if as_list else {"k": leaf}
    return leaf


nested = st.builds(_nest, st.sampled_from([5, 65, 300, 2000]), scalar, st.booleans())


def param_values(method_name: str):
    method = METHODS[method_name]
    keys = st.one_of(st.sampled_from([p.name for p in method.params] + ["epsilon", "weights", "Lambda"]), hostile_key)
    value = st.one_of(hostile, junk, odd_number, st.lists(odd_number, max_size=3), nested)
    return st.dictionaries(keys, value, max_size=4)


@st.composite
def recipe_structures(draw):
    """Near-valid recipes with one to four things wrong (or none), over all methods."""
    method = draw(st.sampled_from(sorted(METHODS)))
    models = draw(st.lists(
        st.fixed_dictionaries(
            {"model": st.one_of(st.sampled_from(["org/a", "m1", "./x", "a/b/c"]), hostile, odd_text, junk)},
            optional={"name": st.one_of(st.sampled_from(["t1", "t2", "t1"]), odd_text, junk), "parameters": st.one_of(param_values(method), junk)},
        ),
        max_size=4,
    ))
    data = {"merge_method": draw(st.one_of(st.just(method), odd_text, junk)), "base_model": draw(st.one_of(st.just("org/base"), odd_text, junk)), "models": models}
    optional = {
        "parameters": st.one_of(param_values(method), junk, nested),
        "dtype": st.one_of(st.sampled_from(["float32", "float64", "bfloat16", "float16", "int8"]), junk),
        "out_dtype": st.one_of(st.sampled_from(["float32", "bfloat16", "int4"]), junk),
        "tokenizer_source": st.one_of(st.sampled_from(["base", "none", "t1", "t3"]), junk),
        "include": st.one_of(st.lists(odd_text, max_size=3), junk),
        "exclude": st.one_of(st.lists(odd_text, max_size=3), junk),
        "output": st.one_of(st.fixed_dictionaries({"shard_size": st.one_of(hostile, odd_text, odd_number, st.sampled_from(["5GB", "1KiB"]))}), junk),
        "evaluator": st.one_of(st.sampled_from(["mod:fn", "a.b:c", "x"]), odd_text),
        "slices": junk, "modles": junk,
    }
    for key, strategy in optional.items():
        if draw(st.integers(0, 3)) == 0:
            data[key] = draw(strategy)
    for _ in range(draw(st.integers(0, 2))):
        data[draw(st.one_of(hostile_key, odd_text, st.integers(), st.none()))] = draw(st.one_of(hostile, junk))
    return data if draw(st.integers(0, 15)) else draw(st.one_of(junk, nested))


yaml_tokens = st.sampled_from(fuzz.YAML_TOKENS)


@st.composite
def yaml_texts(draw):
    """YAML text: a dumped (near-valid) structure with tokens spliced in, or free text."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=200))
    data = draw(recipe_structures())
    try:
        text = yaml.safe_dump(data, allow_unicode=draw(st.booleans()), default_flow_style=draw(st.sampled_from([None, True, False])), sort_keys=False)
    except (yaml.YAMLError, RecursionError, TypeError, ValueError):
        text = "merge_method: ties\nbase_model: b\nmodels: [{model: m}]\n"
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.one_of(yaml_tokens, st.text(max_size=3))) + text[at:]
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]
    return text


def assert_allowed(result: fuzz.Result) -> None:
    assert result.outcome != fuzz.FAILED, f"{result.reason}: {result.detail}"


# -- properties --------------------------------------------------------------------------------------
@SETTINGS
@given(recipe_structures())
def test_from_dict_valid_or_one_line_error(data):
    assert_allowed(fuzz.check_recipe("struct", lambda: Recipe.from_dict(data, "my.yml"), "my.yml"))


@SETTINGS
@given(junk)
def test_from_dict_any_value_as_root(data):
    assert_allowed(fuzz.check_recipe("root", lambda: Recipe.from_dict(data), "recipe"))


@settings(SETTINGS, max_examples=100)
@given(yaml_texts())
def test_from_text_valid_or_one_line_error(text):
    assert_allowed(fuzz.check_recipe("yaml", lambda: Recipe.from_text(text, "fuzz.yml"), "fuzz.yml"))


@settings(SETTINGS, max_examples=40)
@given(recipe_structures(), st.sampled_from(["validate", "dry-run"]))
def test_cli_exits_0_or_2_never_a_traceback(tmp_path_factory, data, command):
    folder = tmp_path_factory.mktemp("cli")
    recipe = folder / "r.yml"
    try:
        recipe.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    except (yaml.YAMLError, RecursionError, TypeError, ValueError):
        recipe.write_text("merge_method: [", encoding="utf-8")
    args = ["validate", str(recipe)] if command == "validate" else ["run", str(recipe), str(folder / "out"), "--dry-run"]
    result = CliRunner().invoke(main, args)
    assert_allowed(fuzz.cli_result(command, result, None, never=folder / "out"))
    assert fuzz.leftovers(folder) == []


# -- regressions: one per defect fixed in recipe.py --------------------------------------------------
BASE = {"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "m"}]}


def error(data=None, text=None, source="r.yml") -> str:
    with pytest.raises(RecipeError) as info:
        Recipe.from_text(text, source) if text is not None else Recipe.from_dict(data, source)
    message = str(info.value)
    assert fuzz.one_line(message) and message.startswith(f"{source}: "), message
    return message


@pytest.mark.parametrize("where", ["lambda", "weight"])
def test_huge_integer_parameter_is_an_error_not_overflow(where):
    """Was: OverflowError (int too large to convert to float) from the parameter check."""
    data = {**BASE, "parameters": {"lambda": 10**400}} if where == "lambda" else {**BASE, "models": [{"model": "m", "parameters": {"weight": 10**400}}]}
    assert "too large" in error(data)


def test_integer_of_thousands_of_digits_is_an_error():
    """Was: ValueError (Exceeds the limit (4300 digits)) while formatting the message, from YAML or from a dict."""
    assert "not valid YAML" in error(text="merge_method: ties\nparameters: {density: " + "9" * 5000 + "}\n")
    assert "too large" in error({**BASE, "merge_method": "ties", "parameters": {"density": -(10**5000)}})
    assert "too large" in error({**BASE, "output": {"shard_size": -(10**5000)}})


def test_deeply_nested_yaml_is_an_error_not_recursion():
    """Was: RecursionError out of yaml.safe_load."""
    assert "nested too deeply" in error(text="[" * 5000 + "]" * 5000)
    assert "nested too deeply" in error(text="{a: " * 3000 + "1" + "}" * 3000)


def test_deeply_nested_or_cyclic_structure_is_an_error_not_recursion():
    """Was: RecursionError out of the search-grid check of a searchable parameter."""
    grid: list = [0.1]
    grid.append(grid)
    assert "plain values" in error({**BASE, "parameters": {"lambda": _nest(5000, 1.0, True)}})
    assert "plain values" in error({**BASE, "parameters": {"lambda": grid}})
    assert "levels deep" in error({**BASE, "include": _nest(5000, "x", True)})


def test_nested_search_grid_is_refused():
    """Was: accepted, [[0.1]] passed as a search grid of lists."""
    assert "plain values" in error({**BASE, "merge_method": "consensus", "parameters": {"lambda": [[0.1], [0.2]]}, "evaluator": "m:f"})


def test_huge_shard_size_is_an_error_not_overflow():
    """Was: OverflowError (cannot convert float infinity to integer) in parse_size."""
    assert "shard_size" in error({**BASE, "output": {"shard_size": "9" * 400 + "TB"}})
    with pytest.raises(ValueError):
        parse_size("9" * 400 + "TB")
    assert parse_size("2.5 kb") == 2500 and parse_size("1GiB") == 2**30


@pytest.mark.parametrize(
    "data",
    [
        {**BASE, "a\nb": 1},
        {**BASE, "parameters": {"x\ny": 1}},
        {**BASE, "parameters": {"line\u2028sep": 1}},
        {**BASE, "output": {"a\rb": 1}},
        {**BASE, "models": [{"model": "m", "parameters": {"w\x85": 1}}]},
    ],
)
def test_keys_with_line_breaks_give_one_line(data):
    """Was: the unknown key went into the message raw, breaking it over two lines."""
    error(data)


@pytest.mark.parametrize("field, value", [("base_model", "a\nb"), ("model", "m\x00"), ("name", "x\ny"), ("name", "\ud800")])
def test_control_characters_in_references_and_names_are_refused(field, value):
    """Was: accepted; the reference then went raw into later messages (two lines) or paths (NUL)."""
    if field == "base_model":
        data = {**BASE, "base_model": value}
    else:
        data = {**BASE, "models": [{"model": "m", field: value} if field == "name" else {"model": value}]}
    message = error(data)
    assert "\\n" in message or "\\x00" in message or "\\ud800" in message or "valid string" in message


def test_duplicate_yaml_keys_are_refused():
    """Was: accepted, the second `parameters:` silently replaced the first."""
    message = error(text="merge_method: ties\nparameters: {density: 0.5}\nbase_model: b\nmodels: [{model: m}]\nparameters: {lambda: 2}\n")
    assert "line 5" in message and "'parameters' is given twice" in message


def test_yaml_merge_keys_are_not_duplicates():
    text = "merge_method: ties\nbase_model: b\nmodels:\n  - &m {model: m, parameters: {weight: 1}}\n  - <<: *m\n    name: other\n"
    recipe = Recipe.from_text(text)
    assert recipe.model_names == ["m", "other"]


def test_yaml_alias_bomb_is_refused_quickly():
    """Was: walked in full (10^8 values) by validation; now refused after a bounded count."""
    text = "a0: &a0 [1,1,1,1,1,1,1,1,1,1]\n" + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
    text += "merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: m}]\nparameters: {lambda: *a8}\n"
    start = time.perf_counter()
    message = error(text=text)
    assert time.perf_counter() - start < 5
    assert "more than" in message or "plain values" in message or "unknown key" in message


@pytest.mark.parametrize(
    "text",
    ["base_model: !!timestamp x\n", "models: !!int ''\n", "dtype: !!bool maybe\n", "parameters: {lambda: !!float x}\n", "? !!timestamp x\n: 1\n"],
)
def test_bad_tagged_yaml_scalars_are_errors(text):
    """Was: AttributeError / IndexError / KeyError / ValueError out of PyYAML's constructors."""
    assert "not valid YAML" in error(text=text)


def test_python_tags_never_construct_objects(tmp_path):
    marker = tmp_path / "PWNED"
    for text in (f"!!python/object/apply:os.system ['touch {marker}']\n", "merge_method: !!python/name:os.system\n"):
        assert "not valid YAML" in error(text=text)
    assert not marker.exists()


def test_messages_never_hold_raw_huge_values():
    message = error({**BASE, "merge_method": "x" * 100_000})
    assert fuzz.one_line(message)
    message = error({**BASE, "output": {"shard_size": "x" * 100_000}})
    assert len(message) < 1000


def test_nan_and_inf_parameters_are_refused():
    for value in (math.nan, math.inf, -math.inf):
        assert "finite" in error({**BASE, "parameters": {"lambda": value}})

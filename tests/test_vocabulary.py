"""Vocabularies that differ: the union / a model's tokenizer / the tokenizer: block, embedding rows re-mapped per
token (ops/vocab.py, vocabulary.py), each checked against rows computed plainly here, token by token.

Every tokenizer is real (byte-level BPE trained with ``tokenizers``, tests/vocab_models.py); mergekit 0.1.5's own
outputs on the same checkpoints are compared in tests/compat (configs ``*--written-vocab-*``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mergekit_lite
from mergekit_lite import CheckpointError, Recipe, RecipeError
from mergekit_lite.api import plan
from mergekit_lite.cli import main
from mergekit_lite.ops.vocab import TokenRule, plan_rows, remap_rows
from mergekit_lite.vocabulary import is_vocabulary_tensor, strip_to_rows

from helpers import leftovers, load_state, write_recipe
from vocab_models import VOCABULARY_TENSORS, build_vocab_models, train_bpe, TEXT_A

REL = 1e-5


@pytest.fixture(scope="module")
def vm(tmp_path_factory) -> dict[str, Path]:
    return build_vocab_models(tmp_path_factory.mktemp("vocab-models"))


# -- plain references --------------------------------------------------------------------------------
def vocab_of(folder: Path) -> dict[str, int]:
    """token → id from tokenizer.json (model vocabulary and added tokens), read as JSON."""
    data = json.loads((Path(folder) / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in data["added_tokens"]})
    return vocab


def rows_of(folder: Path) -> int:
    return json.loads((Path(folder) / "config.json").read_text())["vocab_size"]


def tokens_by_id(folder: Path) -> list[str]:
    vocab = vocab_of(folder)
    out = [None] * len(vocab)
    for token, i in vocab.items():
        out[i] = token
    assert None not in out
    return out


def reference_rows(tensors: dict[str, torch.Tensor], vocabs: dict[str, dict[str, int]], tokens: list[str], base: str | None,
                   rows: int, rules: dict[str, dict] | None = None) -> dict[str, torch.Tensor]:
    """Each model's rows re-mapped onto ``tokens``, one token at a time, by mergekit's rule written out plainly."""
    rules = rules or {}
    models = list(tensors)
    width = next(iter(tensors.values())).shape[1]
    out = {m: torch.zeros(rows, width, dtype=torch.float64) for m in models}
    for t, token in enumerate(tokens):
        have = [m for m in models if token in vocabs[m]]
        rule = rules.get(token)
        forced = bool(rule and rule.get("force"))
        if len(have) == len(models) and not forced:
            for m in models:
                out[m][t] = tensors[m][vocabs[m][token]].double()
            continue
        if rule is not None:
            kind, model, row = rule["source"]
            default = torch.zeros(width, dtype=torch.float64) if kind == "zero" else tensors[model][row].double()
        elif len(have) == 1:
            default = tensors[have[0]][vocabs[have[0]][token]].double()
        elif not have:
            default = torch.zeros(width, dtype=torch.float64)
        elif base is not None and base in have:
            default = tensors[base][vocabs[base][token]].double()
        else:
            default = sum(tensors[m][vocabs[m][token]].double() for m in have) / len(have)
        for m in models:
            out[m][t] = tensors[m][vocabs[m][token]].double() if token in vocabs[m] and not forced else default
    for m in models:
        if rows > len(tokens):
            out[m][len(tokens):] = out[m][: len(tokens)].mean(dim=0)
    return out


def model_vocab(folder: Path) -> dict[str, int]:
    limit = rows_of(folder)
    return {t: i for t, i in vocab_of(folder).items() if i < limit}


def assert_rel(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    rel = float((got.double() - want.double()).norm() / want.double().norm())
    assert rel <= REL, f"{what}: relative difference {rel:.3g}"


def linear_recipe(vm, names: list[str], weights: list[float], **extra) -> dict:
    return {"merge_method": "linear", "base_model": str(vm[names[0]]),
            "models": [{"model": str(vm[n]), "parameters": {"weight": w}} for n, w in zip(names, weights)], "dtype": "float32", **extra}


# -- the re-mapping math, by hand ---------------------------------------------------------------------
def test_rule_by_hand():
    """Three inputs (the base first), five tokens; rows are 10·input + row so every pick is visible."""
    maps = torch.tensor([
        [0, 1, -1, -1, -1],   # base: has tokens 0, 1
        [0, -1, 1, 2, -1],    # a: 0, 2, 3
        [1, 0, 0, 2, -1],     # b: 0, 1, 2, 3 (0 and 1 at other ids)
    ])
    tensors = [torch.tensor([[0.0], [1.0]]), torch.tensor([[10.0], [11.0], [12.0]]), torch.tensor([[20.0], [21.0], [22.0]])]
    out = remap_rows(tensors, plan_rows(maps, 0, {}, 7))
    # token 0: everyone has it → own rows; token 1: base and b have it → the base's row (1.0) for a;
    # token 2: a and b, no base → mean (11 + 20) / 2 for the base; token 3: a, b → mean (12 + 22) / 2; token 4: nobody → 0
    assert [float(x) for x in out[0][:5, 0]] == [0.0, 1.0, 15.5, 17.0, 0.0]
    assert [float(x) for x in out[1][:5, 0]] == [10.0, 1.0, 11.0, 12.0, 0.0]
    assert [float(x) for x in out[2][:5, 0]] == [21.0, 20.0, 20.0, 22.0, 0.0]
    for o in out:  # padding rows 5, 6: the input's mean row over the 5 tokens
        assert torch.allclose(o[5:], o[:5].mean(dim=0).expand(2, 1))
    # without a base: token 1 (base and b) is their mean
    assert float(remap_rows(tensors, plan_rows(maps, None, {}, 5))[1][1, 0]) == 10.5
    # a token only one input has: its row for everyone
    single = remap_rows(tensors[:2], plan_rows(maps[:2], 0, {}, 5))
    assert float(single[0][3, 0]) == 12.0 and float(single[0][2, 0]) == 11.0


def test_configured_rules_by_hand():
    maps = torch.tensor([[0, 1, -1], [0, 1, 2]])
    tensors = [torch.tensor([[0.0], [1.0]]), torch.tensor([[10.0], [11.0], [12.0]])]
    rules = {
        0: TokenRule("zero", force=True),            # everyone: zeros
        1: TokenRule("row", force=True, model=1, row=2),  # everyone: input 1's row 2
        2: TokenRule("row", force=False, model=0, row=0),  # only the input that lacks it: input 0's row 0
    }
    out = remap_rows(tensors, plan_rows(maps, 0, rules, 3))
    assert out[0][:, 0].tolist() == [0.0, 12.0, 0.0] and out[1][:, 0].tolist() == [0.0, 12.0, 12.0]
    # an unforced rule for a token everyone has is not used
    same = remap_rows(tensors, plan_rows(maps, 0, {0: TokenRule("zero")}, 3))
    assert same[0][0, 0] == 0.0 and same[1][0, 0] == 10.0
    with pytest.raises(ValueError, match="no source"):
        plan_rows(maps, 0, {2: TokenRule("none")}, 3)
    with pytest.raises(ValueError, match="asked of it"):
        remap_rows(tensors, plan_rows(maps, 0, {2: TokenRule("row", model=0, row=5)}, 3))


def test_identity_and_argument_checks():
    maps = torch.tensor([[0, 1, 2], [0, 1, 2]])
    assert plan_rows(maps, 0, {}, 3).is_identity([3, 3])
    assert not plan_rows(maps, 0, {}, 3).is_identity([3, 4])  # a padded input is cut
    assert not plan_rows(maps, 0, {}, 4).is_identity([3, 3])  # padding
    assert not plan_rows(maps, 0, {1: TokenRule("zero", force=True)}, 3).is_identity([3, 3])
    assert not plan_rows(torch.tensor([[0, 2, 1], [0, 1, 2]]), 0, {}, 3).is_identity([3, 3])
    with pytest.raises(ValueError, match="at least the vocabulary size"):
        plan_rows(maps, 0, {}, 2)
    with pytest.raises(ValueError, match="base must be"):
        plan_rows(maps, 2, {}, 3)
    with pytest.raises(ValueError, match="same shape past the rows"):
        remap_rows([torch.zeros(3, 2), torch.zeros(3, 3)], plan_rows(maps, 0, {}, 3))


def test_vocabulary_tensors_are_told_by_name():
    for name in ("model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight", "bert.embeddings.word_embeddings.weight",
                 "model.language_model.embed_tokens.weight", "gpt_neox.embed_in.weight", "embed_out.weight", "output.weight"):
        assert is_vocabulary_tensor(name), name
    for name in ("transformer.wpe.weight", "bert.embeddings.position_embeddings.weight", "model.layers.0.attention.output.weight",
                 "model.norm.weight", "bert.embeddings.token_type_embeddings.weight"):
        assert not is_vocabulary_tensor(name), name


# -- union: rows against the plain reference ----------------------------------------------------------
def test_union_rows_and_ids(vm, tmp_path):
    """linear over the base and three fine-tunes whose vocabularies differ; every row of both vocabulary tensors
    equals Σ w·(the model's re-mapped row) / Σ w computed token by token here."""
    names, weights = ["vbase", "vchat", "vtool", "vother"], [0.4, 0.3, 0.2, 0.1]
    out = mergekit_lite.run(Recipe.from_dict(linear_recipe(vm, names, weights, tokenizer_source="union")), tmp_path / "out", progress=False)
    tokens = tokens_by_id(out)
    base = model_vocab(vm["vbase"])
    # ids: the base's first, then the other models' new regular tokens (recipe order, each by id), then added tokens
    assert tokens[:300] == sorted(base, key=base.get)
    other = model_vocab(vm["vother"])
    assert tokens[300:331] == sorted((t for t in other if t not in base), key=other.get)
    assert tokens[331:] == ["<|im_start|>", "<|im_end|>", "<tool>"]
    assert rows_of(out) == len(tokens) == 334
    got = load_state(out)
    vocabs = {n: model_vocab(vm[n]) for n in names}
    for tensor in VOCABULARY_TENSORS:
        states = {n: load_state(vm[n])[tensor] for n in names}
        remapped = reference_rows(states, vocabs, tokens, "vbase", len(tokens))
        want = sum(w * remapped[n] for n, w in zip(names, weights)) / sum(weights)
        assert_rel(got[tensor], want, tensor)
    # the output tokenizer loads and knows the added tokens at their ids
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<tool>"]) == [331, 333]
    assert tok.added_tokens_decoder[331].special and not tok.added_tokens_decoder[333].special
    assert tok.decode(tok("the quick brown fox").input_ids) == "the quick brown fox"


def test_a_models_tokenizer_as_source_and_task_vectors(vm, tmp_path):
    """task_arithmetic with tokenizer_source: vchat: the base and vtool lack vchat's two tokens (vchat's rows for
    everyone: the only model that has them), so those rows stay vchat's own; vtool's <tool> is dropped."""
    data = {"merge_method": "task_arithmetic", "base_model": str(vm["vbase"]), "dtype": "float32",
            "models": [{"model": str(vm["vchat"]), "parameters": {"weight": 0.6}}, {"model": str(vm["vtool"]), "parameters": {"weight": 0.8}}],
            "parameters": {"lambda": 0.9}, "tokenizer_source": "vchat"}
    out = mergekit_lite.run(Recipe.from_dict(data), tmp_path / "out", progress=False)
    tokens = tokens_by_id(out)
    assert tokens == tokens_by_id(vm["vchat"]) and (out / "tokenizer.json").read_bytes() == (vm["vchat"] / "tokenizer.json").read_bytes()
    got = load_state(out)
    names = ["vbase", "vchat", "vtool"]
    vocabs = {n: model_vocab(vm[n]) for n in names}
    for tensor in VOCABULARY_TENSORS:
        r = reference_rows({n: load_state(vm[n])[tensor] for n in names}, vocabs, tokens, "vbase", len(tokens))
        want = r["vbase"] + 0.9 * (0.6 * (r["vchat"] - r["vbase"]) + 0.8 * (r["vtool"] - r["vbase"]))
        assert_rel(got[tensor], want, tensor)
        assert torch.equal(got[tensor][300:], load_state(vm["vchat"])[tensor][300:])


def test_tokens_block_with_force_sources_and_padding(vm, tmp_path):
    names, weights = ["vbase", "vchat", "vtool", "vother"], [0.4, 0.3, 0.2, 0.1]
    block = {"source": "union", "pad_to_multiple_of": 64, "tokens": {
        "<|im_start|>": {"source": "vchat", "force": True},                       # vchat's own row for everyone
        "<|im_end|>": {"source": {"kind": "zero"}, "force": True},               # zeros for everyone
        "Ġtoken": {"source": {"kind": "model_token", "model": "vbase", "token": "Ġone"}},  # only vother lacks it
        "<new>": {"source": {"kind": "model_token", "model": "vtool", "token_id": 300}},  # a new token: vtool's <tool> row
        "the": {"source": {"kind": "zero"}},                                     # everyone has it: unused
    }}
    out = mergekit_lite.run(Recipe.from_dict(linear_recipe(vm, names, weights, tokenizer=block)), tmp_path / "out", progress=False)
    tokens = tokens_by_id(out)
    assert tokens[-1] == "<new>" and len(tokens) == 335 and rows_of(out) == 384
    vocabs = {n: model_vocab(vm[n]) for n in names}
    got = load_state(out)
    for tensor in VOCABULARY_TENSORS:
        states = {n: load_state(vm[n])[tensor] for n in names}
        rules = {
            "<|im_start|>": {"force": True, "source": ("row", "vchat", vocabs["vchat"]["<|im_start|>"])},
            "<|im_end|>": {"force": True, "source": ("zero", None, None)},
            "Ġtoken": {"source": ("row", "vbase", vocabs["vbase"]["Ġone"])},
            "<new>": {"source": ("row", "vtool", 300)},
            "the": {"source": ("zero", None, None)},
        }
        r = reference_rows(states, vocabs, tokens, "vbase", 384, rules)
        want = sum(w * r[n] for n, w in zip(names, weights)) / sum(weights)
        assert_rel(got[tensor], want, tensor)
        i = tokens.index
        assert not got[tensor][i("<|im_end|>")].any()
        assert torch.allclose(got[tensor][i("<new>")], states["vtool"][300], atol=1e-6)
        assert torch.allclose(got[tensor][i("<|im_start|>")], states["vchat"][vocabs["vchat"]["<|im_start|>"]], atol=1e-6)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<new>") == 334


def test_base_source_drops_padding_rows_and_a_new_token_gets_its_source(vm, tmp_path):
    """tokenizer: {source: base} with vpad (rows past its tokenizer) and a new token: the base's 300 tokens and
    the new one. mergekit 0.1.5 stops with KeyError on a new token with source: base (docs/tokenizers.md)."""
    block = {"source": "base", "tokens": {"<new>": {"source": {"kind": "model_token", "model": "vchat", "token": "<|im_end|>"}}}}
    out = mergekit_lite.run(Recipe.from_dict(linear_recipe(vm, ["vbase", "vpad", "vchat"], [0.5, 0.3, 0.2], tokenizer=block)),
                            tmp_path / "out", progress=False)
    tokens = tokens_by_id(out)
    assert len(tokens) == 301 and rows_of(out) == 301 and tokens[300] == "<new>"
    got = load_state(out)
    for tensor in VOCABULARY_TENSORS:
        states = {n: load_state(vm[n])[tensor] for n in ("vbase", "vpad", "vchat")}
        end = states["vchat"][model_vocab(vm["vchat"])["<|im_end|>"]]
        assert torch.allclose(got[tensor][300], end, atol=1e-6)  # every model takes the configured row
        want = (0.5 * states["vbase"][:300] + 0.3 * states["vpad"][:300] + 0.2 * states["vchat"][:300]) / 1.0
        assert_rel(got[tensor][:300], want, tensor)


def test_excluded_vocabulary_tensor_is_the_base_rows_re_mapped(vm, tmp_path):
    data = linear_recipe(vm, ["vbase", "vchat"], [0.5, 0.5], tokenizer_source="union", exclude=["lm_head.weight"])
    out = mergekit_lite.run(Recipe.from_dict(data), tmp_path / "out", progress=False)
    tokens = tokens_by_id(out)
    head = load_state(out)["lm_head.weight"]
    states = {n: load_state(vm[n])["lm_head.weight"] for n in ("vbase", "vchat")}
    want = reference_rows(states, {n: model_vocab(vm[n]) for n in states}, tokens, "vbase", len(tokens))["vbase"]
    assert head.shape == (302, 16) and torch.allclose(head, want.float(), atol=1e-7)


def test_identical_vocabularies_keep_the_files_and_rows(vm, tmp_path):
    """union over models that share the base's vocabulary changes nothing: the base's files are copied as they are."""
    data = linear_recipe(vm, ["vbase", "vbase"], [0.5, 0.5], tokenizer_source="union")
    data["models"][1]["name"] = "again"
    the_plan = plan(Recipe.from_dict(data))
    try:
        assert all(job.vocab is None for job in the_plan.jobs)
        assert the_plan.vocabulary.copy_from == vm["vbase"]
    finally:
        the_plan.close()
    out = mergekit_lite.run(Recipe.from_dict(data), tmp_path / "out", progress=False)
    assert (out / "tokenizer.json").read_bytes() == (vm["vbase"] / "tokenizer.json").read_bytes()


def test_model_wide_statistics_see_the_re_mapped_rows(vm, tmp_path):
    """TIES with model-wide thresholds (extra passes over every task vector) on a union equals the same merge of
    checkpoints re-mapped by hand beforehand (no tokenizer setting): the passes read the re-mapped rows."""
    names = ["vbase", "vchat", "vtool"]
    ties = {"merge_method": "ties", "dtype": "float32", "parameters": {"density": 0.5, "scope": "model"}}
    models = [{"model": str(vm[n]), "parameters": {"weight": w}} for n, w in (("vchat", 1.0), ("vtool", 0.7))]
    out = mergekit_lite.run(Recipe.from_dict({**ties, "base_model": str(vm["vbase"]), "models": models, "tokenizer_source": "union"}),
                            tmp_path / "union", progress=False)
    tokens = tokens_by_id(out)
    vocabs = {n: model_vocab(vm[n]) for n in names}
    aligned = {}
    for n in names:
        state = load_state(vm[n])
        for tensor in VOCABULARY_TENSORS:
            r = reference_rows({m: load_state(vm[m])[tensor] for m in names}, vocabs, tokens, "vbase", len(tokens))
            state[tensor] = r[n].float()
        folder = shutil.copytree(vm[n], tmp_path / f"aligned-{n}")
        save_file(state, str(folder / "model.safetensors"))
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "vocab_size": len(tokens)}))
        aligned[n] = folder
    by_hand = mergekit_lite.run(Recipe.from_dict({**ties, "base_model": str(aligned["vbase"]),
                                                  "models": [{**m, "model": str(aligned[Path(m["model"]).name])} for m in models]}),
                                tmp_path / "by-hand", progress=False)
    a, b = load_state(out), load_state(by_hand)
    for name in b:
        assert_rel(a[name], b[name], name)


def test_slices_re_map_each_edge_with_its_own_sources(vm, tmp_path):
    data = {"merge_method": "passthrough", "tokenizer_source": "union", "dtype": "float32", "slices": [
        {"sources": [{"model": str(vm["vbase"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(vm["vtool"]), "layer_range": [1, 2]}]},
    ]}
    out = mergekit_lite.run(Recipe.from_dict(data), tmp_path / "out", progress=False)
    tokens = tokens_by_id(out)
    assert tokens[300:] == ["<tool>"]
    got = load_state(out)
    embed = load_state(vm["vbase"])["model.embed_tokens.weight"]
    assert torch.equal(got["model.embed_tokens.weight"][:300], embed) and not got["model.embed_tokens.weight"][300].any()
    assert torch.equal(got["lm_head.weight"], load_state(vm["vtool"])["lm_head.weight"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3


# -- the tokenizer: stripping, models without tokenizer files ------------------------------------------
def test_strip_to_rows_drops_tokens_and_their_merges():
    tok = train_bpe(TEXT_A, 300)
    vocab = tok.get_vocab()
    stripped, dropped = strip_to_rows(tok, 290, "test")
    assert dropped == 10 and len(stripped.get_vocab()) == 290
    assert {t for t, i in vocab.items() if i >= 290}.isdisjoint(stripped.get_vocab())
    assert len(tok.get_vocab()) == 300  # the original is untouched
    text = "the quick brown fox jumps over the lazy dog"
    assert stripped.decode(stripped(text).input_ids) == text and max(stripped(text).input_ids) < 290
    same, none = strip_to_rows(tok, 300, "test")
    assert same is tok and none == 0


def test_the_bases_extra_tokens_are_stripped(vm, tmp_path):
    """A base whose tokenizer has two tokens past its 298 rows: tokenizer_source: base keeps 298 tokens and
    writes the tokenizer with transformers."""
    base = shutil.copytree(vm["vbase"], tmp_path / "short-base")
    state = load_state(base)
    for tensor in VOCABULARY_TENSORS:
        state[tensor] = state[tensor][:298].clone()
    save_file(state, str(base / "model.safetensors"))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "vocab_size": 298}))
    data = linear_recipe({"b": base, "c": vm["vchat"]}, ["b", "c"], [0.5, 0.5], tokenizer_source="base")
    result = CliRunner().invoke(main, ["validate", str(write_recipe(tmp_path / "r.yml", data))])
    assert result.exit_code == 0, result.output
    assert "(2 past the base's rows dropped), 298 embedding rows" in result.stdout and "written by transformers" in result.stdout
    out = mergekit_lite.run(Recipe.from_dict(data), tmp_path / "out", progress=False)
    assert len(tokens_by_id(out)) == 298 and rows_of(out) == 298
    assert load_state(out)["lm_head.weight"].shape == (298, 16)


def test_a_model_without_tokenizer_files_shares_the_bases(vm, tmp_path):
    bare = shutil.copytree(vm["vpad"], tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    data = linear_recipe({"vbase": vm["vbase"], "bare": bare}, ["vbase", "bare"], [0.5, 0.5], tokenizer_source="union")
    result = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path / "r.yml", data)), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert "bare has no tokenizer files: it is taken to share the base model's vocabulary (as mergekit does)" in result.stderr
    got, a, b = load_state(tmp_path / "out"), load_state(vm["vbase"]), load_state(bare)
    assert torch.allclose(got["lm_head.weight"], 0.5 * a["lm_head.weight"] + 0.5 * b["lm_head.weight"][:300])


# -- what validate and --dry-run say --------------------------------------------------------------------
def test_validate_and_dry_run_say_the_vocabulary(vm, tmp_path):
    data = linear_recipe(vm, ["vbase", "vchat", "vtool"], [0.4, 0.3, 0.3], tokenizer={"source": "union", "pad_to_multiple_of": 32})
    recipe = write_recipe(tmp_path / "r.yml", data)
    line = ("union of the tokenizers of vbase, vchat, vtool: 303 tokens (3 added), 320 embedding rows (pad_to_multiple_of 32); "
            "rows re-mapped per token in lm_head.weight, model.embed_tokens.weight; files written by transformers (save_pretrained)")
    checked = CliRunner().invoke(main, ["validate", str(recipe)])
    assert checked.exit_code == 0, checked.output
    assert f"tokenizer: {line}" in checked.stdout
    dry = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "out"), "--dry-run"])
    assert dry.exit_code == 0 and f"tokenizer:     {line}" in dry.stdout and "config changes: vocab_size=320" in dry.stdout
    assert "lm_head.weight [320, 16]" in dry.stdout and not (tmp_path / "out").exists()


# -- errors: one line, exit 2, nothing written -----------------------------------------------------------
def cli_error(tmp_path: Path, data: dict, *needles: str) -> str:
    result = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path / "r.yml", data)), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and message.startswith("error: "), message
    for needle in needles:
        assert needle in message, message
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    return message


def test_unset_tokenizer_with_resized_embeddings_is_refused(vm, tmp_path):
    cli_error(tmp_path, linear_recipe(vm, ["vbase", "vchat"], [0.5, 0.5]),
              "tensor lm_head.weight has 302 rows (one per token)", "has 300", "tokenizer_source: union")


def test_source_tokenizer_that_cannot_be_loaded(vm, tmp_path):
    broken = shutil.copytree(vm["vchat"], tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{not json")
    data = linear_recipe({"vbase": vm["vbase"], "broken": broken}, ["vbase", "broken"], [0.5, 0.5], tokenizer_source="union")
    cli_error(tmp_path, data, "model 'broken'", "cannot be loaded")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "tokenizer.json").write_text("[]")
    cli_error(tmp_path, linear_recipe(vm, ["vbase", "vchat"], [0.5, 0.5], tokenizer_source=str(elsewhere)), "cannot be loaded")


@pytest.mark.parametrize("tokens, needles", [
    ({"<x>": {"source": "nope"}}, ["tokenizer.tokens['<x>'].source", "'nope' is not one of the merged models"]),
    ({"<x>": {}}, ["tokenizer.tokens['<x>']", "needs a source", "no input has this token"]),
    ({"<|im_start|>": {"source": "vbase"}}, ["tokenizer.tokens['<|im_start|>'].source", "'vbase' has no token '<|im_start|>'"]),
    ({"<x>": {"source": {"kind": "model_token", "model": "vbase", "token": "<nope>"}}}, ["'vbase' has no token '<nope>'"]),
    ({"<x>": {"source": {"kind": "model_token", "model": "vchat", "token_id": 302}}}, ["row 302 is past the 302 rows", "'vchat'"]),
])
def test_token_entry_errors(vm, tmp_path, tokens, needles):
    cli_error(tmp_path, linear_recipe(vm, ["vbase", "vchat"], [0.5, 0.5], tokenizer={"tokens": tokens}), *needles)


def test_a_source_that_is_not_an_input_of_the_tensor(vm, tmp_path):
    data = {"merge_method": "passthrough", "dtype": "float32",
            "tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": str(vm["vtool"]), "token": "<tool>"}}}},
            "slices": [{"sources": [{"model": str(vm["vbase"]), "layer_range": [0, 2]}]},
                       {"sources": [{"model": str(vm["vtool"]), "layer_range": [1, 2]}]}]}
    cli_error(tmp_path, data, "tokenizer.tokens['<x>']", "is not an input of model.embed_tokens.weight")


def test_a_lambda_search_with_a_re_mapped_vocabulary_is_refused(vm, tmp_path):
    data = {"merge_method": "task_arithmetic", "base_model": str(vm["vbase"]), "models": [{"model": str(vm["vchat"])}],
            "parameters": {"lambda": {"search": [0.5, 1.0]}}, "evaluator": "json:loads", "tokenizer_source": "union"}
    with pytest.raises(RecipeError, match="re-maps the vocabulary"):
        mergekit_lite.run(Recipe.from_dict(data), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_collections_refuse_a_vocabulary(vm):
    data = {"merge_method": "tall_masks", "base_model": str(vm["vbase"]), "models": [{"model": str(vm["vchat"])}, {"model": str(vm["vtool"])}],
            "tokenizer_source": "union"}
    with pytest.raises(RecipeError, match="collection keeps each task's own tokenizer"):
        Recipe.from_dict(data)


def test_only_rows_may_differ(vm, tmp_path):
    wide = shutil.copytree(vm["vchat"], tmp_path / "wide")
    state = load_state(wide)
    state["lm_head.weight"] = torch.zeros(302, 17)
    save_file(state, str(wide / "model.safetensors"))
    data = linear_recipe({"vbase": vm["vbase"], "wide": wide}, ["vbase", "wide"], [0.5, 0.5], tokenizer_source="union")
    with pytest.raises(CheckpointError, match=r"lm_head.weight has shape \[302, 17\].*only the rows"):
        plan(Recipe.from_dict(data))


def test_the_tokenizer_block_recipe_on_the_demo(demo, tmp_path, monkeypatch):
    """recipes/tokenizer_block.yml: two chat tokens from the chat model's <s> and </s> rows, <pad> forced to zeros,
    rows padded to 576; against the plain reference over the demo models (one shared word-level vocabulary)."""
    (tmp_path / "demo").symlink_to(demo["base"].parent.parent)
    monkeypatch.chdir(tmp_path)
    out = mergekit_lite.run(Path(__file__).parent.parent / "recipes" / "tokenizer_block.yml", tmp_path / "out", progress=False)
    tokens = tokens_by_id(out)
    assert tokens[512:] == ["<|im_start|>", "<|im_end|>"] and rows_of(out) == 576
    names = ["base", "math", "chat"]
    vocabs = {n: vocab_of(demo[n]) for n in names}
    got = load_state(out)
    for tensor in VOCABULARY_TENSORS:
        states = {n: load_state(demo[n])[tensor] for n in names}
        rules = {"<|im_start|>": {"source": ("row", "chat", vocabs["chat"]["<s>"])},
                 "<|im_end|>": {"source": ("row", "chat", vocabs["chat"]["</s>"])},
                 "<pad>": {"force": True, "source": ("zero", None, None)}}
        r = reference_rows(states, vocabs, tokens, "base", 576, rules)
        want = r["base"] + 0.5 * ((r["math"] - r["base"]) + (r["chat"] - r["base"]))
        assert_rel(got[tensor], want, tensor)
        assert not got[tensor][tokens.index("<pad>")].any()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False).startswith("<|im_start|>user\nw1<|im_end|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") == 513

"""The MiniLM text quality suite (benchmarks/quality_text/): generated data, the text grids, the evaluator wiring.

No MiniLM fine-tuning here: the data generator is checked for determinism, balance and disjoint splits; the grids
for naming only declared parameters; and a tiny random BERT runs through the suite's scoring path end to end.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.quality_text import data
from benchmarks.quality_text.run import CORE, TEXT_FIXED, TEXT_GRIDS, text_methods

SIZES = {"train": 60, "val": 20, "test": 24}


@pytest.mark.parametrize("task", data.TASKS, ids=lambda t: t.name)
def test_splits_are_deterministic_balanced_and_disjoint(task):
    one, two = data.task_splits(task, SIZES, seed=3), data.task_splits(task, SIZES, seed=3)
    other = data.task_splits(task, SIZES, seed=4)
    assert {s: (x, y.tolist()) for s, (x, y) in one.items()} == {s: (x, y.tolist()) for s, (x, y) in two.items()}
    assert one["train"][0] != other["train"][0]
    seen = [set(one[s][0]) for s in SIZES]
    assert sum(map(len, seen)) == len(set().union(*seen)) == sum(SIZES.values())
    for split, n in SIZES.items():
        counts = np.bincount(one[split][1], minlength=task.num_classes)
        assert counts.sum() == n and counts.max() - counts.min() <= 1, (split, counts)
        assert all(len(s.split()) <= 24 for s in one[split][0])


def test_task_labels_follow_their_rule_on_hand_made_cases():
    """Each generator's label is recomputed here from the sentence, independently of the generator."""
    rng = np.random.default_rng(0)
    words = {w: i for i, w in enumerate(data.UNITS)} | {w: 10 + i for i, w in enumerate(data.TEENS)} | {w: 10 * i for i, w in enumerate(data.TENS) if w}
    for _ in range(200):
        s, y = data.number_parity(rng)
        n = sum(words[w] for w in s.split() if w in words)
        assert y == n % 2, s
        s, y = data.animal_first(rng)
        nouns = [w for w in s.split() if w in data.ANIMALS or w in data.OBJECTS]
        assert len(nouns) == 2 and y == int(nouns[0] in data.ANIMALS), s
        s, y = data.list_count(rng)
        listed = next(s[: -len(w)] for w in data.WHEN if s.endswith(w))
        assert y + 1 == listed.split().count("a"), s
        s, y = data.agent_is_animal(rng)
        first = s.split()[1]
        passive = " was " in s and " by " in s
        assert y == int((first in data.ANIMALS) != passive), s
    assert data.number_words(47) == "forty seven" and data.number_words(13) == "thirteen" and data.number_words(90) == "ninety"


def test_tasks_are_eight_with_disjoint_heads_and_distinct_names():
    assert len(data.TASKS) >= 8 and len(set(data.TASK_NAMES)) == len(data.TASKS)
    assert all(t.num_classes >= 2 for t in data.TASKS)
    assert data.seed_for(0, "a") == data.seed_for(0, "a") != data.seed_for(0, "b")


def test_text_grids_cover_every_method_and_name_only_declared_parameters():
    from mergekit_lite.methods import get_method

    specs = text_methods(core_only=False)
    assert [s.key for s in specs[: len(CORE)]] == list(CORE) and len(text_methods(core_only=True)) == len(CORE)
    assert {s.key for s in specs} == set(TEXT_GRIDS) and set(TEXT_FIXED) <= set(TEXT_GRIDS)
    for spec in specs:
        declared = {p.name for p in get_method(spec.merge_method).params} | {"with_base"}
        assert set(spec.grid) | set(spec.parameters) <= declared, spec.label


def test_suite_scores_a_tiny_random_bert_end_to_end(tmp_path, monkeypatch):
    """A tiny random BertModel written as a suite: heads, splits, and the scoring path the benchmark uses."""
    transformers = pytest.importorskip("transformers")
    from benchmarks.quality_text import suite as suite_mod
    from benchmarks.quality_text.train import features, linear_probe

    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=40)
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()
    profile = suite_mod.TextProfile("tiny", n_train=40, n_val=20, n_test=20, tasks=("parity", "count"))
    suite = suite_mod.TextSuite(tmp_path, profile)
    suite_mod.save_bert(bert, suite.base_dir)
    monkeypatch.setattr(suite_mod.TextSuite, "encode", lambda self, sents: {
        "input_ids": torch.tensor([[hash(w) % 60 + 2 for w in (s.split() + ["pad"] * 16)[:16]] for s in sents]),
        "attention_mask": torch.tensor([[1] * min(16, len(s.split())) + [0] * max(0, 16 - len(s.split())) for s in sents])})
    for name in profile.tasks:
        splits = data.task_splits(data.get_task(name), {"train": 40, "val": 20, "test": 20}, 0)
        suite.data_path(name).parent.mkdir(parents=True, exist_ok=True)
        suite.data_path(name).write_text(json.dumps({s: {"x": x, "y": y.tolist()} for s, (x, y) in splits.items()}))
        x, y = suite.split(name, "train")
        head = linear_probe(suite_mod.Encoder(bert), x, y, data.get_task(name).num_classes, suite_mod.Schedule(steps=5, lr=1e-2, batch_size=16), 0)
        suite_mod.save_head(head, suite.head_path(name))
    state = {k: v for k, v in bert.state_dict().items() if v.is_floating_point()}
    acc = suite.accuracies(state, "val")
    x, y = suite.split("parity", "val")
    expected = float((suite.head("parity")(features(suite_mod.Encoder(bert), x)).argmax(1) == y).float().mean())
    assert set(acc) == {"parity", "count"} and acc["parity"] == pytest.approx(expected)
    with pytest.raises(KeyError, match="lacks"):
        suite.accuracies({k: v for k, v in state.items() if "pooler" not in k}, "val")

"""Shared fixtures: tiny checkpoints built on disk (offline) and helpers to read them back densely."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mergekit_lite.demo import DEMO_TASKS, build_demo


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo base and its three variants (float32, untied embeddings). Read-only: copy before changing."""
    return build_demo(tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture(scope="session")
def demo_tied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A variant of the demo whose config ties the input and output embeddings (no lm_head.weight stored)."""
    return build_demo(tmp_path_factory.mktemp("demo_tied"), seed=1, config_overrides={"tie_word_embeddings": True})


@pytest.fixture(scope="session")
def demo_bf16(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_demo(tmp_path_factory.mktemp("demo_bf16"), seed=2, dtype=torch.bfloat16)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach a model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

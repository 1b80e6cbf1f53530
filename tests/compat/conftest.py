"""Session fixtures of the mergekit compatibility tests: tiny checkpoints, rendered corpus, one mergekit run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402  (tests/compat is not a package)
from checkpoints import build_all  # noqa: E402
from vocab_models import build_vocab_models  # noqa: E402  (tests/vocab_models.py)


@pytest.fixture(scope="session")
def compat_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, ft1..ft5 (32 layers), big1, big2 (40 layers) and the vocabulary family vbase, vchat, vtool, vother,
    vpad (2 layers, tokenizers that differ: tests/vocab_models.py): built once per session."""
    root = tmp_path_factory.mktemp("compat-models")
    return {**build_all(root), **build_vocab_models(root / "vocab")}


@pytest.fixture(scope="session")
def compat_cases(compat_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, harness.Case]:
    """Every corpus config rendered and run through mergekit, all in one subprocess."""
    reason = harness.mergekit_unavailable()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("compat-runs")
    cases = [harness.render(path, compat_models, work) for path in harness.corpus()]
    meta = harness.run_mergekit_all(cases, work)
    version = meta.get("mergekit_version")
    if version != "0.1.5":
        pytest.fail(f"expected mergekit 0.1.5 in {harness.mergekit_python()}, found {version!r}; stderr: {meta.get('stderr_tail', '')}")
    return {case.name: case for case in cases}

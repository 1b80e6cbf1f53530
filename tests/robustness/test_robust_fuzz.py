"""The seeded fuzzer (fuzz.py) with small counts: every input kind, seed 0, reproducible.

``make fuzz`` runs the same generators with thousands of examples; a failure there prints the
command that replays it (``fuzz.py --seed S --kinds K --only I -v``).
"""

from __future__ import annotations

import pytest

import fuzz

SEED = 0


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory):
    box = fuzz.Sandbox(tmp_path_factory.mktemp("fuzz"))
    yield box
    box.close()


def describe(report: fuzz.KindReport, failures: list[fuzz.Failure]) -> str:
    lines = [f"{report.kind}: {report.tried} tried, {report.accepted} accepted, {report.rejected} rejected, {len(failures)} failed"]
    for f in failures[:10]:
        lines.append(f"  #{f.index} {f.reason}: {f.label[:80]} :: {f.detail[:200]}\n    {f.reproduce(SEED)}")
    return "\n".join(lines)


@pytest.mark.parametrize(
    "kind, count",
    [
        ("recipe-struct", 200),
        ("recipe-yaml", 200),
        ("recipe-cli", 50),
        ("safetensors-mutation", 200),
        ("index", 120),
        ("bin", 120),
        ("nan-inf", 24),
    ],
)
def test_fuzz_kind_has_no_failures(sandbox, kind, count):
    report = fuzz.run_kind(kind, SEED, count, sandbox)
    assert report.tried == count
    assert report.accepted + report.rejected + report.failed == count
    assert not report.failures, describe(report, report.failures)
    # the generators must exercise both sides: valid enough to be accepted, and broken
    assert report.accepted > 0 and report.rejected > 0, describe(report, [])


@pytest.mark.parametrize("kind", ["collection-manifest", "collection-cli"])
def test_tampered_collections_never_write_outside_or_run_code(sandbox, kind):
    """What holds today for tampered collections: nothing is written outside the output folder through
    the Python API, no pickle runs, no temporary folder is left (the stricter no-failure tests follow)."""
    report = fuzz.run_kind(kind, SEED, 40, sandbox)
    serious = [
        f for f in report.failures
        if f.reason == "code-ran" or (f.reason == "escape" and " read " not in f.detail and kind == "collection-manifest")
        or (f.reason == "leftover" and "temporary" in f.detail)
    ]
    assert not serious, describe(report, serious)


def test_fuzz_collection_api_has_no_failures(sandbox):
    report = fuzz.run_kind("collection-manifest", SEED, 60, sandbox)
    assert not report.failures, describe(report, report.failures)


def test_fuzz_collection_cli_has_no_failures(sandbox):
    report = fuzz.run_kind("collection-cli", SEED, 60, sandbox)
    assert not report.failures, describe(report, report.failures)


def test_one_example_is_reproducible(sandbox):
    """The same (seed, kind, index) builds the same input and gets the same verdict."""
    kind = fuzz.KINDS["safetensors-mutation"](sandbox.fixtures)
    first = [fuzz.run_example(kind, sandbox, 3, i) for i in range(15)]
    again = [fuzz.run_example(kind, sandbox, 3, i) for i in range(15)]
    assert [(r.outcome, r.label) for r in first] == [(r.outcome, r.label) for r in again]


def test_the_watch_sees_escapes_and_leftovers(sandbox, tmp_path):
    """The harness itself: a write outside the allowed folder, a read of a decoy and a program run are caught."""
    case = sandbox.root / "cases" / "self-test"
    case.mkdir(exist_ok=True)
    watch = fuzz.Watch(sandbox.root, [case], [case / "out"])
    with fuzz.watching(watch):
        (case / "not-allowed.txt").write_text("x")
        (sandbox.fixtures.decoys / "secret.txt").read_text()
        import os

        os.system("true")
    kinds = sorted({v.split(":")[0] for v in watch.violations})
    assert kinds == ["code-ran", "escape"], watch.violations
    assert any("wrote cases/self-test/not-allowed.txt" in v for v in watch.violations)
    assert any("read decoys/secret.txt" in v for v in watch.violations)
    (case / ".mergekit-lite-tmp-x").mkdir()
    assert fuzz.leftovers(case) == [".mergekit-lite-tmp-x"]


def test_summary_table_and_exit_code(capsys, tmp_path):
    code = fuzz.main(["--seed", "1", "--examples", "4", "--kinds", "recipe-struct,bin", "--workdir", str(tmp_path / "box")])
    out = capsys.readouterr().out
    assert code == 0
    assert "input kind" in out and "recipe-struct" in out and "bin" in out and "total" in out
    header = next(line for line in out.splitlines() if line.startswith("input kind"))
    assert all(word in header for word in ("tried", "accepted", "rejected", "FAILED"))

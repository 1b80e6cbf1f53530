"""Tampered collections: an attacker edits manifest.json *and* recomputes manifest.json.sha256.
``Collection.open`` + ``extract`` must raise one-line ``MergeKitLiteError``s (or work) and never
read or write outside the collection and the output folder.

Each defect this suite found (wrong-typed manifests, raw strings in messages, symlinks out of the
folder, `extract --all` writing outside OUT_DIR or leaving it behind) has its minimal reproducer here
as a regression test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import fuzz
from mergekit_lite import Collection, MergeKitLiteError
from mergekit_lite.cli import main


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> fuzz.Fixtures:
    return fuzz.build_fixtures(tmp_path_factory.mktemp("coll-fixtures"))


@pytest.fixture
def coll(fixtures, tmp_path) -> Path:
    """A fresh copy of a 3-task collection (math, code, chat) whose base is referenced."""
    folder = tmp_path / "coll"
    shutil.copytree(fixtures.collection, folder)
    return folder


@pytest.fixture
def coll_embedded(fixtures, tmp_path) -> Path:
    folder = tmp_path / "coll_embedded"
    shutil.copytree(fixtures.collection_embedded, folder)
    return folder


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def save(folder: Path, data) -> None:
    """Write the manifest and fix its checksum, as an attacker would."""
    (folder / "manifest.json").write_text(json.dumps(data))
    (folder / "manifest.json.sha256").write_text(hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest() + "\n")


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def use(folder: Path, out: Path, task: str | None = None) -> str:
    """Open, summarise, verify and extract one task (or each); 'ok' or the one-line error message."""
    try:
        c = Collection.open(folder)
        c.summary()
        c.verify()
        for t in [task] if task else c.tasks:
            c.extract(t, out / str(c.tasks.index(t) if t in c.tasks else t), progress=False)
    except MergeKitLiteError as exc:
        message = str(exc)
        assert fuzz.one_line(message), repr(message)
        return message
    return "ok"


def guarded(tmp_path: Path, fixtures: fuzz.Fixtures, fn, allowed_reads: list[Path], allowed_writes: list[Path]):
    """Run ``fn`` watching every read and write under pytest's base folder (which holds ``tmp_path`` and the
    fixtures with their decoys); returns (result, violations, paths that appeared outside ``allowed_writes``)."""
    roots = [tmp_path, fixtures.root]
    before = {r / p for r in roots for p in tree(r)}
    watch = fuzz.Watch(Path(os.path.commonpath([tmp_path, fixtures.root])), allowed_reads, allowed_writes)
    with fuzz.watching(watch):
        result = fn()
    after = {r / p for r in roots for p in tree(r)}
    new = {p for p in after - before if not any(p.is_relative_to(w) for w in allowed_writes)}
    return result, watch.violations, new


# -- what holds ------------------------------------------------------------------------------------------
def test_untouched_collection_works(coll, tmp_path, fixtures):
    (tmp_path / "out").mkdir()
    result, violations, new = guarded(tmp_path, fixtures, lambda: use(coll, tmp_path / "out"), [coll, fixtures.root], [tmp_path / "out"])
    assert result == "ok" and not violations and not new


@pytest.mark.parametrize(
    "edit, expect",
    [
        (lambda m, d: m["files"].__setitem__("../x", {"sha256": "0", "size": 1}), "points outside"),
        (lambda m, d: m["files"].__setitem__(str(d / "secret.txt"), {"sha256": "0", "size": 15}), "points outside"),
        (lambda m, d: m["files"].__setitem__("masks/../../x", {"sha256": "0", "size": 1}), "points outside"),
        (lambda m, d: m["tasks"][0].__setitem__("mask_file", "../../decoys/secret.txt"), "lists no checksum"),
        (lambda m, d: m["tau_mtl"]["weight_map"].__setitem__("model.norm.weight", "../../decoys/outside.safetensors"), "points outside"),
        (lambda m, d: m["tau_mtl"]["weight_map"].__setitem__("model.norm.weight", str(d / "outside.safetensors")), "points outside"),
        (lambda m, d: m["tau_mtl"].__setitem__("files", [str(d / "outside.safetensors")]), "lists no checksum"),
        (lambda m, d: m["tasks"][0].__setitem__("stem", "../../x"), "points outside"),
        (lambda m, d: m["tasks"][0].__setitem__("support_files", ["../../../decoys/secret.txt"]), "lists no checksum"),
        (lambda m, d: m.__setitem__("format_version", 4), "format version 4"),
        (lambda m, d: m.__setitem__("format_version", "1"), "format version '1'"),
        (lambda m, d: m.__setitem__("format", "other"), "not a mergekit-lite collection"),
    ],
)
def test_manifest_paths_outside_are_refused(coll, tmp_path, fixtures, edit, expect):
    data = manifest(coll)
    edit(data, fixtures.decoys)
    save(coll, data)
    (tmp_path / "out").mkdir()
    result, violations, new = guarded(tmp_path, fixtures, lambda: use(coll, tmp_path / "out"), [coll, fixtures.base], [tmp_path / "out"])
    assert expect in result or "invalid manifest" in result, result  # refused early by the manifest check, or later
    assert not violations and not new, (violations, new)
    assert fuzz.leftovers(tmp_path) == [] and list((tmp_path / "out").iterdir()) == []


def test_embedded_base_path_outside_is_refused(coll_embedded, tmp_path, fixtures):
    for bad in ("../x", str(fixtures.base), "."):
        data = manifest(coll_embedded)
        data["base"]["path"] = bad
        save(coll_embedded, data)
        (tmp_path / "out").mkdir(exist_ok=True)
        result, violations, new = guarded(tmp_path, fixtures, lambda: use(coll_embedded, tmp_path / "out"), [coll_embedded], [tmp_path / "out"])
        assert ("points outside" in result or "invalid manifest" in result) and not violations and not new, (bad, result, violations)


def test_api_stem_is_never_an_output_path(coll, tmp_path, fixtures):
    """Through the Python API the stem only names files inside the collection: '../../x' is refused there."""
    data = manifest(coll)
    data["tasks"][0]["stem"] = "../../escaped"
    data["tasks"][0]["support_files"] = []
    save(coll, data)
    (tmp_path / "out").mkdir()
    result, violations, new = guarded(tmp_path, fixtures, lambda: use(coll, tmp_path / "out", "math"), [coll, fixtures.base], [tmp_path / "out"])
    assert result.startswith(f"{coll / 'manifest.json'}: invalid manifest: ") and "tasks[0].stem" in result, result
    assert not violations and not new, (result, violations, new)
    assert list((tmp_path / "out").iterdir()) == []


def test_stale_checksum_is_refused(coll, tmp_path):
    data = manifest(coll)
    data["tasks"][0]["tall_lambda"] = 0.9
    (coll / "manifest.json").write_text(json.dumps(data))
    assert "SHA-256 does not match" in use(coll, tmp_path)


# -- defects found by this suite, fixed since; kept as regression tests ------------------------------------------
def cli(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("stem", ["../../escaped", "ABSOLUTE"])
def test_cli_extract_all_never_writes_outside_out_dir(coll, tmp_path, stem):
    """Reproducer: set tasks[0].stem to '../../escaped' (or an absolute path) and tasks[0].support_files to [],
    fix manifest.json.sha256, run `mergekit-lite extract COLL --all OUT`: task 0 is written to OUT/../../escaped."""
    data = manifest(coll)
    data["tasks"][0]["stem"] = str(tmp_path / "escaped") if stem == "ABSOLUTE" else stem
    data["tasks"][0]["support_files"] = []
    save(coll, data)
    (tmp_path / "outs").mkdir()
    before = tree(tmp_path)
    result = cli("extract", str(coll), "--all", str(tmp_path / "outs" / "all"), "-q")
    outside = {p for p in tree(tmp_path) - before if not p.startswith("outs")}
    assert not outside, (result.output, outside)
    # the stem is not a safe file stem: refused with one line naming the manifest and the field, nothing written
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stderr.splitlines() == [f"error: {coll / 'manifest.json'}: invalid manifest: tasks[0].stem is not a safe, unique file stem"], result.stderr
    assert list((tmp_path / "outs").iterdir()) == []


def test_cli_extract_all_leaves_no_output_on_failure(coll, tmp_path):
    """Reproducer: flip one byte of masks/002-chat.safetensors, run `extract COLL --all OUT`: exit 2, and OUT exists
    with math/ and code/ extracted."""
    mask = coll / "masks" / "002-chat.safetensors"
    data = bytearray(mask.read_bytes())
    data[-1] ^= 0xFF
    mask.write_bytes(bytes(data))
    result = cli("extract", str(coll), "--all", str(tmp_path / "all"), "-q")
    assert result.exit_code == 2
    assert not (tmp_path / "all").exists(), sorted(p.name for p in (tmp_path / "all").iterdir())


def _set(path: list, value):
    def edit(m):
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _delete(path: list):
    def edit(m):
        node = m
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


WRONG_TYPES = {  # what: (edit, the field the refusal must name)
    "files is a list": (_set(["files"], []), "'files'"),  # AttributeError: 'list' object has no attribute 'items'
    "files missing": (_delete(["files"]), "'files'"),  # KeyError: 'files'
    "file entry without size": (_delete(["files", "tau_mtl.safetensors", "size"]), "'tau_mtl.safetensors'"),  # KeyError: 'size'
    "file entry is a string": (_set(["files", "tau_mtl.safetensors"], "x"), "'tau_mtl.safetensors'"),  # TypeError: string indices must be integers
    "tasks missing": (_delete(["tasks"]), "'tasks'"),  # KeyError: 'tasks'
    "task is a string": (_set(["tasks", 0], "x"), "tasks[0]"),  # TypeError
    "task without name": (_delete(["tasks", 0, "name"]), "tasks[0].name"),  # KeyError: 'name'
    "tensor dtype 'save'": (_set(["tensors", 1, "dtype"], "save"), "tensors[1]"),  # AttributeError: 'function' object has no attribute 'itemsize'
    "tensor dtype 5": (_set(["tensors", 1, "dtype"], 5), "tensors[1]"),  # TypeError: attribute name must be string
    "tensor shape null": (_set(["tensors", 1, "shape"], None), "tensors[1].shape"),  # TypeError: 'NoneType' object is not iterable
    "tensor without stored": (_delete(["tensors", 1, "stored"]), "tensors[1]"),  # KeyError: 'stored'
    "task dtypes is a list": (_set(["tasks", 0, "dtypes"], []), "tasks[0].dtypes"),  # AttributeError: 'list' object has no attribute 'get'
    "task density is text": (_set(["tasks", 0, "density"], "x"), "tasks[0]"),  # ValueError: Unknown format code 'f'
    "task without support_files": (_delete(["tasks", 0, "support_files"]), "tasks[0].support_files"),  # KeyError: 'support_files'
    "base missing": (_delete(["base"]), "'base'"),  # KeyError: 'base'
    "base weight_files is a list": (_set(["base", "weight_files"], []), "'base.weight_files'"),  # AttributeError: 'list' object has no attribute 'values'
    "base reference is a number": (_set(["base"], {"embedded": False, "reference": 5, "resolved_path": None, "weight_files": {}}), "'base'"),  # TypeError
    "mask_stats missing": (_delete(["mask_stats"]), "'mask_stats.overall'"),  # KeyError: 'mask_stats'
    "file name too long": (_set(["files", "x" * 300], {"sha256": "0", "size": 1}), "'" + "x" * 300 + "'"),  # OSError: File name too long
    "task name a lone surrogate": (_set(["tasks", 0, "name"], "\ud800"), "tasks[0].name"),  # UnicodeEncodeError writing README.md (engine.py)
}


def refused_naming(coll: Path, result: str, field: str) -> None:
    """``result`` is a refusal (not 'ok') that names the manifest file and the offending field."""
    assert result.startswith(f"{coll / 'manifest.json'}: invalid manifest: "), result
    assert field in result, (field, result)


@pytest.mark.parametrize("what", list(WRONG_TYPES))
def test_wrong_typed_manifest_is_a_clean_error(coll, tmp_path, what):
    """Reproducer: edit the manifest as named, fix manifest.json.sha256, then Collection.open(c).summary() / extract."""
    edit, field = WRONG_TYPES[what]
    data = manifest(coll)
    edit(data)
    save(coll, data)
    (tmp_path / "out").mkdir()
    refused_naming(coll, use(coll, tmp_path / "out"), field)  # was: something other than MergeKitLiteError
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("field", ["support_files", "stem"])
def test_manifest_strings_stay_on_one_line(coll, tmp_path, field):
    """Reproducer: tasks[0].support_files = ['a\\nb'] (checksum fixed) -> 'lists no checksum for tasks/000-math/a<newline>b'."""
    data = manifest(coll)
    data["tasks"][0][field] = ["a\nb"] if field == "support_files" else "a\nb"
    save(coll, data)
    (tmp_path / "out").mkdir()
    result = use(coll, tmp_path / "out")  # the assertion inside use() fails on a two-line message
    refused_naming(coll, result, f"tasks[0].{field}")


@pytest.mark.parametrize("rel", ["masks/000-math.safetensors", "tasks/000-math/config.json", "tau_mtl.safetensors"])
def test_symlinks_inside_the_collection_are_not_followed_outside(coll, tmp_path, fixtures, rel):
    """Reproducer: replace masks/000-math.safetensors by a symlink to a file outside the folder, record that file's
    size and SHA-256 in the manifest (checksum fixed): open/verify/extract read the outside file."""
    target = tmp_path / "outside" / "secret.txt"
    target.parent.mkdir()
    target.write_text("do not read me\n")
    data = manifest(coll)
    (coll / rel).unlink()
    os.symlink(target, coll / rel)
    data["files"][rel] = {"sha256": hashlib.sha256(target.read_bytes()).hexdigest(), "size": target.stat().st_size}
    save(coll, data)
    (tmp_path / "out").mkdir()
    watch = fuzz.Watch(tmp_path, [coll], [tmp_path / "out"])
    with fuzz.watching(watch):
        result = use(coll, tmp_path / "out")
    assert not any("outside" in v for v in watch.violations), (result, watch.violations)
    assert result == f"{coll / rel}: is a symbolic link; a collection holds plain files only (copy it without links)", result
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_inspect_on_wrong_typed_manifest_exits_2(coll):
    """Reproducer: tasks[0].density = 'x' (checksum fixed); `mergekit-lite inspect COLL` exits 1 with a traceback."""
    data = manifest(coll)
    data["tasks"][0]["density"] = "x"
    save(coll, data)
    result = cli("inspect", str(coll))
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {coll / 'manifest.json'}: invalid manifest: tasks[0] "), result.stderr

"""Print the mergekit-compatibility table of the config corpus, as markdown (for BENCHMARKS.md).

    .venv/bin/python tests/compat/corpus_report.py [--work DIR] [--json FILE]

Builds the tiny checkpoints, renders every config in ``tests/compat/configs/`` (dtype forced to
float32), runs them all through mergekit 0.1.5 in one subprocess (``.venv-mergekit``, or
``$MERGEKIT_PYTHON``), runs our tool on each through its Python API, and compares the outputs the
way ``test_mergekit_compat.py`` does. One row per config:

config | method | features | mergekit | ours | max rel. diff | notes

* mergekit: ``ok`` or ``refuses`` (its error in the notes);
* ours: ``same`` (every check passes; for a config mergekit refuses: we refuse it too, typed),
  ``differs`` (we merge, outputs differ), ``fails`` (we refuse or crash where mergekit merges);
* max rel. diff: worst per-tensor ||ours − mergekit|| / ||mergekit||; for DARE/DELLA,
  |median(||ours − base|| / ||mergekit − base||) − 1|.

Takes about a minute on two cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402
from checkpoints import build_all  # noqa: E402
from vocab_models import build_vocab_models  # noqa: E402  (tests/vocab_models.py)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def evaluate(case: harness.Case) -> dict:
    row = {
        "config": case.name,
        "source": harness.source_url(case.source),
        "method": case.method,
        "features": harness.features(case.data),
        "published_dtype": case.original_dtype,
        "mergekit": "ok" if case.mergekit.get("ok") else ("no result" if case.mergekit.get("missing") else "refuses"),
        "mergekit_error": harness.shorten(case.mergekit.get("error") or "", case) or None,
        "ours": "",
        "max_rel": None,
        "notes": "",
    }
    if case.mergekit.get("missing"):
        row["notes"] = row["mergekit_error"] or ""
        return row
    start = time.perf_counter()
    error = harness.run_ours(case)
    row["ours_seconds"] = round(time.perf_counter() - start, 3)
    if not case.mergekit.get("ok"):
        try:
            import mergekit_lite

            typed = isinstance(error, mergekit_lite.MergeKitLiteError)
        except Exception:  # noqa: BLE001 - our package does not even import
            typed = False
        if error is None:
            row["ours"], row["notes"] = "differs", f"we merge what mergekit refuses ({row['mergekit_error']})"
        elif not typed:
            row["ours"], row["notes"] = "fails", f"we refuse untyped: {harness.main_error_line(error, case)}"
        else:
            row["ours"], row["notes"] = "same", f"both refuse; mergekit: {row['mergekit_error']}"
        return row
    if error is not None:
        row["ours"], row["notes"] = "fails", harness.main_error_line(error, case)
        return row
    try:
        base_state = harness.load_state(Path(case.base)) if case.method in harness.RANDOM_METHODS and case.base else None
        result = harness.compare(case, base_state)
        row["max_rel"] = result.max_rel
        problems = list(result.problems)
        if not problems and len(case.data.get("slices") or []) > 1:
            problem = harness.forward_check(case.ours_out, case.mergekit_out)
            if problem:
                problems.append(problem)
    except Exception as exc:  # noqa: BLE001
        problems = [f"comparison failed: {harness.main_error_line(exc, case)}"]
    row["ours"] = "same" if not problems else "differs"
    row["notes"] = "; ".join(problems) if problems else result.detail
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"mergekit {meta.get('mergekit_version', '?')} vs mergekit-lite on {len(rows)} configs "
        f"(tiny Llama checkpoints, float32; mergekit run: {meta.get('seconds', '?')} s for all)",
        "",
        "| config | method | features | mergekit | ours | max rel. diff | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = f"[{r['config']}]({r['source']})" if r["source"].startswith("http") else r["config"]
        rel = "" if r["max_rel"] is None else f"{r['max_rel']:.2g}"
        lines.append(
            f"| {_cell(name)} | {r['method']} | {_cell(', '.join(r['features']) or '-')} | {r['mergekit']} | "
            f"{r['ours']} | {rel} | {_cell(r['notes'])[:220]} |"
        )
    same = sum(r["ours"] == "same" for r in rows)
    lines += ["", f"same as mergekit: {same}/{len(rows)}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="keep checkpoints and outputs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    reason = harness.mergekit_unavailable()
    if reason:
        print(f"cannot run mergekit: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="compat-report-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = {**build_all(work / "models"), **build_vocab_models(work / "models" / "vocab")}
        runs = work / "runs"
        if runs.exists():
            import shutil

            shutil.rmtree(runs)
        runs.mkdir()
        cases = [harness.render(p, models, runs) for p in harness.corpus()]
        meta = harness.run_mergekit_all(cases, runs)
        rows = [evaluate(c) for c in cases]
    print(markdown(rows, meta))
    if args.json:
        args.json.write_text(json.dumps({"meta": {k: v for k, v in meta.items() if k != "stderr_tail"}, "rows": rows}, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

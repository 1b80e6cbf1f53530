"""Run many mergekit configs in ONE process, through mergekit's own Python API.

Executed with the mergekit virtual environment's interpreter (``.venv-mergekit/bin/python``),
never imported by our package or tests: mergekit (LGPL-3.0) is only *run*, in its own venv.

    python run_mergekit.py JOBS.json RESULTS.json

JOBS.json is ``[{"name": ..., "config": "path/to/config.yml", "out": "path/to/out_dir"}, ...]``
(optionally ``"seed": int`` per job; default 0).
RESULTS.json gets ``{name: {"ok": bool, "error": str|null, "seconds": float}}`` plus a
``"__meta__"`` entry with mergekit's version. Every job runs even if earlier ones fail; the file
is rewritten after each job, so a crash still leaves the finished results behind.

Options used for every job: CPU only, no CUDA, lazy unpickling, no model card, quiet, a fixed
random seed (DARE/DELLA draw random masks), ``copy_tokenizer`` only when the config names a
tokenizer (``tokenizer_source``/``tokenizer``); otherwise mergekit copies none, like our runs.
Starting torch + transformers costs seconds, which is why all jobs share this one process.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:600]


def main(jobs_path: str, results_path: str) -> int:
    import yaml

    import mergekit
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    try:
        from importlib.metadata import version

        mk_version = version("mergekit")
    except Exception:  # pragma: no cover - metadata missing
        mk_version = getattr(mergekit, "__version__", "unknown")

    with open(jobs_path, encoding="utf-8") as fh:
        jobs = json.load(fh)
    results: dict[str, dict] = {"__meta__": {"mergekit_version": mk_version, "python": sys.version.split()[0]}}

    def flush() -> None:
        tmp = results_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
        os.replace(tmp, results_path)

    for job in jobs:
        name, config_path, out = job["name"], job["config"], job["out"]
        start = time.perf_counter()
        try:
            with open(config_path, encoding="utf-8") as fh:
                text = fh.read()
            data = yaml.safe_load(text)
            config = MergeConfiguration.model_validate(data)
            wants_tokenizer = bool(config.tokenizer_source or config.tokenizer)
            options = MergeOptions(
                cuda=False,
                device="cpu",
                lazy_unpickle=True,
                copy_tokenizer=wants_tokenizer,
                write_model_card=False,
                quiet=True,
                random_seed=int(job.get("seed", 0)),
                allow_crimes=False,
                trust_remote_code=False,
            )
            run_merge(config, out, options=options, config_source=text)
            results[name] = {"ok": True, "error": None, "seconds": round(time.perf_counter() - start, 3)}
        except BaseException as exc:  # noqa: BLE001 - every failure is a result, not a crash
            if isinstance(exc, KeyboardInterrupt):
                raise
            results[name] = {
                "ok": False,
                "error": _one_line(exc),
                "traceback": traceback.format_exc(limit=6)[-2000:],
                "seconds": round(time.perf_counter() - start, 3),
            }
        flush()
    flush()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: run_mergekit.py JOBS.json RESULTS.json")
    sys.exit(main(sys.argv[1], sys.argv[2]))

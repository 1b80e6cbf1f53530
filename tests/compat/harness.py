"""The mergekit compatibility harness: corpus, rendering, running both tools, comparing outputs.

Used by ``test_mergekit_compat.py`` (through ``conftest.py``) and by ``corpus_report.py``.
Nothing here imports mergekit: mergekit runs in its own virtual environment, as a subprocess
(``run_mergekit.py``), once for the whole corpus.

Rendering a corpus config: placeholders ``{base}``, ``{ft1}`` .. ``{ft5}``, ``{big1}``, ``{big2}``
become checkpoint folders (textually, before YAML parsing: ``{base}`` is a flow mapping in YAML),
then ``dtype`` (and ``out_dtype`` when present) are forced to ``float32`` so the comparison is
numeric, not about rounding; the published values are kept in :class:`Case`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CONFIGS = HERE / "configs"
DRIVER = HERE / "run_mergekit.py"

#: Methods whose output depends on random draws (DARE / DELLA masks): compared statistically.
RANDOM_METHODS = frozenset({"dare_ties", "dare_linear", "della", "della_linear"})
#: Deterministic methods: every tensor within this relative L2 distance of mergekit's.
REL_TOL = 1e-5
#: Random methods: the median over tensors of ||ours - base|| / ||theirs - base|| within 1 ± this.
RATIO_TOL = 0.02
#: Random methods: a tensor that mergekit's draw left at the base may differ in ours when at most this many entries moved.
RANDOM_FEW_ENTRIES = 8
#: Keys mergekit 0.1.5's MergeConfiguration knows at the top level (others it silently ignores).
MERGEKIT_TOP_KEYS = frozenset(
    {"modules", "slices", "models", "merge_method", "base_model", "dtype", "tokenizer_source", "tokenizer", "chat_template", "out_dtype", "parameters"}
)
_PLACEHOLDER = re.compile(r"\{(base|ft[1-5]|big[12]|vbase|vchat|vtool|vother|vpad)\}")
#: Tensors of the tiny Llamas with one row per token: compared token by token when the outputs' vocabularies
#: hold the same tokens at other ids (mergekit orders the tokens a union adds by Python's set and hash order).
VOCABULARY_TENSORS = frozenset({"model.embed_tokens.weight", "lm_head.weight"})


def mergekit_python() -> Path:
    """The mergekit venv's interpreter: ``$MERGEKIT_PYTHON`` or ``<repo>/.venv-mergekit/bin/python``."""
    env = os.environ.get("MERGEKIT_PYTHON")
    return Path(env) if env else REPO / ".venv-mergekit" / "bin" / "python"


def mergekit_unavailable() -> str | None:
    """Why mergekit cannot run here (``None`` when it can). Only a venv that could not be made counts."""
    python = mergekit_python()
    marker = REPO / ".venv-mergekit" / ".unavailable"
    if "MERGEKIT_PYTHON" not in os.environ and marker.exists():
        reason = marker.read_text(encoding="utf-8", errors="replace").strip()
        return (
            f"the mergekit venv could not be created ({reason}); delete .venv-mergekit and run "
            "`make mergekit-venv` to retry, or point MERGEKIT_PYTHON at an interpreter with mergekit==0.1.5"
        )
    if not python.exists():
        return (
            f"no mergekit interpreter at {python}: run `make mergekit-venv` (or `make test`), "
            "or set MERGEKIT_PYTHON to an interpreter with mergekit==0.1.5"
        )
    return None


def corpus() -> list[Path]:
    return sorted(CONFIGS.glob("*.yml"))


def source_url(path: Path) -> str:
    """The first URL on the ``# Source:`` line of a corpus config ('' if there is none)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# Source:"):
            match = re.search(r"https?://\S+", line)
            return match.group(0).rstrip(").,") if match else ""
    return ""


@dataclass
class Case:
    """One corpus config, rendered for the tiny checkpoints."""

    name: str
    source: Path
    rendered: Path
    data: dict[str, Any]          # the rendered recipe as parsed (dtype forced to float32)
    original_dtype: Any           # ``dtype`` as published (None when absent)
    original_out_dtype: Any       # ``out_dtype`` as published (None when absent)
    mergekit_out: Path
    ours_out: Path
    mergekit: dict[str, Any] = field(default_factory=dict)  # {"ok": bool, "error": str|None, ...}

    @property
    def method(self) -> str:
        return str(self.data.get("merge_method", "?"))

    @property
    def base(self) -> str | None:
        base = self.data.get("base_model")
        return str(base) if base else None


def render(path: Path, models: dict[str, Path], work: Path) -> Case:
    """Substitute the placeholders, force float32, write ``work/<name>/config.yml``."""
    name = path.stem
    text = path.read_text(encoding="utf-8")
    missing = sorted({m for m in _PLACEHOLDER.findall(text) if m not in models})
    if missing:
        raise KeyError(f"{path.name}: no checkpoint for placeholder(s) {missing}")
    text = _PLACEHOLDER.sub(lambda m: str(models[m.group(1)]), text)
    data = yaml.safe_load(text)
    original_dtype, original_out_dtype = data.get("dtype"), data.get("out_dtype")
    data["dtype"] = "float32"
    if "out_dtype" in data:
        data["out_dtype"] = "float32"
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    rendered = folder / "config.yml"
    header = f"# Rendered from tests/compat/configs/{path.name}: published dtype={original_dtype!r}, out_dtype={original_out_dtype!r}; both forced to float32\n"
    rendered.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return Case(name, path, rendered, data, original_dtype, original_out_dtype, folder / "mergekit", folder / "ours")


def run_mergekit_all(cases: list[Case], work: Path, timeout: float = 900) -> dict[str, Any]:
    """Run every case through mergekit in one subprocess; fills ``case.mergekit``; returns the meta."""
    jobs = [{"name": c.name, "config": str(c.rendered), "out": str(c.mergekit_out)} for c in cases]
    jobs_path, results_path = work / "mergekit_jobs.json", work / "mergekit_results.json"
    jobs_path.write_text(json.dumps(jobs, indent=1), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)  # never let our tree shadow mergekit's environment
    start = time.perf_counter()
    proc = subprocess.run(
        [str(mergekit_python()), str(DRIVER), str(jobs_path), str(results_path)],
        cwd=str(work), env=env, capture_output=True, text=True, timeout=timeout,
    )
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.exists() else {}
    if proc.returncode != 0 and not results:
        raise RuntimeError(f"the mergekit driver failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    for case in cases:
        case.mergekit = results.get(case.name) or {
            "ok": False, "missing": True,
            "error": f"no result: the mergekit driver exited {proc.returncode} before this job; stderr: {proc.stderr[-500:]}",
        }
    meta = dict(results.get("__meta__", {}))
    meta["seconds"] = round(time.perf_counter() - start, 2)
    meta["stderr_tail"] = proc.stderr[-2000:]
    return meta


def run_ours(case: Case) -> BaseException | None:
    """Run our tool on the rendered recipe through the Python API; the exception, or None."""
    try:
        import mergekit_lite

        mergekit_lite.run(str(case.rendered), str(case.ours_out), progress=False)
    except Exception as exc:  # noqa: BLE001 - reported by the caller
        return exc
    return None


# ---------------------------------------------------------------------------------- comparison


def load_state(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors in {folder}")
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_config(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))


def load_vocabulary(folder: Path) -> dict[str, int] | None:
    """token → id of an output's tokenizer.json (its model's vocabulary and added tokens); None without one."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = dict((data.get("model") or {}).get("vocab") or {})
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})
    return vocab


def _token_alignment(ours: Path, theirs: Path, problems: list[str]) -> tuple[Any, Any] | None:
    """(our ids, mergekit's ids) of the same tokens, when both outputs hold the same tokens at other ids."""
    import torch

    mine, other = load_vocabulary(ours), load_vocabulary(theirs)
    if mine is None or other is None or mine == other:
        return None
    if set(mine) != set(other):
        only_ours, only_theirs = sorted(set(mine) - set(other)), sorted(set(other) - set(mine))
        problems.append(f"vocabularies differ: {len(only_ours)} token(s) only in ours (e.g. {only_ours[:3]}), "
                        f"{len(only_theirs)} only in mergekit's (e.g. {only_theirs[:3]})")
        return None
    tokens = sorted(other, key=other.get)
    return torch.tensor([mine[t] for t in tokens]), torch.tensor([other[t] for t in tokens])


@dataclass
class Comparison:
    problems: list[str]
    max_rel: float            # deterministic: worst relative L2 distance; random: |median ratio - 1|
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


def _rel(a: Any, b: Any) -> float:
    import torch

    a, b = a.double(), b.double()
    denom = float(torch.linalg.vector_norm(b))
    diff = float(torch.linalg.vector_norm(a - b))
    if denom < 1e-30:
        return diff
    return diff / denom


def compare(case: Case, base_state: dict[str, Any] | None = None, reference: Any = None) -> Comparison:
    """Every output tensor of ours against mergekit's: names, shapes, dtypes, values; config layers.

    ``reference(name)``: the tensor computed plainly in float64, for methods where mergekit's float32
    arithmetic is known to be off (Karcher's arccos near 1): a tensor beyond tolerance of mergekit's then
    passes only if ours is within tolerance of the reference and mergekit's is farther from it."""
    import torch

    ours, theirs = load_state(case.ours_out), load_state(case.mergekit_out)
    problems: list[str] = []
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from ours, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} extra tensor(s) in ours, e.g. {extra[:3]}")
    layers_ours = load_config(case.ours_out).get("num_hidden_layers")
    layers_theirs = load_config(case.mergekit_out).get("num_hidden_layers")
    if layers_ours != layers_theirs:
        problems.append(f"config.json num_hidden_layers: ours {layers_ours}, mergekit {layers_theirs}")
    vocab_ours, vocab_theirs = load_config(case.ours_out).get("vocab_size"), load_config(case.mergekit_out).get("vocab_size")
    if vocab_ours != vocab_theirs:
        problems.append(f"config.json vocab_size: ours {vocab_ours}, mergekit {vocab_theirs}")
    align = _token_alignment(case.ours_out, case.mergekit_out, problems)
    if align is not None:  # our rows in mergekit's token order (rows past the vocabulary, padding, stay in place)
        for name in VOCABULARY_TENSORS & set(ours):
            if ours[name].shape == theirs.get(name, ours[name]).shape:
                moved = ours[name].clone()
                moved[align[1]] = ours[name][align[0]]
                ours[name] = moved
    common = sorted(set(ours) & set(theirs))
    for name in common:
        if ours[name].shape != theirs[name].shape:
            problems.append(f"{name}: shape {tuple(ours[name].shape)} vs mergekit {tuple(theirs[name].shape)}")
        elif ours[name].dtype != theirs[name].dtype:
            problems.append(f"{name}: dtype {ours[name].dtype} vs mergekit {theirs[name].dtype}")
    comparable = [n for n in common if ours[n].shape == theirs[n].shape]

    if case.method in RANDOM_METHODS and base_state is not None:
        ratios = []
        for name in comparable:
            if name not in base_state or base_state[name].shape != theirs[name].shape:
                continue
            b = base_state[name].double()
            d_theirs = float(torch.linalg.vector_norm(theirs[name].double() - b))
            d_ours = float(torch.linalg.vector_norm(ours[name].double() - b))
            if d_theirs > 1e-12:
                ratios.append(d_ours / d_theirs)
            elif d_ours > 1e-12:
                # a draw that drops every moved entry is likely when only a few entries moved (mergekit's own
                # 3-entry layernorm in gemma-moon: 1 in 8 at density 0.5); many moved entries all dropped is a bug
                moved = int((ours[name].double() != b).sum())
                if moved > RANDOM_FEW_ENTRIES:
                    problems.append(f"{name}: mergekit leaves it at the base, ours moves {moved} entries by {d_ours:.3g}")
        if not ratios:
            problems.append("no tensor moved away from the base in mergekit's output: nothing to compare")
            return Comparison(problems, float("nan"))
        median = float(torch.tensor(ratios).median())
        dev = abs(median - 1.0)
        if dev > RATIO_TOL:
            problems.append(f"median ||ours-base||/||mergekit-base|| over {len(ratios)} tensors = {median:.4f} (allowed 1±{RATIO_TOL})")
        return Comparison(problems, dev, f"median task-vector norm ratio {median:.4f} over {len(ratios)} tensors")

    worst, worst_name, bad = 0.0, "", []
    arbitrated: list[str] = []
    for name in comparable:
        a, b = ours[name], theirs[name]
        if not a.is_floating_point():
            if not torch.equal(a, b):
                bad.append(f"{name}: integer values differ")
            continue
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        if not torch.equal(nan_a, nan_b):
            bad.append(f"{name}: NaN at different places (ours {int(nan_a.sum())}, mergekit {int(nan_b.sum())})")
            continue
        keep = ~nan_b
        rel = _rel(a[keep], b[keep])
        if rel > REL_TOL and reference is not None:
            exact = reference(name)
            ours_off, theirs_off = _rel(a, exact), _rel(b, exact)
            if ours_off <= REL_TOL and theirs_off > ours_off:
                arbitrated.append(f"{name} (ours {ours_off:.2g} from the float64 reference, mergekit {theirs_off:.2g})")
                continue
        if rel > worst:
            worst, worst_name = rel, name
        if rel > REL_TOL:
            bad.append(f"{name}: relative L2 difference {rel:.3g}")
    if bad:
        problems.append(f"{len(bad)} of {len(comparable)} tensors differ (tolerance {REL_TOL:g} of the norm): " + "; ".join(bad[:5]))
    detail = f"worst tensor {worst_name} ({worst:.3g})" if worst_name else ""
    if arbitrated:
        detail += f"; {len(arbitrated)} tensor(s) nearer the float64 reference than mergekit's: " + "; ".join(arbitrated[:3])
    return Comparison(problems, worst, detail)


def forward_check(folder: Path, other: Path | None = None) -> str | None:
    """Load ``folder`` with transformers and run a forward pass; compare logits with ``other``'s."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = torch.arange(1, 17).reshape(1, 16) % model.config.vocab_size
    with torch.no_grad():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        return "non-finite logits"
    if other is not None:
        ref = AutoModelForCausalLM.from_pretrained(str(other), dtype=torch.float32)
        with torch.no_grad():
            ref_logits = ref(ids).logits
        rel = _rel(logits, ref_logits)
        if rel > 1e-4:
            return f"logits differ from mergekit's model (relative L2 {rel:.3g})"
    return None


# ---------------------------------------------------------------------------------- features


def _is_gradient(value: Any) -> bool:
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            return any(_is_gradient(v.get("value")) for v in value)
        return True
    if isinstance(value, dict):
        return _is_gradient(value.get("value"))
    return False


def _has_filter(value: Any) -> bool:
    if isinstance(value, dict):
        return "filter" in value
    return isinstance(value, list) and any(isinstance(v, dict) and v.get("filter") for v in value)


def features(data: dict[str, Any]) -> list[str]:
    """Which recipe features a (published or rendered) config uses, for the report."""
    out: list[str] = []
    slices = data.get("slices") or []
    if slices:
        out.append(f"slices×{len(slices)}")
    per_model: list[dict] = []
    for m in data.get("models") or []:
        if isinstance(m, dict) and m.get("parameters"):
            per_model.append(m["parameters"])
    for s in slices:
        for src in (s or {}).get("sources") or []:
            if isinstance(src, dict) and src.get("parameters"):
                per_model.append(src["parameters"])
        if isinstance(s, dict) and s.get("parameters"):
            per_model.append(s["parameters"])
    all_params = [data.get("parameters") or {}] + per_model
    values = [v for p in all_params if isinstance(p, dict) for v in p.values()]
    if any(_is_gradient(v) for v in values):
        out.append("gradient")
    if any(_has_filter(v) for v in values):
        out.append("filter")
    if per_model:
        keys = sorted({k for p in per_model if isinstance(p, dict) for k in p})
        out.append("per-model " + "/".join(keys))
    base = data.get("base_model")
    listed = [m.get("model") for m in data.get("models") or [] if isinstance(m, dict)]
    if base and base in listed:
        out.append("base listed")
    if data.get("tokenizer_source") or data.get("tokenizer"):
        out.append("tokenizer")
    if data.get("chat_template"):
        out.append("chat_template")
    misplaced = sorted(k for k in data if k not in MERGEKIT_TOP_KEYS)
    if misplaced:
        out.append("ignored top-level " + "/".join(misplaced))
    return out


_MODEL_PATH = re.compile(r"(?:/[^\s'\"/:]+)+/(base|ft[1-5]|big[12])\b")


def shorten(text: str, case: Case | None = None) -> str:
    """``text`` on one line, temporary paths shown as ``config.yml`` and ``{placeholder}``."""
    text = text.replace("\n", " ")
    if case is not None:
        text = text.replace(str(case.rendered), "config.yml").replace(str(case.rendered.parent.parent), "<runs>")
    return _MODEL_PATH.sub(lambda m: "{" + m.group(1) + "}", text)


def main_error_line(exc: BaseException, case: Case | None = None) -> str:
    """``Type: message`` on one line, with the long temporary paths shortened."""
    return shorten(f"{type(exc).__name__}: {exc}", case)[:400]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use corpus_report.py or pytest tests/compat")

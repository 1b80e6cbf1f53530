"""The model card (README.md) written beside a merged checkpoint: front matter for the hub, and the recipe."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .checkpoint import looks_like_hub_id, split_revision
from .recipe import Recipe

#: transformers' Auto classes, most specific first, with the table of architectures each one loads.
_AUTO_TABLES = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText"),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "AutoModelForSpeechSeq2Seq"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "AutoModelForQuestionAnswering"),
    ("MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES", "AutoModelForMultipleChoice"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    ("MODEL_FOR_CTC_MAPPING_NAMES", "AutoModelForCTC"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
    ("MODEL_FOR_PRETRAINING_MAPPING_NAMES", "AutoModelForPreTraining"),
    ("MODEL_MAPPING_NAMES", "AutoModel"),
)
#: For architectures the installed transformers does not list: the class name's ending decides.
_SUFFIXES = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForMultipleChoice", "AutoModelForMultipleChoice"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
)


def auto_class(config: dict[str, Any] | None) -> str:
    """The transformers Auto class that loads a model with this config.json: from its first
    ``architectures`` entry (BertModel → AutoModel, LlamaForCausalLM → AutoModelForCausalLM,
    ...ForSequenceClassification → AutoModelForSequenceClassification); AutoModel when unknown."""
    archs = (config or {}).get("architectures") if isinstance(config, dict) else None
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if arch is None:
        return "AutoModel"
    # transformers' naming convention decides the common heads without importing its tables (~1 s)
    unambiguous = next((cls for suffix, cls in _SUFFIXES if suffix != "LMHeadModel" and arch.endswith(suffix)), None)
    if unambiguous is not None:
        return unambiguous
    try:
        from transformers.models.auto import modeling_auto
    except Exception:  # noqa: BLE001 - an old or broken transformers: fall back on the name
        modeling_auto = None
    for table, cls in _AUTO_TABLES:
        names = getattr(modeling_auto, table, None) if modeling_auto is not None else None
        if not names:
            continue
        for value in names.values():
            if arch == value or (isinstance(value, (tuple, list)) and arch in value):
                return cls
    return next((cls for suffix, cls in _SUFFIXES if arch.endswith(suffix)), "AutoModel")


def hub_id(reference: str | None) -> str | None:
    """The hub repository id a model reference names (``org/name``, revision dropped), or None for a local path."""
    if not reference:
        return None
    name, _ = split_revision(reference)
    try:
        local = Path(name).expanduser().exists()
    except (OSError, ValueError, RuntimeError):
        local = False
    return name if not local and looks_like_hub_id(name) else None


def front_matter(base_model: str | None, tags: list[str], library_name: str = "transformers") -> str:
    """The hub's YAML front matter (base_model when it is a hub id, tags, library_name), safely quoted.

    A local path is never written as ``base_model`` (the hub would reject or mislink it): say it in the body."""
    base = hub_id(base_model)
    data = {**({"base_model": base} if base else {}), "tags": tags, "library_name": library_name}
    return "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True) + "---\n\n"


def _where(reference: str) -> str:
    hub = hub_id(reference)
    if hub is None:
        return f"`{reference}` (a local folder)"
    return f"[`{reference}`](https://huggingface.co/{hub})"


def model_card(
    recipe: Recipe,
    notes: str = "",
    *,
    config: dict[str, Any] | None = None,
    tokenizer: Any = None,
    name: str | None = None,
) -> str:
    """A README.md with YAML front matter (base_model when it is a hub id, tags, library_name), how to load
    the model, its tokenizer, and the recipe that made it. ``tokenizer`` is the run's TokenizerPlan."""
    params, model_params = recipe.resolved_parameters()
    if recipe.models is not None:
        rows = "\n".join(
            f"| {task} | `{entry.model}` | " + ", ".join(f"{k}={v}" for k, v in own.items()) + " |"
            for task, entry, own in zip(recipe.model_names, recipe.models, model_params)
        )
        table = "| task | model | parameters |\n|---|---|---|\n" + rows
    else:
        rows = "\n".join(
            f"| {i} | `{s.model}` | {s.layer_range[0]}–{s.layer_range[1] - 1} |" for i, sl in enumerate(recipe.slices or []) for s in sl.sources
        )
        table = "| slice | model | layers |\n|---|---|---|\n" + rows
    settings = ", ".join(f"{k}={v}" for k, v in params.items() if recipe.method.param(k) and not recipe.method.param(k).per_model)
    base = _where(recipe.base_model) if recipe.base_model else "none"
    sentence_transformers = bool(tokenizer is not None and getattr(tokenizer, "sentence_transformers", False))
    folder = name or "path/to/this/model"
    cls = auto_class(config)
    if sentence_transformers:
        usage = (f"from sentence_transformers import SentenceTransformer\n\nmodel = SentenceTransformer({folder!r})\n"
                 f"embeddings = model.encode([\"a sentence\", \"another one\"])\n")
    elif tokenizer is not None and not tokenizer.missing:
        usage = (f"from transformers import AutoTokenizer, {cls}\n\nmodel = {cls}.from_pretrained({folder!r})\n"
                 f"tokenizer = AutoTokenizer.from_pretrained({folder!r})\n")
    else:
        usage = f"from transformers import {cls}\n\nmodel = {cls}.from_pretrained({folder!r})\n"
    tokenizer_line = f"Tokenizer: {tokenizer.describe()}.\n\n" if tokenizer is not None else ""
    return (
        front_matter(recipe.base_model, ["merge", "mergekit-lite", recipe.merge_method],
                     "sentence-transformers" if sentence_transformers else "transformers")
        + "# Merged model\n\n"
        + f"Made with mergekit-lite {__version__} using **{recipe.merge_method}**: {recipe.method.summary}\n"
        + (f"Method reference: {recipe.method.paper}\n" if recipe.method.paper else "")
        + f"\nBase model: {base}. Method parameters: {settings or 'defaults'}.\n\n"
        + tokenizer_line
        + (f"{notes}\n\n" if notes else "")
        + table
        + "\n\n## Usage\n\n```python\n" + usage + "```\n"
        + "\n## Recipe\n\n```yaml\n"
        + recipe.to_yaml()
        + "```\n"
    )


def output_name(out_dir: str | os.PathLike[str]) -> str:
    """The folder name a card's usage example loads (the output folder's own name)."""
    return Path(out_dir).name or str(out_dir)

"""Command line: parses arguments, calls the Python API, turns errors into one line and exit code 2."""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import os
import sys
import warnings
from typing import Any, Callable, Iterator

import click

from . import __version__
from .allocator import return_large_buffers, use_huge_pages
from .errors import MergeKitLiteError
from .openmp import no_blas_threads, shorten_spin_waits

RECIPE_HELP = """
\b
A recipe is YAML, with mergekit's key names:
  merge_method: task_arithmetic        # see `mergekit-lite methods`
  base_model: path/or/org-name[@revision]
  models:
    - model: path/or/org-name[@revision]
      name: my-task                    # optional; default: folder or repo name
      parameters: {weight: 1.0}        # per-model parameters
  parameters: {lambda: 1.0}            # method parameters: a value, a list (gradient over
                                       # the layers), [{filter: mlp, value: 0.5}, {value: 1}]
  # or, instead of models:, layer slices (frankenmerges, per-slice merges):
  # slices:
  #   - sources: [{model: a, layer_range: [0, 24]}]
  #   - sources: [{model: b, layer_range: [8, 32]}]
  dtype: float32                       # compute dtype (float32 | float64)
  out_dtype: bfloat16                  # default: the base model's dtype
  tokenizer_source: union              # unset: the base's files | base | union | <a model's name>
                                       # | <folder or hub id> | none (rows re-mapped per token)
  # or mergekit's tokenizer block (instead of tokenizer_source):
  # tokenizer: {source: union, pad_to_multiple_of: 64,
  #             tokens: {"<|im_end|>": {source: {kind: zero}, force: true}}}
  chat_template: chatml                # auto | chatml, llama3, alpaca, mistral, exaone | "Jinja text"
  include: ["model.layers.*"]          # optional globs: only these are merged
  exclude: ["*.embed_tokens.*"]        # globs never merged (copied from base)
  output: {shard_size: 5GB}
  evaluator: my_module:score           # optional: picks λ from {search: [0.2, 0.4, ...]}

merge_method: tall_masks, emr and tsv_compress write a compressed collection
instead of a merged model (see `mergekit-lite extract` and `inspect`). Relative paths are resolved
from the current folder. Examples are in recipes/.

Several YAML documents separated by --- are a chain (mergekit-multi's format):
`name: x` makes a document a step, used by later documents as `model: x`; the
unnamed document is the final merge (recipes/chain.yml).
"""


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print user errors as one line (no traceback) and exit 2; Ctrl-C exits 130 with nothing written."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MergeKitLiteError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: no output was written", err=True)
            sys.exit(130)

    return wrapper


def _warn(recipe: Any) -> None:
    """Print the recipe's non-fatal notes, one ``warning:`` line each."""
    for warning in recipe.warnings:
        click.echo(f"warning: {warning}", err=True)


def _tokenizer(the_plan: Any) -> Any:
    """The output's tokenizer plan (None for a collection, which keeps each task's own files)."""
    if the_plan.method.output != "model":
        return None
    from .products.tokenizer import tokenizer_plan

    return tokenizer_plan(the_plan)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="mergekit-lite")
def main() -> None:
    """Merge fine-tuned checkpoints of one base model through their task vectors.

    \b
    Typical use:
      mergekit-lite validate recipe.yml          # check recipe and inputs (headers only)
      mergekit-lite run recipe.yml out/ --dry-run  # what would happen, and the memory it needs
      mergekit-lite run recipe.yml out/          # write a Hugging Face checkpoint to out/
      mergekit-lite methods                      # methods and their parameters
    """
    use_huge_pages()  # before torch's first allocation: large tensors without a page fault per 4 KiB
    return_large_buffers()  # freed tensors leave the process: resident memory stays the working set
    shorten_spin_waits()  # before torch is imported: torch's idle threads leave the cores to numpy's work sooner
    no_blas_threads()  # before numpy is imported: its OpenBLAS threads have nothing to do here


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No garbage collection during the imports (torch's make ~180,000 objects, which cost Python's collector
    four full passes, ~0.23 s), then every object they made set aside for good (``gc.freeze``): the collector
    never walks them again (a row-chunked RAM merge at 250M, K = 8: the collector ~2.6 % of the CPU time before)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the plan (tensors, bytes to read and write, estimated peak memory; for a chain, its steps) and write nothing.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists (only once the new output is complete).")
@click.option("--intermediate-dir", type=click.Path(file_okay=False),
              help="A chain's named steps are written here, one folder per step (default: OUT_DIR-intermediate).")
@click.option("--device", default="cpu", show_default=True, help="Where the arithmetic runs: cpu, cuda or cuda:N. Results are the same.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; print only the output path.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where the jobs run: here, or spread over a Ray cluster (pip install 'mergekit-lite[ray]'). The output is the same, byte for byte.")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="--executor ray: join this Ray cluster (e.g. ray://head:10001 or auto); default: start a local Ray instance.")
@friendly_errors
def run(recipe: str, out_dir: str, dry_run: bool, force: bool, intermediate_dir: str | None, device: str, quiet: bool,
        executor: str, ray_address: str | None) -> None:
    """Merge as RECIPE says and write a Hugging Face checkpoint (or collection) to OUT_DIR.

    The output (sharded safetensors + index, config.json, generation config, tokenizer files,
    README.md model card) is built in a temporary folder beside OUT_DIR and moved into place only
    when complete: a failed or interrupted run leaves no partial output. Every input is checked from
    its headers before any weights are read.

    A RECIPE of several YAML documents (separated by ---) is a chain, as in mergekit-multi: each
    document with `name: x` is a step written to --intermediate-dir/x, which later documents use by
    writing x where a model goes; the unnamed document is the final merge, written to OUT_DIR. Steps
    run in dependency order; a step whose output is complete and was made by the same recipe is skipped.
    """
    with _collector_paused():
        from .api import execute, executor_for, plan, prepare_output, resolve_device
        from .chain import Chain, load_recipe

    if executor == "ray":
        from .ray_executor import import_ray

        import_ray()  # without Ray installed: one line saying how to install it, before any work
    elif ray_address is not None:
        raise MergeKitLiteError("--ray-address needs --executor ray")
    parsed = load_recipe(recipe)
    _warn(parsed)
    if isinstance(parsed, Chain):
        _run_chain(parsed, recipe, out_dir, intermediate_dir, dry_run=dry_run, force=force, device=device, quiet=quiet,
                   executor=executor, ray_address=ray_address)
        return
    if intermediate_dir is not None:
        click.echo(f"warning: --intermediate-dir has no effect: {recipe} is one merge, not a chain", err=True)
    resolve_device(device)
    if not dry_run:
        prepare_output(out_dir, force)
    the_plan = plan(parsed)
    try:
        tokenizer = _tokenizer(the_plan)  # a bad tokenizer_source or chat template fails here, before any weight is read
        if dry_run:
            click.echo(the_plan.summary())
            if tokenizer is not None:
                click.echo(f"tokenizer:     {tokenizer.describe()}")
                for note in tokenizer.notes:
                    click.echo(f"warning: {note}", err=True)
            click.echo(f"output:        {out_dir} (dry run: nothing written)")
            return
        with _warning_lines(), executor_for(executor, ray_address) as chosen:  # the product says what the output lacks (no tokenizer, ...)
            path = execute(the_plan, out_dir, force=force, device=device, progress=not quiet, executor=chosen)
    finally:
        the_plan.close()
    _wrote(parsed, path, quiet)


def _wrote(parsed: Any, path: Any, quiet: bool, verb: str = "wrote") -> None:
    """The closing lines of a run: the output path, and how to use it."""
    if quiet:
        click.echo(str(path))
    elif parsed.method.output == "collection":
        click.echo(f"{verb} collection {path} ({len(parsed.models)} tasks)")
        click.echo(f"inspect it with: mergekit-lite inspect {path}")
        click.echo(f"extract a task with: mergekit-lite extract {path} {parsed.model_names[0]} OUT_DIR")
    else:
        from .products.tokenizer import loading_hint

        click.echo(f"{verb} {path}")
        for line in loading_hint(path):
            click.echo(line)


def _run_chain(chain: Any, recipe: str, out_dir: str, intermediate_dir: str | None, *, dry_run: bool, force: bool, device: str, quiet: bool,
               executor: str = "local", ray_address: str | None = None) -> None:
    """`run` for a chain: its plan of steps (--dry-run), or every step in order, skipping those already up to date."""
    from .api import executor_for, plan_chain, resolve_device, run_chain

    resolve_device(device)
    if dry_run:
        runs = plan_chain(chain, out_dir, intermediate_dir=intermediate_dir, force=force, check=False)
        inter = {r.folder.parent for r in runs if not r.final}
        where = f"; named steps go to {inter.pop()}" if inter else ""
        click.echo(f"chain {recipe}: {len(runs)} step(s), in this order{where}")
        for number, r in enumerate(runs, 1):
            what = "up to date, skipped" if r.skip else "runs"
            click.echo(f"step {number}/{len(runs)} {r.step.label} → {r.folder}: {what}" + (f" ({r.reason()})" if r.reason() else ""))
            click.echo(f"  {r.step.recipe.merge_method} of {', '.join(_inputs(r.step))}")
        click.echo(f"output: {runs[-1].folder} (dry run: nothing written)")
        return
    def report(line: str) -> None:
        if not quiet:
            click.echo(line, err=True)

    up_to_date = plan_chain(chain, out_dir, intermediate_dir=intermediate_dir, check=False)[-1].skip
    with _warning_lines(), executor_for(executor, ray_address) as chosen:
        path = run_chain(chain, out_dir, intermediate_dir=intermediate_dir, force=force, device=device, progress=not quiet, report=report,
                         executor=chosen)
    _wrote(chain.final.recipe, path, quiet, "up to date:" if up_to_date else "wrote")


def _inputs(step: Any) -> list[str]:
    """A step's inputs as written, its steps' outputs marked: ["step 'a'", 'demo/checkpoints/base (base)', ...]."""
    recipe = step.recipe

    def show(ref: str) -> str:
        return f"step {ref!r}" if ref in step.needs else ref

    refs = [m.model for m in recipe.models] if recipe.models is not None else list(dict.fromkeys(s.model for sl in recipe.slices or [] for s in sl.sources))
    shown = [f"{show(recipe.base_model)} (base)"] if recipe.base_model is not None and recipe.base_model not in refs else []
    return shown + [show(r) + (" (base)" if r == recipe.base_model else "") for r in refs]


@contextlib.contextmanager
def _warning_lines() -> Iterator[None]:
    """Print the API's MergeKitLiteWarnings as ``warning:`` lines (other warnings are shown as Python shows them)."""
    from .errors import MergeKitLiteWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MergeKitLiteWarning)
        try:
            yield
        finally:
            others = []
            for w in caught:
                if issubclass(w.category, MergeKitLiteWarning):
                    click.echo(f"warning: {w.message}", err=True)
                else:
                    others.append(w)
    for w in others:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)


run.epilog = RECIPE_HELP


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@friendly_errors
def validate(recipe: str) -> None:
    """Check RECIPE and that every input exists and is compatible, reading headers only.

    Exits 0 and prints a summary when the recipe would run; otherwise prints the problem (which
    file, tensor or recipe field, and what to do) and exits 2. For a chain: its names, references
    and order, each document, and the inputs of the steps that read no other step's output.
    """
    with _collector_paused():  # the imports bring torch
        from .chain import Chain, load_recipe
    from .errors import RecipeError

    try:
        parsed = load_recipe(recipe)
    except RecipeError as exc:
        if len(exc.problems) > 1:
            click.echo(f"error: {len(exc.problems)} problems in the recipe:", err=True)
            for problem in exc.problems:
                click.echo(f"  - {problem}", err=True)
            sys.exit(2)
        raise
    _warn(parsed)
    if not isinstance(parsed, Chain):
        click.echo(_check_inputs(parsed))
        return
    names = ", ".join(s.label for s in parsed.steps)
    click.echo(f"ok: a chain of {len(parsed.steps)} step(s), in this order: {names}")
    for number, step in enumerate(parsed.steps, 1):
        head = f"step {number}/{len(parsed.steps)} {step.label}"
        if step.needs:
            click.echo(f"{head}: reads the output of step {', '.join(map(repr, step.needs))}; its inputs are checked when it runs")
        else:
            click.echo(f"{head}: {_check_inputs(parsed.resolved(step, {}))}")


def _check_inputs(parsed: Any) -> str:
    """Plan a recipe from its inputs' headers; say what it would do (and, on stderr, what its output would lack)."""
    with _collector_paused():  # the imports bring torch
        from .api import plan

    the_plan = plan(parsed)
    try:
        tokenizer = _tokenizer(the_plan)
        merged = sum(1 for j in the_plan.jobs if j.merge)
        if tokenizer is not None:
            for note in tokenizer.notes:
                click.echo(f"warning: {note}", err=True)
            if tokenizer.missing:
                click.echo(f"warning: the output will have no tokenizer: {tokenizer.missing}", err=True)
        line = (
            f"ok: {parsed.merge_method} over {len(the_plan.models)} model(s); "
            f"{len(the_plan.jobs)} tensors ({merged} merged), {the_plan.bytes_to_write / 1e6:.1f} MB to write"
        )
        if tokenizer is not None:
            line += f"\ntokenizer: {tokenizer.describe()}"
        return line
    finally:
        the_plan.close()


validate.epilog = RECIPE_HELP


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON (overall, per layer, per tensor).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Also draw them into this PNG file (needs matplotlib).")
@click.option("--tall-lambda", type=float, help="λ of the TALL masks for every task (default: the recipe's tall_lambda, else 0.4).")
@click.option("--aggregate", type=click.Choice(["task_arithmetic", "ties"]), help="How τ_MTL is built (default: the recipe's, else task_arithmetic).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def masks(recipe: str, as_json: bool, plot: str | None, tall_lambda: float | None, aggregate: str | None, device: str, quiet: bool) -> None:
    """Statistics of the TALL masks of RECIPE's models: which weights each task uses.

    For every weight, count how many tasks' masks m_t = |τ_t| > λ_t·|τ_MTL − τ_t| contain it.
    Prints the histogram of those counts (0..T) overall and per layer, the catastrophic (used by
    no task) and selfish (used by one task) fractions, each task's mask density, and the pairwise
    overlap of the masks. Reads each input once; writes nothing but the optional plot.
    """
    import json

    with _collector_paused():  # the imports bring torch
        from .products import mask_statistics
    from .recipe import Recipe

    if tall_lambda is not None and (tall_lambda < 0 or tall_lambda != tall_lambda):
        raise click.BadParameter("must be a number >= 0", param_hint="--tall-lambda")
    stats = mask_statistics(Recipe.from_yaml(recipe), device=device, progress=not quiet, aggregate=aggregate, tall_lambda=tall_lambda)
    if plot:
        stats.plot(plot, title=f"TALL masks of {recipe}")
    if as_json:
        click.echo(json.dumps(stats.as_dict(), indent=2))
    else:
        click.echo(stats.report())
        if plot:
            click.echo(f"\nplot written to {plot}")


@main.command()
@click.argument("collection", type=click.Path(file_okay=False))
@click.argument("args", nargs=-1, metavar="TASK OUT_DIR | --all OUT_DIR")
@click.option("--all", "all_tasks", is_flag=True, help="Extract every task into OUT_DIR/NNN-<task>/ (all or none).")
@click.option("--force", is_flag=True, help="Replace existing output folders.")
@click.option("--base", "base", help="Where the base model is now, if it moved since compression (its SHA-256 is checked).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; print only the output paths.")
@friendly_errors
def extract(collection: str, args: tuple[str, ...], all_tasks: bool, force: bool, base: str | None, quiet: bool) -> None:
    """Write one task of a COLLECTION back as a Hugging Face checkpoint.

    The task's weights are θ_0 + m_t ⊙ τ_MTL (TALL masks), θ_0 + λ_t · (m_t ⊙ τ_uni) (EMR) or, for
    TSV-C's 2-D tensors, θ_0 + U_t diag(S_t) V_tᵀ; its original config, generation config, tokenizer
    and sentence-transformers files are copied (a task compressed without tokenizer files gets the
    base's, with a warning). Only the task's own mask (and factor) file is read (with τ_MTL and the base),
    each checked against its SHA-256 first. `--all` extracts every task into OUT_DIR/NNN-<task>/
    (NNN = the task's index; the name made file-safe), all or none.
    """
    with _collector_paused():  # the imports bring torch
        from .products import Collection
    from .errors import MergeKitLiteError

    if all_tasks and len(args) != 1 or not all_tasks and len(args) != 2:
        raise MergeKitLiteError("usage: mergekit-lite extract COLLECTION TASK OUT_DIR, or mergekit-lite extract COLLECTION --all OUT_DIR")
    coll = Collection.open(collection, base=base)
    if not all_tasks:
        coll.task(args[0])
        with _warning_lines():  # a task without tokenizer files: the base's was written, or none at all
            path = coll.extract(args[0], args[1], force=force, progress=not quiet)
        click.echo(str(path) if quiet else f"wrote {args[0]} to {path}")
        return
    from .errors import MergeKitLiteWarning
    from .writer import AtomicFolder

    folder = AtomicFolder(args[0], force=force)
    with folder as tmp:  # all tasks or none: a failure in any task leaves no OUT_DIR
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MergeKitLiteWarning)  # said once for all tasks, below
            for entry in coll.manifest["tasks"]:
                coll.extract(entry["name"], tmp / entry["stem"], progress=not quiet)
    tokenizers = {e["stem"]: coll.tokenizer_of(e["name"]) for e in coll.manifest["tasks"]}
    fallback = [stem for stem, whose in tokenizers.items() if whose == "base"]
    without = [stem for stem, whose in tokenizers.items() if whose is None]
    if fallback:
        click.echo(f"warning: {folder.destination}: {', '.join(fallback)} were compressed from folders without tokenizer files; "
                   "the base model's tokenizer (kept in the collection) was written instead", err=True)
    if without:
        click.echo(f"warning: {folder.destination}: no tokenizer in {', '.join(without)}: their tasks were compressed from folders "
                   "without tokenizer files and the collection holds no base tokenizer; copy them in (e.g. from the base model)", err=True)
    for entry in coll.manifest["tasks"]:
        path = folder.destination / entry["stem"]
        click.echo(str(path) if quiet else f"wrote {entry['name']} to {path}")


@main.command("extract-lora")
@click.argument("finetuned")
@click.argument("base")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--rank", "-r", type=click.IntRange(min=1), required=True, help="Largest rank of each module's LoRA (mergekit: --max-rank).")
@click.option("--sv-epsilon", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Also drop singular values <= this (an adaptive rank per module, as mergekit's).")
@click.option("--include", "-i", "include", multiple=True, help="Only modules whose name matches this regular expression (repeatable).")
@click.option("--exclude", "-e", "exclude", multiple=True, help="Skip modules whose name matches this regular expression (repeatable).")
@click.option("--embed-lora/--no-embed-lora", default=False, show_default=True,
              help="Decompose changed embeddings and lm_head too (default: save them whole as PEFT modules_to_save).")
@click.option("--save-module", "save_modules", multiple=True, help="Save this module whole (its name or last part; repeatable).")
@click.option("--skip-undecomposable", is_flag=True, help="Skip changed tensors that are not linear weights (norms) instead of saving them whole.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists (only once the new adapter is complete).")
@click.option("--device", default="cpu", show_default=True, help="Where the SVDs run: cpu, cuda or cuda:N.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or per-module table; print only the output path.")
@friendly_errors
def extract_lora_command(finetuned: str, base: str, out_dir: str, rank: int, sv_epsilon: float, include: tuple[str, ...], exclude: tuple[str, ...],
                         embed_lora: bool, save_modules: tuple[str, ...], skip_undecomposable: bool, force: bool, device: str, quiet: bool) -> None:
    """Write a PEFT LoRA adapter of FINETUNED on BASE to OUT_DIR (PeftModel.from_pretrained loads it).

    Each linear module's ΔW is the best rank-R approximation of θ_ft − θ_base (truncated SVD, √σ on
    each factor, lora_alpha = r); its relative error ‖ΔW − BA‖/‖ΔW‖ is printed per module, with the
    adapter's size. Modules are read and decomposed one at a time. Unchanged modules are left out.
    FINETUNED may itself be an adapter (BASE+ADAPTER, or an adapter folder on BASE) to re-rank it.
    """
    with _collector_paused():  # the imports bring torch
        from .products.lora import extract_lora

    report = extract_lora(finetuned, base, out_dir, rank=rank, sv_epsilon=sv_epsilon, include=include, exclude=exclude,
                          embed_lora=embed_lora, save_modules=save_modules, skip_undecomposable=skip_undecomposable,
                          force=force, device=device, progress=not quiet)
    if not quiet:
        for line in report.lines():
            click.echo(line)
    click.echo(str(report.out_dir) if quiet else f"wrote {report.out_dir}")

#: how `inspect` names each collection scheme
SCHEME_LINES = {
    "tall": "TALL masks (θ_0 + m_t ⊙ τ_MTL)",
    "emr": "EMR-Merging (θ_0 + λ_t · (m_t ⊙ τ_uni))",
    "tsv": "TSV-C (2-D tensors: θ_0 + U_t diag(S_t) V_tᵀ; others: θ_0 + m_t ⊙ τ_MTL)",
}


@main.command()
@click.argument("collection", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--verify", is_flag=True, help="Also check the SHA-256 of every file (reads the whole collection and a referenced base).")
@friendly_errors
def inspect(collection: str, as_json: bool, verify: bool) -> None:
    """Show what a COLLECTION holds: its scheme (TALL masks, EMR, TSV-C), tasks, λ, densities, ranks, size and ratio.

    Sizes: the collection's files on disk, plus the referenced base's weights when the base is not
    embedded, beside the bytes of the original fine-tuned checkpoints. Opening checks the manifest's
    own checksum and every file's size; --verify checks every file's SHA-256 too.
    """
    import json

    with _collector_paused():  # the imports bring torch
        from .products import Collection

    coll = Collection.open(collection)
    checked = coll.verify() if verify else None
    info = coll.summary()
    if checked is not None:
        info["verified_files"] = checked
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    mb = 1e6
    base = info["base"]
    click.echo(f"collection {info['path']} (format version {info['format_version']}, {info['created_by']})")
    click.echo(f"base: {base['reference']} ({'embedded' if base['embedded'] else 'referenced, checked by SHA-256'})")
    scheme = info["scheme"]
    click.echo(f"scheme: {SCHEME_LINES[scheme]}")
    if scheme == "emr":
        click.echo(f"τ_uni: elected (sign of Σ τ_t, largest agreeing magnitude), stored as {info['mtl_dtype']}; rescaler: {info['rescaler']}")
    elif scheme == "tsv":
        click.echo(f"factors: {info['factored_tensors']} 2-D tensors at rank {'/'.join(map(str, info['ranks'])) or '-'} per task, stored as {info['mtl_dtype']}")
        click.echo(f"τ_MTL (the other tensors): {info['aggregate']}, stored as {info['mtl_dtype']}")
    else:
        click.echo(f"τ_MTL: {info['aggregate']}, stored as {info['mtl_dtype']}")
    lam = "λ (rescaler)" if scheme == "emr" else "λ"
    click.echo(f"{'task':<24}{lam:>13}{'density':>10}{'rel. error':>12}{'original MB':>14}")
    for t in info["tasks"]:
        value = f"{t['rescaler']:.4f}" if scheme == "emr" else f"{t['tall_lambda']}"
        click.echo(f"{t['name']:<24}{value:>13}{t['density']:>10.4f}{t['relative_error']:>12.4f}{t['original_bytes'] / mb:>14.1f}")
    click.echo(
        f"on disk: {info['bytes_on_disk'] / mb:.1f} MB"
        + ("" if base["embedded"] else f" + base {base['bytes'] / mb:.1f} MB")
        + f"; original checkpoints: {info['original_bytes'] / mb:.1f} MB; ratio {info['ratio']:.2f}x"
    )
    stats = info["mask_stats"]
    if scheme == "tsv":
        click.echo("masks (tensors that are not 2-D only):")
    click.echo(f"weights used by no task (catastrophic): {stats['catastrophic_fraction']:.4f}; by one (selfish): {stats['selfish_fraction']:.4f}")
    click.echo(f"tasks per weight (0..T): {stats['histogram']}")
    if checked is not None:
        click.echo(f"verified: SHA-256 of {checked} files ok")


@main.command()
@click.argument("name", required=False)
@friendly_errors
def methods(name: str | None) -> None:
    """List the merge methods with a one-line summary (or one method's declaration and parameters, by NAME)."""
    with _collector_paused():  # the imports bring torch
        from .methods import METHODS, get_method

    if not name:
        width = max(len(n) for n in METHODS)
        for key in sorted(METHODS):
            click.echo(f"{key.ljust(width)}  {METHODS[key].summary}")
        click.echo("\n`mergekit-lite methods NAME` shows a method's parameters, inputs and memory.")
        return
    method = get_method(name)
    click.echo(f"{method.name}: {method.summary}")
    if method.paper:
        click.echo(f"  paper: {method.paper}")
    if method.inputs == "task_vectors":
        click.echo(f"  inputs: task vectors θ_t − θ_0 of {method.model_count} model(s) besides the base; base_model required")
        if method.output == "model":
            click.echo("  output: θ_0 + λ · merged" if method.param("lambda") else "  output: θ_0 + merged")
    else:
        base = {"required": "base_model required (it is one of the inputs)", "optional": "base_model optional (if given, it is one of the inputs)",
                "unused": "no base model"}[method.base]
        click.echo(f"  inputs: the weights of {method.model_count} model(s); {base}")
    click.echo(f"  writes: {'a merged Hugging Face checkpoint' if method.output == 'model' else 'a compressed collection'}")
    click.echo(f"  memory: about {method.working_copies(8):g} copies of the largest tensor with 8 inputs (compute dtype; measured by benchmarks/bench_memory.py)")
    click.echo("  parameters (a value; a list = gradient over layer depth; [{filter, value}, ...] = per tensor name):")
    for p in method.params:
        where = "per model or global" if p.per_model else "global"
        choices = f" one of {'|'.join(p.choices)};" if p.choices else ""
        fixed = "" if p.per_tensor else " one value for the whole model;"
        click.echo(f"    {p.name} ({p.kind.__name__}, default {p.default!r}, {where});{choices}{fixed} {p.doc}")


def console_main() -> None:
    """The ``mergekit-lite`` console script: ``main``, then the process ends without tearing the interpreter down.

    Freeing what torch's import made, object by object, took 0.11-0.12 s of every run's wall time (250M merges,
    ~5 %). By the time ``main`` returns, every output file is closed and in place (outputs are renamed into place
    only when complete); exit handlers still run (logging, Ray, temporary folders) and both streams are flushed.
    Only the command line leaves this way: the Python API and in-process tests call ``main`` and keep the usual exit.
    """
    try:
        main()  # click's standalone mode: always ends in SystemExit
        code: Any = 0
    except SystemExit as done:
        code = done.code
    if code is not None and not isinstance(code, int):  # sys.exit("message"): printed, exit status 1
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing more to say
            stream.flush()
    os._exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    console_main()

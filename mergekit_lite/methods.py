"""Merge methods: each declared once, with its parameters and defaults, in a registry by name.

The recipe schema, the CLI help and the model card all read these declarations. A method's
``merge`` turns the task vectors of one tensor into one merged task vector (before ``lambda``);
the engine does the I/O, the dtype handling and ``θ = θ_0 + λ · merged``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from .errors import RecipeError


@dataclass(frozen=True)
class Param:
    """One parameter a method accepts, with its type, default and help text."""

    name: str
    kind: type
    default: Any
    doc: str
    per_model: bool = False  # may be given per model (models[i].parameters); top-level value is then the default
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    #: a list of values is a search grid, tried with the recipe's evaluator
    searchable: bool = False
    #: the grid searched when an evaluator is given and the recipe sets no value
    default_grid: tuple[float, ...] | None = None

    def check(self, value: Any, where: str) -> Any:
        """Validate and normalise one value; raise RecipeError naming ``where`` otherwise."""
        if self.searchable and isinstance(value, list):
            if not value:
                raise RecipeError(f"{where}: a search grid needs at least one value")
            return [self.check(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, (list, dict)):
            raise RecipeError(
                f"{where}: lists and filtered values (mergekit 'gradients') are not supported yet; give a single value"
            )
        if self.kind is bool:
            if not isinstance(value, bool):
                raise RecipeError(f"{where}: expected true or false, got {value!r}")
            return value
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecipeError(f"{where}: expected a number, got {value!r}")
            if self.kind is int and not float(value).is_integer():
                raise RecipeError(f"{where}: expected a whole number, got {value!r}")
            if value != value or value in (float("inf"), float("-inf")):
                raise RecipeError(f"{where}: expected a finite number, got {value!r}")
            if self.minimum is not None and value < self.minimum:
                raise RecipeError(f"{where}: must be >= {self.minimum}, got {value!r}")
            if self.maximum is not None and value > self.maximum:
                raise RecipeError(f"{where}: must be <= {self.maximum}, got {value!r}")
            return self.kind(value)
        if self.kind is str:
            if not isinstance(value, str):
                raise RecipeError(f"{where}: expected text, got {value!r}")
            if self.choices and value not in self.choices:
                raise RecipeError(f"{where}: {value!r} is not one of {', '.join(self.choices)}{suggest(value, self.choices)}")
            return value
        return value


@dataclass
class TensorContext:
    """What a method may know about the tensor it merges, beyond the task vectors themselves."""

    name: str
    model_names: list[str]
    params: dict[str, Any]  # the method's global parameters, with defaults filled in
    model_params: list[dict[str, Any]]  # per model, with the global values and defaults filled in
    stats: dict[str, Any] = field(default_factory=dict)  # model-wide statistics from pass 0, if any

    def weights(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor([p.get("weight", 1.0) for p in self.model_params], dtype=dtype, device=device)


MergeFn = Callable[[Iterable[torch.Tensor], TensorContext], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its name, help text, parameters, and the function that merges one tensor."""

    name: str
    summary: str
    params: tuple[Param, ...]
    merge: MergeFn
    paper: str = ""
    #: working copies of the largest tensor (in the compute dtype) held at once, for K models
    working_copies: Callable[[int], int] = lambda k: 4
    #: model-wide statistics computed in extra passes before the merge (None: not needed)
    statistics: Callable[["TaskVectorSource", dict[str, Any], list[dict[str, Any]]], dict[str, Any]] | None = None
    #: how many times the inputs are read, for the plan
    passes: Callable[[dict[str, Any], torch.dtype], int] = lambda params, dtype: 1
    #: what the method writes: a merged Hugging Face checkpoint, or a compressed collection
    output: str = "model"

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def resolve(
        self, global_params: dict[str, Any], per_model: Sequence[dict[str, Any]], where: str = "parameters"
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Check the recipe's parameters against this declaration and fill in the defaults."""
        names = [p.name for p in self.params]
        resolved: dict[str, Any] = {}
        for key, value in global_params.items():
            param = self.param(key)
            if param is None:
                raise RecipeError(f"{where}.{key}: {self.name} has no parameter {key!r}{suggest(key, names)}")
            resolved[key] = param.check(value, f"{where}.{key}")
        for param in self.params:
            resolved.setdefault(param.name, param.default)
        models: list[dict[str, Any]] = []
        for i, params in enumerate(per_model):
            own: dict[str, Any] = {}
            for key, value in params.items():
                param = self.param(key)
                at = f"models[{i}].parameters.{key}"
                if param is None:
                    raise RecipeError(f"{at}: {self.name} has no parameter {key!r}{suggest(key, names)}")
                if not param.per_model:
                    raise RecipeError(f"{at}: {key!r} applies to the whole merge; move it to the top-level parameters")
                own[key] = param.check(value, at)
            models.append({p.name: own.get(p.name, resolved[p.name]) for p in self.params if p.per_model})
        return resolved, models


def suggest(word: str, options: Iterable[str]) -> str:
    """'; did you mean X?' for the closest option, or ''."""
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise RecipeError(f"merge_method: unknown method {name!r}{suggest(name, METHODS)} (available: {', '.join(sorted(METHODS))})")
    return METHODS[name]


# -- shared parameters ---------------------------------------------------------------------------
WEIGHT = Param("weight", float, 1.0, "Per-model weight w_t multiplying its task vector (negative forgets a task).", per_model=True)
LAMBDA = Param("lambda", float, 1.0, "Scaling coefficient λ of the combined task vector: θ = θ_0 + λ·merged.")
#: λ for the methods whose papers search it on validation data (a list is a grid for the evaluator)
LAMBDA_SEARCHABLE = Param(
    "lambda", float, 1.0, "Scaling coefficient λ: θ = θ_0 + λ·merged. A list is a grid searched with the recipe's evaluator.",
    searchable=True, default_grid=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)
INT8_MASK = Param(
    "int8_mask", bool, False, "Accepted for mergekit compatibility: a memory flag there; masks here are always bool, so it changes nothing."
)
COMMON = (WEIGHT, LAMBDA, INT8_MASK)


# -- task arithmetic ------------------------------------------------------------------------------
def _merge_task_arithmetic(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    """Σ_t w_t τ_t, accumulated one task vector at a time so only one is held at once."""
    total: torch.Tensor | None = None
    for params, delta in zip(ctx.model_params, deltas):
        total = delta.mul_(params["weight"]) if total is None else total.add_(delta, alpha=params["weight"])
    assert total is not None, "at least one model is required"
    return total


register(
    MergeMethod(
        name="task_arithmetic",
        summary="θ = θ_0 + λ · Σ_t w_t τ_t (Ilharco et al., 2023).",
        params=(WEIGHT, LAMBDA_SEARCHABLE, INT8_MASK),
        merge=_merge_task_arithmetic,
        paper="https://arxiv.org/abs/2212.04089",
        working_copies=lambda k: 3,
    )
)


# -- helpers shared by the methods below ----------------------------------------------------------
def stack_deltas(deltas: Iterable[torch.Tensor], count: int) -> torch.Tensor:
    """Gather the task vectors of one tensor into one [T, ...] tensor without holding a second copy."""
    stacked: torch.Tensor | None = None
    for i, delta in enumerate(deltas):
        if stacked is None:
            stacked = torch.empty((count, *delta.shape), dtype=delta.dtype, device=delta.device)
        stacked[i] = delta
        del delta
    assert stacked is not None, "at least one model is required"
    return stacked


def _weights_for(ctx: TensorContext, like: torch.Tensor) -> torch.Tensor:
    return ctx.weights(like.dtype, like.device)


class TaskVectorSource:
    """What a method's model-wide statistics see: passes over every merged tensor's task vectors.

    Implemented by the engine; each call of ``tensors`` is one full read of the checkpoints.
    """

    total_numel: int  # entries per task over all merged tensors
    compute_dtype: torch.dtype

    def tensors(self, description: str, tasks: Sequence[int] | None = None) -> Iterable[tuple[str, Iterable[tuple[int, torch.Tensor]]]]:
        raise NotImplementedError


def ties_model_statistics(source: TaskVectorSource, density: float, weights: Sequence[float]) -> dict[str, Any]:
    """The reference's model-wide TIES quantities, exactly, in bounded memory.

    thresholds[t]: the k-th largest |τ_t| over the whole model, k = ⌊density·n⌋ (radix select,
    2 passes for float32, up to 4 for float64); majority: sign of Σ over the model of the elected
    signs γ (one more pass), the sign that entries with a zero sum take.
    """
    from .masks import keep_count, majority_sign_count
    from .select import KthLargestMagnitude

    k = keep_count(source.total_numel, density)
    selectors = [KthLargestMagnitude(k, source.compute_dtype) for _ in weights]
    while not all(s.done for s in selectors):
        pending = [t for t, s in enumerate(selectors) if not s.done]
        for _, deltas in source.tensors("TIES thresholds", pending):
            for t, delta in deltas:
                selectors[t].observe(delta)
        for t in pending:
            selectors[t].end_pass()
    thresholds = [s.value for s in selectors]
    count = 0
    for _, deltas in source.tensors("TIES majority sign"):
        total: torch.Tensor | None = None
        for t, delta in deltas:
            term = delta.masked_fill_(delta.abs() < thresholds[t], 0).mul_(weights[t])
            total = term if total is None else total.add_(term)
        if total is not None:
            count += int(majority_sign_count(total.unsqueeze(0)))
    return {"thresholds": thresholds, "majority": 1.0 if count > 0 else -1.0}


# -- TIES ---------------------------------------------------------------------------------------
DENSITY_TIES = Param("density", float, 0.2, "Fraction of each task vector kept by magnitude (top-k), k = ⌊density·n⌋.", minimum=0, maximum=1)
SCOPE_TIES = Param(
    "scope", str, "model", "Where the trim threshold is computed: model (the paper's, one per task over the whole model) or tensor (mergekit's).",
    choices=("model", "tensor"),
)
MERGE_MODE = Param("merge", str, "mean", "Disjoint merge of the entries that agree with the elected sign.", choices=("mean", "sum", "max"))
NORMALIZE = Param("normalize", bool, True, "mergekit's flag: false turns the disjoint mean into a sum (merge: sum).")


def _merge_mode(ctx: TensorContext) -> str:
    return ctx.params["merge"] if ctx.params.get("normalize", True) else "sum"


def _merge_ties(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    from .masks import ties_merge

    stacked = stack_deltas(deltas, len(ctx.model_params))
    weights = _weights_for(ctx, stacked)
    if ctx.params["scope"] == "model":
        thresholds = torch.tensor(ctx.stats["thresholds"], dtype=stacked.dtype, device=stacked.device)
        return ties_merge(stacked, ctx.params["density"], weights, _merge_mode(ctx), ctx.stats["majority"], thresholds)
    # mergekit's per-tensor semantics: a zero sum counts as positive
    return ties_merge(stacked, ctx.params["density"], weights, _merge_mode(ctx), fallback=1.0)


def _ties_stats(source: TaskVectorSource, params: dict[str, Any], model_params: list[dict[str, Any]]) -> dict[str, Any]:
    if params["scope"] != "model":
        return {}
    return ties_model_statistics(source, params["density"], [p["weight"] for p in model_params])


def _ties_passes(params: dict[str, Any], dtype: torch.dtype) -> int:
    if params.get("scope") != "model":
        return 1
    return 1 + (2 if dtype == torch.float32 else 4) + 1


register(
    MergeMethod(
        name="ties",
        summary="TIES: trim each τ_t to its top-density magnitudes, elect signs by summed mass, disjoint mean (Yadav et al., 2023).",
        params=(DENSITY_TIES, SCOPE_TIES, MERGE_MODE, NORMALIZE, *COMMON),
        merge=_merge_ties,
        paper="https://arxiv.org/abs/2306.01708",
        working_copies=lambda k: 4 * k + 2,
        statistics=_ties_stats,
        passes=_ties_passes,
    )
)


# -- DARE ---------------------------------------------------------------------------------------
DENSITY_DARE = Param("density", float, 0.1, "Keep probability of each entry (drop p = 1 − density); the paper's p = 0.9.", minimum=0, maximum=1)
RESCALE = Param("rescale", bool, True, "Rescale the survivors by 1/density so the expected task vector is unchanged.")
SEED = Param("seed", int, 0, "Seed; each (seed, model, tensor) has its own generator, so results do not depend on order or device.")


def _dare_all(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> Iterable[torch.Tensor]:
    from .masks import dare, generator_for

    for name, params, delta in zip(ctx.model_names, ctx.model_params, deltas):
        yield dare(delta, params["density"], generator_for(ctx.params["seed"], name, ctx.name), rescale=ctx.params["rescale"])


def _merge_dare_linear(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return _merge_task_arithmetic(_dare_all(deltas, ctx), ctx)


def sign_consensus_merge(sparsified: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    """TIES steps 2–3 over already sparsified task vectors (mergekit's dare_ties/breadcrumbs_ties: a zero sum counts as +)."""
    from .masks import disjoint_merge, elect_sign

    stacked = stack_deltas(sparsified, len(ctx.model_params))
    weights = _weights_for(ctx, stacked)
    sign = elect_sign(stacked * weights.view(-1, *([1] * (stacked.dim() - 1))), fallback=1.0)
    return disjoint_merge(stacked, sign, weights, _merge_mode(ctx))


def _merge_dare_ties(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return sign_consensus_merge(_dare_all(deltas, ctx), ctx)


DENSITY_DARE_PER_MODEL = Param(DENSITY_DARE.name, float, DENSITY_DARE.default, DENSITY_DARE.doc, per_model=True, minimum=0, maximum=1)

register(
    MergeMethod(
        name="dare_linear",
        summary="DARE: drop each entry of τ_t with probability p, rescale by 1/(1−p), then task arithmetic (Yu et al., 2024).",
        params=(DENSITY_DARE_PER_MODEL, RESCALE, SEED, *COMMON),
        merge=_merge_dare_linear,
        paper="https://arxiv.org/abs/2311.03099",
        working_copies=lambda k: 4,
    )
)
register(
    MergeMethod(
        name="dare_ties",
        summary="DARE drop-and-rescale, then TIES sign election and disjoint merge (mergekit's dare_ties).",
        params=(DENSITY_DARE_PER_MODEL, RESCALE, SEED, MERGE_MODE, NORMALIZE, *COMMON),
        merge=_merge_dare_ties,
        paper="https://arxiv.org/abs/2311.03099",
        working_copies=lambda k: 3 * k + 2,
    )
)


# -- Model Breadcrumbs --------------------------------------------------------------------------
DENSITY_BC = Param("density", float, 0.15, "β: fraction of each row kept after the outliers are removed.", per_model=True, minimum=0, maximum=1)
GAMMA_BC = Param("gamma", float, 0.006, "γ: fraction of the largest magnitudes (outliers) removed per row.", per_model=True, minimum=0, maximum=1)
SCOPE_BC = Param(
    "scope", str, "row", "Ranking per row along the last dimension (row, the reference) or over the whole tensor (tensor, mergekit).",
    choices=("row", "tensor"),
)


def _breadcrumbs_all(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> Iterable[torch.Tensor]:
    from .masks import breadcrumbs

    for params, delta in zip(ctx.model_params, deltas):
        yield breadcrumbs(delta, params["density"], params["gamma"], ctx.params["scope"])


def _merge_breadcrumbs(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return _merge_task_arithmetic(_breadcrumbs_all(deltas, ctx), ctx)


def _merge_breadcrumbs_ties(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return sign_consensus_merge(_breadcrumbs_all(deltas, ctx), ctx)


register(
    MergeMethod(
        name="breadcrumbs",
        summary="Model Breadcrumbs: per row, drop the top-γ outliers and keep the next β fraction of τ_t, then sum (Davari & Belilovsky, 2023).",
        params=(DENSITY_BC, GAMMA_BC, SCOPE_BC, *COMMON),
        merge=_merge_breadcrumbs,
        paper="https://arxiv.org/abs/2312.06795",
        working_copies=lambda k: 6,
    )
)
register(
    MergeMethod(
        name="breadcrumbs_ties",
        summary="Breadcrumbs masks, then TIES sign election and disjoint merge (mergekit's breadcrumbs_ties).",
        params=(DENSITY_BC, GAMMA_BC, SCOPE_BC, MERGE_MODE, NORMALIZE, *COMMON),
        merge=_merge_breadcrumbs_ties,
        paper="https://arxiv.org/abs/2312.06795",
        working_copies=lambda k: 3 * k + 4,
    )
)


# -- TALL masks and Consensus -------------------------------------------------------------------
AGGREGATE = Param(
    "aggregate", str, "task_arithmetic", "How τ_MTL is built: task_arithmetic (Σ τ_t) or ties (density 0.2, sum, model scope).",
    choices=("task_arithmetic", "ties"),
)
TALL_LAMBDA = Param(
    "tall_lambda", float, 0.4, "λ_t of the TALL mask |τ_t| > λ_t·|τ_MTL − τ_t|; a list is a grid searched per task with the evaluator (the paper: 0.2…0.6).",
    per_model=True, minimum=0, searchable=True, default_grid=(0.2, 0.3, 0.4, 0.5, 0.6),
)
CONSENSUS_K = Param("consensus_k", int, 2, "Keep weights used by at least k tasks (1 drops catastrophic, 2 also selfish ones).", minimum=0)
TALL_TIES_DENSITY = 0.2


def multitask_vector(stacked: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
    """τ_MTL for TALL masks: Σ_t τ_t, or TIES with density 0.2 and sum over model-scope thresholds."""
    from .masks import ties_merge

    if ctx.params["aggregate"] == "task_arithmetic":
        return stacked.sum(dim=0)
    thresholds = torch.tensor(ctx.stats["thresholds"], dtype=stacked.dtype, device=stacked.device)
    return ties_merge(stacked, TALL_TIES_DENSITY, None, "sum", ctx.stats["majority"], thresholds)


def tall_masks_for(stacked: torch.Tensor, tau_mtl: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
    """The T TALL masks of one tensor, [T, ...] bool."""
    from .masks import tall_mask

    return torch.stack([tall_mask(stacked[t], tau_mtl, p["tall_lambda"]) for t, p in enumerate(ctx.model_params)])


def _merge_consensus(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    from .masks import consensus_mask

    stacked = stack_deltas(deltas, len(ctx.model_params))
    tau_mtl = multitask_vector(stacked, ctx)
    keep = consensus_mask(tall_masks_for(stacked, tau_mtl, ctx), ctx.params["consensus_k"])
    return tau_mtl.masked_fill_(~keep, 0)


def _aggregate_stats(source: TaskVectorSource, params: dict[str, Any], model_params: list[dict[str, Any]]) -> dict[str, Any]:
    if params["aggregate"] != "ties":
        return {}
    return ties_model_statistics(source, TALL_TIES_DENSITY, [1.0] * len(model_params))


def _aggregate_passes(params: dict[str, Any], dtype: torch.dtype) -> int:
    return _ties_passes({"scope": "model" if params.get("aggregate") == "ties" else "tensor"}, dtype)


register(
    MergeMethod(
        name="consensus",
        summary="Consensus merging: keep the weights of τ_MTL that ≥ k tasks' TALL masks use (Wang et al., 2024).",
        params=(AGGREGATE, CONSENSUS_K, TALL_LAMBDA, LAMBDA_SEARCHABLE, INT8_MASK),
        merge=_merge_consensus,
        paper="https://arxiv.org/abs/2405.07813",
        working_copies=lambda k: 3 * k + 3,
        statistics=_aggregate_stats,
        passes=_aggregate_passes,
    )
)


# -- TALL-masks compression (writes a collection, not a merged model) -----------------------------
MTL_DTYPE = Param(
    "mtl_dtype", str, "auto", "Stored dtype of τ_MTL: auto (float32, or float64 for float64 models; see docs/collection-format.md) or a dtype.",
    choices=("auto", "float32", "float64", "bfloat16", "float16"),
)
EMBED_BASE = Param("embed_base", bool, False, "Store the base weights inside the collection instead of a reference (path/hub id + SHA-256).")


def _no_merge(deltas: Iterable[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    raise RecipeError("merge_method: tall_masks writes a collection; it has no merged model")


register(
    MergeMethod(
        name="tall_masks",
        summary="TALL-masks compression: base + τ_MTL + one bit per weight per task; extract any fine-tune again (Wang et al., 2024).",
        params=(AGGREGATE, TALL_LAMBDA, MTL_DTYPE, EMBED_BASE, INT8_MASK),
        merge=_no_merge,
        paper="https://arxiv.org/abs/2405.07813",
        working_copies=lambda k: 3 * k + 3,
        statistics=_aggregate_stats,
        passes=_aggregate_passes,
        output="collection",
    )
)

"""nuslerp, multislerp and karcher end to end, against references written here from the formulas.

Two kinds of checks, both through ``mergekit_lite.run``: hand-computed cases on tiny checkpoints
whose tensors are set by hand (2-vectors at right angles, colinear rows, zero task vectors), and
plain float64 references over the demo models (loops over vectors, the tangent-space step of
Multi-SLERP done literally, the Karcher iteration written out).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergekit_lite
from mergekit_lite import Recipe
from mergekit_lite.demo import DEMO_TASKS
from mergekit_lite.errors import RecipeError
from mergekit_lite.methods import get_method

from helpers import load_state

S = math.sqrt(0.5)  # sin 45° = cos 45°
NAME = "model.layers.0.w"


def tiny(folder: Path, values) -> str:
    """A one-tensor checkpoint (``model.layers.0.w``, float32) with hand-set values."""
    folder.mkdir(parents=True)
    save_file({NAME: torch.tensor(values, dtype=torch.float32)}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}))
    return str(folder)


def run(tmp_path: Path, data: dict, name: str = "out") -> dict[str, torch.Tensor]:
    return load_state(mergekit_lite.run(Recipe.from_dict(data), tmp_path / name, progress=False))


def hand(tmp_path: Path, method: str, tensors: dict[str, list], weights: dict[str, float] | None = None, base: str | None = None, **params) -> torch.Tensor:
    paths = {k: tiny(tmp_path / k, v) for k, v in tensors.items()}
    data: dict = {"merge_method": method, "models": []}
    for k in tensors:
        if k == base:
            continue
        entry: dict = {"model": paths[k]}
        if weights and k in weights:
            entry["parameters"] = {"weight": weights[k]}
        data["models"].append(entry)
    if base is not None:
        data["base_model"] = paths[base]
    if params:
        data["parameters"] = params
    return run(tmp_path, data)[NAME].double()


def close(got: torch.Tensor, want, atol: float = 1e-6) -> None:
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=atol, rtol=0)


# -- hand-computed cases -------------------------------------------------------------------------
def test_nuslerp_flattened_right_angle(tmp_path):
    # t = 1/(1+1) = 0.5, θ = 90°: sin(45°)·a + sin(45°)·b
    close(hand(tmp_path, "nuslerp", {"a": [[1.0, 0.0]], "b": [[0.0, 2.0]]}, {"a": 1.0, "b": 1.0}), [[S, 2 * S]])


def test_nuslerp_t_from_weights(tmp_path):
    # weights 1 and 3: t = 0.75; θ = 90°: sin(22.5°)·a + sin(67.5°)·b
    got = hand(tmp_path, "nuslerp", {"a": [[1.0, 0.0]], "b": [[0.0, 1.0]]}, {"a": 1.0, "b": 3.0})
    close(got, [[math.sin(math.pi / 8), math.sin(3 * math.pi / 8)]])


def test_nuslerp_weights_summing_to_zero_give_half(tmp_path):
    got = hand(tmp_path, "nuslerp", {"a": [[1.0, 0.0]], "b": [[0.0, 1.0]]}, {"a": 1.0, "b": -1.0})
    close(got, [[S, S]])


# x0 = [[1, 0], [1, 0]], x1 = [[0, 1], [1, 0]], t = 0.5
X0, X1 = [[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]
C = math.sin(math.pi / 8) / math.sin(math.pi / 4)  # θ = 45°: sin(θ/2)/sin θ
F = math.sin(math.pi / 6) / math.sin(math.pi / 3)  # θ = 60°


@pytest.mark.parametrize(
    "params, want",
    [
        ({}, [[F, F], [2 * F, 0.0]]),  # one vector [1,0,1,0] vs [0,1,1,0]: cos = 1/2
        ({"nuslerp_flatten": False}, [[S, S], [1.0, 0.0]]),  # rows: 90° apart; colinear → lerp
        # columns: [1,1] vs [0,1] (45°); [0,0] vs [1,0]: the zero vector has cos 0 → 90°
        ({"nuslerp_flatten": False, "nuslerp_row_wise": True}, [[C, S], [2 * C, 0.0]]),
        ({"nuslerp_row_wise": True}, [[F, F], [2 * F, 0.0]]),  # row_wise alone changes nothing
    ],
)
def test_nuslerp_vectors(tmp_path, params, want):
    close(hand(tmp_path, "nuslerp", {"a": X0, "b": X1}, {"a": 0.5, "b": 0.5}, **params), want)


def test_nuslerp_task_vectors_with_base(tmp_path):
    got = hand(tmp_path, "nuslerp", {"base": [[1.0, 1.0]], "a": [[2.0, 1.0]], "b": [[1.0, 3.0]]}, {"a": 1.0, "b": 1.0}, base="base")
    close(got, [[1 + S, 1 + 2 * S]])


def test_nuslerp_needs_two_models_besides_the_base(tmp_path):
    with pytest.raises(RecipeError, match="exactly 2 models besides the base"):
        hand(tmp_path, "nuslerp", {"a": [[1.0, 0.0]], "b": [[0.0, 1.0]], "c": [[1.0, 1.0]]})
    assert not (tmp_path / "out").exists()


def test_multislerp_right_angle(tmp_path):
    # unit vectors [1,0], [0,1], weights ½ each: direction 45°, norm ½·3 + ½·1 = 2
    close(hand(tmp_path, "multislerp", {"a": [[3.0, 0.0]], "b": [[0.0, 1.0]]}, {"a": 1.0, "b": 1.0}), [[2 * S, 2 * S]], atol=1e-5)
    # weights not normalised: the direction is the same, the norm is 1·3 + 1·1 = 4
    got = hand(tmp_path / "raw", "multislerp", {"a": [[3.0, 0.0]], "b": [[0.0, 1.0]]}, {"a": 1.0, "b": 1.0}, normalize_weights=False)
    close(got, [[4 * S, 4 * S]], atol=1e-5)


def test_multislerp_one_model_passes_through(tmp_path):
    close(hand(tmp_path, "multislerp", {"base": [[5.0, 5.0]], "a": [[3.0, 4.0]]}, {"a": 0.2}, base="base"), [[3.0, 4.0]])


def test_multislerp_antipodal_pair_falls_back_to_linear(tmp_path):
    got = hand(tmp_path, "multislerp", {"base": [[1.0, 1.0]], "a": [[2.0, 1.0]], "b": [[0.0, 1.0]]}, {"a": 1.0, "b": 1.0}, base="base")
    close(got, [[1.0, 1.0]])  # the task vectors ±[1, 0] cancel: ½τ_a + ½τ_b = 0


def test_multislerp_cancelling_directions_refused(tmp_path):
    with pytest.raises(RecipeError, match="cancel out"):
        hand(tmp_path, "multislerp", {"a": [[1.0, 0.0]], "b": [[-1.0, 0.0]], "c": [[0.0, 0.0]]})


def test_multislerp_unchanged_tensor_keeps_the_base(tmp_path):
    # all three task vectors are zero (mergekit raises here; we keep the base: see docs)
    got = hand(tmp_path, "multislerp", {"base": [[1.0, 2.0]], "a": [[1.0, 2.0]], "b": [[1.0, 2.0]], "c": [[1.0, 2.0]]}, base="base")
    close(got, [[1.0, 2.0]])


def test_karcher_right_angle(tmp_path):
    # the geodesic midpoint of [1,0] and [0,1] is 45°; the norm is the mean norm (3 + 1)/2
    close(hand(tmp_path, "karcher", {"a": [[3.0, 0.0]], "b": [[0.0, 1.0]]}), [[2 * S, 2 * S]], atol=1e-5)


def test_karcher_zero_tensor_counts_only_in_the_norm(tmp_path):
    close(hand(tmp_path, "karcher", {"a": [[3.0, 0.0]], "b": [[0.0, 0.0]]}), [[1.5, 0.0]])


def test_karcher_base_is_one_more_input(tmp_path):
    # three directions 0°, 90°, 0°: equal weights; the base is averaged in like the others
    got = hand(tmp_path, "karcher", {"base": [[2.0, 0.0]], "a": [[0.0, 2.0]], "b": [[2.0, 0.0]]}, base="base", max_iter=200, tol=1e-9)
    angle = math.pi / 6  # on a circle, the Karcher mean of angles within a half-circle is their mean: 30°
    close(got, [[2 * math.cos(angle), 2 * math.sin(angle)]], atol=1e-5)


# -- float64 references over the demo models -------------------------------------------------
def ref_slerp_vectors(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SLERP of two 1-D vectors, written out (colinear: lerp)."""
    na, nb = max(float(a.norm()), 1e-7), max(float(b.norm()), 1e-7)
    cos = min(1.0, max(-1.0, float(a @ b) / (na * nb)))
    if 1 - cos * cos <= 1e-16:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta) * a + math.sin(t * theta) / math.sin(theta) * b


def ref_nuslerp(t: float, x0: torch.Tensor, x1: torch.Tensor, flatten: bool, row_wise: bool) -> torch.Tensor:
    if flatten or x0.dim() == 1:
        return ref_slerp_vectors(t, x0.reshape(-1), x1.reshape(-1)).reshape(x0.shape)
    out = torch.empty_like(x0)
    if row_wise:  # vectors along the first dimension: the columns
        for j in range(x0.shape[1]):
            out[:, j] = ref_slerp_vectors(t, x0[:, j], x1[:, j])
    else:
        for i in range(x0.shape[0]):
            out[i] = ref_slerp_vectors(t, x0[i], x1[i])
    return out


def ref_multislerp(xs: list[torch.Tensor], w: list[float], normalize: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Multi-SLERP as described: tangent space at the weighted mean direction, exponential map back."""
    w_t = torch.tensor(w, dtype=torch.float64)
    if normalize:
        w_t = w_t / w_t.sum()
    flat = [x.reshape(-1) for x in xs]
    norms = [float(f.norm()) for f in flat]
    units = [f / (n + eps) for f, n in zip(flat, norms)]
    mean = sum(wi * u for wi, u in zip(w_t, units))
    mean = mean / mean.norm()
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w_t, units))
    tn = float(tangent.norm()) + eps
    point = mean * math.cos(tn) + tangent * (math.sin(tn) / tn)
    return (point * float(sum(wi * n for wi, n in zip(w_t, norms)))).reshape(xs[0].shape)


def ref_karcher(xs: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The Karcher mean of the directions (equal weights), iterated as documented, times the mean norm."""
    flat = [x.reshape(-1) for x in xs]
    norms = [float(f.norm()) for f in flat]
    units = [f / n for f, n in zip(flat, norms)]
    alpha = 1.0 / len(xs)
    mean = sum(alpha * u for u in units)
    mean = mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            cos = min(1.0, max(-1.0, float(mean @ u)))
            theta = math.acos(cos)
            if theta < tol:
                continue
            tangent += alpha * theta / math.sin(theta) * (u - cos * mean)
        tn = float(tangent.norm())
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * tangent / tn
        mean = mean / mean.norm()
    return (mean * sum(alpha * n for n in norms)).reshape(xs[0].shape)


def demo_states(demo):
    base = {k: v.double() for k, v in load_state(demo["base"]).items()}
    fts = [{k: v.double() for k, v in load_state(demo[t]).items()} for t in DEMO_TASKS]
    return base, fts


def layer_t(name: str) -> float:
    """Relative depth in the 2-layer demo: layer i → i; embeddings, norm and head → 0."""
    return 1.0 if ".layers.1." in name else 0.0


def assert_states(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float = 1e-5) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        diff = float((got[name].double() - w).norm()) / float(w.norm())
        assert diff < rel, f"{name}: relative difference {diff:.3g}"


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("flatten, row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_matches_reference(demo, tmp_path, with_base, flatten, row_wise):
    base, (a, b, _) = demo_states(demo)
    data = {
        "merge_method": "nuslerp",
        "models": [{"model": str(demo["math"]), "parameters": {"weight": [0.2, 0.8]}}, {"model": str(demo["code"]), "parameters": {"weight": 0.6}}],
        "parameters": {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise},
    }
    if with_base:
        data["base_model"] = str(demo["base"])
    want = {}
    for name in base:
        w0 = 0.2 + 0.6 * layer_t(name)
        t = 0.6 / (w0 + 0.6)
        if with_base:
            want[name] = base[name] + ref_nuslerp(t, a[name] - base[name], b[name] - base[name], flatten, row_wise)
        else:
            want[name] = ref_nuslerp(t, a[name], b[name], flatten, row_wise)
    assert_states(run(tmp_path, data), want)


@pytest.mark.parametrize("base_listed_first", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_reference(demo, tmp_path, base_listed_first, normalize):
    base, fts = demo_states(demo)
    weights = [0.5, 0.3, 0.2]
    models = [{"model": str(demo[t]), "parameters": {"weight": w}} for t, w in zip(DEMO_TASKS, weights)]
    if base_listed_first:  # the base is read before the others instead of last
        models.insert(0, {"model": str(demo["base"])})
    data = {"merge_method": "multislerp", "base_model": str(demo["base"]), "models": models, "parameters": {"normalize_weights": normalize}}
    want = {n: base[n] + ref_multislerp([ft[n] - base[n] for ft in fts], weights, normalize) for n in base}
    assert_states(run(tmp_path, data), want)


def test_multislerp_without_base_matches_reference(demo, tmp_path):
    _, fts = demo_states(demo)
    data = {"merge_method": "multislerp", "models": [{"model": str(demo[t]), "parameters": {"weight": w}} for t, w in zip(DEMO_TASKS, (1.0, 2.0, 0.5))]}
    want = {n: ref_multislerp([ft[n] for ft in fts], [1.0, 2.0, 0.5]) for n in fts[0]}
    assert_states(run(tmp_path, data), want)


@pytest.mark.parametrize("max_iter, tol", [(10, 1e-5), (0, 1e-5), (100, 1e-7)])
def test_karcher_matches_reference(demo, tmp_path, max_iter, tol):
    base, fts = demo_states(demo)
    data = {"merge_method": "karcher", "base_model": str(demo["base"]), "models": [{"model": str(demo[t])} for t in DEMO_TASKS],
            "parameters": {"max_iter": max_iter, "tol": tol}}
    inputs = lambda n: [ft[n] for ft in fts] + [base[n]]  # noqa: E731  (the base is the fourth input)
    want = {n: ref_karcher(inputs(n), max_iter, tol) for n in base}
    assert_states(run(tmp_path, data), want)


def test_declarations():
    nu, multi, karcher = (get_method(n) for n in ("nuslerp", "multislerp", "karcher"))
    assert [p.name for p in nu.params] == ["weight", "nuslerp_flatten", "nuslerp_row_wise"]
    assert (nu.param("nuslerp_flatten").default, nu.param("nuslerp_row_wise").default) == (True, False)
    assert [(p.name, p.default) for p in multi.params] == [("weight", 1.0), ("normalize_weights", True), ("eps", 1e-8)]
    assert [(p.name, p.default) for p in karcher.params] == [("max_iter", 10), ("tol", 1e-5)]
    assert all(m.inputs == "weights" and m.base == "optional" for m in (nu, multi, karcher))
    assert (nu.min_models, nu.max_models) == (2, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recipe", ["nuslerp", "multislerp", "karcher"])
def test_cuda_matches_cpu(demo, tmp_path, recipe):
    data = {
        "nuslerp": {"merge_method": "nuslerp", "base_model": str(demo["base"]), "parameters": {"nuslerp_flatten": False},
                    "models": [{"model": str(demo["math"]), "parameters": {"weight": 0.3}}, {"model": str(demo["code"])}]},
        "multislerp": {"merge_method": "multislerp", "base_model": str(demo["base"]), "models": [{"model": str(demo[t])} for t in DEMO_TASKS]},
        "karcher": {"merge_method": "karcher", "models": [{"model": str(demo[t])} for t in DEMO_TASKS]},
    }[recipe]
    cpu = load_state(mergekit_lite.run(Recipe.from_dict(data), tmp_path / "cpu", progress=False))
    gpu = load_state(mergekit_lite.run(Recipe.from_dict(data), tmp_path / "gpu", device="cuda", progress=False))
    assert_states(gpu, {n: t.double() for n, t in cpu.items()}, rel=1e-5)


def test_karcher_of_nearly_parallel_inputs_keeps_float64_angles():
    """Layer norms of fine-tunes are nearly parallel: float32 dot products near 1 put errors of ~3e-4 rad into
    arccos (a float32 iteration lands 2.5e-5 from the mean here); the Gram matrix in float64 does not."""
    from mergekit_lite.ops.spherical import karcher_mean_by_rows

    torch.manual_seed(0)
    xs = [1 + 1e-4 * torch.randn(1024) for _ in range(4)]
    want = ref_karcher([x.double() for x in xs], 10, 1e-5)
    got = karcher_mean_by_rows(lambda i, a, b: xs[i][a:b].clone(), 4, [(0, 512), (512, 1024)], (1024,), [0.25] * 4, max_iter=10, tol=1e-5)
    assert float((got.double() - want).norm() / want.norm()) < 1e-7


def test_interpolation_factors_from_the_gram_matrix():
    """slerp and nuslerp as c0·v0 + c1·v1 from ‖v0‖², ⟨v0, v1⟩, ‖v1‖² (what the row-chunked passes give): the
    right angle by hand, colinear pairs, and a random pair against the formulas on the whole vectors."""
    import math

    from mergekit_lite.ops.combine import slerp, slerp_factors
    from mergekit_lite.ops.spherical import nuslerp, nuslerp_factors

    right = torch.tensor([[4.0, 0.0], [0.0, 9.0]], dtype=torch.float64)  # ‖v0‖ = 2, ‖v1‖ = 3, orthogonal
    assert slerp_factors(right, 0.5) == pytest.approx((math.sqrt(0.5), math.sqrt(0.5)))
    assert nuslerp_factors(right, 0.25) == pytest.approx((math.sin(0.75 * math.pi / 2), math.sin(0.25 * math.pi / 2)))
    colinear = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)
    assert slerp_factors(colinear, 0.3) is None  # slerp's caller lerps
    assert nuslerp_factors(colinear, 0.3) == pytest.approx((0.7, 0.3))
    torch.manual_seed(2)
    v0, v1 = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    gram = torch.stack([v0, v1]) @ torch.stack([v0, v1]).T
    s0, s1 = slerp_factors(gram, 0.3)
    torch.testing.assert_close(s0 * v0 + s1 * v1, slerp(0.3, v0.clone(), v1.clone()), rtol=1e-12, atol=1e-12)
    c0, c1 = nuslerp_factors(gram, 0.3)
    torch.testing.assert_close(c0 * v0 + c1 * v1, nuslerp(0.3, v0.clone(), v1.clone()), rtol=1e-12, atol=1e-12)

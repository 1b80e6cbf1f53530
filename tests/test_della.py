"""DELLA (MagPrune): keep probabilities by magnitude rank, the draw, both rescale rules, and the merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite import Recipe
from mergekit_lite.methods import TensorContext, get_method
from mergekit_lite.methods.task_arithmetic import sparsify_della
from mergekit_lite.ops import sparsify
from mergekit_lite.ops import della_keep_probabilities, della_keep_probabilities_as, della_mask, generator_for

from helpers import load_state, plain_uniforms, tiny_llama


def test_keep_probabilities_by_rank_within_each_row():
    x = torch.tensor([[0.1, -3.0, 2.0], [5.0, 1.0, -1.0]])
    # row 0 ranks |x| as 0, 2, 1; row 1 as 2, 0, 1 (the tie 1 = |-1| goes to the lower position)
    want = torch.tensor([[0.3, 0.7, 0.5], [0.7, 0.3, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(della_keep_probabilities(x, 0.5, 0.2), want)
    torch.testing.assert_close(della_keep_probabilities(torch.tensor([2.0, -1.0]), 0.5, 0.2), torch.tensor([0.7, 0.3], dtype=torch.float64))
    assert della_keep_probabilities(torch.tensor([4.0]), 0.5, 0.2).tolist() == [pytest.approx(0.3)]
    with pytest.raises(ValueError, match="density ± epsilon"):
        della_keep_probabilities(x, 0.9, 0.15)


def _ctx(rule: str, seed: int) -> TensorContext:
    return TensorContext("w", ["m"], {"seed": seed, "rescale": True, "rescale_rule": rule}, [{"density": 0.4, "epsilon": 0.3}])


def _kept(tau: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
    return sparsify_della(tau, {"density": 0.4, "epsilon": 0.3}, ctx, 0).apply(tau.clone())


def test_paper_rescale_is_unbiased_and_mergekit_rescale_keeps_the_l1_norm():
    torch.manual_seed(0)
    tau = torch.randn(4, 64)
    paper = torch.stack([_kept(tau, _ctx("density", s)) for s in range(400)])
    # E[kept / p] = τ: the mean over 400 draws is within a few standard errors of τ
    se = (tau.abs() * ((1 / della_keep_probabilities(tau, 0.4, 0.3).float() - 1) / 400) ** 0.5).clamp_min(1e-6)
    assert float(((paper.mean(0) - tau).abs() / se).max()) < 6
    l1 = _kept(tau, _ctx("l1", 1))
    assert float(l1.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5)
    kept = l1 != 0
    assert 0.25 < float(kept.float().mean()) < 0.55  # about density of the entries survive
    # the larger an entry's magnitude rank, the more often it survives
    big = tau.abs() > tau.abs().median(dim=1, keepdim=True).values
    assert float((paper != 0)[:, big].float().mean()) > float((paper != 0)[:, ~big].float().mean()) + 0.1


def test_della_linear_through_the_api_matches_a_plain_computation(tmp_path):
    base, ft = tiny_llama(tmp_path / "base", 2, 1), tiny_llama(tmp_path / "ft", 2, 2)
    recipe = Recipe.from_dict({
        "merge_method": "della_linear", "base_model": str(base),
        "models": [{"model": str(ft), "name": "ft", "parameters": {"weight": 0.5, "density": 0.6, "epsilon": 0.2}}],
        "parameters": {"seed": 3, "rescale_rule": "density"},
    })
    out = load_state(mergekit_lite.run(recipe, tmp_path / "out", progress=False))
    b, f = load_state(base), load_state(ft)
    for name in b:
        tau = f[name] - b[name]
        p = della_keep_probabilities(tau, 0.6, 0.2)
        uniforms = torch.from_numpy(plain_uniforms(generator_for(3, "ft", name), tau.numel())).reshape(tau.shape)
        keep = uniforms < p  # the documented draw: one 32-bit uniform per entry, kept below p_i
        want = b[name] + 0.5 * torch.where(keep, tau / p.float(), 0)
        torch.testing.assert_close(out[name], want, rtol=1e-5, atol=1e-6, msg=name)


def test_consensus_ta_and_consensus_ties_are_consensus_with_their_aggregate():
    assert get_method("consensus_ties").param("aggregate").default == "ties"
    assert get_method("consensus_ta").param("aggregate").default == "task_arithmetic"
    assert get_method("consensus_ties").combine is get_method("consensus").combine


@pytest.mark.parametrize("shape", [(37, 11), (50,), (), (0, 4), (4, 0)])
def test_mask_made_in_row_blocks_equals_one_draw_over_the_whole_tensor(shape):
    """The blocked draw gives exactly one uniform per entry, in order, compared with the whole probability tensor."""
    torch.manual_seed(1)
    x = torch.randn(shape)
    uniforms = torch.from_numpy(plain_uniforms(np.random.Generator(np.random.PCG64DXSM(9)), x.numel())).reshape(shape)
    want = uniforms < della_keep_probabilities(x, 0.5, 0.2)
    for chunk in (1, 7, 1 << 20):
        got = della_mask(x, 0.5, 0.2, np.random.Generator(np.random.PCG64DXSM(9)), chunk_entries=chunk)
        assert got.shape == x.shape and torch.equal(got, want), chunk
        probs = della_keep_probabilities_as(x, 0.5, 0.2, chunk_entries=chunk)
        assert probs.dtype == x.dtype and torch.equal(probs, della_keep_probabilities(x, 0.5, 0.2).to(x.dtype))


def _stable_ranks_plainly(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Rank of each entry's magnitude along ``dim`` (0 = smallest, ties to the lower index), by counting."""
    moved = x.abs().movedim(dim, -1).reshape(-1, x.shape[dim]).double().tolist()
    ranks = []
    for row in moved:
        key = [(float("inf") if v != v else v, i) for i, v in enumerate(row)]  # NaN sorts last (torch's rule)
        ranks.append([sum(1 for other in key if other < mine) for mine in key])
    shape = list(x.movedim(dim, -1).shape)
    return torch.tensor(ranks, dtype=torch.float64).reshape(shape).movedim(-1, dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_keep_probabilities_rank_exactly_with_ties_zeros_and_special_values(dtype):
    """The CPU fast path (a sort of integer keys made from the float bits) ranks as a stable sort of |x| would."""
    torch.manual_seed(3)
    x = torch.randn(9, 40).to(dtype)
    x[:, ::4] = 0.0
    x[:, 1::4] = -0.0
    x[:, 2::7] = x[:, 3::7]  # exact ties between positions
    x[0, 5], x[1, 6], x[2, 7] = float("inf"), -float("inf"), 65504.0
    for with_nan in (False, True):
        if with_nan:
            x[3, 8] = float("nan")
        want = 0.5 - 0.2 + _stable_ranks_plainly(x, 1) / (x.shape[1] - 1) * (2 * 0.2)
        torch.testing.assert_close(della_keep_probabilities(x, 0.5, 0.2), want, rtol=0, atol=1e-15)


def test_keep_probabilities_of_a_tensor_of_three_dims_rank_along_dim_one_as_mergekit():
    """mergekit argsorts |x| along dim 1 of any tensor of two dims or more (a conv weight, say)."""
    torch.manual_seed(4)
    x = torch.randn(3, 5, 4)
    want = 0.5 - 0.2 + _stable_ranks_plainly(x, 1) / 4 * 0.4
    torch.testing.assert_close(della_keep_probabilities(x, 0.5, 0.2), want, rtol=0, atol=1e-15)
    uniforms = torch.from_numpy(plain_uniforms(np.random.Generator(np.random.PCG64DXSM(2)), x.numel())).reshape(x.shape)
    assert torch.equal(della_mask(x, 0.5, 0.2, np.random.Generator(np.random.PCG64DXSM(2))), uniforms < want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_mask_is_the_same_for_any_thread_count_and_leaves_the_generator_where_one_draw_would(threads, dtype, monkeypatch):
    """Each block's rows are sorted on several threads, its draws made from the generator advanced to each
    part's first entry (the split thresholds lowered so that this small tensor is split)."""
    monkeypatch.setattr(sparsify, "DELLA_SPLIT_MIN", 8)
    monkeypatch.setattr(sparsify, "SPLIT_DRAWS", 16)
    monkeypatch.setattr(sparsify, "RANK_BLOCK", 40)  # each thread ranks its rows two at a time
    torch.manual_seed(5)
    x = torch.randn(53, 19).to(dtype)
    x[:, ::2] = torch.randint(-3, 4, (53, 10)).to(dtype)  # ties within each row, broken by position
    plain = np.random.Generator(np.random.PCG64DXSM(11))
    want = torch.from_numpy(plain_uniforms(plain, x.numel())).reshape(x.shape) < 0.4 - 0.1 + _stable_ranks_plainly(x, 1) / 18 * 0.2
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        generator = np.random.Generator(np.random.PCG64DXSM(11))
        got = della_mask(x, 0.4, 0.1, generator, chunk_entries=60)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, want)
    assert generator.random() == plain.random()  # the stream continues after the tensor's draws (x has an odd count)
    assert x.numel() % 2 == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("first", [0, 1, 6])
def test_mask_ranks_ties_zeros_and_special_values_as_a_stable_sort_from_any_first_draw(dtype, first, monkeypatch):
    """The mask's integer-key ranking and integer thresholds against the plain definition (ranks by counting,
    float64 probabilities, float64 uniforms), a few rows at a time, from a first draw that may be a high half;
    with a NaN the tensor takes the general path and still ranks it as torch's stable sort (NaN last)."""
    monkeypatch.setattr(sparsify, "RANK_BLOCK", 64)
    torch.manual_seed(6)
    x = torch.randn(11, 40).to(dtype)
    x[:, ::4] = 0.0
    x[:, 1::4] = -0.0
    x[:, 2::7] = x[:, 3::7]
    x[0, 5], x[1, 6], x[2, 7] = float("inf"), -float("inf"), 1000.0
    for with_nan in (False, True):
        if with_nan:
            x[3, 8] = float("nan")
        plain = np.random.Generator(np.random.PCG64DXSM(12))
        uniforms = plain_uniforms(plain, first + x.numel())[first:]
        want = torch.from_numpy(uniforms).reshape(x.shape) < 0.5 - 0.3 + _stable_ranks_plainly(x, 1) / 39 * 0.6
        got = della_mask(x, 0.5, 0.3, np.random.Generator(np.random.PCG64DXSM(12)), first=first)
        assert torch.equal(got, want), with_nan


def test_mask_of_a_row_longer_than_a_ranking_block_and_probabilities_near_one(monkeypatch):
    """A row is never split (RANK_BLOCK smaller than it), and a probability within 2^-32 of 1 (no 32-bit
    ceiling) takes the float64 comparison: the same mask as the plain definition either way."""
    monkeypatch.setattr(sparsify, "RANK_BLOCK", 16)
    torch.manual_seed(7)
    x = torch.randn(5, 33)
    for density, epsilon in ((0.5, 0.25), (0.5, 0.5 - 2**-34)):
        plain = np.random.Generator(np.random.PCG64DXSM(13))
        probabilities = density - epsilon + _stable_ranks_plainly(x, 1) / 32 * (2 * epsilon)
        want = torch.from_numpy(plain_uniforms(plain, x.numel())).reshape(x.shape) < probabilities
        assert torch.equal(della_mask(x, density, epsilon, np.random.Generator(np.random.PCG64DXSM(13))), want)

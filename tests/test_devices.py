"""``--device cuda`` gives the CPU's bits: what a machine without a GPU can check of it.

The GPU itself is checked by ``benchmarks/gpu_check.py`` (BENCHMARKS.md): here, that the device-independent steps
are the CPU's own (a division by a 0-d tensor rounds as a division by the number does), and that a method marked
``cpu_only`` ignores the device it is handed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergekit_lite
from mergekit_lite import execute
from mergekit_lite.methods import METHODS
from mergekit_lite.ops.devices import divide_
from mergekit_lite.recipe import Recipe

from helpers import ta_recipe

finite = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False, min_value=-1e30, max_value=1e30)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32 if x.element_size() == 4 else torch.int64)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=64), divisor=finite.filter(lambda d: d != 0), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_a_zero_d_tensor_of_the_dtype_divides_as_the_number_does(values, divisor, dtype):
    """What ``divide_`` hands a GPU (the number as a 0-d tensor of x's dtype) rounds each quotient as the CPU's
    division by the number: the number is rounded to x's dtype first, then divided by."""
    x = torch.tensor(values, dtype=dtype)
    by_number = x.clone().div_(divisor)
    by_tensor = x.clone().div_(torch.tensor(divisor, dtype=dtype))
    assert torch.equal(bits(by_number), bits(by_tensor))
    assert torch.equal(bits(divide_(x.clone(), divisor)), bits(by_number))


def test_the_reciprocal_that_cuda_multiplies_by_is_not_the_quotient():
    """Why ``divide_`` exists: x · (1/d), CUDA's division by a number, is one bit apart from x / d in many entries."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(10_000).astype(np.float32))
    quotient, product = x / 0.1, x * torch.tensor(1 / 0.1, dtype=torch.float32)
    apart = int((bits(quotient) != bits(product)).sum())
    assert 1_000 < apart < 9_000


@pytest.mark.parametrize("method", ["arcee_fusion", "tsv_m", "iso_c", "iso_cts"])
def test_a_cpu_only_method_ignores_the_device_it_is_handed(demo, method):
    """Arcee Fusion and the float32-SVD merges are ``cpu_only``: handed the meta device (no values at all), each
    tensor is still the CPU's."""
    assert METHODS[method].cpu_only and not METHODS["slerp"].cpu_only
    data = ta_recipe(demo, merge_method=method, parameters={})
    if method == "arcee_fusion":
        data["models"] = [{"model": data["models"][0]["model"]}]
    plan = mergekit_lite.plan(Recipe.model_validate(data))
    try:
        merged = [job for job in plan.jobs if job.merge]
        assert merged
        for job in merged:
            on_cpu = execute.compute_tensor(plan, job, torch.device("cpu"))
            handed_meta = execute.compute_tensor(plan, job, torch.device("meta"))
            assert handed_meta.device.type == "cpu" and torch.equal(on_cpu, handed_meta), job.name
    finally:
        plan.close()
    slerp = ta_recipe(demo, merge_method="slerp", parameters={"t": 0.5})
    slerp["models"] = [{"model": slerp["models"][0]["model"]}]
    plan = mergekit_lite.plan(Recipe.model_validate(slerp))
    try:  # a method that is not cpu_only goes where it is sent (the meta device has no values to give back)
        job = max((job for job in plan.jobs if job.merge), key=lambda job: job.out.numel)
        with pytest.raises((NotImplementedError, RuntimeError)):
            execute.compute_tensor(plan, job, torch.device("meta"))
    finally:
        plan.close()

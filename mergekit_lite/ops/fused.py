"""The native fused kernel (``mergekit_lite/native/fused.c``), where it was built: a fixed linear combination of stored
inputs in one pass over their bytes, with the torch path's roundings.

A method whose output for a tensor is such a combination (task arithmetic, linear; slerp's second pass) describes it
as a ``LinearForm``; the executor reads the inputs' stored bytes in chunks and calls ``linear_combination_into``.
Whether the kernel gives the torch path's bytes on this machine is checked on a sample first
(``execute._kernel_matches``); the torch path stays the reference. ``gram`` makes float64 Gram matrices (slerp,
Model Stock, Multi-SLERP's norms). Set MERGEKIT_LITE_NATIVE=0 to use torch alone.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Sequence

import torch

try:
    from .. import _fused
except ImportError:  # built without a C compiler (setup.py's optional extension): torch alone
    _fused = None

#: the stored dtypes the kernel reads and writes, by the code it knows them by
KINDS = {torch.float32: 0, torch.bfloat16: 1}
#: the most inputs one call takes (the kernel's own limits: a combination's, a Gram matrix's)
MAX_INPUTS = 4096
MAX_GRAM_INPUTS = 256


@dataclass(frozen=True)
class LinearForm:
    """One tensor's output as Σ_t w_t·x_t ÷ divisor (``lam`` None: the inputs' weights, as linear), or of task
    vectors, θ_0 + λ·(Σ_t w_t·(x_t − θ_0) ÷ divisor) (task arithmetic). ``divisor`` None: no division."""

    weights: tuple[float, ...]
    divisor: float | None
    lam: float | None
    #: (no base) each product w_t·x_t rounded before it is added (torch's ``mul_`` then ``add_``), not fused
    rounded_products: bool = False

    @property
    def of_task_vectors(self) -> bool:
        return self.lam is not None


def available() -> bool:
    """Whether the kernel was built and is not switched off (MERGEKIT_LITE_NATIVE=0)."""
    # safetensors' bytes are little-endian, and the kernel reads them as the host's numbers
    return _fused is not None and sys.byteorder == "little" and os.environ.get("MERGEKIT_LITE_NATIVE", "1") != "0"


def handles(dtype: torch.dtype) -> bool:
    return dtype in KINDS


def linear_combination_into(out: torch.Tensor, base: torch.Tensor | None, inputs: Sequence[torch.Tensor], form: LinearForm) -> int:
    """``out`` (flat, float32 or bfloat16) = the form applied entry by entry to ``inputs`` (and ``base``, for task
    vectors), all flat, contiguous, on the CPU and of ``out``'s length. Returns -1, or the first input holding a NaN
    or infinite entry (0: the base, 1 + t: input t), whose entries the caller must then not use."""
    assert _fused is not None, "the native kernel is not built"
    n = out.numel()
    tensors = [out, *inputs] + ([base] if base is not None else [])
    if any(t.device.type != "cpu" or not t.is_contiguous() or t.numel() != n or t.dtype not in KINDS for t in tensors):
        raise ValueError("linear_combination_into: flat contiguous CPU float32/bfloat16 tensors of one length")
    if len(inputs) != len(form.weights) or form.of_task_vectors != (base is not None) or (form.rounded_products and form.of_task_vectors):
        raise ValueError("linear_combination_into: one weight per input, a base exactly for task vectors, rounded products without")
    return _fused.linear_combination(
        out.data_ptr(), KINDS[out.dtype], n,
        base.data_ptr() if base is not None else 0, KINDS[base.dtype] if base is not None else 0,
        [t.data_ptr() for t in inputs], [KINDS[t.dtype] for t in inputs], list(form.weights),
        form.divisor or 0.0, form.lam if form.lam is not None else 0.0, form.rounded_products,
    )


def gram(base: torch.Tensor | None, inputs: Sequence[torch.Tensor], sum_into: torch.Tensor | None = None,
         diagonal: bool = False) -> tuple[torch.Tensor, int]:
    """The float64 Gram matrix ⟨x_i, x_j⟩ of flat, contiguous float32/bfloat16 CPU tensors of one length (or of
    their differences from ``base``), each product exact and summed in float64 in a fixed order, and -1 or the first
    input with a NaN/Inf entry (as ``linear_combination_into``). ``sum_into`` (flat float32): receives x_0 + x_1 + …
    in that order, the bytes of torch's ``copy_`` then ``add_``. ``diagonal``: only the squared norms (the rest 0)."""
    assert _fused is not None, "the native kernel is not built"
    n = inputs[0].numel()
    tensors = [*inputs] + ([base] if base is not None else [])
    if any(t.device.type != "cpu" or not t.is_contiguous() or t.numel() != n or t.dtype not in KINDS for t in tensors) or len(inputs) > MAX_GRAM_INPUTS \
            or (sum_into is not None and (sum_into.dtype != torch.float32 or not sum_into.is_contiguous() or sum_into.numel() != n or sum_into.device.type != "cpu")):
        raise ValueError("gram: at most 256 flat contiguous CPU float32/bfloat16 tensors of one length (a float32 sum of it)")
    bad, values = _fused.gram(n, base.data_ptr() if base is not None else 0, KINDS[base.dtype] if base is not None else 0,
                              [t.data_ptr() for t in inputs], [KINDS[t.dtype] for t in inputs], sum_into.data_ptr() if sum_into is not None else 0,
                              diagonal)
    return torch.tensor(values, dtype=torch.float64).view(len(inputs), len(inputs)), bad

"""Arithmetic that rounds the same on every device: what ``--device cuda`` needs to give the CPU's bits.

torch's CUDA kernels divide by a number as a multiplication by its reciprocal (one bit apart from the CPU's
quotient in many entries); ``divide_`` takes the CPU's path on the CPU and, elsewhere, a division that rounds as
the CPU's does. (Reductions that a result hangs on add up in another order on a GPU: those are made in float64 on
every device instead, the L1 rescale's norms and Model Stock's Gram matrix, so that their float32 uses agree.)
"""

from __future__ import annotations

import torch
from torch import Tensor

#: dtypes whose number operand torch rounds to the tensor's own dtype on the CPU (a 0-d tensor of it divides alike)
_SAME_ROUNDING = (torch.float32, torch.float64)


def divide_(x: Tensor, divisor: float) -> Tensor:
    """x / divisor in place, each quotient correctly rounded on every device (on the CPU: ``x.div_(divisor)``).

    CUDA's ``div_`` by a Python number multiplies by 1/divisor; by a 0-d tensor on x's device it divides. The CPU
    rounds the number to x's dtype first, so the 0-d tensor is made in that dtype (float32 and float64; other
    dtypes keep torch's own rule)."""
    if x.device.type == "cpu" or x.dtype not in _SAME_ROUNDING:
        return x.div_(divisor)
    return x.div_(torch.tensor(divisor, dtype=x.dtype, device=x.device))

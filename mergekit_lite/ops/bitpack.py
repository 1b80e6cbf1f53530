"""Bit packing of boolean masks: 1 bit per entry, 8 entries per byte, most significant bit first.

Entry i of the flattened mask is bit (7 − i mod 8) of byte ⌊i/8⌋, i.e. ``numpy.packbits`` with its
default ``bitorder="big"`` (what the TALL-masks reference uses); the last byte is zero-padded.
"""

from __future__ import annotations

import numpy as np
import torch

_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


def packed_size(numel: int) -> int:
    """Bytes needed for ``numel`` bits."""
    return (numel + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flatten a bool mask and pack it into a 1-D uint8 tensor of ``packed_size(numel)`` bytes."""
    if mask.device.type == "cpu" and mask.dtype == torch.bool:  # numpy packs in C, with no uint8 copy of the mask
        return torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8)
    return (groups << _SHIFTS.to(groups.device)).sum(dim=1, dtype=torch.uint8) if groups.numel() else flat.new_zeros(0)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of ``pack_bits``: a bool tensor of ``shape``; refuses a buffer of the wrong length."""
    numel = 1
    for d in shape:
        numel *= d
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_size(numel):
        raise ValueError(f"packed mask has {packed.numel()} bytes of {packed.dtype}, expected {packed_size(numel)} uint8 for shape {list(shape)}")
    bits = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:numel].bool().reshape(shape)


def unpack_bit_range(packed: torch.Tensor, start: int, stop: int, little: bool = False) -> torch.Tensor:
    """Entries [start, stop) of the flattened mask that ``pack_bits`` packed, as a 1-D bool tensor; ``little``: a
    mask packed least significant bit first (the native kernel's keep-masks) instead."""
    first, last = start // 8, packed_size(stop)
    window = packed[first:last]
    if window.device.type == "cpu":
        bits = torch.from_numpy(np.unpackbits(window.numpy(), bitorder="little" if little else "big").view(np.bool_))
    else:
        shifts = _SHIFTS.flip(0) if little else _SHIFTS
        bits = ((window.unsqueeze(1) >> shifts.to(window.device)) & 1).reshape(-1).bool()
    offset = start - 8 * first
    return bits[offset : offset + (stop - start)]

"""The primitives of DARE's and DELLA's draws that the native kernel shares with the numpy path: a 32-bit uniform's
scale, and the tie words that settle the few entries whose 16-bit word equals the threshold's high half.

Pure functions on generators and numbers; no tensor code, so both ``sparsify`` and ``fused`` build on it.
"""

from __future__ import annotations

import numpy as np

#: a 32-bit uniform u stands for u / 2^32
UNIFORM_SCALE = float(1 << 32)


def tie_key(generator: np.random.Generator) -> int:
    """The 64-bit key of a generator's tie words: its 128-bit state and increment folded together
    (state ⊕ state >> 64 ⊕ increment, modulo 2^64), read where the generator is, without drawing."""
    state = generator.bit_generator.state["state"]
    return (state["state"] ^ (state["state"] >> 64) ^ state["inc"]) & 0xFFFFFFFFFFFFFFFF


_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def tie_words(key: int, positions: np.ndarray) -> np.ndarray:
    """L_j, the low halves of DARE's 32-bit uniforms at the entries ``positions`` where they are needed: the low
    16 bits of SplitMix64 (Steele et al., 2014) of key + (j + 1)·0x9E3779B97F4A7C15. A hash of the position, so
    any entry's L_j is found without drawing the ones before it."""
    z = (np.asarray(positions, dtype=np.uint64) + np.uint64(1)) * _MIX[0] + np.uint64(key)
    z = (z ^ (z >> np.uint64(30))) * _MIX[1]
    z = (z ^ (z >> np.uint64(27))) * _MIX[2]
    z ^= z >> np.uint64(31)
    return (z & np.uint64(0xFFFF)).astype(np.uint16)

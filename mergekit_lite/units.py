"""Sizes in bytes: parsing ``5GB``/``512MiB`` and printing byte counts for people."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
#: Largest shard size accepted (a file offset must fit in a signed 64-bit integer).
MAX_SIZE = 2**63 - 1


def parse_size(value: int | str) -> int:
    """Bytes from ``5GB`` (decimal, as Hugging Face uses), ``512MiB`` (binary) or a plain integer."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 5GB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value)) if isinstance(value, (str, float)) else None
        if not match:
            raise ValueError(f"expected a size like 5GB or 500MB, got {_show(value)}")
        try:
            size = int(Decimal(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
        except (InvalidOperation, ValueError, OverflowError):
            raise ValueError(f"expected a size like 5GB or 500MB, got {_show(value)}") from None
    if size <= 0:
        raise ValueError(f"must be a positive size, got {_show(value)}")
    if size > MAX_SIZE:
        raise ValueError(f"must be at most {MAX_SIZE} bytes, got {_show(value)}")
    return size



def _show(value: object, limit: int = 120) -> str:
    text = repr(value) if not (isinstance(value, int) and value.bit_length() > 200) else "<a very large integer>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def human_bytes(n: float) -> str:
    """1234567 → '1.2 MB' (decimal units, as the hub shows sizes)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"

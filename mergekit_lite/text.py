"""Text for one-line messages: escaping line breaks and control characters, bounded reprs."""

from __future__ import annotations

import unicodedata
from typing import Any

#: Largest magnitude of an integer recipe value; beyond it no float or 64-bit integer holds it.
MAX_INT = 2**63 - 1
#: Characters that must never appear in a reference or a name: they break lines, or cannot be encoded.
_BAD_CATEGORIES = ("Cc", "Cs", "Zl", "Zp")


def one_line(text: str) -> str:
    """``text`` with every line break, control character and lone surrogate escaped (\\n, \\x00, \\ud800)."""
    if text.isprintable() or all(unicodedata.category(c) not in _BAD_CATEGORIES for c in text):  # the first: at C speed
        return text
    return "".join(c if unicodedata.category(c) not in _BAD_CATEGORIES else repr(c)[1:-1] for c in text)


def safe_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)`` for a message: one line, at most ``limit`` characters, never raising."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        return f"<an integer of {len(str(abs(value))) if value.bit_length() < 10000 else 'thousands of'} digits>"
    try:
        text = repr(value)
    except (ValueError, RecursionError, TypeError):  # huge ints, nesting, odd objects
        text = f"<{type(value).__name__}>"
    text = one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""Progress on long work: a bar on a terminal; in a log (stderr not a terminal) a plain line every few seconds."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

from tqdm import tqdm

#: seconds between two progress lines in a log
LOG_INTERVAL = 5.0


class _LogProgress:
    """tqdm's ``update``/``set_postfix_str`` as a plain line every ``LOG_INTERVAL`` seconds (no carriage returns)."""

    def __init__(self, total: float, description: str, unit: str):
        self.total, self.description, self.unit = total, description, unit
        self.done = 0.0
        self.started = self.last = time.monotonic()
        self.postfix = ""

    def update(self, n: float = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= LOG_INTERVAL:
            self.last = now
            self._line(now)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def _line(self, now: float) -> None:
        share = f"{100 * self.done / self.total:.0f}%" if self.total else f"{self.done:g} {self.unit}"
        extra = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.description}: {share} after {now - self.started:.0f} s{extra}", file=sys.stderr, flush=True)


@contextmanager
def progress_bar(total: float, description: str, enabled: bool = True, unit: str = "B") -> Iterator[Any]:
    """A progress reporter with ``update(n)``: tqdm on a terminal, timed plain lines otherwise, nothing when disabled."""
    if enabled and not sys.stderr.isatty():
        yield _LogProgress(total, description, unit)
        return
    with tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=description, file=sys.stderr, disable=not enabled, leave=False) as bar:
        yield bar

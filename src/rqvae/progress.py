"""Progress output for long loops: a tqdm bar on a terminal, otherwise (CI logs, ``make demo > log``) one
plain line every ``interval`` seconds and one at the end, e.g. ``reference stats 12/20 batch 0.17 it/s``,
never the carriage-return frames a bar writes into a log file."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

INTERVAL = 30.0  # seconds between plain lines


class PlainProgress:
    """A progress report for non-terminals: one line every ``interval`` seconds (and at :meth:`close`)."""

    def __init__(self, total: int | None, initial: int, desc: str, stream: IO[str],
                 interval: float = INTERVAL, unit: str = "step") -> None:
        self.total, self.n, self.desc, self.stream, self.interval = total, initial, desc, stream, interval
        self.unit = unit
        self.loss: float | None = None
        self.loss_source: Any = None  # a callable returning the running loss (or None), read per line
        self._t_last, self._n_last, self._n_shown = time.perf_counter(), initial, None

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self._t_last >= self.interval:
            self._line()

    def _line(self) -> None:
        now = time.perf_counter()
        rate = (self.n - self._n_last) / max(now - self._t_last, 1e-9)
        running = self.loss_source() if self.loss_source is not None else None
        self.loss = self.loss if running is None else running
        loss = "" if self.loss is None else f" loss {self.loss:.4g}"
        total = "" if self.total is None else f"/{self.total}"
        self.stream.write(f"{self.desc} {self.unit} {self.n}{total}{loss} {rate:.3g} it/s\n")
        self.stream.flush()
        self._t_last, self._n_last, self._n_shown = now, self.n, self.n

    def close(self) -> None:
        if self._n_shown != self.n:
            self._line()


def progress(total: int | None, desc: str, enabled: bool = True, unit: str = "step",
             stream: IO[str] | None = None) -> Any:
    """An object with ``update(n)`` and ``close()``: tqdm on a terminal, :class:`PlainProgress` elsewhere,
    and one that shows nothing when not ``enabled``."""
    stream = sys.stderr if stream is None else stream
    if enabled and stream.isatty():
        from tqdm.auto import tqdm  # only for terminals

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=stream)
    return PlainProgress(total, 0, desc, stream, unit=unit) if enabled else _Silent()


def progress_iter(items: Iterable[Any], total: int | None, desc: str, enabled: bool = True,
                  unit: str = "batch") -> Iterator[Any]:
    """``items`` with :func:`progress` output, one update per item."""
    bar = progress(total, desc, enabled, unit)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

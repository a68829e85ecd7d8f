"""One small progress helper (as scvi's utils/_track.py): rich bars on stderr, quiet when asked.

On a terminal, a rich bar with done/total, rate and ETA. Not on a terminal (CI, batch
schedulers' log files), the same facts as one log line every ``log_every`` of the work, so a
multi-hour stage still says how far it is without filling the log with bar redraws.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)

_DISABLED = False


def set_progress(enabled: bool) -> None:
    """Turn progress bars on or off (the CLI's -q turns them off)."""
    global _DISABLED
    _DISABLED = not enabled


def track(
    iterable: Iterable[T],
    *,
    description: str = "working",
    total: int | None = None,
    weight: Callable[[T], int] | None = None,
    unit: str = "",
    log_every: float = 0.1,
) -> Iterator[T]:
    """Iterate with progress on stderr: a bar on a terminal, else a log line every ``log_every``.

    Parameters
    ----------
    iterable
        The work items (e.g. chunks).
    description
        What is being done.
    total
        Total work: the number of items, or with ``weight`` the total units (e.g. cells).
    weight
        Units of work in one item (e.g. ``lambda chunk: chunk.n_cells``); default 1 per item.
    unit
        The unit's name for rate and counts (e.g. ``"cells"``).
    log_every
        Fraction of ``total`` between log lines when stderr is not a terminal.

    Examples
    --------
    >>> list(track([1, 2, 3], description="demo"))
    [1, 2, 3]
    """
    if total is None and weight is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    size = weight or (lambda _item: 1)
    with Tracker(description, total=total, unit=unit, log_every=log_every) as tracker:
        for item in iterable:
            n = size(item)
            yield item
            tracker.advance(n)


class Tracker:
    """Progress pushed as work is done (:func:`track` for loops; callbacks use it directly).

    A rich bar on a terminal (done/total, rate, ETA), else a log line every ``log_every`` of
    ``total``; nothing when progress is off (``-q``) or the log level is above INFO.

    Examples
    --------
    >>> with Tracker("training", total=1000, unit="cells") as t:
    ...     t.advance(500)
    ...     t.describe("training, epoch 2/2")
    ...     t.advance(500)
    """

    def __init__(
        self, description: str, *, total: int | None, unit: str = "", log_every: float = 0.1
    ) -> None:
        self.description, self.total, self.unit, self.log_every = (
            description,
            total,
            unit,
            log_every,
        )
        self.done = 0
        self._t0 = time.perf_counter()
        self._next_mark = log_every
        self._progress: Any = None
        self._task: Any = None
        self._on = (
            not _DISABLED and logging.getLogger("census_scvi").getEffectiveLevel() <= logging.INFO
        )
        if self._on and sys.stderr.isatty():
            self._progress = _rich_progress(unit)
            self._progress.start()
            self._task = self._progress.add_task(description, total=total)

    def advance(self, n: int) -> None:
        """``n`` more units done."""
        if not self._on:
            return
        self.done += n
        if self._progress is not None:
            self._progress.advance(self._task, n)
            return
        if not self.total:
            return
        frac = self.done / self.total
        if frac + 1e-12 >= self._next_mark or self.done >= self.total:
            seconds = time.perf_counter() - self._t0
            line = progress_line(self.description, self.done, self.total, seconds, self.unit)
            logger.info("%s", line)
            while self._next_mark <= frac + 1e-12:
                self._next_mark += self.log_every

    def describe(self, description: str) -> None:
        """A new description (e.g. the epoch and the loss) for the bar and the next log lines."""
        self.description = description
        if self._progress is not None:
            self._progress.update(self._task, description=description)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rich_progress(unit: str) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    rate = TextColumn(f"{{task.speed:>,.0f}} {unit or 'it'}/s" if unit else "")
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        rate,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def progress_line(description: str, done: int, total: int, seconds: float, unit: str = "") -> str:
    """``"HVG pass 1/2: 40% (40,000/100,000 cells, 9,876 cells/s, ETA 0:00:06)"``."""
    rate = done / seconds if seconds > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else 0.0
    u = f" {unit}" if unit else ""
    m, s = divmod(int(round(eta)), 60)
    h, m = divmod(m, 60)
    return (
        f"{description}: {100 * done / total:.0f}% ({done:,}/{total:,}{u}, "
        f"{rate:,.0f}{u}/s, ETA {h}:{m:02d}:{s:02d})"
    )

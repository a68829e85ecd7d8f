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
from typing import TypeVar

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
    if _DISABLED or logging.getLogger("census_scvi").getEffectiveLevel() > logging.INFO:
        yield from iterable
        return
    if total is None and weight is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    size = weight or (lambda _item: 1)
    if sys.stderr.isatty():
        yield from _bar(iterable, description, total, size, unit)
    else:
        yield from _logged(iterable, description, total, size, unit, log_every)


def _bar(
    iterable: Iterable[T], description: str, total: int | None, size: Callable[[T], int], unit: str
) -> Iterator[T]:
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
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        rate,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            n = size(item)
            yield item
            progress.advance(task, n)


def _logged(
    iterable: Iterable[T],
    description: str,
    total: int | None,
    size: Callable[[T], int],
    unit: str,
    log_every: float,
) -> Iterator[T]:
    t0, done, next_mark = time.perf_counter(), 0, log_every
    for item in iterable:
        n = size(item)
        yield item
        done += n
        if not total:
            continue
        frac = done / total
        if frac + 1e-12 >= next_mark or done >= total:
            logger.info(
                "%s", progress_line(description, done, total, time.perf_counter() - t0, unit)
            )
            while next_mark <= frac + 1e-12:
                next_mark += log_every


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

"""One small progress helper (as scvi's utils/_track.py): rich bars on stderr, quiet when asked."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DISABLED = False


def set_progress(enabled: bool) -> None:
    """Turn progress bars on or off (the CLI's -q turns them off)."""
    global _DISABLED
    _DISABLED = not enabled


def track(
    iterable: Iterable[T], *, description: str = "working", total: int | None = None
) -> Iterator[T]:
    """Iterate with a progress bar on stderr (no bar when disabled or logging is quiet)."""
    if _DISABLED or logging.getLogger("census_scvi").getEffectiveLevel() > logging.INFO:
        yield from iterable
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)

"""The project's own error type (the CLI prints its message on one line and exits 2), and disk-full."""

from __future__ import annotations

import errno
import os
import shutil


class CensusScviError(Exception):
    """A user-facing error: what is wrong (with the value) and how to fix it.

    Parameters
    ----------
    message
        One line naming the problem and the value that caused it.
    hint
        Optional one-line suggestion for the fix, printed after the message.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


_GIB = 1024**3


def _gib(n: int) -> str:
    return f"{n / _GIB:.2f}" if n >= 0.01 * _GIB else f"{n / _GIB:.2g}"


def disk_full(
    directory: str | os.PathLike[str],
    need: int | None,
    free: int | None = None,
    *,
    about: bool = False,
    rerun: str = "rerun",
) -> CensusScviError:
    """The one-line error of a full disk: ``need N GiB free in DIR; M GiB free``.

    ``about``: ``need`` is an estimate. ``rerun`` ends the hint (e.g. what a rerun keeps).
    """
    if free is None:
        free = shutil.disk_usage(directory).free
    what = (
        f"need {'about ' if about else ''}{_gib(need)} GiB free in {directory}"
        if need
        else f"no space left in {directory}"
    )
    return CensusScviError(
        f"{what}; {_gib(free)} GiB free",
        hint=f"free disk space (or use a run directory on a larger disk, -o), then {rerun}",
    )


def is_disk_full(e: BaseException) -> bool:
    """An ENOSPC, as Python, TileDB or HDF5 report it (HDF5's OSError has no errno set)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(e)

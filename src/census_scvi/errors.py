"""The project's own error type: the CLI prints its message on one line and exits 2."""

from __future__ import annotations


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

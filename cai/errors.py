"""Errors the CLI turns into one clear line and exit code 2, never a traceback."""

from __future__ import annotations


class CaiError(Exception):
    """A user-facing error: bad input, a missing model, a server that cannot score.

    `where` is "file:line" (or just "file") and `field` the dotted path of the offending
    field, when they apply; `str()` puts them first so the message reads like a compiler's.
    """

    def __init__(self, message: str, where: str | None = None, field: str | None = None):
        self.message = message
        self.where = where
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        head = ""
        if self.where:
            head += f"{self.where}: "
        if self.field:
            head += f"{self.field}: "
        return head + self.message


class ValidationErrors(CaiError):
    """Several `CaiError`s found in one file, reported together."""

    def __init__(self, errors: list[CaiError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)

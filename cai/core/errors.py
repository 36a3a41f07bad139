"""Errors the CLI turns into one clear line and exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path


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


def decode_utf8(data: bytes, where: str) -> str:
    """Bytes of a text file as str (a leading UTF-8 byte-order mark is dropped).

    A file that is not UTF-8 is a `CaiError` naming `file:line` and the offending byte, not
    a `UnicodeDecodeError` traceback.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CaiError(f"not UTF-8 text (byte 0x{data[exc.start]:02x}: {exc.reason}); save the "
                       "file as UTF-8", f"{where}:{line}") from None


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file's content; every way of failing to read it is one `CaiError`."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise CaiError(f"cannot read {what}: is a folder, not a file", str(p)) from None
    except OSError as exc:
        raise CaiError(f"cannot read {what}: {exc.strerror or exc}", str(p)) from None
    return decode_utf8(data, str(p))

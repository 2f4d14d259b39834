"""Errors raised on bad input: each names the file and, where it has one, the line."""

from __future__ import annotations

from pathlib import Path


class DataFormatError(ValueError):
    """A malformed input file. ``str(err)`` reads ``path:line: message``."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ConfigError(ValueError):
    """A configuration that cannot be used (unknown key, wrong type, inconsistent values)."""


def missing_extra(package: str, extra: str) -> ImportError:
    """The error to raise when an optional heavy dependency is not installed."""
    return ImportError(
        f"{package} is required for this feature; install it with `pip install 'missrec[{extra}]'`"
        f" (or `pip install {package}`)."
    )

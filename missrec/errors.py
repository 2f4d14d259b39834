"""The toolkit's own errors: something the user can act on, said in one line.

Every launcher prints a :class:`MISSRecError` as ``error: <message>`` and exits non-zero (``--debug`` or
``MISSREC_DEBUG=1`` shows the traceback, :mod:`missrec.cli`); any other exception is a bug and keeps its traceback.
Each subclass also derives from the builtin a caller would catch (``ValueError``, ``FileNotFoundError``, ...).
"""

from __future__ import annotations

from pathlib import Path


class MISSRecError(Exception):
    """An error in what the user gave or asked for (input, configuration, environment), not in the toolkit."""


class DataFormatError(MISSRecError, ValueError):
    """A malformed input file. ``str(err)`` reads ``path:line: message``."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ConfigError(MISSRecError, ValueError):
    """A configuration that cannot be used (unknown key, wrong type, inconsistent values)."""


class InputError(MISSRecError, ValueError):
    """Values passed in that cannot be used (an empty history, a feature table of the wrong shape, ...)."""


class MissingInputError(MISSRecError, FileNotFoundError):
    """A file or folder the job needs is not there; the message names it."""


class StageFailedError(MISSRecError, RuntimeError):
    """A subprocess stage (pre-training, a fine-tuning job, feature extraction) failed; names its log."""


def missing_extra(package: str, extra: str) -> ImportError:
    """The error to raise when an optional heavy dependency is not installed."""
    return ImportError(
        f"{package} is required for this feature; install it with `pip install 'missrec[{extra}]'`"
        f" (or `pip install {package}`)."
    )

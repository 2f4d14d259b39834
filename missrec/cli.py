"""What every launcher shares: the toolkit's own errors as one line, the traceback on request.

    if __name__ == "__main__":
        sys.exit(launch(main))

A :class:`~missrec.errors.MISSRecError` (bad input, an unusable config, a missing file, a failed stage) prints as
``error: <message>`` on stderr and exits 2; with ``--debug`` on the command line (each launcher's parser declares it,
:func:`add_debug_flag`) or ``MISSREC_DEBUG=1`` it raises with its traceback. Any other exception is a bug: it
always keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from missrec.errors import MISSRecError

DEBUG_ENV = "MISSREC_DEBUG"
EXIT_USER_ERROR = 2


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"show the Python traceback of an error (also: {DEBUG_ENV}=1)")


def debugging(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def launch(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a launcher's ``main(argv)``; its exit code, or 2 after printing a toolkit error as one line."""
    try:
        return main(argv)
    except MISSRecError as err:
        if debugging(sys.argv[1:] if argv is None else argv):
            raise
        sys.stderr.write(f"error: {err}\n")
        return EXIT_USER_ERROR

"""Crash-safe file writes: temporary file in the same folder, fsync, rename.

A reader never sees a half-written artefact: either the previous complete file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on success fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as fh:
            yield fh
            fh.flush()
            os.fchmod(fh.fileno(), 0o644)  # mkstemp makes 0600; artefacts are meant to be shared
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def replace_folder(new: str | Path, dest: str | Path) -> None:
    """Make the complete folder ``new`` appear at ``dest`` in one step, then delete what ``dest`` held.

    ``dest`` absent: one ``rename``. ``dest`` present: Linux ``renameat2(RENAME_EXCHANGE)`` swaps the two
    atomically, so a reader of ``dest`` sees the old complete folder or the new one, never a mix; where the
    file system cannot exchange, ``dest`` is first renamed to ``.<name>.previous`` (a crash between the two
    renames leaves the old folder there, named in :func:`previous_folder`).
    """
    import shutil

    new, dest = Path(new), Path(dest)
    if not dest.exists():
        os.rename(new, dest)
    elif _exchange(new, dest):
        shutil.rmtree(new)
    else:
        previous = previous_folder(dest)
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(dest, previous)
        os.rename(new, dest)
        shutil.rmtree(previous)
    _fsync_dir(dest.parent)


def previous_folder(dest: str | Path) -> Path:
    """Where :func:`replace_folder` parks the old folder when it cannot exchange atomically."""
    dest = Path(dest)
    return dest.parent / f".{dest.name}.previous"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))

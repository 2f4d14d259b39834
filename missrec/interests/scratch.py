"""Where a rank's large per-token arrays live during interest discovery: small ones in memory, large ones in
memory-mapped files of a scratch folder, so that a rank's own memory does not grow with its share of the pool
(the page cache holds the file pages, and the kernel can drop them).

    with Scratch("/local/scratch") as scratch:          # "" -> the system's temporary folder
        d2 = scratch.empty((n, k), np.float64, "knn_d2")  # np.ndarray or np.memmap
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Self

import numpy as np

log = logging.getLogger(__name__)

IN_MEMORY_BYTES = 64 << 20  # arrays up to this size stay in memory


class Scratch:
    """Allocator of per-token arrays: in memory up to ``in_memory_bytes``, else a file in a private folder
    under ``folder`` (removed on :meth:`close`)."""

    def __init__(self, folder: str | Path = "", in_memory_bytes: int = IN_MEMORY_BYTES) -> None:
        self.parent = str(folder) if folder else None
        self.in_memory_bytes = int(in_memory_bytes)
        self._dir: Path | None = None
        self.file_bytes = 0

    def empty(self, shape: tuple[int, ...], dtype: Any, name: str) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype``; a memmap when it is larger than the limit."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if nbytes <= self.in_memory_bytes:
            return np.empty(shape, dtype=dtype)
        if self._dir is None:
            if self.parent:
                Path(self.parent).mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="missrec-mid-", dir=self.parent))
            log.debug("interest discovery scratch: %s", self._dir)
        self.file_bytes += nbytes
        path = self._dir / f"{name}-{len(list(self._dir.iterdir()))}.bin"
        return np.memmap(path, dtype=dtype, mode="w+", shape=shape)

    def full(self, shape: tuple[int, ...], value: Any, dtype: Any, name: str) -> np.ndarray:
        out = self.empty(shape, dtype, name)
        out[...] = value
        return out

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Item feature tables on disk, addressed by global item id: what a step gathers instead of holding tables.

Several domains share one global item index: item ``i`` of domain ``d`` is global item ``offsets[d] + i``.
Each (domain, modality) table stays a read-only memory map of its file (float32 or float16, as the shard
folder stores it); :meth:`FeatureStore.gather` reads only the rows a batch asks for, so a process's own
memory grows with the batch, never with the catalogue (the page cache keeps hot rows). A domain without a
modality contributes all-zero rows, which models treat as a missing modality. The maps are opened lazily
in each process that gathers (DataLoader workers included), so the store pickles as a few paths.

    store = FeatureStore.from_folders(["shards/Kitchen", "shards/Garden"], ("feat1CLS", "feat3CLS"))
    rows = store.gather(np.array([0, 5, 1203]))   # item values (global id + 1; 0 = padding): per modality [3, F]
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from missrec.data.atomic import FEATURE_DTYPES, read_features
from missrec.data.shards import ShardSource
from missrec.errors import ConfigError, DataFormatError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TableFile:
    """One domain's table of one modality: ``path`` holds ``rows`` x ``dim`` values of ``dtype``."""

    path: str
    rows: int
    dim: int
    dtype: str


class FeatureStore:
    """Memory-mapped feature tables of several domains: ``tables[m][d]`` (None: domain ``d`` lacks modality
    ``m``), domains in global-index order with ``counts[d]`` items each."""

    def __init__(self, tables: Sequence[Sequence[TableFile | None]], counts: Sequence[int],
                 names: Sequence[str] = ()) -> None:
        if not tables:
            raise ConfigError("a feature store needs at least one modality")
        self.tables = [list(t) for t in tables]
        self.counts = [int(c) for c in counts]
        self.names = list(names) or [f"domain{d}" for d in range(len(self.counts))]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)  # [D + 1]
        self.dims = []
        for m, per_domain in enumerate(self.tables):
            if len(per_domain) != len(self.counts):
                raise ConfigError(f"modality {m}: {len(per_domain)} tables for {len(self.counts)} domains")
            dims = {t.dim for t in per_domain if t is not None}
            if len(dims) != 1:
                raise ConfigError(f"modality {m}: tables of widths {sorted(dims)} (every domain must agree, "
                                  "and at least one domain must have the modality)")
            self.dims.append(dims.pop())
        stored = {t.dtype for per_domain in self.tables for t in per_domain if t is not None}
        self.dtype = np.dtype("float16" if stored == {"float16"} else "float32")  # what gather returns
        self._maps: dict[tuple[int, int], np.ndarray] = {}
        self._pid = -1

    @classmethod
    def from_folders(cls, folders: Sequence[str | Path], suffixes: Sequence[str]) -> FeatureStore:
        """The tables ``suffixes`` (one modality each) of the shard folders ``folders``, in that order."""
        sources = [ShardSource(f) for f in folders]
        tables = []
        for suffix in suffixes:
            per_domain = []
            for s in sources:
                if suffix not in s.feature_suffixes:
                    log.warning("domain %s has no %s table: its items miss that modality", s.name, suffix)
                    per_domain.append(None)
                    continue
                info = s.feature_info(suffix)
                per_domain.append(TableFile(str(s.folder / info["file"]), s.num_items, int(info["dim"]),
                                            info.get("dtype", "float32")))
            tables.append(per_domain)
        return cls(tables, [s.num_items for s in sources], [s.name for s in sources])

    # ------------------------------------------------------------------------------------ sizes
    @property
    def num_items(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_modalities(self) -> int:
        return len(self.tables)

    @property
    def nbytes(self) -> int:
        """Bytes of every table on disk (what caching them whole would cost, at their stored type)."""
        return sum(t.rows * t.dim * np.dtype(FEATURE_DTYPES[t.dtype]).itemsize
                   for per_domain in self.tables for t in per_domain if t is not None)

    def domain_of(self, items: np.ndarray) -> np.ndarray:
        """Domain index of each global item id ``items`` [n]."""
        return np.searchsorted(self.offsets, items, side="right") - 1

    # ------------------------------------------------------------------------------------ reading
    def _map(self, m: int, d: int) -> np.ndarray:
        if self._pid != os.getpid():  # maps are per process (a forked worker opens its own)
            self._maps, self._pid = {}, os.getpid()
        key = (m, d)
        if key not in self._maps:
            t = self.tables[m][d]
            assert t is not None
            self._maps[key] = read_features(Path(t.path), t.rows, t.dim, check_finite=False, dtype=t.dtype)
        return self._maps[key]

    def gather(self, values: np.ndarray, modalities: Sequence[int] | None = None) -> list[np.ndarray]:
        """Rows of item values ``values`` [U] (global item id + 1; 0 = padding, an all-zero row): per modality
        (all, or those listed in ``modalities``) an array [U, F_m] of :attr:`dtype`. Rows holding NaN or inf
        raise a ``DataFormatError`` naming the file and the row."""
        values = np.asarray(values, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > self.num_items):
            raise ValueError(f"item values must lie in 0..{self.num_items} (0 = padding)")
        items = values - 1
        real = np.flatnonzero(items >= 0)
        dom = self.domain_of(items[real])
        out = []
        for m in range(self.num_modalities) if modalities is None else modalities:
            rows = np.zeros((len(values), self.dims[m]), dtype=self.dtype)
            for d in np.unique(dom):
                if self.tables[m][d] is None:
                    continue
                sel = real[dom == d]
                local = items[sel] - self.offsets[d]
                order = np.argsort(local, kind="stable")  # ascending offsets: sequential reads where they cluster
                block = np.asarray(self._map(m, d)[local[order]])
                if not np.isfinite(block).all():
                    bad = int(local[order][np.flatnonzero(~np.isfinite(block).all(axis=1))[0]])
                    raise DataFormatError(Path(self.tables[m][d].path), f"row {bad} (item {bad}) holds NaN or inf",
                                          bad)
                rows[sel[order]] = block
            out.append(rows)
        return out


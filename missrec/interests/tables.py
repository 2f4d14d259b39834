"""The interest index of a pre-training epoch as files: what each rank's interest discovery writes and every
batch reads, so no process holds the index of the whole catalogue.

One folder per epoch (``RUN/interests/epoch0003/``)::

    item_interest.00000.npy ...   int32 [hi - lo, M]: interest of each (item, modality) of the items that rank
                                  r's slice covers (-1: the modality is missing); one file per rank
    centroids.00000.npy ...       float32 [c_hi - c_lo, D]: the centroids rank r owns; one file per rank
    index.json                    item and centroid ranges, sizes; written last by rank 0 (marks the folder
                                  complete)

The run folder must be on a file system every node sees (as DeepSpeed checkpoints need). Readers memory-map
the slices lazily per process (DataLoader workers included) and gather rows per batch.

    tables = InterestTables("runs/pre/interests/epoch0003")
    ids = tables.item_interests(values)    # item values (global id + 1; 0 = padding) [U] -> [U, M]
    vecs = tables.centroid_rows(ids)       # [C_u, D]
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from missrec.errors import DataFormatError
from missrec.io import write_json

INDEX = "index.json"


def _slice_file(folder: Path, kind: str, rank: int) -> Path:
    return folder / f"{kind}.{rank:05d}.npy"


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_slices(folder: str | Path, rank: int, item_interest: np.ndarray, centroids: np.ndarray) -> None:
    """Rank ``rank``'s part of the index: its items' interests [n_r, M] and its centroid slice [C_r, D]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_npy(_slice_file(folder, "item_interest", rank), np.ascontiguousarray(item_interest, dtype=np.int32))
    _save_npy(_slice_file(folder, "centroids", rank), np.ascontiguousarray(centroids, dtype=np.float32))


def write_index(folder: str | Path, item_bounds: Sequence[int], centroid_bounds: Sequence[int],
                num_modalities: int, dim: int, stats: dict | None = None) -> None:
    """The folder's ``index.json`` (after every rank wrote its slices): ``item_bounds`` [W + 1] and
    ``centroid_bounds`` [W + 1] are the ranks' ranges."""
    write_json(Path(folder) / INDEX, {
        "item_bounds": [int(b) for b in item_bounds], "centroid_bounds": [int(b) for b in centroid_bounds],
        "num_items": int(item_bounds[-1]), "num_clusters": int(centroid_bounds[-1]),
        "num_modalities": int(num_modalities), "dim": int(dim), "stats": stats or {},
    })


def remove_older(root: str | Path, keep: Sequence[str | Path]) -> None:
    """Delete the epoch folders under ``root`` other than ``keep``."""
    keep_names = {Path(k).name for k in keep}
    for folder in Path(root).glob("epoch*"):
        if folder.name not in keep_names:
            shutil.rmtree(folder, ignore_errors=True)


class InterestTables:
    """Reader of an index folder written by :func:`write_slices` / :func:`write_index`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not (self.folder / INDEX).is_file():
            raise DataFormatError(self.folder / INDEX, "interest index missing (its discovery did not finish)")
        meta = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))
        self.item_bounds = np.asarray(meta["item_bounds"], dtype=np.int64)
        self.centroid_bounds = np.asarray(meta["centroid_bounds"], dtype=np.int64)
        self.num_items = int(meta["num_items"])
        self.num_clusters = int(meta["num_clusters"])
        self.num_modalities = int(meta["num_modalities"])
        self.dim = int(meta["dim"])
        self._maps: dict[tuple[str, int], np.ndarray] = {}
        self._pid = -1

    def _map(self, kind: str, rank: int) -> np.ndarray:
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        key = (kind, rank)
        if key not in self._maps:
            self._maps[key] = np.load(_slice_file(self.folder, kind, rank), mmap_mode="r")
        return self._maps[key]

    def _gather(self, kind: str, bounds: np.ndarray, ids: np.ndarray, width: int, dtype: type, fill: float) -> np.ndarray:
        out = np.full((len(ids), width), fill, dtype=dtype)
        owner = np.searchsorted(bounds, ids, side="right") - 1
        for r in np.unique(owner):
            sel = np.flatnonzero(owner == r)
            out[sel] = self._map(kind, int(r))[ids[sel] - bounds[r]]
        return out

    def item_interests(self, values: np.ndarray) -> np.ndarray:
        """Interest [U, M] int64 of each (item, modality) of the item values ``values`` [U] (global id + 1;
        0 = padding, all -1); -1 where the modality is missing."""
        values = np.asarray(values, dtype=np.int64)
        real = np.flatnonzero(values > 0)
        out = np.full((len(values), self.num_modalities), -1, dtype=np.int64)
        out[real] = self._gather("item_interest", self.item_bounds, values[real] - 1, self.num_modalities,
                                 np.int64, -1)
        return out

    def centroid_rows(self, ids: np.ndarray) -> np.ndarray:
        """Centroids [len(ids), D] float32 of the interests ``ids``."""
        return self._gather("centroids", self.centroid_bounds, np.asarray(ids, dtype=np.int64), self.dim,
                            np.float32, 0.0)

"""Pre-training batches for unit tests, assembled from in-memory tables instead of shard folders and index files
(the same :func:`missrec.data.pretrain_batch.assemble` the stream runs)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from missrec.data.pretrain_batch import PretrainBatch, assemble


class ArrayStore:
    """A :class:`~missrec.data.feature_store.FeatureStore` stand-in over in-memory tables [N, F_m]."""

    def __init__(self, tables: Sequence[np.ndarray]) -> None:
        self.tables = [np.asarray(t, dtype=np.float32) for t in tables]

    def gather(self, values: np.ndarray) -> list[np.ndarray]:
        out = []
        for t in self.tables:
            rows = np.zeros((len(values), t.shape[1]), dtype=np.float32)
            real = values > 0
            rows[real] = t[values[real] - 1]
            out.append(rows)
        return out


class ArrayTables:
    """An :class:`~missrec.interests.tables.InterestTables` stand-in: ``item_interest`` [N, M], ``centroids``."""

    def __init__(self, item_interest: np.ndarray, centroids: np.ndarray) -> None:
        self.item_interest = np.asarray(item_interest, dtype=np.int64)
        self.centroids = np.asarray(centroids, dtype=np.float32)
        self.dim = self.centroids.shape[1]

    def item_interests(self, values: np.ndarray) -> np.ndarray:
        out = np.full((len(values), self.item_interest.shape[1]), -1, dtype=np.int64)
        real = values > 0
        out[real] = self.item_interest[values[real] - 1]
        return out

    def centroid_rows(self, ids: np.ndarray) -> np.ndarray:
        return self.centroids[ids]


def batch_from_model(model, rows: Sequence[tuple[int, Sequence[int], int]], drop_prob: float = 0.0,
                     seed: int = 0) -> PretrainBatch:
    """The pre-training batch of ``(user, history, target)`` rows over a model's own tables and interest index."""
    store = ArrayStore([t[1:].numpy() for t in model.items.rows(slice(None))])
    tables = ArrayTables(model.item_interest[1:].numpy(), model.centroids.numpy())
    records = [(0, (i, u, list(h), t, True)) for i, (u, h, t) in enumerate(rows)]
    return assemble([records], domain=0, item_offset=0, user_offset=0, max_len=model.pos_emb.num_embeddings,
                    store=store, tables=tables, drop_prob=drop_prob, view_seeds=[(seed,)])

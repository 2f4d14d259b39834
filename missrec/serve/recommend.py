"""Top-k recommendation for a batch of user histories from a trained run, served from a FAISS item index.

    rec = Recommender.from_run("runs/missrec-office")
    rec.recommend([["Office-000012", "Office-000040"], [3, 17, 5]], k=10)
    # -> [[Recommendation(item_index, raw_id, score, text), ...], ...]
    rec.add_items({"feat1CLS": text_feats, "feat3CLS": image_feats}, ["NEW-1", "NEW-2"], ["...", "..."])

Per query: encode the history with the model, fetch a candidate pool of ``k * candidate_factor`` items
(plus the history length when history items are excluded) from the index, re-rank the pool with the
model's exact score and the run's scoring policy (:mod:`missrec.eval.policy`: the history offset and affinity
chosen on validation, so a served list is what evaluation measured; ``exclude_history``, off unless asked, drops
history items altogether), keep the top k. For SASRec (and MISSRec with one modality, ``fusion="mean"`` or a zero fusion
factor) the index ranking is already exact; otherwise see :mod:`missrec.serve.scorers`.

A policy with a history affinity (w × each item's largest similarity to a history item, added to its score) also
pools each history item's ``k * candidate_factor`` nearest neighbours from a second index
(:mod:`missrec.serve.neighbours`) and re-ranks with the affinity included; how often that gives the full
ranking's top k is measured by :mod:`missrec.serve.agreement`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from missrec.data.batching import collate
from missrec.errors import ConfigError, InputError, MISSRecError
from missrec.eval.policy import ScoringPolicy
from missrec.serve.index import IndexConfig, ItemIndex, index_items
from missrec.serve.loading import load_run
from missrec.serve.neighbours import HistoryNeighbours
from missrec.serve.scorers import ItemScorer, MISSRecScorer, TransductiveItemsError, make_scorer
from missrec.train.placement import resolve_device

log = logging.getLogger(__name__)

ItemRef = int | str


@dataclass(frozen=True)
class ServeConfig:
    """How to serve. ``candidate_factor``: the index returns ``k * candidate_factor`` candidates for exact
    re-ranking (1 = trust the index order). ``history_neighbours``: for a run with a history affinity, also
    pool each history item's ``k * candidate_factor`` nearest neighbours (False: the user's pool alone, re-ranked
    with the affinity). ``device``: auto | cpu | cuda (the model; FAISS follows
    ``index.use_gpu``)."""

    index: IndexConfig = field(default_factory=IndexConfig)
    candidate_factor: int = 10
    history_neighbours: bool = True  # a run with a history affinity: each history item's neighbours join the pool
    exclude_history: bool = False  # drop the user's history items from every list (off: the policy ranks them)
    batch_size: int = 256
    chunk_items: int = 65_536  # items per chunk while building the index
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.candidate_factor < 1 or self.batch_size < 1 or self.chunk_items < 1:
            raise ConfigError("candidate_factor, batch_size and chunk_items must be >= 1")


class Recommendation(NamedTuple):
    item_index: int
    raw_id: str
    score: float  # the model's exact score (MISSRec: fused / temperature; SASRec: dot product)
    text: str


class UnknownItemError(MISSRecError, ValueError):
    """A history names an item that is not in the catalogue."""


class Recommender:
    """A trained model, its item catalogue and a FAISS index over the catalogue.

    ``model``: SASRec or MISSRec (copied unless ``copy_model`` is False, so :meth:`add_items` never
    changes the caller's model); ``raw_ids`` / ``texts`` [num_items]; ``feature_names``: the feature
    suffixes of MISSRec's modalities, in order (for :meth:`add_items`); ``policy``: the run's scoring policy.
    """

    def __init__(
        self,
        model: nn.Module,
        raw_ids: Sequence[str],
        texts: Sequence[str] | None = None,
        max_len: int = 50,
        cfg: ServeConfig = ServeConfig(),
        feature_names: Sequence[str] = (),
        *,
        policy: ScoringPolicy | None = None,
        copy_model: bool = True,
        source: str = "",
    ) -> None:
        self.cfg = cfg
        self.policy = policy or ScoringPolicy()  # the run's history terms (exclusion comes from cfg)
        self.max_len = int(max_len)
        self.source = source
        self.feature_names = tuple(feature_names)
        self.device = resolve_device(cfg.device)
        model = copy.deepcopy(model) if copy_model else model
        self.model = model.to(self.device).eval()
        self.scorer: ItemScorer = make_scorer(self.model)
        n = self.scorer.num_items
        if len(raw_ids) != n:
            raise InputError(f"{len(raw_ids)} raw ids for a model of {n} items")
        texts = [""] * n if texts is None else list(texts)
        if len(texts) != n:
            raise InputError(f"{len(texts)} texts for a model of {n} items")
        self.raw_ids = [str(r) for r in raw_ids]
        self.texts = texts
        self._index_of: dict[str, int] = {}
        for i, raw in enumerate(self.raw_ids):
            if raw in self._index_of:
                raise InputError(f"raw item id {raw!r} appears twice (items {self._index_of[raw]} and {i})")
            self._index_of[raw] = i
        self.data: Any = None  # the run's DomainData when built by from_run
        self.index = self._build_index()
        self.neighbours = HistoryNeighbours(self.scorer, cfg.index, cfg.chunk_items, cfg.progress)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_run(cls, run_dir: str | Path, cfg: ServeConfig = ServeConfig(), data_root: str | None = None) -> Recommender:
        """Load a fine-tuning run folder (config, domain data, model, ``best.pt``) and index its items."""
        run = load_run(run_dir, data_root, str(resolve_device(cfg.device)))
        rec = cls(run.model, run.raw_ids, run.texts, run.cfg.data.max_len, cfg,
                  feature_names=run.cfg.data.features if run.cfg.model == "missrec" else (),
                  policy=run.policy, copy_model=False, source=str(run.run_dir))
        rec.data = run.data
        return rec

    def _build_index(self) -> ItemIndex:
        t0 = time.perf_counter()
        index = index_items(self.scorer.item_vectors, self.num_items, self.scorer.dim, self.cfg.index,
                            self.cfg.chunk_items, self.cfg.progress)
        self.index_seconds = time.perf_counter() - t0
        log.info("item index %s over %d items in %.3fs (proxy exact: %s)", index.info["kind"], self.num_items,
                 self.index_seconds, self.scorer.proxy_is_exact)
        return index

    # ------------------------------------------------------------------------------ catalogue
    @property
    def num_items(self) -> int:
        return self.scorer.num_items

    def item_index(self, item: ItemRef) -> int:
        """The 0-based index of a raw item id (str) or an index (int); unknown ones raise UnknownItemError."""
        if isinstance(item, (bool, np.bool_)):
            raise UnknownItemError(f"item {item!r} is neither a raw id (str) nor an index (int)")
        if isinstance(item, (int, np.integer)):
            i = int(item)
            if not 0 <= i < self.num_items:
                raise UnknownItemError(f"item index {i} is outside the catalogue (0..{self.num_items - 1})")
            return i
        if isinstance(item, str):
            i = self._index_of.get(item)
            if i is None:
                where = f" of {self.source}" if self.source else ""
                raise UnknownItemError(f"unknown item id {item!r}: not in the catalogue{where} ({self.num_items} items)")
            return i
        raise UnknownItemError(f"item {item!r} is neither a raw id (str) nor an index (int)")

    def resolve(self, histories: Sequence[Sequence[ItemRef]]) -> list[list[int]]:
        """Histories of raw ids / indices -> lists of 0-based indices (oldest first, every item kept)."""
        if isinstance(histories, (str, bytes)):
            raise TypeError("histories must be a list of histories (lists of items), not a string")
        out = []
        for u, hist in enumerate(histories):
            if isinstance(hist, (str, bytes)):
                raise TypeError(f"history {u} is a string; pass a list of items")
            idx = [self.item_index(x) for x in hist]
            if not idx:
                raise InputError(f"history {u} is empty: need at least one item")
            out.append(idx)
        return out

    # ------------------------------------------------------------------------------ recommending
    def recommend(
        self,
        histories: Sequence[Sequence[ItemRef]],
        k: int = 10,
        *,
        exclude_history: bool | None = None,
        candidate_factor: int | None = None,
        full_ranking: bool = False,
    ) -> list[list[Recommendation]]:
        """Top-``k`` items for each history (items as raw ids or indices, oldest first; only the last
        ``max_len`` feed the model). ``exclude_history`` (default: the config's) leaves history items out.
        ``full_ranking``: score every item exactly instead of using the index (the reference)."""
        ids, scores = self.topk(self.resolve(histories), k, exclude_history=exclude_history,
                                candidate_factor=candidate_factor, full_ranking=full_ranking)
        out = []
        for row_ids, row_scores in zip(ids, scores, strict=True):
            out.append([Recommendation(int(i), self.raw_ids[i], float(s), self.texts[i])
                        for i, s in zip(row_ids, row_scores, strict=True) if i >= 0])
        return out

    def topk(
        self,
        histories: Sequence[Sequence[int]],
        k: int = 10,
        *,
        exclude_history: bool | None = None,
        candidate_factor: int | None = None,
        full_ranking: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`recommend` for histories of 0-based indices: (ids [B, k] int64, scores [B, k]
        float32), padded with id -1 / score -inf when fewer than ``k`` items qualify."""
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        exclude = self.cfg.exclude_history if exclude_history is None else exclude_history
        factor = self.cfg.candidate_factor if candidate_factor is None else int(candidate_factor)
        if factor < 1:
            raise InputError(f"candidate_factor must be >= 1, got {factor}")
        for u, h in enumerate(histories):
            a = np.asarray(h, dtype=np.int64)
            if a.size == 0:
                raise InputError(f"history {u} is empty: need at least one item")
            bad = a[(a < 0) | (a >= self.num_items)]
            if bad.size:
                raise UnknownItemError(f"history {u}: item index {int(bad[0])} is outside the catalogue "
                                       f"(0..{self.num_items - 1})")
        ids_out = np.full((len(histories), k), -1, dtype=np.int64)
        scores_out = np.full((len(histories), k), -np.inf, dtype=np.float32)
        bs = self.cfg.batch_size
        for lo in tqdm(range(0, len(histories), bs), desc="recommend", unit="batch", leave=False,
                       disable=not self.cfg.progress or len(histories) <= bs):
            part = histories[lo : lo + bs]
            ids, scores = self._topk_batch(part, k, exclude, factor, full_ranking)
            ids_out[lo : lo + len(part), : ids.shape[1]] = ids
            scores_out[lo : lo + len(part), : ids.shape[1]] = scores
        return ids_out, scores_out

    def _topk_batch(
        self, histories: Sequence[Sequence[int]], k: int, exclude: bool, factor: int, full: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        batch = collate([(0, h, 0) for h in histories], self.max_len)
        user = self.scorer.encode(batch)  # [B, D]
        seen = [np.unique(np.asarray(h, dtype=np.int64)) for h in histories]
        offset = self.policy.history_offset  # the run's offset of history items (0: none)
        weight = self.policy.affinity_weight  # the run's history affinity weight (0: none)
        if full:
            scores = self.scorer.full_scores(user).float()  # [B, N]
            if weight:
                scores = scores + weight * self.scorer.history_affinity(batch).float()
            cand = None
        else:
            extra = max(s.size for s in seen) if exclude else 0
            _, cand = self.index.search(self.scorer.query_vectors(user), k * factor + extra)  # [B, P]
            if not (cand >= 0).any():  # nothing retrieved (an approximate index can come back empty)
                return np.full((len(histories), 0), -1, np.int64), np.zeros((len(histories), 0), np.float32)
            if weight:  # the history affinity: pool each history item's neighbours too, score row by row
                n = k * factor if self.cfg.history_neighbours else 0
                cand, scores = self.neighbours.rerank(user, batch, cand, weight, n)  # [B, P']
            else:
                uniq = np.unique(cand[cand >= 0])
                exact = self.scorer.scores(user, torch.from_numpy(uniq)).float()  # [B, U]
                pos = torch.from_numpy(np.searchsorted(uniq, np.clip(cand, 0, None)))  # [B, P]
                scores = exact.gather(1, pos.to(exact.device))
                scores = scores.masked_fill(torch.from_numpy(cand < 0).to(scores.device), float("-inf"))
        if exclude or offset:
            rows, cols = self._history_cells(seen, cand)
            rows, cols = rows.to(scores.device), cols.to(scores.device)
            scores[rows, cols] = float("-inf") if exclude else scores[rows, cols] + offset
        top, arg = scores.topk(min(k, scores.shape[1]), dim=1)  # [B, k']
        arg = arg.cpu().numpy()
        ids = arg if cand is None else np.take_along_axis(cand, arg, axis=1)
        top = top.cpu().numpy()
        ids = np.where(np.isfinite(top), ids, -1)
        return ids, top

    @staticmethod
    def _history_cells(seen: Sequence[np.ndarray], cand: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) cells of the score matrix that hold history items ([B, N], or the pool [B, P])."""
        rows, cols = [], []
        for r, s in enumerate(seen):
            c = s if cand is None else np.flatnonzero(np.isin(cand[r], s))
            rows.append(np.full(c.size, r, dtype=np.int64))
            cols.append(c.astype(np.int64))
        return torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cols))

    # ------------------------------------------------------------------------------ new items
    def add_items(
        self, features: Mapping[str, np.ndarray], raw_ids: Sequence[str], texts: Sequence[str] | None = None
    ) -> list[int]:
        """Append items known only by their features (inductive MISSRec): ``features`` maps each of the
        run's feature suffixes to an array [n_new, dim] (an all-zero row, or a suffix left out, = that
        modality missing). They are adapted with the trained adapters, indexed, and can be recommended
        and used in histories at once. Returns their item indices."""
        if not isinstance(self.scorer, MISSRecScorer):
            raise TransductiveItemsError(
                "cannot add items to an ID-based model (SASRec): it has no embedding for unseen items; "
                "serve an inductive MISSRec run"
            )
        if self.scorer.transductive:
            raise TransductiveItemsError(
                "cannot add items to a transductive MISSRec run: its score needs a trained ID embedding "
                "for every item and new items have none; train with missrec.mode=inductive to add items"
            )
        raw_ids = [str(r) for r in raw_ids]
        n = len(raw_ids)
        if n == 0:
            return []
        texts = [""] * n if texts is None else [str(t) for t in texts]
        if len(texts) != n:
            raise InputError(f"{len(texts)} texts for {n} new items")
        dup = [r for r in raw_ids if r in self._index_of]
        if dup or len(set(raw_ids)) != n:
            raise InputError(f"new item ids must be new and distinct; already present or repeated: "
                             f"{dup[:5] or sorted({r for r in raw_ids if raw_ids.count(r) > 1})[:5]}")
        tables = self._feature_tables(features, n, raw_ids)
        start = self.num_items
        self.scorer.add_items(tables)
        new = torch.arange(start, start + n)
        self.index.add(self.scorer.item_vectors(new))
        self.neighbours.add(new)
        for i, (raw, text) in enumerate(zip(raw_ids, texts, strict=True)):
            self._index_of[raw] = start + i
            self.raw_ids.append(raw)
            self.texts.append(text)
        return new.tolist()

    def _feature_tables(self, features: Mapping[str, np.ndarray], n: int, raw_ids: Sequence[str]) -> list[np.ndarray]:
        """One [n, dim_m] float32 table per modality, in the model's order; checked."""
        names = self.feature_names or tuple(f"feat{m}" for m in range(self.scorer.num_modalities))
        unknown = sorted(set(features) - set(names))
        if unknown:
            raise InputError(f"unknown feature table(s) {unknown}; this run's modalities are {list(names)}")
        tables = []
        for m, name in enumerate(names):
            dim = int(self.model.items.dims[m])
            if name not in features:
                log.warning("no %s features for the %d new items: that modality is missing for them", name, n)
                tables.append(np.zeros((n, dim), dtype=np.float32))
                continue
            arr = np.asarray(features[name], dtype=np.float32)
            if arr.shape != (n, dim):
                raise InputError(f"features {name!r} must be [{n}, {dim}], got {arr.shape}")
            bad = ~np.isfinite(arr).all(axis=1)
            if bad.any():
                raise InputError(f"features {name!r} of new item {raw_ids[int(np.argmax(bad))]!r} hold NaN or inf")
            tables.append(arr)
        empty = ~np.stack([np.abs(t).sum(1) > 0 for t in tables], axis=1).any(axis=1)
        if empty.any():
            raise InputError(f"new item {raw_ids[int(np.argmax(empty))]!r} has no features in any modality")
        return tables

    # ------------------------------------------------------------------------------ reporting
    @property
    def info(self) -> dict[str, Any]:
        """The index description plus the serving settings."""
        return {**self.index.info, "index_seconds": round(self.index_seconds, 4),
                "candidate_factor": self.cfg.candidate_factor, "proxy_exact": bool(self.scorer.proxy_is_exact),
                "num_items": self.num_items, "policy": self.policy.to_dict(),
                "history_neighbours": bool(self.policy.affinity_weight and self.cfg.history_neighbours)}

    def split_histories(self, split: str = "test", limit: int | None = None) -> list[list[int]]:
        """Histories (0-based indices) of a split of the run's domain (``from_run`` only), up to ``limit``."""
        if self.data is None:
            raise RuntimeError("split_histories needs a recommender built by from_run")
        if self.data.domain is not None:
            sp = self.data.domain.splits[split]
            n = len(sp) if limit is None else min(limit, len(sp))
            return [sp.history(i).tolist() for i in range(n)]
        out: list[list[int]] = []
        for batch in self.data.eval_batches(split):
            for seq, length in zip(batch.seq.tolist(), batch.seq_len.tolist(), strict=True):
                out.append([s - 1 for s in seq[:length]])
                if limit is not None and len(out) >= limit:
                    return out
        return out


__all__ = ["ItemRef", "Recommendation", "Recommender", "ServeConfig", "UnknownItemError"]

"""Ranking metrics per popularity bucket: test users grouped by how often their target item is a
training target, e.g. ``edges=(6, 21)`` -> targets seen [0, 6), [6, 21) and [21, inf) times.

A model that ranks popular items higher gains in the last bucket and loses in the first; the overall
Recall@k can hide that trade-off (docs/experiments.md, the MISSRec sections, uses it to compare two codes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

import torch

from missrec.data.batching import Batch
from missrec.errors import ConfigError
from missrec.eval.metrics import DEFAULT_KS, RankingMetrics, scoring


def check_edges(edges: Sequence[int]) -> tuple[int, ...]:
    """Bucket edges: strictly increasing positive integers (ValueError otherwise)."""
    out = tuple(int(e) for e in edges)
    if not out or out[0] < 1 or any(b <= a for a, b in pairwise(out)):
        raise ConfigError(f"popularity edges must be strictly increasing positive integers, got {list(edges)}")
    return out


def target_counts(batches: Iterable[Batch], num_items: int) -> torch.Tensor:
    """How often each item is a target in ``batches`` (e.g. one training epoch): [num_items] int64."""
    counts = torch.zeros(num_items, dtype=torch.long)
    for b in batches:
        counts += torch.bincount(b.target.cpu(), minlength=num_items)
    return counts


def bucket_labels(edges: Sequence[int]) -> list[str]:
    """``(6, 21)`` -> ``["0-5", "6-20", "21+"]`` (inclusive ranges of training-target counts)."""
    lows = [0, *edges]
    return [f"{lo}-{hi - 1}" for lo, hi in zip(lows, edges)] + [f"{edges[-1]}+"]


@torch.no_grad()
def evaluate_by_popularity(
    model: torch.nn.Module, batches: Iterable[Batch], counts: torch.Tensor, edges: Sequence[int],
    device: torch.device, ks: tuple[int, ...] = DEFAULT_KS, ties: str = "index", policy: Any = None,
) -> dict[str, dict[str, float]]:
    """Recall/NDCG@``ks`` of ``model`` (ranked with its scoring ``policy`` when given) per bucket of
    ``counts[target]`` (``counts`` [num_items]) and over all rows (key ``"all"``); each bucket also reports its
    number of rows as ``"users"``."""
    edges = check_edges(edges)
    bounds = torch.tensor(edges)
    labels = bucket_labels(edges)
    parts = [RankingMetrics(ks, ties) for _ in labels]
    whole = RankingMetrics(ks, ties)
    with scoring(model):
        for batch in batches:
            batch = batch.to(device)
            scores = policy.scores(model, batch) if policy is not None else model.full_scores(batch)  # [B, N]
            whole.update(scores, batch.target)
            which = torch.bucketize(counts[batch.target.cpu()], bounds, right=True)  # [B] bucket index
            for i, part in enumerate(parts):
                rows = (which == i).nonzero().flatten().to(scores.device)
                if rows.numel():
                    part.update(scores[rows], batch.target[rows])
    out = {lab: {"users": float(p.count), **(p.compute() if p.count else {})} for lab, p in zip(labels, parts)}
    out["all"] = {"users": float(whole.count), **whole.compute()}
    return out

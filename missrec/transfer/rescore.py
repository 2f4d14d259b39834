"""Score a finished fine-tuning run again: its best checkpoint (``best.pt``, with the interest index of
its epoch) on a split, at any cutoffs, from the run's own ``config.json``.

    python launcher/evaluate.py --run runs/mm-ind --ks 10,50 --split test

Useful to compare with figures computed at other cutoffs, e.g. the official MISSRec evaluator, which
reports top-(k+1) as "@k" (docs/experiments.md). ``--ties expected`` scores tied items by their expected rank,
which needs no item order and so compares exactly with another code's dumped ranks. ``--by-popularity
6,21`` splits the users by how often their target is a training target (:mod:`missrec.eval.popularity`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from missrec.errors import ConfigError
from missrec.eval.metrics import check_tie_rule
from missrec.eval.popularity import check_edges, evaluate_by_popularity, target_counts
from missrec.serve.loading import load_run
from missrec.train.loop import evaluate
from missrec.train.placement import resolve_device

if TYPE_CHECKING:
    from missrec.serve.loading import LoadedRun

log = logging.getLogger(__name__)

SPLITS = ("valid", "test")


def rescore_run(
    run_dir: str | Path, ks: Sequence[int] = (10, 50), split: str = "test", data_root: str | None = None,
    device: str = "auto", ties: str = "index",
) -> dict[str, float]:
    """Recall/NDCG@``ks`` of ``run_dir``'s ``best.pt`` on ``split`` (full ranking, as in training; ``ties``:
    ``index`` as in training, or ``expected`` over a random order of tied items, :mod:`missrec.eval.metrics`).

    The run is loaded as for serving (:func:`missrec.serve.loading.load_run`); ``data_root`` replaces the
    run's data folder (its config may hold a path relative to another working directory)."""
    run, dev = _load_checked(run_dir, ks, split, data_root, device, ties)
    log.info("%s: best.pt (epoch %s) on %s at %s, ties %s", run_dir, run.epoch, split, list(ks), ties)
    return evaluate(run.model, run.data.eval_batches(split), dev, tuple(int(k) for k in ks), ties, run.policy)


def _load_checked(
    run_dir: str | Path, ks: Sequence[int], split: str, data_root: str | None, device: str, ties: str
) -> tuple[LoadedRun, torch.device]:
    """The run (:func:`missrec.serve.loading.load_run`) and its device, after the arguments are checked
    (before anything is loaded)."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    if not ks or any(int(k) < 1 for k in ks):
        raise ConfigError(f"cutoffs must be positive integers, got {list(ks)}")
    check_tie_rule(ties)
    dev = resolve_device(device)
    return load_run(run_dir, data_root, str(dev)), dev


def rescore_by_popularity(
    run_dir: str | Path, edges: Sequence[int], ks: Sequence[int] = (10, 50), split: str = "test",
    data_root: str | None = None, device: str = "auto", ties: str = "index",
) -> dict[str, dict[str, float]]:
    """As :func:`rescore_run`, per bucket of how often the target is a target of the run's training rows
    (one pass over them; ``edges`` e.g. ``(6, 21)``), plus ``"all"``; see
    :func:`missrec.eval.popularity.evaluate_by_popularity`."""
    edges = check_edges(edges)
    run, dev = _load_checked(run_dir, ks, split, data_root, device, ties)
    counts = target_counts(run.data.train_batches(0), run.data.num_items)  # [N]
    log.info("%s: best.pt (epoch %s) on %s by training-target count %s", run_dir, run.epoch, split, list(edges))
    return evaluate_by_popularity(run.model, run.data.eval_batches(split), counts, edges, dev,
                                  tuple(int(k) for k in ks), ties, run.policy)

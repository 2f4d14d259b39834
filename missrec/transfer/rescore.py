"""Score a finished fine-tuning run again: its best checkpoint (``best.pt``, with the interest index of
its epoch) on a split, at any cutoffs, from the run's own ``config.json``.

    python launcher/evaluate.py --run runs/mm-ind --ks 10,50 --split test

Useful to compare with figures computed at other cutoffs, e.g. the official MISSRec evaluator, which
reports top-(k+1) as "@k" (docs/results.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from missrec.config import RunConfig, from_dict, merge
from missrec.train.loop import evaluate, resolve_device

log = logging.getLogger(__name__)

SPLITS = ("valid", "test")


def rescore_run(
    run_dir: str | Path, ks: Sequence[int] = (10, 50), split: str = "test", data_root: str | None = None,
    device: str = "auto",
) -> dict[str, float]:
    """Recall/NDCG@``ks`` of ``run_dir``'s ``best.pt`` on ``split`` (full ranking, as in training).

    ``data_root`` replaces the run's data folder (its config may hold a path relative to another
    working directory)."""
    from missrec.transfer.finetune import DomainData, build_model

    run = Path(run_dir)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"cutoffs must be positive integers, got {list(ks)}")
    for name in ("config.json", "best.pt"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run / name}: not found; is {run} a finished fine-tuning run folder?")
    cfg = from_dict(RunConfig, json.loads((run / "config.json").read_text()), where=str(run / "config.json"))
    if data_root is not None:
        cfg = merge(cfg, {"data": {"data_root": str(data_root)}})
    data = DomainData(cfg)
    model = build_model(cfg, data)
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(state)
    dev = resolve_device(device)
    log.info("%s: best.pt on %s at %s", run, split, list(ks))
    return evaluate(model.to(dev), data.eval_batches(split), dev, tuple(int(k) for k in ks))

"""What choosing the history terms on validation costs: a validation with the scoring-policy grid against a plain one.

Builds the default model (MISSRec, or SASRec) on a domain (scientific_mm by default; untrained weights: the cost does
not depend on them), then times, alternately and ``repeats`` times each, a plain validation (the model's own ranking)
and one that ranks the targets under every (offset, affinity weight) pair of the grid
(:func:`missrec.eval.policy.fit_policy`). Prints both and their ratio (the target: at most 1.5).

    python launcher/bench.py validation --data-root ../shared/datasets/scientific_mm --domain Scientific
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from missrec.config import RunConfig, build
from missrec.models.build import history_grid
from missrec.train.loop import validate
from missrec.train.placement import resolve_device
from missrec.transfer.finetune import DomainData, build_model, seed_everything

log = logging.getLogger(__name__)


def run_validation_benchmark(data_root: str | Path, domain: str = "Scientific", model: str = "missrec",
                             repeats: int = 3, threads: int = 0, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Seconds of a plain and of a grid validation (medians of ``repeats`` alternating runs) and their ratio."""
    if threads > 0:
        torch.set_num_threads(threads)
    feats = ["data.features=[feat1CLS,feat3CLS]"] if model == "missrec" else []
    cfg = build(RunConfig, [], [f"data.data_root={data_root}", f"data.domain={domain}", f"model={model}",
                                "train.progress=false", *feats, *overrides])
    seed_everything(cfg.train.seed)
    data = DomainData(cfg)
    net = build_model(cfg, data)
    device = resolve_device(cfg.train.device)
    net.to(device).eval()
    grid = history_grid(cfg.missrec if model == "missrec" else cfg.sasrec)
    if grid is None:
        raise ValueError(f"the {model} defaults choose no history terms: nothing to compare")
    batches = list(data.eval_batches("valid"))  # read once: the timings are of the scoring alone
    validate(net, batches[:2], device, None)  # warm-up (interests, kernels)
    plain, fitted = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        validate(net, batches, device, None)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        validate(net, batches, device, grid)
        fitted.append(time.perf_counter() - t0)
    p, f = sorted(plain)[len(plain) // 2], sorted(fitted)[len(fitted) // 2]
    out = {"domain": domain, "model": model, "rows": sum(len(b) for b in batches), "items": data.num_items,
           "pairs": len(grid[0]) * len(grid[1]), "offsets": len(grid[0]), "weights": len(grid[1]),
           "plain_seconds": round(p, 3), "grid_seconds": round(f, 3), "ratio": round(f / p, 3),
           "threads": torch.get_num_threads(), "device": str(device), "repeats": repeats}
    log.info("validation of %d rows: plain %.2fs, with the %d-pair grid %.2fs (x%.2f)", out["rows"], p,
             out["pairs"], f, out["ratio"])
    return out

"""Benchmark of MISSRec training steps on shuffled batches (the order RecBole trains in): one padded pass per
batch against passes over groups of similar history length (``missrec.data.batching.length_groups``).

Every setting times the same batches, interleaved round by round so that machine noise hits them alike;
the figures to read are the ratios to the one-pass setting.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch

from missrec.config import RunConfig, build
from missrec.data.batching import length_groups

log = logging.getLogger(__name__)


def run_length_pass_benchmark(
    data_root: str, domain: str, features: tuple[str, ...], mode: str = "inductive", steps: int = 6,
    overheads: tuple[int, ...] = (-1, 32, 128, 512, 2048), batch_size: int = 512, seed: int = 0,
) -> dict[str, Any]:
    """Seconds per training step (forward, backward, Adam) of MISSRec on ``steps`` shuffled batches of
    ``domain`` for each length-group ``overheads`` value (-1: one padded pass). Returns a JSON-able dict."""
    from missrec.transfer.finetune import DomainData, build_model

    cfg = build(RunConfig, overrides=[
        f"data.data_root={data_root}", f"data.domain={domain}", "model=missrec", f"missrec.mode={mode}",
        f"data.features=[{','.join(features)}]", "data.group_by_length=false", f"train.batch_size={batch_size}",
        f"train.seed={seed}",
    ])
    torch.manual_seed(seed)
    data = DomainData(cfg)
    model = build_model(cfg, data)
    model.begin_epoch(0)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = [b for _, b in zip(range(steps + 1), data.train_batches(0))]
    times: dict[int, list[float]] = {o: [] for o in overheads}
    for i, batch in enumerate(batches):
        for o in overheads:
            model.length_group_overhead = o
            t = time.perf_counter()
            model.loss(batch)["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i > 0:  # the first batch warms up
                times[o].append(time.perf_counter() - t)
        log.info("length passes: batch %d/%d timed", i, steps)
    one = statistics.mean(times[overheads[0]])
    rows = []
    for o in overheads:
        groups = [length_groups(b.seq_len, o) for b in batches[1:]]
        positions = [sum(len(g) * int(b.seq_len[g].max()) for g in gs) for b, gs in zip(batches[1:], groups)]
        sec = statistics.mean(times[o])
        rows.append({
            "overhead": o, "seconds_per_step": round(sec, 3), "speedup_vs_first": round(one / sec, 2),
            "passes_per_step": round(statistics.mean(len(g) for g in groups), 2),
            "positions_per_step": round(statistics.mean(positions)),
        })
    lengths = torch.cat([b.seq_len for b in batches[1:]]).float()
    return {
        "domain": domain, "mode": mode, "batch_size": batch_size, "steps": steps, "threads": torch.get_num_threads(),
        "mean_history": round(float(lengths.mean()), 2), "longest_history": int(lengths.max()),
        "untrimmed_positions": batch_size * cfg.data.max_len, "settings": rows,
    }

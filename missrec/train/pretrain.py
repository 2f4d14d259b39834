"""Multi-domain, ID-agnostic pre-training of MISSRec with DeepSpeed (ZeRO-1/2/3, bf16), on any number of
ranks, resumable to the same final parameters.

Per epoch: distributed interest discovery over every rank's slice of the item tokens, then steps over
the epoch plan of :class:`~missrec.data.multi.MultiDomainData` (global batch = per-rank batch x ranks).
Per step: the contrastive losses with negatives gathered from every rank (gradients flow back to their
owners), ``engine.backward`` (DeepSpeed averages gradients over ranks), ``engine.step``. Randomness
(dropout, item-drop view) is reseeded from (seed, global step, rank) at every step, so a run resumed
from a checkpoint replays exactly what an uninterrupted run does.

Launched by ``launcher/pretrain.py``; see ``cluster_configs/README.md`` for multi-node commands.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from missrec.config import PretrainConfig, to_dict
from missrec.data.multi import MultiDomainData
from missrec.errors import ConfigError
from missrec.train import checkpoint, faults
from missrec.train.dist import (
    all_gather_nograd,
    all_reduce_mean,
    gather_with_grad,
    init_distributed,
    shutdown,
)
from missrec.train.engine import bf16_enabled, deepspeed_config, init_engine, read_ds_config, zero_stage
from missrec.train.loop import NonFiniteLossError, nonfinite_parameters
from missrec.train.rank_zero import RankZero
from missrec.train.trace import SampleTrace

log = logging.getLogger(__name__)

def _step_seed(seed: int, global_step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, global_step, rank]).generate_state(1)[0])


def _discover() -> Any:
    from missrec.interests.distributed import discover_interests_distributed

    return discover_interests_distributed


def _log_interests(rz: RankZero, stats: dict[str, float], sizes: np.ndarray, step: int) -> None:
    rz.scalars({f"mid/{k}": v for k, v in stats.items()}, step)
    rz.histogram("mid/cluster_size", sizes, step)


def run_pretrain(cfg: PretrainConfig, resume: bool = False) -> dict[str, Any]:
    """Pre-train on the domains of ``cfg.data``; returns (and writes to ``RUN/metrics.json``) the summary."""
    if cfg.nonfinite not in ("error", "skip"):
        raise ConfigError(f"nonfinite must be 'error' or 'skip', got {cfg.nonfinite!r}")
    from missrec.models.build import missrec_from_config

    if not cfg.missrec.use_interests:
        raise ConfigError("missrec.use_interests=false is a fine-tuning ablation; pre-training discovers interests")
    w = init_distributed(standalone=True)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ds_source = str(cfg.deepspeed_config)
    ds_cfg = deepspeed_config(read_ds_config(ds_source), cfg, w.size, ds_source)
    data = MultiDomainData(cfg.data, cfg.features, cfg.domain_weights, cfg.max_len)
    torch.manual_seed(cfg.seed)  # identical initial parameters on every rank
    # the history offset is a fine-tuning term (pre-training scores in-batch candidates): none here
    model = missrec_from_config(replace(cfg.missrec, history_bias=False), data.num_items, data.features, cfg.max_len,
                                cfg.seed)
    model.set_trainable("all")
    run_dir = Path(cfg.output_dir)
    rz = RankZero(run_dir, rank=w.rank)
    g = cfg.batch_size * w.size
    steps = data.steps_per_epoch(g)
    if cfg.max_steps_per_epoch > 0:
        steps = min(steps, cfg.max_steps_per_epoch)
    rz.record_start(to_dict(cfg), extra={
        "world_size": w.size, "backend": w.backend, "global_batch": g, "steps_per_epoch": steps,
        "deepspeed_config": ds_source, "domains": data.names, "num_items": data.num_items,
    })
    rz.write_json("ds_config.json", ds_cfg)
    log.info("world size %d (%s), global batch %d = %d per rank x %d, %d samples per step, %d steps per epoch, "
             "ZeRO-%d, bf16=%s", w.size, w.backend or "single process", g, cfg.batch_size, w.size, g, steps,
             zero_stage(ds_cfg), bf16_enabled(ds_cfg))
    engine = init_engine(model, ds_cfg)
    module = engine.module
    discover = _discover() if w.size > 1 else None

    epoch, start_step, global_step, history = 0, 0, 0, []
    resumed_index = False
    if resume:
        from missrec.train.dist import broadcast_object

        tag = broadcast_object(checkpoint.latest_tag(run_dir))
        if tag is None:
            log.info("--resume: no complete checkpoint in %s, starting from scratch", run_dir)
        else:
            tag, client = checkpoint.load(engine, run_dir, tag)
            epoch, start_step = int(client["epoch"]), int(client["step_in_epoch"])
            global_step, history = int(client["global_step"]), list(client.get("history", []))
            if start_step > 0:  # mid-epoch: the interests of that epoch, not rediscovered
                module.set_interest_index(client["item_interest"], client["centroids"])
                resumed_index = True
            log.info("resumed from %s: epoch %d, step %d (global step %d)", tag, epoch, start_step, global_step)

    def client_state(ep: int, step_in_epoch: int) -> dict[str, Any]:
        return {"epoch": ep, "step_in_epoch": step_in_epoch, "global_step": global_step, "history": history,
                "item_interest": module.item_interest[1:].cpu(), "centroids": module.centroids.cpu(),
                "world_size": w.size, "global_batch": g}

    trace = SampleTrace(run_dir, w.rank, global_step, cfg.trace_samples)
    timers = {"mid": 0.0, "data": 0.0, "step": 0.0, "checkpoint": 0.0}
    skipped = 0
    bar = tqdm(total=steps * cfg.epochs, initial=epoch * steps + start_step, desc="pre-train", unit="step",
               disable=not (cfg.progress and w.is_zero), dynamic_ncols=True)
    t_run = time.perf_counter()
    steps_run = 0
    while epoch < cfg.epochs:
        if not resumed_index:
            t0 = time.perf_counter()
            mid = module.refresh_interests(w.rank, w.size, discover)
            timers["mid"] += time.perf_counter() - t0
            sizes = np.bincount(module.item_interest[1:][module.item_interest[1:] >= 0].cpu().numpy())
            _log_interests(rz, mid, sizes, global_step)
            log.info("epoch %d: MID %d tokens -> %d interests in %.1fs", epoch, int(mid["tokens"]),
                     int(mid["clusters"]), mid["seconds"])
        resumed_index = False
        sums: dict[str, float] = {}
        counted = 0
        module.train()
        t_data = time.perf_counter()
        for step, dom, rows in data.step_rows(epoch, cfg.batch_size, w.rank, w.size, cfg.seed, start_step):
            if step >= steps:
                break
            batch = data.batch(dom, rows)
            trace.step(epoch, global_step, step, dom, rows)
            timers["data"] += time.perf_counter() - t_data
            faults.maybe_kill(global_step, w.rank)
            t0 = time.perf_counter()
            torch.manual_seed(_step_seed(cfg.seed, global_step, w.rank))
            gen = torch.Generator().manual_seed(_step_seed(cfg.seed + 1, global_step, w.rank))
            out = engine(batch, objective="pretrain", drop_prob=cfg.drop_prob, seq_seq_weight=cfg.seq_seq_weight,
                         generator=gen, gather=gather_with_grad, keys=(batch.target, batch.user))
            loss = out["loss"]
            loss = faults.maybe_nan(loss, global_step, w.rank)
            flags = all_gather_nograd(torch.isfinite(loss.detach()).reshape(1).float()).reshape(-1)  # [world]
            bad = (flags == 0).nonzero().reshape(-1).tolist()  # ranks whose loss is NaN/inf
            if bad:
                if cfg.nonfinite == "error":
                    raise NonFiniteLossError(
                        f"non-finite pre-training loss at epoch {epoch} step {step} (global {global_step}) on "
                        f"rank(s) {bad} (this is rank {w.rank}, loss {float(loss):.4g}); this rank's batch: users "
                        f"{batch.user[:8].tolist()}... of domain {data.names[dom]}, rows {rows[:8].tolist()}...; "
                        f"non-finite parameters: {nonfinite_parameters(module)}; set nonfinite=skip to skip")
                skipped += 1
                log.warning("skipped a non-finite loss at global step %d (%d so far)", global_step, skipped)
            else:
                engine.backward(loss)
                engine.step()
            timers["step"] += time.perf_counter() - t0
            global_step += 1
            steps_run += 1
            terms = all_reduce_mean({k: float(v.detach()) for k, v in out.items()})
            if not bad:  # a skipped step counts in skipped_nonfinite, not in the epoch's mean losses
                counted += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
            gnorm = engine.get_global_grad_norm()
            rz.scalars({**{f"train/{k}": v for k, v in terms.items()}, "train/lr": engine.get_lr()[0],
                        "train/grad_norm": float(gnorm) if gnorm is not None else float("nan"),
                        "train/seq_per_s": g / max(time.perf_counter() - t0, 1e-9)}, global_step)
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.4f}", epoch=epoch)
            if cfg.checkpoint_every > 0 and global_step % cfg.checkpoint_every == 0 and step + 1 < steps:
                faults.maybe_limit_writes(global_step, w.rank)
                t0 = time.perf_counter()
                checkpoint.save(engine, rz, global_step, client_state(epoch, step + 1), cfg.keep_checkpoints)
                timers["checkpoint"] += time.perf_counter() - t0
            t_data = time.perf_counter()
        n = max(1, counted)
        history.append({"epoch": epoch, **{k: v / n for k, v in sums.items()}})
        log.info("epoch %d: %s", epoch, {k: round(v / n, 5) for k, v in sums.items()})
        epoch, start_step = epoch + 1, 0
        t0 = time.perf_counter()
        faults.maybe_limit_writes(global_step, w.rank)
        checkpoint.save(engine, rz, global_step, client_state(epoch, 0), cfg.keep_checkpoints)
        timers["checkpoint"] += time.perf_counter() - t0
    bar.close()
    trace.close()
    wall = time.perf_counter() - t_run
    busy = max(sum(timers.values()), 1e-9)
    summary = {
        "world_size": w.size, "global_batch": g, "zero_stage": zero_stage(ds_cfg), "bf16": bf16_enabled(ds_cfg),
        "epochs": cfg.epochs, "global_step": global_step, "steps_this_run": steps_run, "skipped_nonfinite": skipped,
        "history": history, "wall_seconds": round(wall, 2),
        "seq_per_second": round(steps_run * g / max(timers["step"] + timers["data"], 1e-9), 1),
        "time_seconds": {k: round(v, 3) for k, v in timers.items()},
        "time_share": {k: round(v / busy, 4) for k, v in timers.items()},
        "final_checkpoint": checkpoint.tag_for(global_step),
    }
    rz.write_json("metrics.json", summary)
    rz.close()
    shutdown()
    return summary

"""Multi-domain, ID-agnostic pre-training of MISSRec with DeepSpeed (ZeRO-1/2/3, bf16), on any number of
ranks and nodes, resumable to the same final parameters.

Per epoch: interest discovery sharded over the ranks into the epoch's index files
(:mod:`missrec.train.pretrain_mid`), then the steps of the epoch plan, each rank streaming only its share of
the shards (:class:`missrec.data.pretrain_stream.PretrainData`; batches assembled in DataLoader workers with
the feature rows and interests they use). Per step: the batch moves to the step's device
(:func:`missrec.train.placement.place`), the contrastive losses use negatives gathered from every rank
(gradients flow back to their owners), ``engine.backward`` (DeepSpeed averages gradients over ranks),
``engine.step``. The step has no host sync: losses add up on the device and are read, averaged over ranks and
checked for NaN/inf every ``log_every`` steps (``nonfinite="skip"`` checks each step instead). Dropout is
reseeded from (seed, global step, rank) at every step and the data stream is a function of (seed, epoch), so a
run resumed from a checkpoint replays exactly what an uninterrupted run does.

Launched by ``launcher/pretrain.py``; see ``cluster_configs/README.md`` for multi-node commands.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from missrec.config import PretrainConfig, to_dict
from missrec.data.pretrain_batch import PretrainBatch
from missrec.data.pretrain_stream import PretrainData
from missrec.errors import ConfigError
from missrec.train import checkpoint
from missrec.train.dist import all_gather_nograd, gather_with_grad, init_distributed, is_distributed, shutdown
from missrec.train.engine import bf16_enabled, deepspeed_config, init_engine, read_ds_config, zero_stage
from missrec.train.faults import StepHooks, hooks_from_env
from missrec.train.loop import NonFiniteLossError, nonfinite_parameters
from missrec.train.placement import pin_batches, place
from missrec.train.rank_zero import RankZero
from missrec.train.trace import SampleTrace

log = logging.getLogger(__name__)

TERMS = ("loss", "seq_item", "seq_seq", "interest_reg")
INTERESTS = "interests"


def _step_seed(seed: int, global_step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, global_step, rank]).generate_state(1)[0])


def step_terms(engine: Any, batch: PretrainBatch, device: torch.device, seq_seq_weight: float
               ) -> dict[str, torch.Tensor]:
    """A pre-training step's loss terms: the batch (assembled on the host) moved to ``device``, the forward
    pass of ``engine`` (a DeepSpeed engine, or the model itself) there, negatives gathered across ranks."""
    return engine(place(batch, device), objective="pretrain", seq_seq_weight=seq_seq_weight,
                  gather=gather_with_grad)


def check_config(cfg: PretrainConfig) -> None:
    if cfg.nonfinite not in ("error", "skip"):
        raise ConfigError(f"nonfinite must be 'error' or 'skip', got {cfg.nonfinite!r}")
    if not cfg.missrec.use_interests:
        raise ConfigError("missrec.use_interests=false is a fine-tuning ablation; pre-training discovers interests")
    if cfg.missrec.mode != "inductive":
        raise ConfigError("pre-training is ID-agnostic: missrec.mode must be inductive (item IDs are per domain)")
    if cfg.log_every < 1:
        raise ConfigError(f"log_every must be >= 1, got {cfg.log_every}")


@dataclass
class Sums:
    """Loss terms added up on the device (no host sync until read)."""

    device: torch.device
    total: torch.Tensor = field(init=False)
    count: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total = torch.zeros(len(TERMS), dtype=torch.float64, device=self.device)
        self.count = torch.zeros((), dtype=torch.float64, device=self.device)

    def add(self, out: dict[str, torch.Tensor], weight: torch.Tensor | float = 1.0) -> None:
        self.total += torch.stack([out[k].detach().double() for k in TERMS]) * weight
        self.count += weight

    def read(self) -> dict[str, float]:
        """Means over the steps added here and over the ranks (a host sync)."""
        both = torch.cat([self.total, self.count.reshape(1)])
        if is_distributed():
            torch.distributed.all_reduce(both)
        vals = both.tolist()
        n = max(vals[-1], 1e-12)
        return {k: v / n for k, v in zip(TERMS, vals[:-1])}


class NonFiniteWatch:
    """The first global step whose loss was NaN/inf on this rank, kept on the device; read at syncs."""

    def __init__(self, device: torch.device) -> None:
        self.first = torch.full((), -1, dtype=torch.int64, device=device)
        self.recent: collections.deque = collections.deque(maxlen=256)  # (global step, description) on the host

    def observe(self, loss: torch.Tensor, global_step: int, describe: str) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first = torch.where(bad & (self.first < 0), torch.full_like(self.first, global_step), self.first)
        self.recent.append((global_step, describe))

    def check(self, rank: int, module: torch.nn.Module, epoch: int, steps_per_epoch: int) -> None:
        """Raise :class:`NonFiniteLossError` naming the first bad step and the ranks where it was bad."""
        firsts = all_gather_nograd(self.first.reshape(1)).tolist()  # [world]
        bad = [s for s in firsts if s >= 0]
        if not bad:
            return
        step = min(bad)
        ranks = [r for r, s in enumerate(firsts) if s == step]
        mine = next((d for s, d in self.recent if s == step), "not recorded") if rank in ranks else "finite here"
        raise NonFiniteLossError(
            f"non-finite pre-training loss at epoch {step // steps_per_epoch} step {step % steps_per_epoch} (global "
            f"{step}) on rank(s) {ranks} (this is rank {rank}); this rank's batch: {mine}; the step was applied "
            f"(checked every log_every steps), non-finite parameters now: {nonfinite_parameters(module)}; set "
            "nonfinite=skip to check each step and skip such steps")


def run_pretrain(cfg: PretrainConfig, resume: bool = False, hooks: StepHooks | None = None) -> dict[str, Any]:
    """Pre-train on the domains of ``cfg.data``; returns (and writes to ``RUN/metrics.json``) the summary."""
    check_config(cfg)
    from missrec.models.build import missrec_from_config
    from missrec.train.pretrain_mid import discover_epoch_interests

    hooks = hooks or hooks_from_env()
    w = init_distributed(standalone=True)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ds_source = str(cfg.deepspeed_config)
    ds_cfg = deepspeed_config(read_ds_config(ds_source), cfg, w.size, ds_source)
    data = PretrainData(cfg.data, cfg.features, cfg.domain_weights, batch_size=cfg.batch_size, world_size=w.size,
                        rank=w.rank, streams=cfg.streams, seed=cfg.seed, max_len=cfg.max_len,
                        drop_prob=cfg.drop_prob, num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer,
                        skip_bad_shards=cfg.skip_bad_shards)
    torch.manual_seed(cfg.seed)  # identical initial parameters on every rank
    # the history offset is a fine-tuning term (pre-training scores in-batch candidates): none here
    model = missrec_from_config(replace(cfg.missrec, history_bias=False), data.num_items, None, cfg.max_len,
                                cfg.seed, feature_dims=data.store.dims)
    model.set_trainable("all")
    run_dir = Path(cfg.output_dir)
    rz = RankZero(run_dir, rank=w.rank)
    g = data.global_batch
    steps = data.steps_per_epoch()
    if cfg.max_steps_per_epoch > 0:
        steps = min(steps, cfg.max_steps_per_epoch)
    rz.record_start(to_dict(cfg), extra={
        "world_size": w.size, "backend": w.backend, "global_batch": g, "steps_per_epoch": steps,
        "streams": data.spec.total_streams, "deepspeed_config": ds_source, "domains": data.names,
        "num_items": data.num_items, "feature_table_bytes": data.store.nbytes,
    })
    rz.write_json("ds_config.json", ds_cfg)
    engine = init_engine(model, ds_cfg)
    module = engine.module
    device = torch.device(engine.device)
    log.info("world size %d (%s), global batch %d = %d per rank x %d, %d steps per epoch, ZeRO-%d, bf16=%s, "
             "step device %s", w.size, w.backend or "single process", g, cfg.batch_size, w.size, steps,
             zero_stage(ds_cfg), bf16_enabled(ds_cfg), device)

    epoch, start_step, global_step, history = 0, 0, 0, []
    index_dir: Path | None = None
    if resume:
        from missrec.train.dist import broadcast_object

        tag = broadcast_object(checkpoint.latest_tag(run_dir))
        if tag is None:
            log.info("--resume: no complete checkpoint in %s, starting from scratch", run_dir)
        else:
            tag, client = checkpoint.load(engine, run_dir, tag)
            epoch, start_step = int(client["epoch"]), int(client["step_in_epoch"])
            global_step, history = int(client["global_step"]), list(client.get("history", []))
            if int(client.get("global_batch", g)) != g or int(client.get("streams", data.spec.total_streams)) != \
                    data.spec.total_streams:
                log.warning("resuming with global batch %d and %d streams, the checkpoint had %s and %s: the data "
                            "order differs from the interrupted run's", g, data.spec.total_streams,
                            client.get("global_batch"), client.get("streams"))
            if start_step > 0:  # mid-epoch: that epoch's interests, not rediscovered
                index_dir = run_dir / str(client["interest_dir"])
                if not index_dir.is_dir():
                    raise FileNotFoundError(f"{index_dir}: the interest index of checkpoint {tag} is missing")
            log.info("resumed from %s: epoch %d, step %d (global step %d)", tag, epoch, start_step, global_step)

    def client_state(ep: int, step_in_epoch: int) -> dict[str, Any]:
        return {"epoch": ep, "step_in_epoch": step_in_epoch, "global_step": global_step, "history": history,
                "interest_dir": str(index_dir.relative_to(run_dir)) if index_dir is not None else "",
                "world_size": w.size, "global_batch": g, "streams": data.spec.total_streams}

    trace = SampleTrace(run_dir, w.rank, global_step, cfg.trace_samples)
    timers = {"mid": 0.0, "data": 0.0, "step": 0.0, "checkpoint": 0.0}
    skipped, steps_run = 0, 0
    interval, epoch_sums = Sums(device), Sums(device)
    watch = NonFiniteWatch(device)
    bar = tqdm(total=steps * cfg.epochs, initial=epoch * steps + start_step, desc="pre-train", unit="step",
               disable=not (cfg.progress and w.is_zero), dynamic_ncols=True)
    t_run = t_interval = time.perf_counter()
    while epoch < cfg.epochs:
        if index_dir is None:
            t0 = time.perf_counter()
            index_dir = run_dir / INTERESTS / f"epoch{epoch:04d}"
            stats, sizes = discover_epoch_interests(module, data.store, module.interest_cfg, index_dir, w.rank,
                                                    w.size, device)
            timers["mid"] += time.perf_counter() - t0
            rz.scalars({f"mid/{k}": v for k, v in stats.items()}, global_step)
            rz.histogram("mid/cluster_size", sizes, global_step)
            if w.is_zero:
                from missrec.interests.tables import remove_older

                remove_older(run_dir / INTERESTS, keep=[index_dir])
            log.info("epoch %d: MID %d tokens -> %d interests in %.1fs", epoch, int(stats["tokens"]),
                     int(stats["clusters"]), stats["seconds"])
        epoch_sums.reset()
        module.train()
        t_data = time.perf_counter()
        for batch in data.loader(epoch, index_dir, start_step, steps, pin_memory=pin_batches(device),
                                 prefetch=cfg.prefetch):
            step = batch.step
            timers["data"] += time.perf_counter() - t_data
            hooks.before_step(global_step, w.rank)
            trace.step(epoch, global_step, step, batch.domain, batch.rows.numpy(), batch.passes.numpy())
            t0 = time.perf_counter()
            describe = (f"users {batch.user_key[:8].tolist()}... of domain {data.names[batch.domain]}, rows "
                        f"{batch.rows[:8].tolist()}...") if cfg.nonfinite == "error" else ""
            torch.manual_seed(_step_seed(cfg.seed, global_step, w.rank))
            out = step_terms(engine, batch, device, cfg.seq_seq_weight)
            out["loss"] = hooks.loss(out["loss"], global_step, w.rank)
            if cfg.nonfinite == "skip":  # one host sync per step: all ranks skip a bad step together
                finite = all_gather_nograd(torch.isfinite(out["loss"].detach()).reshape(1))
                if not bool(finite.all()):
                    skipped += 1
                    log.warning("skipped a non-finite loss at global step %d (%d so far)", global_step, skipped)
                else:
                    engine.backward(out["loss"])
                    engine.step()
                    interval.add(out)
                    epoch_sums.add(out)
            else:
                watch.observe(out["loss"], global_step, describe)
                engine.backward(out["loss"])
                engine.step()
                interval.add(out)
                epoch_sums.add(out)
            timers["step"] += time.perf_counter() - t0
            global_step += 1
            steps_run += 1
            bar.update(1)
            last = step + 1 == steps
            if global_step % cfg.log_every == 0 or last:
                watch.check(w.rank, module, epoch, steps)
                terms = interval.read()
                elapsed = time.perf_counter() - t_interval
                gnorm = engine.get_global_grad_norm()
                rz.scalars({**{f"train/{k}": v for k, v in terms.items()}, "train/lr": engine.get_lr()[0],
                            "train/grad_norm": float(gnorm) if gnorm is not None else float("nan"),
                            "train/seq_per_s": cfg.log_every * g / max(elapsed, 1e-9)}, global_step)
                bar.set_postfix(loss=f"{terms['loss']:.4f}", epoch=epoch)
                interval.reset()
                t_interval = time.perf_counter()
            if cfg.checkpoint_every > 0 and global_step % cfg.checkpoint_every == 0 and not last:
                watch.check(w.rank, module, epoch, steps)
                t0 = time.perf_counter()
                hooks.before_save(global_step, w.rank)
                checkpoint.save(engine, rz, global_step, client_state(epoch, step + 1), cfg.keep_checkpoints)
                timers["checkpoint"] += time.perf_counter() - t0
            t_data = time.perf_counter()
        watch.check(w.rank, module, epoch, steps)
        means = epoch_sums.read()
        history.append({"epoch": epoch, **means})
        log.info("epoch %d: %s", epoch, {k: round(v, 5) for k, v in means.items()})
        epoch, start_step, index_dir = epoch + 1, 0, None
        t0 = time.perf_counter()
        hooks.before_save(global_step, w.rank)
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

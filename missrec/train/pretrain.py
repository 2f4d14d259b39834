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
from missrec.errors import ConfigError, MissingInputError
from missrec.interests.tables import remove_older
from missrec.models.build import missrec_from_config
from missrec.train import checkpoint
from missrec.train.dist import (
    all_gather_nograd,
    broadcast_object,
    gather_with_grad,
    init_distributed,
    is_distributed,
    shutdown,
)
from missrec.train.engine import bf16_enabled, deepspeed_config, init_engine, read_ds_config, zero_stage
from missrec.train.faults import StepHooks, hooks_from_env
from missrec.train.loop import NonFiniteLossError, nonfinite_parameters
from missrec.train.placement import pin_batches, place
from missrec.train.pretrain_mid import discover_epoch_interests
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


@dataclass
class _Position:
    """Where the run stands: the epoch, the step within it, the global step, the epoch means so far, and the
    epoch's interest index folder (None until discovered)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    index_dir: Path | None = None


class _Pretraining:
    """One pre-training run on this rank, step by step: :meth:`run` is set-up, resume, then per epoch interest
    discovery, the steps and a checkpoint."""

    def __init__(self, cfg: PretrainConfig, hooks: StepHooks) -> None:
        self.cfg, self.hooks = cfg, hooks
        self.w = w = init_distributed(standalone=True)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.ds_source = str(cfg.deepspeed_config)
        self.ds_cfg = deepspeed_config(read_ds_config(self.ds_source), cfg, w.size, self.ds_source)
        self.data = data = PretrainData(
            cfg.data, cfg.features, cfg.domain_weights, batch_size=cfg.batch_size, world_size=w.size, rank=w.rank,
            streams=cfg.streams, seed=cfg.seed, max_len=cfg.max_len, drop_prob=cfg.drop_prob,
            num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, skip_bad_shards=cfg.skip_bad_shards)
        torch.manual_seed(cfg.seed)  # identical initial parameters on every rank
        # the history offset is a fine-tuning term (pre-training scores in-batch candidates): none here
        model = missrec_from_config(replace(cfg.missrec, history_bias=False), data.num_items, None, cfg.max_len,
                                    cfg.seed, feature_dims=data.store.dims)
        model.set_trainable("all")
        self.run_dir = Path(cfg.output_dir)
        self.rz = RankZero(self.run_dir, rank=w.rank)
        self.g = data.global_batch
        self.steps = data.steps_per_epoch()
        if cfg.max_steps_per_epoch > 0:
            self.steps = min(self.steps, cfg.max_steps_per_epoch)
        self.rz.record_start(to_dict(cfg), extra={
            "world_size": w.size, "backend": w.backend, "global_batch": self.g, "steps_per_epoch": self.steps,
            "streams": data.spec.total_streams, "deepspeed_config": self.ds_source, "domains": data.names,
            "num_items": data.num_items, "feature_table_bytes": data.store.nbytes,
        })
        self.rz.write_json("ds_config.json", self.ds_cfg)
        self.engine = init_engine(model, self.ds_cfg)
        self.module = self.engine.module
        self.device = torch.device(self.engine.device)
        log.info("world size %d (%s), global batch %d = %d per rank x %d, %d steps per epoch, ZeRO-%d, bf16=%s, "
                 "step device %s", w.size, w.backend or "single process", self.g, cfg.batch_size, w.size,
                 self.steps, zero_stage(self.ds_cfg), bf16_enabled(self.ds_cfg), self.device)
        self.pos = _Position()
        self.timers = {"mid": 0.0, "data": 0.0, "step": 0.0, "checkpoint": 0.0}
        self.skipped = self.steps_run = 0
        self.interval, self.epoch_sums = Sums(self.device), Sums(self.device)
        self.watch = NonFiniteWatch(self.device)
        self.t_interval = time.perf_counter()

    # ------------------------------------------------------------------------------ resume and checkpoints
    def resume(self) -> None:
        """Continue from the latest complete checkpoint in the run folder, if there is one."""
        tag = broadcast_object(checkpoint.latest_tag(self.run_dir))
        if tag is None:
            log.info("--resume: no complete checkpoint in %s, starting from scratch", self.run_dir)
            return
        tag, client = checkpoint.load(self.engine, self.run_dir, tag)
        pos, streams = self.pos, self.data.spec.total_streams
        pos.epoch, pos.step_in_epoch = int(client["epoch"]), int(client["step_in_epoch"])
        pos.global_step, pos.history = int(client["global_step"]), list(client.get("history", []))
        if int(client.get("global_batch", self.g)) != self.g or int(client.get("streams", streams)) != streams:
            log.warning("resuming with global batch %d and %d streams, the checkpoint had %s and %s: the data "
                        "order differs from the interrupted run's", self.g, streams, client.get("global_batch"),
                        client.get("streams"))
        if pos.step_in_epoch > 0:  # mid-epoch: that epoch's interests, not rediscovered
            pos.index_dir = self.run_dir / str(client["interest_dir"])
            if not pos.index_dir.is_dir():
                raise MissingInputError(f"{pos.index_dir}: the interest index of checkpoint {tag} is missing")
        log.info("resumed from %s: epoch %d, step %d (global step %d)", tag, pos.epoch, pos.step_in_epoch,
                 pos.global_step)

    def save(self, epoch: int, step_in_epoch: int) -> None:
        """A checkpoint from which the run continues at (``epoch``, ``step_in_epoch``)."""
        pos = self.pos
        t0 = time.perf_counter()
        self.hooks.before_save(pos.global_step, self.w.rank)
        client = {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": pos.global_step,
                  "history": pos.history, "world_size": self.w.size, "global_batch": self.g,
                  "streams": self.data.spec.total_streams,
                  "interest_dir": str(pos.index_dir.relative_to(self.run_dir)) if pos.index_dir is not None else ""}
        checkpoint.save(self.engine, self.rz, pos.global_step, client, self.cfg.keep_checkpoints)
        self.timers["checkpoint"] += time.perf_counter() - t0

    # ------------------------------------------------------------------------------ an epoch
    def discover_interests(self) -> None:
        """The epoch's interests (sharded MID over the ranks) into ``RUN/interests/epochNNNN``."""
        pos = self.pos
        t0 = time.perf_counter()
        pos.index_dir = self.run_dir / INTERESTS / f"epoch{pos.epoch:04d}"
        stats, sizes = discover_epoch_interests(self.module, self.data.store, self.module.interest_cfg,
                                                pos.index_dir, self.w.rank, self.w.size, self.device)
        self.timers["mid"] += time.perf_counter() - t0
        self.rz.scalars({f"mid/{k}": v for k, v in stats.items()}, pos.global_step)
        self.rz.histogram("mid/cluster_size", sizes, pos.global_step)
        if self.w.is_zero:
            remove_older(self.run_dir / INTERESTS, keep=[pos.index_dir])
        log.info("epoch %d: MID %d tokens -> %d interests in %.1fs", pos.epoch, int(stats["tokens"]),
                 int(stats["clusters"]), stats["seconds"])

    def train_step(self, batch: PretrainBatch) -> None:
        """Forward, backward and optimiser step of one batch; the loss terms add up on the device."""
        cfg, pos, engine = self.cfg, self.pos, self.engine
        self.hooks.before_step(pos.global_step, self.w.rank)
        t0 = time.perf_counter()
        describe = (f"users {batch.user_key[:8].tolist()}... of domain {self.data.names[batch.domain]}, rows "
                    f"{batch.rows[:8].tolist()}...") if cfg.nonfinite == "error" else ""
        torch.manual_seed(_step_seed(cfg.seed, pos.global_step, self.w.rank))
        out = step_terms(engine, batch, self.device, cfg.seq_seq_weight)
        out["loss"] = self.hooks.loss(out["loss"], pos.global_step, self.w.rank)
        apply = True
        if cfg.nonfinite == "skip":  # one host sync per step: all ranks skip a bad step together
            apply = bool(all_gather_nograd(torch.isfinite(out["loss"].detach()).reshape(1)).all())
            if not apply:
                self.skipped += 1
                log.warning("skipped a non-finite loss at global step %d (%d so far)", pos.global_step,
                            self.skipped)
        else:
            self.watch.observe(out["loss"], pos.global_step, describe)
        if apply:
            engine.backward(out["loss"])
            engine.step()
            self.interval.add(out)
            self.epoch_sums.add(out)
        self.timers["step"] += time.perf_counter() - t0
        pos.global_step += 1
        self.steps_run += 1

    def log_interval(self, bar: tqdm) -> None:
        """Check for NaN/inf and log the interval's mean loss terms (the only host sync of the steps)."""
        self.watch.check(self.w.rank, self.module, self.pos.epoch, self.steps)
        terms = self.interval.read()
        elapsed = time.perf_counter() - self.t_interval
        gnorm = self.engine.get_global_grad_norm()
        self.rz.scalars({**{f"train/{k}": v for k, v in terms.items()}, "train/lr": self.engine.get_lr()[0],
                         "train/grad_norm": float(gnorm) if gnorm is not None else float("nan"),
                         "train/seq_per_s": self.cfg.log_every * self.g / max(elapsed, 1e-9)}, self.pos.global_step)
        bar.set_postfix(loss=f"{terms['loss']:.4f}", epoch=self.pos.epoch)
        self.interval.reset()
        self.t_interval = time.perf_counter()

    def run_epoch(self, bar: tqdm, trace: SampleTrace) -> None:
        cfg, pos = self.cfg, self.pos
        if pos.index_dir is None:
            self.discover_interests()
        self.epoch_sums.reset()
        self.module.train()
        t_data = time.perf_counter()
        for batch in self.data.loader(pos.epoch, pos.index_dir, pos.step_in_epoch, self.steps,
                                      pin_memory=pin_batches(self.device), prefetch=cfg.prefetch):
            step = batch.step
            self.timers["data"] += time.perf_counter() - t_data
            trace.step(pos.epoch, pos.global_step, step, batch.domain, batch.rows.numpy(), batch.passes.numpy())
            self.train_step(batch)
            bar.update(1)
            last = step + 1 == self.steps
            if pos.global_step % cfg.log_every == 0 or last:
                self.log_interval(bar)
            if cfg.checkpoint_every > 0 and pos.global_step % cfg.checkpoint_every == 0 and not last:
                self.watch.check(self.w.rank, self.module, pos.epoch, self.steps)
                self.save(pos.epoch, step + 1)
            t_data = time.perf_counter()
        self.watch.check(self.w.rank, self.module, pos.epoch, self.steps)
        means = self.epoch_sums.read()
        pos.history.append({"epoch": pos.epoch, **means})
        log.info("epoch %d: %s", pos.epoch, {k: round(v, 5) for k, v in means.items()})
        pos.epoch, pos.step_in_epoch, pos.index_dir = pos.epoch + 1, 0, None
        self.save(pos.epoch, 0)

    # ------------------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        cfg, pos = self.cfg, self.pos
        trace = SampleTrace(self.run_dir, self.w.rank, pos.global_step, cfg.trace_samples)
        bar = tqdm(total=self.steps * cfg.epochs, initial=pos.epoch * self.steps + pos.step_in_epoch,
                   desc="pre-train", unit="step", disable=not (cfg.progress and self.w.is_zero), dynamic_ncols=True)
        t_run = self.t_interval = time.perf_counter()
        while pos.epoch < cfg.epochs:
            self.run_epoch(bar, trace)
        bar.close()
        trace.close()
        return self.summary(time.perf_counter() - t_run)

    def summary(self, wall: float) -> dict[str, Any]:
        timers, busy = self.timers, max(sum(self.timers.values()), 1e-9)
        return {
            "world_size": self.w.size, "global_batch": self.g, "zero_stage": zero_stage(self.ds_cfg),
            "bf16": bf16_enabled(self.ds_cfg), "epochs": self.cfg.epochs, "global_step": self.pos.global_step,
            "steps_this_run": self.steps_run, "skipped_nonfinite": self.skipped, "history": self.pos.history,
            "wall_seconds": round(wall, 2),
            "seq_per_second": round(self.steps_run * self.g / max(timers["step"] + timers["data"], 1e-9), 1),
            "time_seconds": {k: round(v, 3) for k, v in timers.items()},
            "time_share": {k: round(v / busy, 4) for k, v in timers.items()},
            "final_checkpoint": checkpoint.tag_for(self.pos.global_step),
        }


def run_pretrain(cfg: PretrainConfig, resume: bool = False, hooks: StepHooks | None = None) -> dict[str, Any]:
    """Pre-train on the domains of ``cfg.data``; returns (and writes to ``RUN/metrics.json``) the summary.
    ``hooks``: fault injection for tests (default: the environment's, :func:`missrec.train.faults.hooks_from_env`)."""
    check_config(cfg)
    job = _Pretraining(cfg, hooks or hooks_from_env())
    if resume:
        job.resume()
    summary = job.run()
    job.rz.write_json("metrics.json", summary)
    job.rz.close()
    shutdown()
    return summary

"""The single-process training loop: epochs, validation, early stopping, best checkpoint, test.

The loop knows a model only through the small :class:`Recommender` protocol, and data only through
callables that yield :class:`~missrec.data.batching.Batch` objects.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from tqdm.auto import tqdm

from missrec.config import TrainConfig
from missrec.data.batching import Batch
from missrec.errors import ConfigError
from missrec.eval.metrics import DEFAULT_KS, RankingMetrics, scoring
from missrec.models.history import ValidatedAffinity, ValidatedOffset, fit_offset_on_validation
from missrec.train.averaging import WeightAverage
from missrec.train.placement import place, resolve_device
from missrec.train.rank_zero import RankZero

log = logging.getLogger(__name__)


@runtime_checkable
class Recommender(Protocol):
    """What the loop needs of a model (an ``nn.Module``)."""

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Loss terms of a batch; key ``"loss"`` is the total that is minimised."""

    def full_scores(self, batch: Batch) -> torch.Tensor:
        """Scores of every item for each row: [B, num_items]."""


class NonFiniteLossError(RuntimeError):
    """A NaN/inf loss with ``nonfinite="error"``: the message names the step, the batch and the
    parameters that are no longer finite (if any)."""


def _check_finite(first_bad: torch.Tensor, epoch: int, users: dict[int, torch.Tensor], model: nn.Module) -> None:
    """Raise :class:`NonFiniteLossError` when a step of this epoch had a NaN/inf loss (read at the logging
    syncs); ``users``: the first users of the recent steps' batches, by step."""
    step = int(first_bad)
    if step >= 0:
        who = users.get(step)
        raise NonFiniteLossError(
            f"epoch {epoch} step {step}: loss is not finite for the batch of users "
            f"{who.tolist() if who is not None else '(not recorded)'}...; it was seen at the next logging sync, "
            f"after the step was applied; non-finite parameters now: {nonfinite_parameters(model)}; set "
            "train.nonfinite=skip to check each step and skip such steps"
        )


def nonfinite_parameters(model: nn.Module, limit: int = 8) -> str:
    """``"none"``, or the names of (up to ``limit``) parameters holding NaN or inf."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if not bad:
        return "none"
    return ", ".join(bad[:limit]) + (f" and {len(bad) - limit} more" if len(bad) > limit else "")


@dataclass
class FitResult:
    valid: dict[str, float]
    test: dict[str, float]
    best_epoch: int
    epochs_run: int
    seconds: float
    seconds_per_epoch: float
    eval_seconds_per_epoch: float
    skipped_nonfinite: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "test": self.test,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "seconds": round(self.seconds, 2),
            "seconds_per_epoch": round(self.seconds_per_epoch, 3),
            "eval_seconds_per_epoch": round(self.eval_seconds_per_epoch, 3),
            "skipped_nonfinite": self.skipped_nonfinite,
        }


def step_terms(model: nn.Module, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """A fine-tuning step's loss terms: data-dependent shapes decided on the host (``model.prepare``), the batch
    moved to ``device`` (where the model is), the loss computed there without a host sync."""
    prepare = getattr(model, "prepare", None)
    if prepare is not None:
        batch = prepare(batch)
    return model.loss(place(batch, device))


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[Batch], device: torch.device, ks: tuple[int, ...] = DEFAULT_KS,
    ties: str = "index",
) -> dict[str, float]:
    """Full-ranking Recall/NDCG at each cutoff of ``ks`` (default 10, 50) of ``model`` over ``batches``;
    ``ties``: how tied scores rank (:class:`missrec.eval.metrics.RankingMetrics`)."""
    metrics = RankingMetrics(ks, ties)
    with scoring(model):
        for batch in batches:
            batch = place(batch, device)
            metrics.update(model.full_scores(batch), batch.target)
    return metrics.compute()


def fit(
    model: nn.Module,
    train_batches: Callable[[int], Iterable[Batch]],
    eval_batches: Callable[[str], Iterable[Batch]],
    cfg: TrainConfig,
    out: RankZero,
    steps_per_epoch: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> FitResult:
    """Train with early stopping on validation NDCG@10, then test the best checkpoint.

    ``train_batches(epoch)`` yields the epoch's training batches; ``eval_batches(split)`` yields the
    ``"valid"`` or ``"test"`` batches. The best state is kept in memory and saved as ``best.pt``.
    """
    device = resolve_device(cfg.device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if not 0.0 < cfg.lr_decay <= 1.0 or cfg.lr_decay_patience < 1:
        raise ConfigError(f"train.lr_decay must be in (0, 1] and train.lr_decay_patience >= 1, got "
                          f"{cfg.lr_decay} and {cfg.lr_decay_patience}")
    plateau = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.lr_decay, patience=cfg.lr_decay_patience - 1,
            threshold=0.0, min_lr=cfg.lr_min,
        ) if cfg.lr_decay < 1.0 else None
    )
    if not 0.0 <= cfg.ema < 1.0:
        raise ConfigError(f"train.ema must be in [0, 1) (0 = off), got {cfg.ema}")
    average = WeightAverage(params, cfg.ema) if cfg.ema > 0 else None
    n_trainable = sum(p.numel() for p in params)
    log.info("training on %s: %d trainable parameters, batch %d", device, n_trainable, cfg.batch_size)

    grid = model.offset_grid() if isinstance(model, ValidatedOffset) else None
    weights = (model.affinity_grid() if isinstance(model, ValidatedAffinity) else None) or (0.0,)
    best_score, best_epoch, best_state, best_valid = -math.inf, -1, None, {}
    bad_epochs, skipped, global_step = 0, 0, 0
    t_start = time.perf_counter()
    train_time, eval_time, history = 0.0, 0.0, []
    epoch = 0
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        epoch_lr = optimizer.param_groups[0]["lr"]
        model.train()
        hook = getattr(model, "begin_epoch", None)
        if hook is not None:
            for k, v in (hook(epoch) or {}).items():
                out.scalars({f"interests/{k}": v}, global_step)
        total = torch.zeros((), dtype=torch.float64, device=device)  # the epoch's loss, added up on the device
        count, seqs = 0, 0
        first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite step ("error")
        recent_users: dict[int, torch.Tensor] = {}
        bar = tqdm(
            train_batches(epoch), total=steps_per_epoch, desc=f"epoch {epoch}", leave=False,
            disable=None if cfg.progress else True, unit="batch",  # None: no bar when not a terminal
        )
        for step, batch in enumerate(bar):
            if cfg.max_steps_per_epoch and step >= cfg.max_steps_per_epoch:
                break
            recent_users[step] = batch.user[:8]  # on the host: named if this step's loss is not finite
            recent_users.pop(step - 64, None)
            terms = step_terms(model, batch, device)
            loss = terms["loss"]
            if cfg.nonfinite == "skip" and not torch.isfinite(loss):  # a host sync per step, asked for
                skipped += 1
                log.warning("epoch %d step %d: non-finite loss skipped (%d so far)", epoch, step, skipped)
                optimizer.zero_grad(set_to_none=True)
                continue
            if cfg.nonfinite == "error":
                bad = ~torch.isfinite(loss.detach())
                first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                gnorm = None
            optimizer.step()
            if average is not None:
                average.update()
            global_step += 1
            total += loss.detach().double()
            count += 1
            seqs += len(batch)
            if global_step % 20 == 0:  # the logging interval: the only host syncs of the loop
                _check_finite(first_bad, epoch, recent_users, model)
                vals = {f"train/{k}": float(v.detach()) for k, v in terms.items()}
                vals["train/lr"] = optimizer.param_groups[0]["lr"]
                if gnorm is not None:
                    vals["train/grad_norm"] = float(gnorm)
                out.scalars(vals, global_step)
                bar.set_postfix(loss=f"{float(total) / count:.4f}")
        _check_finite(first_bad, epoch, recent_users, model)
        total = float(total)
        bar.close()
        epoch_train = time.perf_counter() - t0
        train_time += epoch_train
        out.scalars({"train/epoch_loss": total / max(count, 1), "train/seq_per_s": seqs / epoch_train}, epoch)

        if (epoch + 1) % cfg.eval_every and epoch + 1 != cfg.epochs:
            continue
        t1 = time.perf_counter()
        with average.swapped_in(model) if average is not None else contextlib.nullcontext():
            if grid:  # the history offset (and affinity) is chosen here, on the selection metric, kept with the state
                extra, valid = fit_offset_on_validation(model, eval_batches("valid"), device, grid, weights=weights)
            else:
                valid, extra = evaluate(model, eval_batches("valid"), device), {}
            improved = valid["ndcg@10"] > best_score
            if improved:  # keep the weights that were validated: the averaged ones with train.ema
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            # the state just validated, on the test split: a diagnostic trace, never a selection signal
            traced = evaluate(model, eval_batches("test"), device) if cfg.trace_test else {}
        eval_time += time.perf_counter() - t1
        shown = {**valid, **extra}  # the validation metrics and, when chosen there, the history offset
        out.scalars({f"valid/{k}": v for k, v in shown.items()}, epoch)
        if traced:
            out.scalars({f"trace_test/{k}": v for k, v in traced.items()}, epoch)
        history.append({"epoch": epoch, "loss": total / max(count, 1), **shown,
                        **{f"test_{k}": v for k, v in traced.items()}, "train_s": epoch_train, "lr": epoch_lr})
        log.info(
            "epoch %d: loss %.4f, %.1fs (%.0f seq/s), valid %s",
            epoch, total / max(count, 1), epoch_train, seqs / epoch_train,
            " ".join(f"{k}={v:.4f}" for k, v in shown.items()),
        )
        if plateau is not None:
            lr_before = optimizer.param_groups[0]["lr"]
            plateau.step(valid["ndcg@10"])
            if optimizer.param_groups[0]["lr"] < lr_before:
                log.info("epoch %d: no better validation NDCG@10 for %d evaluations: lr %.3g -> %.3g",
                         epoch, cfg.lr_decay_patience, lr_before, optimizer.param_groups[0]["lr"])
        if improved:
            best_score, best_epoch, best_valid = valid["ndcg@10"], epoch, valid
            bad_epochs = 0
            out.save("best.pt", {"model": best_state, "epoch": epoch, "valid": valid})
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                log.info("early stop at epoch %d (best %d)", epoch, best_epoch)
                break
    epochs_run = epoch + 1
    if best_state is not None:
        model.load_state_dict(best_state)
    test = evaluate(model, eval_batches("test"), device)
    out.scalars({f"test/{k}": v for k, v in test.items()}, best_epoch)
    seconds = time.perf_counter() - t_start
    return FitResult(
        valid=best_valid, test=test, best_epoch=best_epoch, epochs_run=epochs_run, seconds=seconds,
        seconds_per_epoch=train_time / max(epochs_run, 1), eval_seconds_per_epoch=eval_time / max(epochs_run, 1),
        skipped_nonfinite=skipped, history=history,
    )

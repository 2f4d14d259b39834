"""The single-process training loop: epochs, validation, early stopping, best checkpoint, test.

The loop knows a model only through the small :class:`Recommender` protocol, and data only through
callables that yield :class:`~missrec.data.batching.Batch` objects.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from tqdm.auto import tqdm

from missrec.config import TrainConfig
from missrec.data.batching import Batch
from missrec.errors import MISSRecError
from missrec.eval.metrics import DEFAULT_KS, RankingMetrics, scoring
from missrec.eval.policy import ScoringPolicy, fit_policy
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


class NonFiniteLossError(MISSRecError, RuntimeError):
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
    policy: ScoringPolicy = field(default_factory=ScoringPolicy)

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
            "policy": self.policy.to_dict(),
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
    ties: str = "index", policy: ScoringPolicy | None = None,
) -> dict[str, float]:
    """Full-ranking Recall/NDCG at each cutoff of ``ks`` (default 10, 50) of ``model`` over ``batches``, ranked with
    ``policy`` (default the model's own scores); ``ties``: how tied scores rank (:class:`RankingMetrics`)."""
    policy = policy or ScoringPolicy()
    metrics = RankingMetrics(ks, ties)
    with scoring(model):
        for batch in batches:
            batch = place(batch, device)
            metrics.update(policy.scores(model, batch), batch.target)
    return metrics.compute()


@dataclass
class _EpochStats:
    loss: float
    steps: int
    seqs: int
    seconds: float
    skipped: int
    global_step: int


def train_epoch(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer,
                params: list[torch.Tensor], cfg: TrainConfig, out: RankZero, device: torch.device, epoch: int,
                global_step: int, steps_per_epoch: int | None) -> _EpochStats:
    """One epoch of steps. No host sync in a step: the loss adds up on the device and is read, and checked for
    NaN/inf, every 20 steps (``nonfinite="skip"`` checks every step instead)."""
    t0 = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64, device=device)  # the epoch's loss, added up on the device
    count, seqs, skipped = 0, 0, 0
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite step ("error")
    recent_users: dict[int, torch.Tensor] = {}
    bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}", leave=False,
               disable=None if cfg.progress else True, unit="batch")  # None: no bar when not a terminal
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
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
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
    bar.close()
    _check_finite(first_bad, epoch, recent_users, model)
    return _EpochStats(float(total) / max(count, 1), count, seqs, time.perf_counter() - t0, skipped, global_step)


def validate(model: nn.Module, batches: Iterable[Batch], device: torch.device,
             grid: tuple[Sequence[float], Sequence[float]] | None) -> tuple[dict[str, float], ScoringPolicy]:
    """Validation metrics, and the scoring policy they were measured with: chosen here from ``grid`` (offsets,
    affinity weights) on the selection metric, or the model's own ranking without a grid."""
    if grid is None:
        return evaluate(model, batches, device), ScoringPolicy()
    policy, valid = fit_policy(model, batches, device, grid[0], grid[1])
    return valid, policy


def fit(
    model: nn.Module,
    train_batches: Callable[[int], Iterable[Batch]],
    eval_batches: Callable[[str], Iterable[Batch]],
    cfg: TrainConfig,
    out: RankZero,
    steps_per_epoch: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    grid: tuple[Sequence[float], Sequence[float]] | None = None,
) -> FitResult:
    """Train with early stopping on validation NDCG@10, then test the best checkpoint with its scoring policy.

    ``train_batches(epoch)`` yields the epoch's training batches; ``eval_batches(split)`` yields the
    ``"valid"`` or ``"test"`` batches. ``grid`` (offsets, affinity weights): the history terms chosen at each
    validation (:func:`missrec.eval.policy.fit_policy`); None: the model's own ranking. The best state and its
    policy are kept in memory and saved as ``best.pt``.
    """
    device = resolve_device(cfg.device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    log.info("training on %s: %d trainable parameters, batch %d", device, sum(p.numel() for p in params),
             cfg.batch_size)
    best_score, best_epoch, best_state, best_valid, best_policy = -math.inf, -1, None, {}, ScoringPolicy()
    bad_epochs, skipped, global_step = 0, 0, 0
    t_start = time.perf_counter()
    train_time, eval_time, history = 0.0, 0.0, []
    epoch = 0
    for epoch in range(cfg.epochs):
        model.train()
        hook = getattr(model, "begin_epoch", None)
        for k, v in ((hook(epoch) or {}) if hook is not None else {}).items():
            out.scalars({f"interests/{k}": v}, global_step)
        st = train_epoch(model, train_batches(epoch), optimizer, params, cfg, out, device, epoch, global_step,
                         steps_per_epoch)
        global_step, skipped, train_time = st.global_step, skipped + st.skipped, train_time + st.seconds
        out.scalars({"train/epoch_loss": st.loss, "train/seq_per_s": st.seqs / st.seconds}, epoch)
        if (epoch + 1) % cfg.eval_every and epoch + 1 != cfg.epochs:
            continue
        t1 = time.perf_counter()
        valid, policy = validate(model, eval_batches("valid"), device, grid)
        eval_time += time.perf_counter() - t1
        shown = {**valid, **(policy.to_dict() if grid else {})}
        out.scalars({f"valid/{k}": v for k, v in shown.items()}, epoch)
        history.append({"epoch": epoch, "loss": st.loss, **shown, "train_s": st.seconds})
        log.info("epoch %d: loss %.4f, %.1fs (%.0f seq/s), valid %s", epoch, st.loss, st.seconds,
                 st.seqs / st.seconds, " ".join(f"{k}={v:.4f}" for k, v in shown.items()))
        if valid["ndcg@10"] > best_score:
            best_score, best_epoch, best_valid, best_policy = valid["ndcg@10"], epoch, valid, policy
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            bad_epochs = 0
            out.save("best.pt", {"model": best_state, "epoch": epoch, "valid": valid, "policy": policy.to_dict()})
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                log.info("early stop at epoch %d (best %d)", epoch, best_epoch)
                break
    epochs_run = epoch + 1
    if best_state is not None:
        model.load_state_dict(best_state)
    test = evaluate(model, eval_batches("test"), device, policy=best_policy)
    out.scalars({f"test/{k}": v for k, v in test.items()}, best_epoch)
    return FitResult(
        valid=best_valid, test=test, best_epoch=best_epoch, epochs_run=epochs_run,
        seconds=time.perf_counter() - t_start, seconds_per_epoch=train_time / max(epochs_run, 1),
        eval_seconds_per_epoch=eval_time / max(epochs_run, 1), skipped_nonfinite=skipped, history=history,
        policy=best_policy,
    )

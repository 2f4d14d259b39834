"""Fault-injection hooks of the pre-training loop, for the robustness tests (docs/robustness.md).

The loop calls a :class:`StepHooks` object, which does nothing unless a fault is asked for. Each fault is an
environment variable ``STEP[:RANK[:MODE]]`` (RANK defaults to 0) that does nothing
unless set, and acts on that rank at that global step only:

- ``MISSREC_FAULT_SIGKILL_STEP``: SIGKILL the rank before the step;
- ``MISSREC_FAULT_NAN_STEP``: make the rank's loss NaN at the step;
- ``MISSREC_FAULT_SAVE`` (MODE ``diskfull`` or ``die``): just before the checkpoint save after the
  step, limit the rank's file size (``RLIMIT_FSIZE``, 4 KiB): ``diskfull`` makes the checkpoint's writes
  fail with an OSError as a full disk does, ``die`` lets the kernel kill the rank (SIGXFSZ) mid-write.
"""

from __future__ import annotations

import logging
import os
import signal

import torch

log = logging.getLogger(__name__)

FAULT_ENV = "MISSREC_FAULT_SIGKILL_STEP"
NAN_FAULT_ENV = "MISSREC_FAULT_NAN_STEP"
SAVE_FAULT_ENV = "MISSREC_FAULT_SAVE"


def _due(env: str, global_step: int, rank: int) -> str | None:
    """The hook's MODE ('' when it has none) when ``env`` names this step and rank, else None."""
    spec = os.environ.get(env, "")
    if not spec:
        return None
    step, _, rest = spec.partition(":")
    who, _, mode = rest.partition(":")
    return mode if int(step) == global_step and int(who or 0) == rank else None


class StepHooks:
    """What the pre-training loop calls around a step; these do nothing. Tests (and the robustness suite) install
    :class:`EnvFaults` to inject faults."""

    def before_step(self, global_step: int, rank: int) -> None:
        pass

    def loss(self, loss: torch.Tensor, global_step: int, rank: int) -> torch.Tensor:
        return loss

    def before_save(self, global_step: int, rank: int) -> None:
        pass


class EnvFaults(StepHooks):
    """The faults the environment variables above ask for (a subprocess run cannot be handed an object)."""

    def before_step(self, global_step: int, rank: int) -> None:
        if _due(FAULT_ENV, global_step, rank) is not None:
            log.warning("fault injection: SIGKILL on rank %d before global step %d", rank, global_step)
            os.kill(os.getpid(), signal.SIGKILL)

    def loss(self, loss: torch.Tensor, global_step: int, rank: int) -> torch.Tensor:
        if _due(NAN_FAULT_ENV, global_step, rank) is None:
            return loss
        log.warning("fault injection: NaN loss on rank %d at global step %d", rank, global_step)
        return loss * float("nan")

    def before_save(self, global_step: int, rank: int) -> None:
        mode = _due(SAVE_FAULT_ENV, global_step, rank)
        if mode is None:
            return
        if mode not in ("diskfull", "die"):
            raise ValueError(f"{SAVE_FAULT_ENV}: mode must be diskfull or die, got {mode!r}")
        import resource

        log.warning("fault injection: %s while rank %d writes the checkpoint of global step %d", mode, rank,
                    global_step)
        # Python starts with SIGXFSZ ignored (writes past the limit fail with EFBIG); "die" restores the
        # kernel's default action, which kills the process in the middle of the write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN if mode == "diskfull" else signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def hooks_from_env() -> StepHooks:
    """:class:`EnvFaults` when one of the fault variables is set, else the no-op hooks."""
    return EnvFaults() if any(os.environ.get(v) for v in (FAULT_ENV, NAN_FAULT_ENV, SAVE_FAULT_ENV)) else StepHooks()

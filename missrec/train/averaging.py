"""Exponential moving average (EMA) of a model's trainable weights, for validation and the best checkpoint.

The optimiser keeps training the live weights; after every step the average moves towards them. At
validation time :meth:`WeightAverage.swapped_in` puts the averaged weights into the model, lets a model
whose derived state depends on its weights rebuild it (MISSRec rebuilds its interest index from the
averaged adapters through ``weights_changed()``), and afterwards restores the live weights and
buffers exactly. On small, noisy datasets (dropout 0.5, a few thousand users) the average generalises
better than the last step's weights: see docs/results.md.

Usage::

    avg = WeightAverage(params, decay=0.99)
    ...; optimizer.step(); avg.update()
    with avg.swapped_in(model):
        valid = evaluate(model, ...)
        state = model.state_dict()   # the averaged weights + the interest index built from them
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """EMA ``w_avg <- d * w_avg + (1 - d) * w`` of ``params`` after each :meth:`update`.

    ``d = min(decay, (1 + t) / (10 + t))`` at update ``t`` (t = 0, 1, ...), so the first steps do not
    drag the average towards the random initialisation (the warm-up of TensorFlow's EMA)."""

    def __init__(self, params: Sequence[nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().clone() for p in self.params]

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the live weights (call after each optimiser step)."""
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], weight)
        self.updates += 1

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Inside the block ``model`` holds the averaged weights (and whatever ``weights_changed()``
        rebuilt from them); on exit every parameter and buffer is restored as it was."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        hook = getattr(model, "weights_changed", None)
        if hook is not None:
            hook()
        try:
            yield
        finally:
            model.load_state_dict(live)

"""Compute ceiling and achieved FLOP/s: the dense float32 matmul rate of this machine, and the rate a
training step reaches (its forward + backward FLOPs divided by its measured time).

FLOPs of a step come from :class:`torch.utils.flop_counter.FlopCounterMode` (matmul-type ops: mm, bmm,
addmm, attention), and for SASRec also from the closed form :func:`sasrec_step_flops`, which the
counter matches exactly (tested). Element-wise work (LayerNorm, softmax, dropout, GELU, the optimizer)
is not counted, so the fraction of the ceiling is a lower bound on how busy the cores are.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from missrec.data.batching import Batch


def _sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant figures (a tiny model's rate keeps its precision)."""
    return float(f"{x:.{digits}g}")


def matmul_rate(n: int = 2048, repeats: int = 10, warmup: int = 2, dtype: torch.dtype = torch.float32) -> dict:
    """Time ``repeats`` products of two [n, n] matrices (after ``warmup``); 2 n^3 FLOPs each.

    Returns GFLOP/s per product (``max`` is the ceiling used for fractions, ``median`` the typical
    rate on a possibly shared machine) and the torch thread count it ran with."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=dtype)  # [n, n]
    b = torch.randn(n, n, generator=g, dtype=dtype)  # [n, n]
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    flops = 2.0 * n**3
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(flops / (time.perf_counter() - t0) / 1e9)
    return {
        "n": n, "repeats": repeats, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "gflops_max": _sig(max(rates)), "gflops_median": _sig(statistics.median(rates)),
        "gflops_min": _sig(min(rates)),
    }


def sasrec_step_flops(
    batch_size: int, length: int, hidden: int, layers: int, inner: int, num_items: int
) -> dict[str, int]:
    """Closed-form FLOPs of one SASRec training step (objective ``"last"``) on a [B, L] batch.

    Forward: embedding lookups are free; per layer the Q, K, V and output projections 4*B*L*D^2*2,
    attention scores and weighted sum 2*B*L^2*D*2, the FFN 2*B*L*D*inner*2; the output layer scores
    every item, 2*B*D*N. Backward = 2 x forward (gradients of inputs and of weights)."""
    b, seq, d = int(batch_size), int(length), int(hidden)
    per_layer = 4 * b * seq * d * d * 2 + 2 * b * seq * seq * d * 2 + 2 * b * seq * d * int(inner) * 2
    forward = int(layers) * per_layer + 2 * b * d * int(num_items)
    return {"forward": forward, "backward": 2 * forward, "total": 3 * forward}


def count_step_flops(model: torch.nn.Module, batch: Batch) -> dict[str, Any]:
    """FLOPs of ``model.loss(batch)["loss"]`` forward and backward, by FlopCounterMode (gradients are
    cleared afterwards). Returns forward, total and the per-op totals."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss = model.loss(batch)["loss"]
        forward = counter.get_total_flops()
        loss.backward()
    model.zero_grad(set_to_none=True)
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return {"forward": int(forward), "total": int(counter.get_total_flops()), "by_op": by_op}


def time_train_steps(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence[Batch], warmup: int = 1
) -> list[float]:
    """Seconds of each full training step (loss, zero_grad, backward, optimizer step) on ``batches``,
    after ``warmup`` untimed steps on the first batch."""
    model.train()

    def step(batch: Batch) -> None:
        loss = model.loss(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step(batches[0])
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    return times


def step_rate(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    ceiling_gflops: float,
    analytic: Callable[[Batch], dict[str, int]] | None = None,
    lr: float = 1e-3,
) -> dict[str, Any]:
    """Achieved GFLOP/s of ``model``'s training step over ``batches`` (Adam, as the trainer uses) and its
    fraction of ``ceiling_gflops``. FLOPs per batch by FlopCounterMode (and ``analytic(batch)`` when
    given, for comparison); the step times are measured separately, without the counter."""
    batches = list(batches)
    model.train()
    counted = [count_step_flops(model, b) for b in batches]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, fused=True)
    times = time_train_steps(model, opt, batches)
    flops = sum(c["total"] for c in counted)
    seconds = sum(times)
    by_op: dict[str, int] = {}
    for c in counted:
        for k, v in c["by_op"].items():
            by_op[k] = by_op.get(k, 0) + v
    out: dict[str, Any] = {
        "batches": len(batches),
        "rows": [len(b) for b in batches],
        "lengths": [int(b.seq_len.max()) for b in batches],
        "flops_total": flops,
        "flops_forward": sum(c["forward"] for c in counted),
        "flops_by_op": by_op,
        "step_seconds": [_sig(t) for t in times],
        "seconds_per_step": _sig(seconds / len(batches)),
        "sequences_per_second": round(sum(len(b) for b in batches) / seconds, 1),
        "achieved_gflops": _sig(flops / seconds / 1e9),
        "fraction_of_ceiling": _sig(flops / seconds / 1e9 / ceiling_gflops),
        "threads": torch.get_num_threads(),
    }
    if analytic is not None:
        total = sum(analytic(b)["total"] for b in batches)
        out["flops_analytic"] = total
        out["analytic_over_counted"] = round(total / flops, 4) if flops else None
    return out


__all__ = ["count_step_flops", "matmul_rate", "sasrec_step_flops", "step_rate", "time_train_steps"]

"""Where a step runs and how its inputs get there: the one place both trainers (pre-training, fine-tuning)
decide the device and move batches.

A batch is built on the host (in DataLoader workers for pre-training), pinned when the step runs on a GPU, and
moved with ``non_blocking`` copies; everything the step then uses is on the step's device (the device test in
``tests/test_placement.py`` runs both steps on a stand-in device to check it).
"""

from __future__ import annotations

import os
from typing import Protocol, TypeVar

import torch


class Movable(Protocol):
    def to(self, device: torch.device | str, non_blocking: bool = True) -> Movable: ...


B = TypeVar("B", bound=Movable)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: this process's GPU (``cuda:LOCAL_RANK``) when CUDA is present, else the CPU; or the named device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)


def place(batch: B, device: torch.device) -> B:
    """``batch`` (a :class:`~missrec.data.batching.Batch` or a
    :class:`~missrec.data.pretrain_batch.PretrainBatch`) on ``device``; copies from pinned memory overlap with
    the GPU's work."""
    return batch.to(device, non_blocking=True)  # type: ignore[return-value]


def pin_batches(device: torch.device) -> bool:
    """Whether loaders should pin the batches they make for ``device``."""
    return device.type == "cuda"

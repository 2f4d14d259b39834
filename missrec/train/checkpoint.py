"""Checkpoints of a DeepSpeed run: save, find the latest complete one, load, prune.

Layout under ``RUN/checkpoints/``: one folder per tag (``step00000012``) written by
``engine.save_checkpoint`` on every rank (model, optimizer and scheduler states; ZeRO partitions),
plus ``complete.json`` written by rank 0 only after every rank has finished writing (a barrier).
A folder without ``complete.json`` is an interrupted save and is never loaded; the previous complete
checkpoint stays the one used. The toolkit's own state (epoch, step within the epoch, global step,
the interest index, the loss history) travels in DeepSpeed's ``client_state``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from missrec.errors import MissingInputError, MISSRecError
from missrec.train.dist import barrier, broadcast_object
from missrec.train.rank_zero import RankZero

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"


class CheckpointWriteError(MISSRecError, OSError):
    """A checkpoint could not be written (full disk, I/O error); names the folder and the fallback."""


def tag_for(global_step: int) -> str:
    return f"step{global_step:08d}"


def complete_tags(run_dir: str | Path) -> list[tuple[int, str]]:
    """(global step, tag) of every complete checkpoint, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    out = []
    for marker in root.glob(f"*/{COMPLETE}"):
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
            out.append((int(info["global_step"]), marker.parent.name))
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s: unreadable checkpoint marker, ignoring that checkpoint", marker)
    return sorted(out)


def latest_tag(run_dir: str | Path) -> str | None:
    tags = complete_tags(run_dir)
    return tags[-1][1] if tags else None


def save(engine: Any, rz: RankZero, global_step: int, client_state: dict[str, Any], keep: int) -> str:
    """Save a checkpoint on every rank; mark it complete once all ranks are done; prune old ones."""
    t0 = time.perf_counter()
    tag = tag_for(global_step)
    root = rz.run_dir / CHECKPOINTS
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
        _fsync_folder(root / tag)  # durable before it can be marked complete
    except (OSError, RuntimeError) as exn:  # torch.save reports a full disk as a RuntimeError
        previous = latest_tag(rz.run_dir)
        raise CheckpointWriteError(
            f"{root / tag}: writing the checkpoint failed ({exn}); it is not marked complete, so --resume "
            f"uses {previous or 'no checkpoint (none is complete yet)'}") from exn
    barrier()
    rz.write_json(f"{CHECKPOINTS}/{tag}/{COMPLETE}", {
        "global_step": global_step, "epoch": client_state.get("epoch"),
        "step_in_epoch": client_state.get("step_in_epoch"), "time": time.time(),
    })
    if keep > 0 and rz.is_zero:
        for _, old in complete_tags(rz.run_dir)[:-keep]:
            rz.remove_tree(f"{CHECKPOINTS}/{old}")
    barrier()
    log.info("checkpoint %s saved in %.1fs", tag, time.perf_counter() - t0)
    return tag


def _fsync_folder(folder: Path) -> None:
    for f in folder.glob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(engine: Any, run_dir: str | Path, tag: str | None = None) -> tuple[str, dict[str, Any]]:
    """Load ``tag`` (default: the latest complete checkpoint) into ``engine``; returns (tag, client state)."""
    tag = broadcast_object(tag or latest_tag(run_dir))  # rank 0's view decides for everyone
    if tag is None:
        raise MissingInputError(f"{Path(run_dir) / CHECKPOINTS}: no complete checkpoint to resume from")
    path, client = engine.load_checkpoint(str(Path(run_dir) / CHECKPOINTS), tag=tag)
    if path is None:
        raise MissingInputError(f"{Path(run_dir) / CHECKPOINTS / tag}: DeepSpeed could not load it")
    return tag, dict(client or {})

"""The one helper through which rank-0 side effects go: run folder, TensorBoard, checkpoints, JSON.

On any other rank every method is a no-op, so calling code never branches on the rank.
A run folder is reproducible: ``config.json`` (merged config), ``git.json`` (commit and dirty flag),
``env.json`` (versions, world size), TensorBoard events under ``tb/``, ``metrics.json``.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from missrec.io import atomic_open, write_json

log = logging.getLogger(__name__)


def current_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def git_info(repo_dir: str | Path | None = None) -> dict[str, Any]:
    """The commit of the code that runs, and whether the tree had uncommitted changes."""
    repo_dir = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parents[2]

    def _git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(repo_dir), *args], capture_output=True, text=True, timeout=10, check=True
            )
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


class RankZero:
    """Rank-0 side effects of one run, rooted at ``run_dir``."""

    def __init__(self, run_dir: str | Path, rank: int | None = None, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.rank = current_rank() if rank is None else rank
        self.is_zero = self.rank == 0
        self._tb = None
        if self.is_zero:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    # -------------------------------------------------------------------------------- run record
    def record_start(self, config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
        """Write the merged config, the git commit and the environment."""
        if not self.is_zero:
            return
        write_json(self.run_dir / "config.json", dict(config))
        write_json(self.run_dir / "git.json", git_info())
        env = {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "argv": sys.argv,
        }
        env.update(extra or {})
        write_json(self.run_dir / "env.json", env)

    def write_json(self, name: str, obj: Any) -> None:
        if self.is_zero:
            write_json(self.run_dir / name, obj)

    # -------------------------------------------------------------------------------- TensorBoard
    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._tb is None:
            return
        for k, v in values.items():
            self._tb.add_scalar(k, float(v), step)

    def histogram(self, tag: str, values: Any, step: int) -> None:
        if self._tb is not None:
            self._tb.add_histogram(tag, values, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def embedding(self, mat: torch.Tensor, metadata: list[Any], tag: str, step: int = 0, header=None) -> None:
        if self._tb is not None:
            self._tb.add_embedding(mat, metadata=metadata, tag=tag, global_step=step, metadata_header=header)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def remove_tree(self, name: str) -> None:
        """Delete ``run_dir/name`` (a folder, e.g. an old checkpoint) on rank 0."""
        if self.is_zero:
            import shutil

            shutil.rmtree(self.run_dir / name, ignore_errors=True)

    # -------------------------------------------------------------------------------- checkpoints
    def save(self, name: str, state: Mapping[str, Any]) -> Path | None:
        """Save ``state`` with ``torch.save`` atomically under ``run_dir/name``."""
        if not self.is_zero:
            return None
        path = self.run_dir / name
        with atomic_open(path, "wb") as fh:
            torch.save(dict(state), fh)
        return path

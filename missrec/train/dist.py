"""Distributed helpers that work the same on gloo (CPU) and NCCL (GPU), and as no-ops on one process.

- :func:`init_distributed` — start the process group from the launcher's environment (``deepspeed``,
  ``torchrun`` or SLURM set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT).
- :func:`gather_with_grad` — all-gather along dim 0 where the local slice keeps its gradient and the
  backward pass sums every rank's gradient for that slice back to its owner, so a loss over the
  gathered tensor trains like the same loss over the global batch on one process.
- :func:`all_gather_nograd`, :func:`broadcast_object`, :func:`barrier`, :func:`world`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from missrec.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_zero(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> World:
    """This process's place in the job (rank 0 of 1 when no process group is running)."""
    if not is_distributed():
        return World(local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 str(dist.get_backend()))


def comm_device() -> torch.device:
    """The device collectives need: this rank's GPU under NCCL, the CPU otherwise."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous on this machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def child_threads(threads: int) -> Iterator[None]:
    """Within the block, processes spawned from this one start with ``OMP_NUM_THREADS`` and
    ``MKL_NUM_THREADS`` = ``threads``; the previous values come back after it."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update(dict.fromkeys(keys, str(threads)))
    try:
        yield
    finally:
        for key, val in saved.items():
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val


def init_loopback_gloo(rank: int, world_size: int, port: int, timeout_s: float) -> None:
    """Join a gloo group of ``world_size`` processes on 127.0.0.1:``port`` (spawned workers of a test or
    benchmark, which set no launcher environment)."""
    import datetime

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def launch_command(script: str, args: list[str], ranks: int, launcher: str = "deepspeed") -> list[str]:
    """The command line that runs ``script args`` on ``ranks`` local ranks: ``deepspeed`` or ``torchrun``
    from this interpreter's environment (a plain ``python`` for one rank), rendezvous on 127.0.0.1."""
    import sys

    if ranks == 1:
        return [sys.executable, script, *args]
    bin_dir = Path(sys.executable).parent
    if launcher == "deepspeed":
        return [str(bin_dir / "deepspeed"), "--num_accelerators", str(ranks), "--master_port", str(free_port()),
                script, *args]
    if launcher == "torchrun":
        return [str(bin_dir / "torchrun"), "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), script, *args]
    raise ConfigError(f"launcher must be 'deepspeed' or 'torchrun', got {launcher!r}")


def init_distributed(backend: str = "auto", standalone: bool = False) -> World:
    """Join the process group the launcher describes in the environment. When it describes none:
    a single process without a group, or (``standalone``) a group of one on 127.0.0.1, which DeepSpeed
    needs. ``backend``: ``auto`` (NCCL with GPUs, gloo otherwise), ``gloo`` or ``nccl``."""
    if is_distributed():
        return world()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and "MASTER_ADDR" not in os.environ:
        if not standalone:
            return world()
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        import deepspeed
    except ImportError:  # plain torch.distributed is enough when DeepSpeed is absent
        dist.init_process_group(backend=backend)
    else:
        deepspeed.init_distributed(dist_backend=backend)
        release_shm_names(world())
    w = world()
    log.info("process group: rank %d of %d (%s)", w.rank, w.size, w.backend)
    return w


def shm_buffer_name(rank: int) -> Path:
    """Where DeepSpeed's CPU shared-memory all-reduce puts ``rank``'s buffer (about 69 MB)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def release_shm_names(w: World) -> None:
    """Unlink this rank's DeepSpeed shared-memory buffer name once every rank has mapped every buffer.

    DeepSpeed's CPU accelerator creates one named buffer per rank in ``init_distributed`` (each rank
    maps all of them before that call returns) and never removes it, so every CPU run, killed or not,
    used to leave ``ranks x 69 MB`` of RAM behind in /dev/shm. Unlinking the name keeps the mappings
    valid; the kernel frees the memory when the last rank exits, however it exits."""
    barrier()  # every rank is past init: all buffers are mapped (on every rank, so no rank can hang here)
    path = shm_buffer_name(w.rank)
    with contextlib.suppress(FileNotFoundError):  # none when the ranks span several hosts
        path.unlink()
        log.debug("unlinked %s (still mapped until the ranks exit)", path)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        size, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.n = rank, x.shape[0]
        dev = x.device
        xc = x.detach().to(comm_device()).contiguous()
        parts = [torch.empty_like(xc) for _ in range(size)]
        dist.all_gather(parts, xc)
        parts[rank] = xc
        return torch.cat(parts).to(dev)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        dev = grad.device
        g = grad.to(comm_device()).contiguous()
        dist.all_reduce(g)  # every rank's gradient of every slice, summed (a reduce-scatter gloo lacks)
        lo = ctx.rank * ctx.n
        return g[lo : lo + ctx.n].to(dev)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` [n, ...] on every rank (same n) -> [world * n, ...] in rank order; gradients reach the
    owners of each slice, summed over ranks. Identity on one process."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """``x`` [n, ...] (same n on every rank) -> [world * n, ...] in rank order, no gradient."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    dev = x.device
    xc = x.detach().to(comm_device()).contiguous()
    parts = [torch.empty_like(xc) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, xc)
    return torch.cat(parts).to(dev)


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over ranks (for logging)."""
    if not is_distributed() or dist.get_world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not is_distributed() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[int(os.environ.get("LOCAL_RANK", "0"))])
        else:
            dist.barrier()


def shutdown() -> None:
    """A final barrier, then leave the process group (clean exits under ZeRO-3 too)."""
    if is_distributed():
        barrier()
        dist.destroy_process_group()

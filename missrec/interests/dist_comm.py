"""Small numpy-facing wrapper over ``torch.distributed`` for the distributed interest discovery.

Arrays go in and out as numpy; on the wire they are torch tensors on the device the backend needs
(:func:`comm_device`: ``cuda:<current device>`` for NCCL, CPU for gloo and the rest). Every method is
a collective of the group unless it says otherwise: all ranks must call it in the same order with
arguments of the same shape class (sizes that differ per rank are exchanged or derived from values
every rank knows). ``Comm.bytes`` counts the logical payload this rank sent and received (not the
backend's wire traffic, which depends on its algorithm).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

_TORCH_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.uint8): torch.uint8,
}


def comm_device(group: Any = None) -> torch.device:
    """Device the group's backend communicates from: the current CUDA device for NCCL, else CPU."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_distributed(group: Any = None) -> bool:
    """True when torch.distributed is initialised and the group has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class Comm:
    """Collectives over ``group`` (None: the default group) on numpy arrays, with byte counting."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.device = comm_device(group)
        self.next = (self.rank + 1) % self.world
        self.prev = (self.rank - 1) % self.world
        self.bytes = {"sent": 0, "received": 0}

    # ------------------------------------------------------------------ conversions
    def _to_wire(self, a: np.ndarray) -> torch.Tensor:
        a = np.ascontiguousarray(a)
        if a.dtype not in _TORCH_DTYPES:
            raise TypeError(f"cannot communicate arrays of dtype {a.dtype}")
        return torch.from_numpy(a).to(self.device)

    @staticmethod
    def _from_wire(t: torch.Tensor) -> np.ndarray:
        return t.cpu().numpy()

    # ------------------------------------------------------------------ collectives
    def all_gather_list(self, a: np.ndarray, counts: np.ndarray | None = None) -> list[np.ndarray]:
        """Every rank's ``a`` (same dtype and trailing shape), in rank order. ``counts`` [W]: each rank's
        ``len(a)`` when every rank knows it already; otherwise the lengths are gathered first."""
        a = np.ascontiguousarray(a)
        if counts is None:
            counts = self.all_gather_scalars(len(a))
        counts = np.asarray(counts, dtype=np.int64)
        if int(counts[self.rank]) != len(a):
            raise ValueError(f"rank {self.rank}: counts say {int(counts[self.rank])} rows, got {len(a)}")
        width = int(np.prod(a.shape[1:], dtype=np.int64))
        most = int(counts.max()) if counts.size else 0
        if most == 0 or width == 0:
            return [np.empty((int(c),) + a.shape[1:], dtype=a.dtype) for c in counts]
        pad = np.zeros((most,) + a.shape[1:], dtype=a.dtype)
        pad[: len(a)] = a
        send = self._to_wire(pad)
        outs = [torch.empty_like(send) for _ in range(self.world)]
        dist.all_gather(outs, send, group=self.group)
        self.bytes["sent"] += a.nbytes * (self.world - 1)
        self.bytes["received"] += int(counts.sum() - counts[self.rank]) * width * a.itemsize
        return [self._from_wire(o)[: int(c)] for o, c in zip(outs, counts)]

    def all_gather_concat(self, a: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
        """Concatenation of every rank's ``a`` in rank order (see :meth:`all_gather_list`)."""
        return np.concatenate(self.all_gather_list(a, counts), axis=0)

    def all_gather_scalars(self, *values: float) -> np.ndarray:
        """Each rank's ``values`` as rows of a [W, len(values)] int64 array (one column: [W])."""
        row = np.asarray(values, dtype=np.int64)[None, :]
        out = self.all_gather_list(row, np.ones(self.world, dtype=np.int64))
        arr = np.concatenate(out, axis=0)
        return arr[:, 0] if arr.shape[1] == 1 else arr

    def all_reduce_sum(self, a: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks (the result is the same on every rank)."""
        t = self._to_wire(a)
        if t.numel():
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
            self.bytes["sent"] += t.numel() * t.element_size()
            self.bytes["received"] += t.numel() * t.element_size()
        return self._from_wire(t)

    def broadcast_rows(self, a: np.ndarray | None, width: int, dtype: Any, src: int = 0) -> np.ndarray:
        """Rank ``src``'s array ``a`` [m, width] (m known only there; others pass None) on every rank."""
        m = np.array([len(a) if self.rank == src else 0], dtype=np.int64)
        t = self._to_wire(m)
        dist.broadcast(t, group_src=src, group=self.group)
        m = int(self._from_wire(t)[0])
        buf = np.ascontiguousarray(a, dtype=dtype) if self.rank == src else np.empty((m, width), dtype=dtype)
        t = self._to_wire(buf)
        if t.numel():
            dist.broadcast(t, group_src=src, group=self.group)
        nbytes = t.numel() * t.element_size()
        self.bytes["sent" if self.rank == src else "received"] += nbytes * (
            self.world - 1 if self.rank == src else 1
        )
        return self._from_wire(t).reshape(m, width)

    def fetch_rows(self, x: np.ndarray, offsets: np.ndarray, gids: np.ndarray) -> np.ndarray:
        """Rows ``gids`` [m] (global token ids, the same on every rank) of the sharded pool: [m, D].

        Rank ``r`` holds global rows ``offsets[r]:offsets[r + 1]`` as ``x``; each owner sends its rows."""
        gids = np.asarray(gids, dtype=np.int64)
        owner = np.searchsorted(offsets, gids, side="right") - 1  # [m]
        counts = np.bincount(owner, minlength=self.world)[: self.world].astype(np.int64)
        mine = gids[owner == self.rank] - offsets[self.rank]
        parts = self.all_gather_list(np.ascontiguousarray(x[mine]), counts)
        out = np.empty((len(gids), x.shape[1]), dtype=x.dtype)
        for r, part in enumerate(parts):
            out[owner == r] = part
        return out

    def all_to_all(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        """Send ``parts[r]`` (rows of one dtype and trailing shape, any count) to rank ``r``; returns what
        every rank sent here, in rank order. Collective (sizes are exchanged first). Every segment carries one
        extra byte, so no rank ever takes part with empty buffers (which a backend may treat as nothing to do
        while its peers wait)."""
        a = np.concatenate([np.ascontiguousarray(p) for p in parts])
        tail, dtype = a.shape[1:], a.dtype
        row_bytes = int(np.prod(tail, dtype=np.int64)) * dtype.itemsize
        send_counts = np.array([len(p) for p in parts], dtype=np.int64)
        table = self.all_gather_list(send_counts[None], np.ones(self.world, dtype=np.int64))  # [W] x [1, W]
        recv_counts = np.array([int(t[0, self.rank]) for t in table], dtype=np.int64)
        raw = a.reshape(len(a), -1).view(np.uint8).reshape(-1) if len(a) else np.empty(0, np.uint8)
        bounds = np.concatenate([[0], np.cumsum(send_counts * row_bytes)])
        segments = [np.concatenate([raw[bounds[r] : bounds[r + 1]], np.zeros(1, np.uint8)]) for r in range(self.world)]
        send = self._to_wire(np.concatenate(segments))
        out = torch.empty(int(recv_counts.sum()) * row_bytes + self.world, dtype=torch.uint8, device=self.device)
        dist.all_to_all_single(out, send, output_split_sizes=(recv_counts * row_bytes + 1).tolist(),
                               input_split_sizes=(send_counts * row_bytes + 1).tolist(), group=self.group)
        self.bytes["sent"] += int(send_counts.sum() - send_counts[self.rank]) * row_bytes
        self.bytes["received"] += int(recv_counts.sum() - recv_counts[self.rank]) * row_bytes
        got = self._from_wire(out)
        starts = np.concatenate([[0], np.cumsum(recv_counts * row_bytes + 1)])
        return [got[starts[r] : starts[r + 1] - 1].view(dtype).reshape((int(recv_counts[r]),) + tail)
                for r in range(self.world)]

    def fetch_values(self, local: np.ndarray, offsets: np.ndarray, gids: np.ndarray) -> np.ndarray:
        """``values[gids]`` of an array sharded as ``offsets`` [W + 1] (this rank holds ``local`` = rows
        ``offsets[r]:offsets[r + 1]``), for this rank's requests ``gids`` [m] (any ids, repeats allowed).
        Collective: each request goes to its owner and the answer comes back (two all-to-alls); memory
        O(m) here and O(requests received) at the owners."""
        gids = np.asarray(gids, dtype=np.int64)
        owner = np.searchsorted(offsets, gids, side="right") - 1
        order = np.argsort(owner, kind="stable")
        counts = np.bincount(owner, minlength=self.world)[: self.world]
        bounds = np.concatenate([[0], np.cumsum(counts)])
        asked = self.all_to_all([gids[order[bounds[r] : bounds[r + 1]]] for r in range(self.world)])
        lo = int(offsets[self.rank])
        answers = self.all_to_all([np.ascontiguousarray(local[q - lo]) for q in asked])
        out = np.empty((len(gids),) + local.shape[1:], dtype=local.dtype)
        out[order] = np.concatenate(answers) if answers else out[:0]
        return out

    # ------------------------------------------------------------------ ring (point to point)
    def shift_start(self, send: np.ndarray | None, recv_nbytes: int) -> tuple[list[Any], Any, Any]:
        """Start sending the bytes ``send`` to the next rank and receiving ``recv_nbytes`` bytes from the
        previous one (not a collective: only the two neighbours take part). Finish with :meth:`shift_wait`.
        Empty messages are skipped: both sides must agree on the sizes. Each message starts with its length,
        checked on arrival (gloo would fill a larger receive buffer with a shorter message and say nothing)."""
        ops = []
        out = keep = None
        if send is not None and send.nbytes:
            body = np.ascontiguousarray(send).view(np.uint8).ravel()
            keep = self._to_wire(np.concatenate([np.array([body.size], dtype=np.int64).view(np.uint8), body]))
            ops.append(dist.P2POp(dist.isend, keep, group=self.group, group_peer=self.next))
            self.bytes["sent"] += keep.numel()
        if recv_nbytes:
            out = torch.empty(int(recv_nbytes) + 8, dtype=torch.uint8, device=self.device)
            ops.append(dist.P2POp(dist.irecv, out, group=self.group, group_peer=self.prev))
            self.bytes["received"] += int(recv_nbytes)
        reqs = dist.batch_isend_irecv(ops) if ops else []
        return reqs, out, keep

    def shift_wait(self, pending: tuple[list[Any], Any, Any]) -> np.ndarray | None:
        """Wait for a :meth:`shift_start`; the received bytes (uint8) or None."""
        reqs, out, _keep = pending
        for req in reqs:
            req.wait()
        if out is None:
            return None
        got = self._from_wire(out)
        size = int(got[:8].copy().view(np.int64)[0])
        if size != got.size - 8:
            raise RuntimeError(f"rank {self.rank}: a ring message of {size} bytes arrived where {got.size - 8} "
                               "were expected (the ranks disagree on what they exchange)")
        return got[8:]


def pack(*arrays: np.ndarray) -> np.ndarray:
    """Concatenate the raw bytes of C-contiguous arrays into one uint8 array."""
    if not arrays:
        return np.empty(0, dtype=np.uint8)
    return np.concatenate([np.ascontiguousarray(a).view(np.uint8).ravel() for a in arrays])


def unpack(buf: np.ndarray, specs: list[tuple[tuple[int, ...], Any]]) -> list[np.ndarray]:
    """Split ``buf`` (uint8) into arrays of the given (shape, dtype), in order (copies)."""
    out = []
    pos = 0
    for shape, dtype in specs:
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        out.append(buf[pos : pos + nbytes].copy().view(dt).reshape(shape))
        pos += nbytes
    if pos != buf.size:
        raise ValueError(f"unpack: {buf.size} bytes received, {pos} expected")
    return out

"""Run a function in a fresh (spawned) interpreter: its own memory high-water mark, threads and Ray/torch
state, an optional time limit, and a crash (segfault, out-of-memory kill) that fails only that call."""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable
from typing import Any

GIB = float(1 << 30)
LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"


class IsolatedError(RuntimeError):
    """The function raised, the process died, or it ran past its time limit (``timed_out``)."""

    def __init__(self, message: str, *, timed_out: bool = False, peak_rss_gib: float | None = None,
                 seconds: float = 0.0, details: str = "") -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.peak_rss_gib = peak_rss_gib
        self.seconds = seconds
        self.details = details


def _child(fn: Callable[..., Any], args: tuple, conn: Any, log_level: int) -> None:
    # a spawned child inherits "spawn" as its start method; restore the platform default so the code it
    # runs (DataLoader workers, pools) starts processes as it would in a plain interpreter
    mp.set_start_method(None, force=True)
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    try:
        msg = ("ok", fn(*args), "")
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        msg = ("error", f"{type(e).__name__}: {e}", traceback.format_exc())
    conn.send(msg)
    conn.close()


def _hwm_gib(pid: int) -> float | None:
    """Peak resident set size (VmHWM) of process ``pid`` so far, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        return None
    return None


def run_isolated(
    fn: Callable[..., Any], *args: Any, timeout: float | None = None, log_level: int = logging.INFO,
    poll: float = 0.25,
) -> tuple[Any, dict[str, Any]]:
    """``fn(*args)`` in a spawned process (``fn`` and the result must pickle). Returns ``(result, meta)``
    with meta ``seconds`` (wall, spawn included) and ``peak_rss_gib`` (the child's VmHWM as last seen).
    Raises :class:`IsolatedError` when ``fn`` raised (message and traceback), the process died without
    an answer, or ``timeout`` seconds passed (the process is then terminated)."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, args, send, log_level))
    t0 = time.perf_counter()
    proc.start()
    send.close()
    peak: float | None = None
    msg = None
    try:
        while True:
            if recv.poll(poll):
                try:
                    msg = recv.recv()
                except EOFError:  # the child exited without answering
                    msg = None
                break
            hwm = _hwm_gib(proc.pid)
            peak = max(peak or 0.0, hwm) if hwm is not None else peak
            if not proc.is_alive() and not recv.poll(0):
                break
            if timeout is not None and time.perf_counter() - t0 > timeout:
                proc.terminate()
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                raise IsolatedError(f"did not finish within {timeout:.0f} s (terminated)", timed_out=True,
                                    peak_rss_gib=peak, seconds=time.perf_counter() - t0)
        hwm = _hwm_gib(proc.pid)
        peak = max(peak or 0.0, hwm) if hwm is not None else peak
        proc.join()
    finally:
        recv.close()
        if proc.is_alive():
            proc.kill()
            proc.join()
    seconds = time.perf_counter() - t0
    if msg is None:
        raise IsolatedError(f"the process exited with code {proc.exitcode} without a result "
                            "(killed, out of memory or crashed?)", peak_rss_gib=peak, seconds=seconds)
    status, value, details = msg
    if status != "ok":
        raise IsolatedError(value, peak_rss_gib=peak, seconds=seconds, details=details)
    return value, {"seconds": seconds, "peak_rss_gib": peak}


__all__ = ["IsolatedError", "run_isolated"]

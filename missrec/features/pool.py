"""A pool of Ray actors, each holding one encoder model, that encodes chunks of items.

The driver keeps every actor busy with up to ``inflight_per_actor`` chunks and hands each result to a
callback as it arrives (the caller writes the chunk to disk at once). Actors are created with
``max_restarts`` and their tasks with ``max_task_retries``: when an actor process dies, Ray starts a
new one (which loads the model again) and reruns the chunks it held.

Ray is joined at ``address`` (or ``RAY_ADDRESS``, set for a driver run by ``ray job submit``) when one is
given; otherwise a local Ray is started with just enough CPUs and shut down at the end. A Ray that is
already initialised in this process is used as it is and left running.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from missrec.errors import ConfigError, StageFailedError, missing_extra
from missrec.features.chunks import ChunkRange
from missrec.features.encode import ChunkEncoder, EncoderSpec
from missrec.features.items import ItemSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaultHook:
    """Test-only: the actor that receives chunk ``chunk`` exits (``os._exit(1)``) once, before encoding
    it; the ``marker`` file it creates first keeps the restarted actor from failing again. Every actor
    also waits ``delay_s`` before each chunk (a slow encoder, so that a test can act mid-job)."""

    chunk: int = -1
    marker: str = ""
    delay_s: float = 0.0


@dataclass(frozen=True)
class PoolConfig:
    """The actor pool. ``num_gpus_per_actor=None``: 1 when the Ray cluster has GPUs, else 0 (then each
    actor asks for ``num_cpus_per_actor`` CPUs and uses that many torch threads unless the encoder says)."""

    num_actors: int = 2
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float | None = None
    address: str | None = None  # Ray address ("auto", "ray://host:10001", "host:6379"); None: RAY_ADDRESS
    local_num_cpus: int | None = None  # a local Ray's CPUs; None: what the actors ask for
    local_object_store_bytes: int | None = 256 << 20  # a local Ray's object store (None: Ray's default)
    max_restarts: int = 3
    max_task_retries: int = 3
    inflight_per_actor: int = 2
    ready_timeout_s: float = 900.0  # actors not up by then (e.g. no node has the GPUs asked for): error

    def __post_init__(self) -> None:
        if self.num_actors < 1:
            raise ConfigError(f"num_actors must be >= 1 for the Ray pool, got {self.num_actors}")
        if self.num_cpus_per_actor <= 0 or self.inflight_per_actor < 1:
            raise ConfigError("num_cpus_per_actor must be > 0 and inflight_per_actor >= 1")
        if self.max_restarts < 0 or self.max_task_retries < 0:
            raise ConfigError("max_restarts and max_task_retries must be >= 0")


class FeatureWorker:
    """The actor body (also usable as a plain object): loads the encoder once, encodes chunks."""

    def __init__(self, spec: EncoderSpec, root: str, fault: FaultHook | None = None) -> None:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("missrec").setLevel(logging.INFO)
        self.encoder = ChunkEncoder(spec, root)
        self.fault = fault
        self.pid = os.getpid()

    def ready(self) -> dict:
        """Who this actor is once its model is loaded: pid, host, device, dim."""
        return {"pid": self.pid, "host": socket.gethostname(), "device": self.encoder.device,
                "dim": self.encoder.dim}

    def encode(self, chunk: int, item_ids: Sequence[str], texts: Sequence[str],
               images: Sequence[str] | None) -> dict:
        """Encode chunk ``chunk``; see :meth:`ChunkEncoder.encode` (plus ``chunk`` and ``pid``)."""
        f = self.fault
        if f is not None and f.delay_s > 0:
            time.sleep(f.delay_s)
        if f is not None and f.chunk == chunk and not os.path.exists(f.marker):
            Path(f.marker).write_text(f"pid {self.pid} exits on chunk {chunk}\n")
            logging.getLogger(__name__).warning("fault hook: pid %d exits on chunk %d", self.pid, chunk)
            os._exit(1)
        out = self.encoder.encode(item_ids, texts, images)
        out["chunk"] = chunk
        out["pid"] = self.pid
        return out


def _ray():
    try:
        import ray
    except ImportError:
        raise missing_extra("ray[default]", "ray") from None
    return ray


def connect(cfg: PoolConfig) -> tuple[bool, str]:
    """Initialise Ray for the pool; returns (whether we called ``ray.init`` and so must call
    ``ray.shutdown``: that stops a local Ray, or only disconnects from a cluster, how)."""
    ray = _ray()
    if ray.is_initialized():
        return False, "existing"
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True, address
    cpus = cfg.local_num_cpus or math.ceil(cfg.num_actors * cfg.num_cpus_per_actor)
    # address="local": a new Ray even when `ray start` left a cluster address on this machine
    kwargs = {"address": "local", "num_cpus": cpus, "include_dashboard": False, "log_to_driver": True}
    if cfg.local_object_store_bytes:
        kwargs["object_store_memory"] = cfg.local_object_store_bytes
    ray.init(**kwargs)
    return True, f"local ({cpus} CPUs)"


def run_pool(cfg: PoolConfig, spec: EncoderSpec, source: ItemSource, chunks: Sequence[ChunkRange],
             on_result: Callable[[ChunkRange, dict], None], fault: FaultHook | None = None,
             on_ready: Callable[[], None] | None = None) -> dict:
    """Encode ``chunks`` of ``source`` on ``cfg.num_actors`` Ray actors; ``on_ready()`` is called once the
    actors have loaded their models, ``on_result(chunk, result)`` in the driver for each finished chunk,
    in completion order. Returns timings and actor info.

    Results come from Ray's object store and are read-only: ``on_result`` must copy before mutating.
    """
    ray = _ray()
    t0 = time.perf_counter()
    started, how = connect(cfg)
    actors: list = []
    try:
        gpus = cfg.num_gpus_per_actor
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        threads = spec.torch_threads or max(1, int(cfg.num_cpus_per_actor))
        actor_spec = replace(spec, torch_threads=threads, device="cuda" if gpus > 0 and spec.device == "auto"
                             else spec.device)
        remote_cls = ray.remote(FeatureWorker).options(
            num_cpus=cfg.num_cpus_per_actor, num_gpus=gpus, max_restarts=cfg.max_restarts,
            max_task_retries=cfg.max_task_retries,
        )
        n_actors = min(cfg.num_actors, max(1, len(chunks)))
        actors = [remote_cls.remote(actor_spec, str(source.root), fault) for _ in range(n_actors)]
        try:
            info = ray.get([a.ready.remote() for a in actors], timeout=cfg.ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(f"{n_actors} actors asking for {cfg.num_cpus_per_actor} CPU / {gpus} GPU each were "
                               f"not ready after {cfg.ready_timeout_s:.0f}s; cluster resources: "
                               f"{ray.cluster_resources()}") from None
        startup = time.perf_counter() - t0
        log.info("Ray %s: %d actors ready in %.1fs (%s GPU, %s CPU each): %s", how, n_actors, startup, gpus,
                 cfg.num_cpus_per_actor, info)
        pids: list[set[int]] = [{i["pid"]} for i in info]
        todo = deque(chunks)
        inflight: dict = {}  # ObjectRef -> (chunk, actor index)

        def submit(a: int) -> None:
            c = todo.popleft()
            imgs = source.images[c.start:c.end] if source.images is not None else None
            ref = actors[a].encode.remote(c.index, source.item_ids[c.start:c.end], source.texts[c.start:c.end], imgs)
            inflight[ref] = (c, a)

        if on_ready is not None:
            on_ready()
        t1 = time.perf_counter()
        for _ in range(cfg.inflight_per_actor):
            for a in range(n_actors):
                if todo:
                    submit(a)
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1)
            c, a = inflight.pop(done[0])
            try:
                res = ray.get(done[0])
            except ray.exceptions.RayError as err:
                raise StageFailedError(f"chunk {c.index} (items {c.start}..{c.end - 1}) failed (actor restarts "
                                   f"<= {cfg.max_restarts}, task retries <= {cfg.max_task_retries}): {err}; "
                                   "finished chunks are kept, rerun to resume") from err
            pids[a].add(res["pid"])
            on_result(c, res)
            if todo:
                submit(a)
        encode_s = time.perf_counter() - t1
    finally:
        for act in actors:
            try:
                ray.kill(act)
            except Exception as err:  # noqa: BLE001 - best effort: the actor may already be gone
                log.debug("ray.kill(%s): %s", act, err)
        if started:
            ray.shutdown()
    return {
        "mode": "ray", "ray": how, "num_actors": n_actors, "gpus_per_actor": gpus,
        "cpus_per_actor": cfg.num_cpus_per_actor, "torch_threads_per_actor": threads,
        "devices": sorted({i["device"] for i in info}), "hosts": sorted({i["host"] for i in info}),
        "actor_restarts": sum(len(p) - 1 for p in pids),
        "startup_seconds": round(startup, 3), "encode_seconds": round(encode_s, 3),
    }


__all__ = ["FaultHook", "FeatureWorker", "PoolConfig", "connect", "run_pool"]

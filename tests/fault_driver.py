"""Run one job in a child process and inject a write fault at the N-th call of one function.

    python tests/fault_driver.py MODE MODULE:FUNC N LIMIT JOB.json

Before the N-th call of ``MODULE.FUNC`` (``Class.method`` allowed) the process limits its file size to
LIMIT bytes (``RLIMIT_FSIZE``): with MODE ``diskfull`` a write past it fails with ``OSError(EFBIG)``,
as on a full disk; with MODE ``die`` the kernel kills the process (``SIGXFSZ``) in the middle of that
write. JOB.json says what to run: ``{"job": "extract", "config": {...}}`` (an in-process feature
extraction) or ``{"job": "shards", ...}`` (write a domain's shard folder).
"""

from __future__ import annotations

import functools
import importlib
import json
import resource
import signal
import sys
from pathlib import Path


def _patch(target: str, nth: int, limit: int, mode: str) -> None:
    module_name, _, path = target.partition(":")
    owner = importlib.import_module(module_name)
    *outer, name = path.split(".")
    for part in outer:
        owner = getattr(owner, part)
    real = getattr(owner, name)
    calls = [0]

    @functools.wraps(real)
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            # Python starts with SIGXFSZ ignored (writes fail with EFBIG); "die" restores the kernel default
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN if mode == "diskfull" else signal.SIG_DFL)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return real(*args, **kwargs)

    setattr(owner, name, wrapped)


def _run(job: dict) -> None:
    if job["job"] == "extract":
        from missrec.features.encode import EncoderSpec
        from missrec.features.job import ExtractConfig, extract_features

        c = dict(job["config"])
        extract_features(ExtractConfig(**{**c, "encoder": EncoderSpec(**c["encoder"]), "pool": None}))
    elif job["job"] == "shards":
        from missrec.data.atomic import load_domain
        from missrec.data.shard_writer import write_domain_shards

        dom = load_domain(job["data_root"], job["domain"], job.get("features", []))
        write_domain_shards(dom, Path(job["out"]), samples_per_shard=job["samples_per_shard"],
                            feature_suffixes=job.get("features", []), show_progress=False)
    else:
        raise ValueError(f"unknown job {job['job']!r}")


if __name__ == "__main__":
    mode, target, nth, limit, job_file = sys.argv[1:6]
    if mode not in ("diskfull", "die"):
        raise SystemExit(f"mode must be diskfull or die, got {mode!r}")
    _patch(target, int(nth), int(limit), mode)
    _run(json.loads(Path(job_file).read_text()))

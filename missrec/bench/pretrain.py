"""Pre-training throughput over ranks: sequences per second with 1 and 2 ranks (same per-rank batch,
one torch thread per rank), the scaling efficiency rate_2 / (2 rate_1), and where the time goes
(interest discovery, data, step, checkpoint) as ``RUN/metrics.json`` reports it.

Each configuration runs ``launcher/pretrain.py`` as its own job (``deepspeed --num_accelerators N`` on
CPU), on the synthetic catalogue's source domains, so start-up is excluded from the rate but the
real data path, gathered negatives and gradient averaging are in it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from missrec.data.atomic import load_domain
from missrec.data.shard_writer import write_domain_shards
from missrec.data.shards import shards_exist
from missrec.data.synthetic import SyntheticConfig, generate_catalogue
from missrec.errors import StageFailedError
from missrec.train.dist import launch_command

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]



def synthetic_shards(workdir: Path, items: int = 1000, users: int = 2000) -> list[Path]:
    """Shard folders of the synthetic catalogue's source domains (written once under ``workdir``)."""
    cfg = SyntheticConfig(items_per_domain=items, users_per_domain=users)
    out = []
    for d in cfg.source_domains:
        folder = workdir / "shards" / d
        if not shards_exist(folder):
            if not (workdir / "catalogue" / "catalogue.json").exists():
                generate_catalogue(workdir / "catalogue", cfg)
            dom = load_domain(workdir / "catalogue" / d, d, ["feat1CLS", "feat3CLS"])
            write_domain_shards(dom, folder, samples_per_shard=2000, feature_suffixes=["feat1CLS", "feat3CLS"],
                                show_progress=False)
        out.append(folder)
    return out


def run_pretrain_benchmark(
    ranks: tuple[int, ...] = (1, 2), batch_size: int = 128, steps: int = 40, zero: str = "zero2",
    workdir: str | None = None, sets: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Time ``steps`` pre-training steps (one epoch) per rank count; returns the figures as a dict."""
    work = Path(workdir or tempfile.mkdtemp(prefix="bench-pretrain-"))
    data = synthetic_shards(work)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    results = {}
    for n in ranks:
        out = work / f"run-{n}"
        args = ["--deepspeed_config", str(REPO / "cluster_configs" / f"{zero}.json"), "--data",
                ",".join(map(str, data)), "--output-dir", str(out), "--quiet", "--set", f"batch_size={batch_size}",
                "--set", "epochs=1", "--set", f"max_steps_per_epoch={steps}", "--set", "threads=1",
                "--set", "checkpoint_every=0"]
        for s in sets:
            args += ["--set", s]
        cmd = launch_command(str(REPO / "launcher" / "pretrain.py"), args, n)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise StageFailedError(f"pre-training with {n} ranks failed:\n{proc.stderr[-4000:]}")
        m = json.loads((out / "metrics.json").read_text())
        m["job_seconds"] = round(time.perf_counter() - t0, 1)
        results[n] = m
        log.info("%d rank(s): %.1f seq/s, shares %s", n, m["seq_per_second"], m["time_share"])
    summary: dict[str, Any] = {
        "per_rank_batch": batch_size, "steps": steps, "zero": zero,
        "seq_per_second": {str(n): results[n]["seq_per_second"] for n in ranks},
        "time_share": {str(n): results[n]["time_share"] for n in ranks},
        "time_seconds": {str(n): results[n]["time_seconds"] for n in ranks},
        "job_seconds": {str(n): results[n]["job_seconds"] for n in ranks},
    }
    if 1 in results and len(ranks) > 1:
        base = results[1]["seq_per_second"]
        summary["scaling_efficiency"] = {
            str(n): round(results[n]["seq_per_second"] / (n * base), 3) for n in ranks if n > 1
        }
    return summary

"""The GPU check: every stage that should use a GPU, run once on one, sized for about 8 minutes on an H100.

    python launcher/bench.py gpu --data-root ../shared/datasets/scientific_mm   # JSON out, failures included

1. ``pretrain``: DeepSpeed pre-training on CUDA (NCCL, bf16, ZeRO-2) of the synthetic sources for a fixed
   number of steps, interest discovery on faiss-gpu (``missrec.interests.use_gpu=true``);
2. ``finetune``: 3 epochs of MISSRec on scientific_mm (inductive, both modalities) on CUDA, then the test split;
3. ``mid_1m``: DPC-KNN of 1 M tokens (width 300) on faiss-gpu;
4. ``extract``: a tiny open_clip model encoding the synthetic catalogue's texts and images on CUDA, in process;
5. ``scale_1m``: the scale benchmark (:mod:`missrec.bench.scale`) at 1 M items.

Each check runs on its own; a failure is recorded (message and traceback tail) and the next one runs, so one
run shows everything that breaks. ``quick`` shrinks every check (the CPU test of this script uses it).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from missrec.bench.mid import run_mid_benchmark
from missrec.bench.pretrain import synthetic_shards
from missrec.bench.scale import run_scale_benchmark
from missrec.data.synthetic import SyntheticConfig, generate_catalogue
from missrec.errors import MissingInputError, StageFailedError
from missrec.features.clip import make_tiny_clip
from missrec.features.encode import EncoderSpec
from missrec.features.job import ExtractConfig, extract_features
from missrec.train.dist import free_port

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


def _env(cuda: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def _launch(script: str, args: list[str], cuda: bool, timeout: float) -> str:
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), script, *args] if script.endswith("pretrain.py") else \
        [sys.executable, script, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(cuda), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise StageFailedError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-4000:]}")
    return proc.stdout


def _port() -> int:
    return free_port()


def check_pretrain(work: Path, cuda: bool, quick: bool) -> dict[str, Any]:
    data = synthetic_shards(work / "pretrain-data", items=500 if quick else 5000, users=1000 if quick else 20000)
    out = work / "pretrain-run"
    sets = ["epochs=1", f"max_steps_per_epoch={5 if quick else 200}", f"batch_size={64 if quick else 512}",
            f"num_workers={1 if quick else 4}", "log_every=10", "progress=false", "missrec.interests.use_gpu=auto"]
    if quick:
        sets += ["missrec.hidden=32", "missrec.inner=64", "missrec.heads=2"]
    args = ["--deepspeed_config", str(REPO / "cluster_configs" / ("bf16.json" if cuda else "zero2.json")),
            "--data", ",".join(map(str, data)), "--output-dir", str(out), "--quiet"]
    for s in sets:
        args += ["--set", s]
    _launch(str(REPO / "launcher" / "pretrain.py"), args, cuda, timeout=600)
    m = json.loads((out / "metrics.json").read_text())
    env = json.loads((out / "env.json").read_text())
    return {"backend": env.get("backend"), "bf16": m["bf16"], "zero_stage": m["zero_stage"],
            "steps": m["steps_this_run"], "seq_per_second": m["seq_per_second"], "time_seconds": m["time_seconds"]}


def check_finetune(work: Path, cuda: bool, quick: bool, data_root: str | None) -> dict[str, Any]:
    if not data_root or not Path(data_root, "Scientific.train.inter").exists():
        raise MissingInputError(f"scientific_mm not found at {data_root!r} (pass --data-root)")
    out = work / "finetune-run"
    args = ["--data-root", data_root, "--domain", "Scientific", "--model", "missrec", "--mode", "inductive",
            "--features", "feat1CLS,feat3CLS", "--output-dir", str(out), "--set", f"train.epochs={1 if quick else 3}",
            "--set", f"train.device={'cuda' if cuda else 'cpu'}", "--set", "train.progress=false"]
    if quick:
        args += ["--set", "train.max_steps_per_epoch=2", "--set", "missrec.hidden=32", "--set", "missrec.heads=2"]
    _launch(str(REPO / "launcher" / "finetune.py"), args, cuda, timeout=600)
    m = json.loads((out / "metrics.json").read_text())
    return {"test": m["test"], "seconds_per_epoch": m["seconds_per_epoch"],
            "eval_seconds_per_epoch": m["eval_seconds_per_epoch"]}


def check_mid(work: Path, cuda: bool, quick: bool) -> dict[str, Any]:
    out = run_mid_benchmark(20_000 if quick else 1_000_000, dim=300, use_gpu=bool(cuda),
                            exact_check_max=0, recall_sample=200)
    return {k: out[k] for k in ("tokens", "clusters", "seconds_total", "seconds", "peak_rss_gib", "ari_vs_planted")} | {
        "gpu": out["info"].get("gpu"), "knn_backend": out["info"].get("knn_backend"),
        "knn_recall": out["info"].get("knn_recall")}


def check_extract(work: Path, cuda: bool, quick: bool) -> dict[str, Any]:
    items = 300 if quick else 5000
    generate_catalogue(work / "extract-cat", SyntheticConfig(items_per_domain=items, users_per_domain=10,
                                                             domains=("Kitchen",), target_domains=(),
                                                             proxy_features=False))
    cfg_path, ckpt = make_tiny_clip(work / "extract-model")
    spec = EncoderSpec(backend="open_clip", model=cfg_path.stem, pretrained=str(ckpt), model_config=str(cfg_path),
                       batch_size=256, device="cuda" if cuda else "cpu")
    meta = extract_features(ExtractConfig(str(work / "extract-cat" / "Kitchen"), "Kitchen", spec, None,
                                          out_dir=str(work / "extract-out"), chunk_size=1024, keep_chunks=False))
    return {"items": items, "encode_items_per_second": meta["encode_items_per_second"],
            "wall_seconds": meta["wall_seconds"], "device": spec.device}


def check_scale(work: Path, cuda: bool, quick: bool) -> dict[str, Any]:
    n = 20_000 if quick else 1_000_000
    return run_scale_benchmark(items=(n,), steps=5 if quick else 30, hidden=32 if quick else 128,
                               workdir=str(work / "scale"), rows=200_000 if quick else 2_000_000)


def run_gpu_check(data_root: str | None = None, workdir: str | None = None, quick: bool = False,
                  only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the checks (all, or those named in ``only``); returns what each printed or the error it raised."""
    import torch

    cuda = torch.cuda.is_available()
    work = Path(workdir or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
        "python": sys.version.split()[0], "quick": quick, "checks": {},
    }
    try:
        import faiss

        out["faiss"] = {"version": faiss.__version__, "gpus": int(getattr(faiss, "get_num_gpus", lambda: 0)())}
    except ImportError as exc:
        out["faiss"] = {"error": str(exc)}
    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "pretrain": lambda: check_pretrain(work, cuda, quick),
        "finetune": lambda: check_finetune(work, cuda, quick, data_root),
        "mid_1m": lambda: check_mid(work, cuda, quick),
        "extract": lambda: check_extract(work, cuda, quick),
        "scale_1m": lambda: check_scale(work, cuda, quick),
    }
    for name, fn in checks.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            result = {"ok": True, **fn()}
        except Exception as exc:  # noqa: BLE001 - the check records every failure and goes on
            result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[-3000:]}",
                      "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        out["checks"][name] = result
        log.info("gpu check %s: %s", name, "ok" if result["ok"] else result["error"][:300])
    out["all_ok"] = all(c["ok"] for c in out["checks"].values())
    return out

"""Benchmarks; each prints one JSON object.

    python launcher/bench.py loader --data-root ../shared/datasets/scientific --domain Scientific
    python launcher/bench.py mid --tokens 100000 --dim 300
    python launcher/bench.py extract --items 3000
    python launcher/bench.py pretrain --ranks 1,2 --steps 40
    python launcher/bench.py gpu --data-root ../shared/datasets/scientific_mm   # on a GPU machine, ~8 minutes
    python launcher/bench.py scale --items 100000,1000000,4000000   # 2-rank pre-training as the catalogue grows
    python launcher/bench.py serve --run runs/ind --extra 0,100000 --kinds flat,hnsw   # a run with a history affinity
    python launcher/bench.py validation   # validation with the scoring-policy grid vs a plain one (scientific_mm)
    python launcher/bench.py report [--quick] [--skip mid,pretrain]   # all of them -> docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from missrec.cli import add_debug_flag, launch


def cmd_loader(args: argparse.Namespace) -> dict:
    from missrec.bench.loader import run_loader_benchmark
    from missrec.bench.train_rate import sasrec_training_rate
    from missrec.data.atomic import load_domain
    from missrec.data.shards import shards_exist, write_domain_shards

    folder = Path(args.shards) if args.shards else Path(tempfile.mkdtemp(prefix="bench-shards-")) / args.domain
    if not shards_exist(folder):
        dom = load_domain(args.data_root, args.domain)
        write_domain_shards(dom, folder, samples_per_shard=args.samples_per_shard, show_progress=False)
    reader = run_loader_benchmark(folder, batch_size=512, num_workers=args.workers, epochs=2)
    # SASRec as trained by default (paper settings: batch 512, loss at the last position of each row)
    sasrec = sasrec_training_rate(folder, batch_size=512, steps=args.steps)
    return {
        "reader_sequences_per_second": reader["sequences_per_second"],
        "reader_workers": args.workers,
        "sasrec_training_sequences_per_second": sasrec["sequences_per_second"],
        "ratio": round(reader["sequences_per_second"] / sasrec["sequences_per_second"], 1),
        "reader": reader, "sasrec": sasrec,
    }


def cmd_mid(args: argparse.Namespace) -> dict:
    from missrec.bench.mid import run_mid_benchmark

    return run_mid_benchmark(
        args.tokens, dim=args.dim, clusters_ratio=args.ratio, knn=args.knn, method=args.method, seed=args.seed,
        exact_check_max=args.exact_check_max, show_progress=not args.quiet,
    )


def cmd_extract(args: argparse.Namespace) -> dict:
    from missrec.bench.extract import run_extract_benchmark

    actors = [int(a) for a in args.actors.split(",") if a]
    return run_extract_benchmark(
        items=args.items, actors=actors, chunk_size=args.chunk_size, batch_size=args.batch_size,
        workdir=args.workdir, address=args.address, in_process=not args.no_in_process, progress=not args.quiet,
    )


def cmd_pretrain(args: argparse.Namespace) -> dict:
    from missrec.bench.pretrain import run_pretrain_benchmark

    ranks = tuple(int(r) for r in args.ranks.split(",") if r)
    return run_pretrain_benchmark(ranks=ranks, batch_size=args.batch_size, steps=args.steps, zero=args.zero,
                                  workdir=args.workdir, sets=tuple(args.overrides))


def cmd_scale(args: argparse.Namespace) -> dict:
    from missrec.bench.scale import run_scale_benchmark

    items = tuple(int(x) for x in args.items.split(",") if x)
    return run_scale_benchmark(items=items, steps=args.steps, batch_size=args.batch_size, hidden=args.hidden,
                               workdir=args.workdir, extra=tuple(args.overrides))


def cmd_gpu(args: argparse.Namespace) -> dict:
    from missrec.bench.gpu import run_gpu_check

    return run_gpu_check(args.data_root, args.workdir, quick=args.quick,
                         only=tuple(x for x in args.only.split(",") if x))


def cmd_serve(args: argparse.Namespace) -> dict:
    from missrec.bench.serve import run_serve_benchmark

    return run_serve_benchmark(
        args.run, extra_items=[int(x) for x in args.extra.split(",") if x], kinds=args.kinds.split(","),
        users=args.users, k=args.k, factors=[int(f) for f in args.factors.split(",")], noise=args.noise,
        data_root=args.data_root,
    )


def cmd_validation(args: argparse.Namespace) -> dict:
    from missrec.bench.validation import run_validation_benchmark

    return run_validation_benchmark(args.data_root, args.domain, args.model, args.repeats, args.threads,
                                    tuple(args.set))


def cmd_report(args: argparse.Namespace) -> dict:
    from missrec.bench.report import ReportConfig, render_saved, run_report

    cfg = ReportConfig(
        output=args.output, data_root=args.data_root, quick=args.quick,
        skip=tuple(s for s in args.skip.split(",") if s), threads=args.threads,
        mid_timeout_s=args.mid_timeout, mid_kmeans_timeout_s=args.kmeans_timeout, mid_exact_max=args.exact_max,
        progress=not args.quiet,
    )
    return render_saved(cfg) if args.render_only else run_report(cfg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    lo = sub.add_parser("loader", help="shard reader rate vs SASRec training consumption")
    lo.add_argument("--data-root", default=str(Path(__file__).resolve().parents[1].parent / "shared/datasets/scientific"))
    lo.add_argument("--domain", default="Scientific")
    lo.add_argument("--shards", default=None, help="existing shard folder (written if missing)")
    lo.add_argument("--samples-per-shard", type=int, default=5000)
    lo.add_argument("--workers", type=int, default=2)
    lo.add_argument("--steps", type=int, default=0, help="SASRec steps to time (0: one whole epoch)")
    lo.set_defaults(fn=cmd_loader)
    mid = sub.add_parser("mid", help="interest discovery on N random clustered tokens")
    mid.add_argument("--tokens", type=int, required=True)
    mid.add_argument("--dim", type=int, default=300)
    mid.add_argument("--ratio", type=float, default=0.02)
    mid.add_argument("--knn", type=float, default=5)
    mid.add_argument("--method", choices=["dpc_knn", "kmeans"], default="dpc_knn")
    mid.add_argument("--seed", type=int, default=0)
    mid.add_argument("--exact-check-max", type=int, default=20000)
    mid.add_argument("--quiet", action="store_true")
    mid.set_defaults(fn=cmd_mid)
    ex = sub.add_parser("extract", help="feature extraction items/s with 1 and 2 Ray actors (tiny open_clip)")
    ex.add_argument("--items", type=int, default=3000)
    ex.add_argument("--actors", default="1,2", help="comma-separated pool sizes to time")
    ex.add_argument("--chunk-size", type=int, default=128)
    ex.add_argument("--batch-size", type=int, default=64)
    ex.add_argument("--workdir", default=None, help="folder for the catalogue and outputs (default: a temp dir)")
    ex.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    ex.add_argument("--no-in-process", action="store_true", help="skip the in-process baseline")
    ex.add_argument("--quiet", action="store_true")
    ex.set_defaults(fn=cmd_extract)
    pt = sub.add_parser("pretrain", help="pre-training seq/s with 1 and 2 DeepSpeed ranks (CPU, gloo)")
    pt.add_argument("--ranks", default="1,2")
    pt.add_argument("--batch-size", type=int, default=128, help="per rank")
    pt.add_argument("--steps", type=int, default=40)
    pt.add_argument("--zero", default="zero2", help="cluster_configs/<name>.json")
    pt.add_argument("--workdir", default=None)
    pt.add_argument("--set", action="append", default=[], dest="overrides", help="pre-training config override")
    pt.set_defaults(fn=cmd_pretrain)
    sc = sub.add_parser("scale", help="2-rank pre-training on catalogues of growing size: memory, seq/s, MID")
    sc.add_argument("--items", default="100000,1000000,4000000", help="comma-separated catalogue sizes")
    sc.add_argument("--steps", type=int, default=30)
    sc.add_argument("--batch-size", type=int, default=256, help="per rank")
    sc.add_argument("--hidden", type=int, default=128, help="model width (the MID token width)")
    sc.add_argument("--workdir", default=None, help="where catalogues (cached) and runs go (default runs/bench-scale)")
    sc.add_argument("--set", action="append", default=[], dest="overrides", help="pre-training config override")
    sc.set_defaults(fn=cmd_scale)
    gp = sub.add_parser("gpu", help="the GPU check: pre-training, fine-tuning, MID, extraction, scale on one GPU")
    gp.add_argument("--data-root", default="../shared/datasets/scientific_mm", help="scientific_mm (fine-tuning)")
    gp.add_argument("--workdir", default=None)
    gp.add_argument("--only", default="", help="comma-separated checks (pretrain,finetune,mid_1m,extract,scale_1m)")
    gp.add_argument("--quick", action="store_true", help="tiny sizes (to try the script without a GPU)")
    gp.set_defaults(fn=cmd_gpu)
    sv = sub.add_parser("serve", help="a run with a history affinity: index + history neighbours vs full ranking")
    sv.add_argument("--run", required=True, help="fine-tuning run folder (inductive MISSRec to grow the catalogue)")
    sv.add_argument("--extra", default="0,100000", help="comma-separated numbers of synthetic items to add")
    sv.add_argument("--kinds", default="flat,hnsw", help="index kinds: flat, hnsw, ivf")
    sv.add_argument("--users", type=int, default=500, help="test histories to serve")
    sv.add_argument("--k", type=int, default=10)
    sv.add_argument("--factors", default="1,2,5,10", help="candidate factors (pool = k x factor)")
    sv.add_argument("--noise", type=float, default=0.3, help="synthetic items: noise x each dimension's std")
    sv.add_argument("--data-root", default=None, help="data folder, if not where the run recorded it")
    sv.set_defaults(fn=cmd_serve)
    repo = Path(__file__).resolve().parents[1]
    va = sub.add_parser("validation", help="validation with the scoring-policy grid against a plain validation")
    va.add_argument("--data-root", default=str(repo.parent / "shared/datasets/scientific_mm"))
    va.add_argument("--domain", default="Scientific")
    va.add_argument("--model", choices=["missrec", "sasrec"], default="missrec")
    va.add_argument("--repeats", type=int, default=3)
    va.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    va.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    va.set_defaults(fn=cmd_validation)
    rp = sub.add_parser("report", help="run every benchmark; Markdown report with PNG plots and machine details")
    rp.add_argument("--output", default=str(repo / "docs" / "benchmarks.md"),
                    help="Markdown file; PNGs and results.json go to the same path without .md")
    rp.add_argument("--data-root", default=str(repo.parent / "shared" / "datasets"),
                    help="folder holding scientific/ and scientific_mm/")
    rp.add_argument("--quick", action="store_true", help="smaller sizes: MID 10k/100k only, fewer steps")
    rp.add_argument("--skip", default="", help="comma-separated stages: loader,mid,extract,pretrain,finetune,flops")
    rp.add_argument("--threads", type=int, default=0, help="torch threads for training stages (0: torch default)")
    rp.add_argument("--mid-timeout", type=float, default=900.0, help="seconds before a DPC-KNN MID run is stopped")
    rp.add_argument("--kmeans-timeout", type=float, default=300.0, help="seconds before a k-means MID run is stopped")
    rp.add_argument("--exact-max", type=int, default=10_000, help="largest MID pool for the exact O(N^2) reference")
    rp.add_argument("--render-only", action="store_true", help="re-render from the saved results.json")
    rp.add_argument("--quiet", action="store_true", help="no progress bars")
    rp.set_defaults(fn=cmd_report)
    for sp in sub.choices.values():
        add_debug_flag(sp)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(json.dumps(args.fn(args)))
    return 0


if __name__ == "__main__":
    sys.exit(launch(main))

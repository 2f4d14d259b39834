"""Score a finished fine-tuning run's best checkpoint again, at any cutoffs; prints the metrics JSON last.

    python launcher/evaluate.py --run runs/mm-ind
    python launcher/evaluate.py --run runs/mm-ind --ks 10,11,50,51 --split test --data-root ../shared/datasets/scientific_mm
    python launcher/evaluate.py --run runs/mm-ind --ties expected > runs/mm-ind/test_expected.json
    python launcher/evaluate.py --run runs/mm-ind --by-popularity 6,21   # per bucket of target popularity
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from missrec.cli import add_debug_flag, launch
from missrec.eval.metrics import TIE_RULES
from missrec.transfer.rescore import rescore_by_popularity, rescore_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(p)
    p.add_argument("--run", required=True, help="a fine-tuning run folder (config.json, best.pt)")
    p.add_argument("--ks", default="10,50", help="comma-separated cutoffs (default 10,50)")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--data-root", default=None, help="the data folder, if not the one in the run's config")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--ties", choices=TIE_RULES, default="index",
                   help="tied scores: index (lower item index first, as in training) | expected (random order)")
    p.add_argument("--by-popularity", default=None, metavar="EDGES",
                   help="e.g. 6,21: metrics per bucket of how often the target is a training target "
                        "([0, 6), [6, 21), [21, inf)) and over all users")
    args = p.parse_args(argv)
    try:
        ks = [int(k) for k in args.ks.split(",") if k.strip()]
        edges = [int(e) for e in args.by_popularity.split(",") if e.strip()] if args.by_popularity else None
    except ValueError:
        p.error(f"--ks and --by-popularity must be comma-separated integers, got {args.ks!r}, {args.by_popularity!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if edges is None:
        metrics = rescore_run(args.run, ks, args.split, args.data_root, args.device, args.ties)
    else:
        metrics = {"edges": edges, "buckets": rescore_by_popularity(
            args.run, edges, ks, args.split, args.data_root, args.device, args.ties)}
    print(json.dumps({"run": args.run, "split": args.split, "ties": args.ties, **metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(launch(main))

"""The embedded end-to-end demo on the synthetic catalogue (``make demo``): prepare -> Ray extraction with a
tiny open_clip model -> shards -> DeepSpeed pre-training (2 ranks) -> fan-out fine-tuning -> results.

    python launcher/demo.py --out runs/demo
    tensorboard --logdir runs/demo
"""

from __future__ import annotations

import argparse
import logging
import sys

from missrec.cli import add_debug_flag, launch
from missrec.transfer.demo import DemoConfig, run_demo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(p)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=DemoConfig.epochs, help="fine-tuning epochs per job")
    p.add_argument("--pretrain-epochs", type=int, default=DemoConfig.pretrain_epochs)
    p.add_argument("--ranks", type=int, default=DemoConfig.ranks, help="DeepSpeed ranks for pre-training")
    p.add_argument("--num-cpus", type=int, default=DemoConfig.num_cpus, help="Ray CPUs (actors, fine-tuning jobs)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    # the stages speak through missrec.transfer.demo; libraries (open_clip, Ray, DeepSpeed) only warn
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("missrec.transfer.demo").setLevel(logging.INFO)
    cfg = DemoConfig(out=args.out, epochs=args.epochs, pretrain_epochs=args.pretrain_epochs, ranks=args.ranks,
                     num_cpus=args.num_cpus)
    res = run_demo(cfg, progress=not args.no_progress)
    print("\nTest metrics on the synthetic target domains (full ranking over each domain's items):\n")
    print(res["table"])
    print(f"\nwhole demo: {res['seconds']} s (stages: {res['stage_seconds']})")
    print(f"results: {args.out}/results.md   interests: {res['picture']['png']}")
    print(f"look at the runs:  .venv/bin/tensorboard --logdir {args.out}")
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(launch(main))

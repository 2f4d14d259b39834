"""The embedded end-to-end demo on the synthetic catalogue (``make demo``).

    python launcher/demo.py --out runs/demo
    tensorboard --logdir runs/demo/runs
"""

from __future__ import annotations

import argparse
import logging
import sys

from missrec.transfer.demo import DemoConfig, run_demo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=DemoConfig.epochs)
    p.add_argument("--threads", type=int, default=DemoConfig.threads)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("missrec.interests").setLevel(logging.WARNING)
    res = run_demo(DemoConfig(out=args.out, epochs=args.epochs, threads=args.threads), progress=not args.no_progress)
    print("\nTest metrics on the synthetic target domains (full ranking):\n")
    print(res["table"])
    print(f"\nwhole demo: {res['seconds']} s; results in {args.out}/results.md")
    print(f"look at the runs:  .venv/bin/tensorboard --logdir {args.out}/runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The real transfer experiment: pre-train on four Amazon source domains, fine-tune on Scientific.

    python launcher/transfer.py                 # full size, for the record (hours on 2 CPU cores)
    python launcher/transfer.py --quick         # the first 400 users of every domain, a tiny model (CI)
    python launcher/transfer.py --out runs/t --seeds 2020,1,2 --set pretrain_epochs=5

Stages and outputs: missrec/transfer/experiment.py. Every stage whose output is complete is skipped, so a rerun
continues an interrupted one. The last stdout line is the table's JSON: {"rows": {"zero-shot": {...}, ...}}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace

from missrec.cli import add_debug_flag, launch
from missrec.config import merge, parse_overrides
from missrec.transfer.experiment import QUICK, TransferConfig, run_transfer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(p)
    p.add_argument("--quick", action="store_true", help="a slice of every domain and a tiny model (about 3 min)")
    p.add_argument("--out", default=None, help="run folder (default runs/transfer, runs/transfer-quick)")
    p.add_argument("--sources", default=None,
                   help="folder of the source domains (default $MISSREC_DATASETS/sources, ../shared/datasets/sources)")
    p.add_argument("--target", default=None,
                   help="Scientific's atomic files (default $MISSREC_DATASETS/scientific)")
    p.add_argument("--seeds", default=None, help="comma-separated fine-tuning seeds")
    p.add_argument("--set", action="append", default=[], dest="overrides",
                   help="experiment setting key=value (fields of TransferConfig)")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")
    cfg = QUICK if args.quick else TransferConfig()
    if args.overrides:
        cfg = merge(cfg, parse_overrides(args.overrides))
    data = os.environ.get("MISSREC_DATASETS", "../shared/datasets")  # where the tests find the shared data too
    changes = {"sources_root": args.sources or f"{data}/sources", "target_root": args.target or f"{data}/scientific"}
    if args.out:
        changes["out"] = args.out
    if args.seeds:
        changes["seeds"] = tuple(int(s) for s in args.seeds.split(",") if s)
    cfg = replace(cfg, **changes)
    result = run_transfer(cfg)
    sys.stdout.write(json.dumps({"rows": result["rows"], "stage_seconds": result["stage_seconds"]}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(launch(main))

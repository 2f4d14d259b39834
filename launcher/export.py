"""Consolidate a pre-training run's checkpoint (ZeRO partitions) into one file for fine-tuning.

    python launcher/export.py --run runs/pretrain --out runs/pretrain/backbone.pt [--tag step00000148]
    python launcher/finetune.py ... --model missrec --mode inductive --pretrained runs/pretrain/backbone.pt
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from missrec.cli import add_debug_flag, launch
from missrec.train.export import export_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(p)
    p.add_argument("--run", required=True, help="pre-training run folder (its checkpoints/ sub-folder)")
    p.add_argument("--out", required=True, help="consolidated output file")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    info = export_checkpoint(args.run, args.out, args.tag)
    sys.stdout.write(json.dumps(info) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(launch(main))

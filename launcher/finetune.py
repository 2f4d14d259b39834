"""Fine-tune (or train from scratch) one model on one domain and print its metrics as the last line.

    python launcher/finetune.py --data-root ../shared/datasets/scientific --domain Scientific \
        --model sasrec --output-dir runs/sasrec-sci
    python launcher/finetune.py --data-root ../shared/datasets/scientific_mm --domain Scientific \
        --model missrec --mode transductive --features feat1CLS,feat3CLS --output-dir runs/missrec-mm

Any config value can be set with ``--config diff.yaml`` and ``--set train.lr=5e-4`` (dotted keys).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from missrec.config import RunConfig, build
from missrec.transfer.finetune import run_finetune


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="folder with the domain's atomic files or shard folder")
    p.add_argument("--domain", required=True)
    p.add_argument("--model", choices=["sasrec", "missrec"], default=None)
    p.add_argument("--mode", choices=["transductive", "inductive"], default=None)
    p.add_argument("--features", default=None, help="comma-separated feature suffixes, e.g. feat1CLS,feat3CLS")
    p.add_argument("--feature-dir", default=None, help="folder of the feature files, if not beside the data")
    p.add_argument("--pretrained", default=None, help="pre-trained checkpoint (launcher/export.py output)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--config", action="append", default=[], help="YAML/JSON config diff (repeatable)")
    p.add_argument("--set", action="append", default=[], dest="overrides", help="dotted override key=value")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    logging.getLogger("missrec.train.loop").setLevel(logging.INFO)  # one line per epoch, even when quiet

    flags = [f"data.data_root={args.data_root}", f"data.domain={args.domain}", f"output_dir={args.output_dir}"]
    if args.model:
        flags.append(f"model={args.model}")
    if args.mode:
        flags.append(f"missrec.mode={args.mode}")
    if args.features is not None:
        flags.append(f"data.features=[{args.features}]")
    if args.feature_dir:
        flags.append(f"data.feature_dir={args.feature_dir}")
    if args.pretrained:
        flags.append(f"pretrained={args.pretrained}")
    if args.epochs is not None:
        flags.append(f"train.epochs={args.epochs}")
    if args.seed is not None:
        flags.append(f"train.seed={args.seed}")
    if args.quiet:
        flags.append("train.progress=false")
    cfg = build(RunConfig, args.config, flags + args.overrides)
    metrics = run_finetune(cfg)
    sys.stdout.write(json.dumps(metrics) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pre-train MISSRec on several source domains with DeepSpeed (ID-agnostic, multi-modal).

    deepspeed --num_accelerators 2 launcher/pretrain.py --deepspeed_config cluster_configs/zero2.json \
        --data shards/Kitchen,shards/Garden --output-dir runs/pretrain
    torchrun --nproc_per_node 2 launcher/pretrain.py --deepspeed_config cluster_configs/zero2.json \
        --data shards/Kitchen,shards/Garden --output-dir runs/pretrain
    # after a crash: the same command with --resume continues from the latest complete checkpoint
    python launcher/export.py --run runs/pretrain --out runs/pretrain/backbone.pt

On CPU set DS_ACCELERATOR=cpu and OMP_NUM_THREADS=1 (gloo backend). Batch sizes and model settings come
from the toolkit config (``--set batch_size=512``, ``--config diff.yaml``), never from the DeepSpeed JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from missrec.cli import add_debug_flag, launch
from missrec.config import PretrainConfig, build
from missrec.train.pretrain import run_pretrain


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(p)
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON with engine settings (cluster_configs/zero{1,2,3}.json, bf16.json)")
    p.add_argument("--data", action="append", default=[],
                   help="domain shard folders, comma-separated or repeated")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per rank")
    p.add_argument("--config", action="append", default=[], help="YAML/JSON config diff (repeatable)")
    p.add_argument("--set", action="append", default=[], dest="overrides", help="dotted override key=value")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s [rank %(process)d] %(name)s: %(message)s")
    flags = [f"output_dir={args.output_dir}"]
    folders = [f for item in args.data for f in item.split(",") if f]
    if folders:
        flags.append(f"data=[{','.join(folders)}]")
    if args.deepspeed_config:
        flags.append(f"deepspeed_config={args.deepspeed_config}")
    if args.epochs is not None:
        flags.append(f"epochs={args.epochs}")
    if args.batch_size is not None:
        flags.append(f"batch_size={args.batch_size}")
    if args.quiet:
        flags.append("progress=false")
    cfg = build(PretrainConfig, args.config, flags + args.overrides)
    summary = run_pretrain(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        sys.stdout.write(json.dumps({k: v for k, v in summary.items() if k != "history"}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(launch(main))

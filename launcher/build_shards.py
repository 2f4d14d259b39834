"""Write one domain's atomic files as WebDataset sequence shards (+ item tables + manifest.json).

    python launcher/build_shards.py --data-root ../shared/datasets/scientific_mm --domain Scientific \
        --out shards/Scientific --features feat1CLS,feat3CLS [--samples-per-shard 10000]
    python launcher/build_shards.py --data-root data/sources/Toys --domain Toys --out shards/Toys \
        --features minilm --feature-dir features/Toys

Feature files <D>.<suffix> are read from --feature-dir when given (e.g. the --out folder of
launcher/extract_features.py), else from --data-root.

Prints a one-line JSON summary of the manifest as the last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from missrec.cli import add_debug_flag, launch
from missrec.data.atomic import load_domain
from missrec.data.shards import write_domain_shards


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(p)
    p.add_argument("--data-root", required=True, help="folder with the domain's atomic files")
    p.add_argument("--domain", required=True, help="domain name, the file prefix (e.g. Scientific)")
    p.add_argument("--out", required=True, help="output folder for this domain, e.g. shards/Scientific")
    p.add_argument("--features", default="", help="comma-separated feature suffixes, e.g. feat1CLS,feat3CLS")
    p.add_argument("--feature-dir", default=None,
                   help="folder holding the feature files <DOMAIN>.<suffix> (default: --data-root)")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--feature-dtype", choices=["float32", "float16"], default="float32",
                   help="storage type of the feature tables in the shard folder (float16 halves them; readers "
                        "memory-map them either way)")
    p.add_argument(
        "--max-len", type=int, default=None,
        help="keep only the last N items of each history when writing (default: keep them all)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    if args.samples_per_shard < 1:
        p.error("--samples-per-shard must be >= 1")
    suffixes = [s.strip() for s in args.features.split(",") if s.strip()]
    domain = load_domain(args.data_root, args.domain, feature_suffixes=suffixes, max_len=args.max_len,
                         feature_dir=args.feature_dir)
    manifest = write_domain_shards(
        domain, Path(args.out), samples_per_shard=args.samples_per_shard, feature_suffixes=suffixes,
        show_progress=not args.quiet, feature_dtype=args.feature_dtype,
    )
    summary = {
        "out": str(args.out),
        "domain": manifest["domain"],
        "num_items": manifest["num_items"],
        "num_users": manifest["num_users"],
        "max_history_len": manifest["max_history_len"],
        "splits": {k: {"rows": v["rows"], "shards": len(v["shards"])} for k, v in manifest["splits"].items()},
        "features": {k: v["dim"] for k, v in manifest["features"].items()},
        "feature_dtype": args.feature_dtype,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(launch(main))

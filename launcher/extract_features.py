"""Extract item features for a domain.

    python launcher/extract_features.py --data-root ../shared/datasets/scientific --domain Scientific \
        --backend sentence-transformers --model all-MiniLM-L6-v2 --out features/scientific --suffix minilm

(The Ray actor pool with open_clip text and image towers is the extraction issue's work; this
in-process text backend is what it builds on.)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from missrec.features.extract import extract_text_features


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--out", required=True, help="folder for <domain>.<suffix> and its metadata JSON")
    p.add_argument("--backend", choices=["sentence-transformers"], default="sentence-transformers")
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--suffix", default="minilm")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    meta = extract_text_features(args.data_root, args.domain, args.out, args.suffix, args.model, args.batch_size)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())

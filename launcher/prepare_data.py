"""Prepare raw catalogues as atomic-format domain folders (UniSRec's rules: 5-core, leave-one-out, 50 items).

    python launcher/prepare_data.py amazon --ratings Industrial_and_Scientific.csv \
        --meta meta_Industrial_and_Scientific.json.gz --domain Scientific --out data/
    python launcher/prepare_data.py generic --interactions inter.csv --items items.tsv --domain Shop --out data/
    python launcher/prepare_data.py merge --inputs data/Food data/Home --domain Pretrain --out data/
    python launcher/prepare_data.py export --data-root ../shared/datasets/scientific --domain Scientific \
        --out raw/

Each writes ``<out>/<domain>/`` (``export``: generic raw files in ``<out>``) and prints its summary as one
JSON line, the last line of stdout. Either raw file may be gzip-compressed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from missrec.data.prepare import PrepareConfig, prepare_amazon, prepare_generic
from missrec.data.prepare_merge import export_interactions, merge_domains
from missrec.errors import ConfigError, DataFormatError


def _common(p: argparse.ArgumentParser, default_k: int) -> None:
    p.add_argument("--domain", required=True, help="domain name: the folder and file prefix (e.g. Scientific)")
    p.add_argument("--out", required=True, help="parent folder; the domain goes to OUT/DOMAIN/")
    p.add_argument("--k", type=int, default=None, help=f"k-core for users and items (default {default_k}; 0: off)")
    p.add_argument("--user-k", type=int, default=None, help="k-core for users (overrides --k)")
    p.add_argument("--item-k", type=int, default=None, help="k-core for items (overrides --k)")
    p.add_argument("--max-len", type=int, default=50, help="histories keep their last N items (default 50)")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="keep repeated (user, item, timestamp, rating) interactions")
    p.add_argument("--skip-malformed", action="store_true",
                   help="skip and count malformed input lines instead of stopping at the first")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    p.set_defaults(default_k=default_k)


def _config(args: argparse.Namespace) -> PrepareConfig:
    k = args.default_k if args.k is None else args.k
    return PrepareConfig(
        user_k=k if args.user_k is None else args.user_k, item_k=k if args.item_k is None else args.item_k,
        max_len=args.max_len, dedupe=not args.keep_duplicates, skip_malformed=args.skip_malformed,
        require_title=getattr(args, "require_title", False), max_field_chars=getattr(args, "max_field_chars", 2000),
        progress=not args.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("amazon", help="Amazon Review Data (2018): ratings CSV + metadata JSON lines")
    a.add_argument("--ratings", required=True, help="item,user,rating,timestamp CSV (no header), plain or gzip")
    a.add_argument("--meta", required=True, help="metadata JSON lines (asin, title, category, brand, imageURL...)")
    a.add_argument("--require-title", action="store_true", help="also drop items without a usable title")
    a.add_argument("--max-field-chars", type=int, default=2000,
                   help="drop a cleaned text field this long or longer (UniSRec: 2000; 0: keep all)")
    _common(a, 5)
    g = sub.add_parser("generic", help="interactions CSV (user,item,timestamp) + item table (item_id,text,image)")
    g.add_argument("--interactions", required=True)
    g.add_argument("--items", required=True, help="TSV or CSV with item_id, text and optionally image")
    _common(g, 5)
    m = sub.add_parser("merge", help="merge prepared domains; ids become Domain:raw_id")
    m.add_argument("--inputs", nargs="+", required=True, help="prepared domain folders, each PATH or LABEL=PATH (LABEL: the id prefix)")
    _common(m, 0)
    e = sub.add_parser("export", help="a prepared domain back to generic raw files (interactions CSV + items)")
    e.add_argument("--data-root", required=True, help="the domain's folder")
    e.add_argument("--domain", required=True)
    e.add_argument("--out", required=True, help="folder for DOMAIN.interactions.csv and DOMAIN.items.tsv")
    e.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        if args.cmd == "export":
            result = export_interactions(args.data_root, args.domain, args.out, progress=not args.quiet)
        else:
            cfg = _config(args)
            if args.cmd == "amazon":
                result = prepare_amazon(args.ratings, args.meta, args.domain, args.out, cfg)
            elif args.cmd == "generic":
                result = prepare_generic(args.interactions, args.items, args.domain, args.out, cfg)
            else:
                result = merge_domains(args.inputs, args.domain, args.out, cfg)
    except (DataFormatError, ConfigError, FileNotFoundError) as err:
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

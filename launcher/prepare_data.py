"""Prepare raw catalogues as atomic-format domain folders (UniSRec's rules: 5-core, leave-one-out, 50 items).

    python launcher/prepare_data.py amazon --ratings Industrial_and_Scientific.csv \
        --meta meta_Industrial_and_Scientific.json.gz --domain Scientific --out data/
    python launcher/prepare_data.py generic --interactions inter.csv --items items.tsv --domain Shop --out data/
    python launcher/prepare_data.py unisrec --inter Games-6k.test.inter --items Games-6k.item \
        --domain Games --out data/
    python launcher/prepare_data.py sequences --sequences toys/user_sequence.txt --names toys/item_names.txt \
        --domain Toys --out data/
    python launcher/prepare_data.py merge --inputs data/Food data/Home --domain Pretrain --out data/
    python launcher/prepare_data.py export --data-root ../shared/datasets/scientific --domain Scientific \
        --out raw/

Each writes ``<out>/<domain>/`` (``export``: generic raw files in ``<out>``) and prints its summary as one
JSON line, the last line of stdout. Either raw file may be gzip-compressed.

``unisrec`` and ``sequences`` read published, already filtered domains (formats: missrec/data/raw_sources.py):
a RecBole ``.item`` table + a one-row-per-user ``.inter`` file (history + last item), or
``user_sequence.txt`` (user id, then item ids, oldest first) + ``item_names.txt`` (item id, space, text).
They keep the data as published (k-core off unless --k/--user-k/--item-k ask for it), then split and
write like the others (leave-one-out, histories cut to --max-len). An item in a history without text
(no line in the item file, or empty text) is an error naming the history file and line, unless
--drop-textless drops such items (counted by reason in <D>.prepare.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from missrec.cli import add_debug_flag, launch
from missrec.data.prepare import (
    PrepareConfig,
    prepare_amazon,
    prepare_generic,
    prepare_sequences,
    prepare_unisrec,
)
from missrec.data.prepare_merge import export_interactions, merge_domains


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
    u = sub.add_parser("unisrec", help="RecBole .item (item_id, title) + one-row-per-user .inter")
    u.add_argument("--inter", required=True, help="user_id, item_id_list, item_id TSV: one row per user")
    u.add_argument("--items", required=True, help="item_id:token + title:token_seq (or text:token_seq) TSV")
    s = sub.add_parser("sequences", help="user_sequence.txt (user, items oldest first) + item_names.txt")
    s.add_argument("--sequences", required=True, help="a line per user: user id, item ids (oldest first)")
    s.add_argument("--names", required=True, help="one item a line: item id, a space, then its text")
    for sp in (u, s):
        sp.add_argument("--drop-textless", action="store_true",
                        help="drop items without text from the histories (counted) instead of stopping")
        _common(sp, 0)
    m = sub.add_parser("merge", help="merge prepared domains; ids become Domain:raw_id")
    m.add_argument("--inputs", nargs="+", required=True, help="prepared domain folders, each PATH or LABEL=PATH (LABEL: the id prefix)")
    _common(m, 0)
    e = sub.add_parser("export", help="a prepared domain back to generic raw files (interactions CSV + items)")
    e.add_argument("--data-root", required=True, help="the domain's folder")
    e.add_argument("--domain", required=True)
    e.add_argument("--out", required=True, help="folder for DOMAIN.interactions.csv and DOMAIN.items.tsv")
    e.add_argument("--quiet", action="store_true")
    for sp in sub.choices.values():
        add_debug_flag(sp)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    if args.cmd == "export":
        result = export_interactions(args.data_root, args.domain, args.out, progress=not args.quiet)
    else:
        cfg = _config(args)
        if args.cmd == "amazon":
            result = prepare_amazon(args.ratings, args.meta, args.domain, args.out, cfg)
        elif args.cmd == "generic":
            result = prepare_generic(args.interactions, args.items, args.domain, args.out, cfg)
        elif args.cmd == "unisrec":
            result = prepare_unisrec(args.inter, args.items, args.domain, args.out, cfg,
                                     args.drop_textless)
        elif args.cmd == "sequences":
            result = prepare_sequences(args.sequences, args.names, args.domain, args.out, cfg,
                                       args.drop_textless)
        else:
            result = merge_domains(args.inputs, args.domain, args.out, cfg)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(launch(main))

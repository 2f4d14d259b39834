"""Top-k recommendations from a trained run for one or more histories; the last stdout line is JSON.

    python launcher/recommend.py --run runs/missrec-office --history "Office-000012,Office-000040" --k 10
    python launcher/recommend.py --run runs/missrec-office --history "12,40" --indices --approx
    python launcher/recommend.py --run runs/missrec-office --history "Office-000012" --agreement 400

``--history`` is repeatable (one user each): comma-separated raw item ids, oldest first (``--indices``:
0-based item indices instead). ``--agreement N`` also measures, over the first N histories of the
domain's test split, how often index + re-rank gives the exact full-ranking top-k.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from missrec.cli import add_debug_flag, launch
from missrec.serve.agreement import topk_agreement
from missrec.serve.index import IndexConfig
from missrec.serve.recommend import Recommender, ServeConfig


def _table(rows: list, width: int = 60) -> str:
    lines = [f"{'rank':>4}  {'index':>7}  {'raw id':<20} {'score':>9}  text"]
    for rank, r in enumerate(rows, 1):
        text = r.text if len(r.text) <= width else r.text[: width - 3] + "..."
        lines.append(f"{rank:>4}  {r.item_index:>7}  {r.raw_id:<20} {r.score:>9.4f}  {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(p)
    p.add_argument("--run", required=True, help="fine-tuning run folder (config.json, best.pt)")
    p.add_argument("--history", action="append", required=True, help="comma-separated items, oldest first")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--indices", action="store_true", help="history items are 0-based indices, not raw ids")
    p.add_argument("--approx", action="store_true", help="approximate index (see --approx-kind)")
    p.add_argument("--approx-kind", choices=["hnsw", "ivf"], default="hnsw")
    p.add_argument("--factor", type=int, default=None, help="candidate pool = k x factor (default 10)")
    p.add_argument("--no-history-neighbours", action="store_true",
                   help="a run with a history affinity: pool the user's index candidates only, not also each "
                        "history item's nearest neighbours")
    p.add_argument("--exclude-history", action="store_true",
                   help="leave the history's items out of the results (default: ranked by the run's policy)")
    p.add_argument("--data-root", default=None, help="data folder, if not where the run recorded it")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (the model; FAISS uses a GPU it sees)")
    p.add_argument("--agreement", type=int, default=0, metavar="N", help="measure top-k agreement on N test histories")
    p.add_argument("--quiet", action="store_true", help="warnings only, no progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")

    index_cfg = IndexConfig(kind=args.approx_kind if args.approx else "flat")
    cfg = ServeConfig(index=index_cfg, exclude_history=args.exclude_history, device=args.device,
                      history_neighbours=not args.no_history_neighbours,
                      progress=not args.quiet, **({"candidate_factor": args.factor} if args.factor else {}))
    rec = Recommender.from_run(args.run, cfg, data_root=args.data_root)
    histories: list[list[int | str]] = []
    for h in args.history:
        items = [t.strip() for t in h.split(",") if t.strip()]
        if args.indices and not all(t.lstrip("-").isdigit() for t in items):
            p.error(f"--indices: history {h!r} holds items that are not integers")
        histories.append([int(t) for t in items] if args.indices else items)
    results = rec.recommend(histories, k=args.k)
    out = {"run": args.run, "k": args.k, "index": rec.info, "users": []}
    for hist, rows in zip(histories, results, strict=True):
        print(f"\nhistory: {', '.join(map(str, hist))}")
        print(_table(rows))
        out["users"].append({"history": hist, "items": [
            {"rank": i, "item_index": r.item_index, "raw_id": r.raw_id, "score": round(r.score, 6), "text": r.text}
            for i, r in enumerate(rows, 1)]})
    if args.agreement > 0:
        hist = rec.split_histories("test", args.agreement)
        out["agreement"] = topk_agreement(rec, hist, args.k, factors=sorted({1, 2, 5, cfg.candidate_factor}),
                                          exclude_history=cfg.exclude_history)
        print(f"\ntop-{args.k} agreement with the exact ranking: {out['agreement']['factors']}")
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(launch(main))

"""Compare two groups of runs over seeds (mean ± sd, difference, standard error, Welch's t and p per
metric); prints a Markdown table, then the comparison as JSON on the last line.

    python launcher/compare.py --runs runs/ind-s2020 runs/ind-s1 runs/ind-s2 \\
        --baseline docs/benchmarks/official_code_inductive.json --labels ours,official
    python launcher/compare.py --runs runs/a-s* --baseline runs/b-s* --split valid
    python launcher/compare.py --runs ... --baseline ... --margin 0.005   # + a non-inferiority test

A source is a run folder, a metrics JSON file (e.g. ``launcher/evaluate.py ... > FILE``) or a JSON file
``{"runs": [...]}`` (missrec/eval/seeds.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from missrec.cli import add_debug_flag, launch
from missrec.eval.seeds import METRICS, compare_groups, comparison_json, load_group, render_comparison


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(p)
    p.add_argument("--runs", nargs="+", required=True, help="the first group's sources")
    p.add_argument("--baseline", nargs="+", required=True, help="the second group's sources")
    p.add_argument("--split", choices=["test", "valid"], default="test")
    p.add_argument("--metrics", default=",".join(METRICS), help="comma-separated (default: %(default)s)")
    p.add_argument("--labels", default="ours,baseline", help="the two groups' names in the table")
    p.add_argument("--margin", type=float, default=None,
                   help="also test non-inferiority: the one-sided p that the first group trails by this much or more")
    args = p.parse_args(argv)
    labels = tuple(s.strip() for s in args.labels.split(","))
    if len(labels) != 2:
        p.error(f"--labels needs two comma-separated names, got {args.labels!r}")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    a, b = load_group(args.runs, args.split), load_group(args.baseline, args.split)
    results = compare_groups(a, b, metrics, args.margin)
    print(render_comparison(results, labels))
    print(json.dumps({"labels": labels, "split": args.split, "margin": args.margin,
                      "metrics": comparison_json(results)}))
    return 0


if __name__ == "__main__":
    sys.exit(launch(main))

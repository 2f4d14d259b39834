"""Results tables in the paper's layout (R@10, N@10, R@50, N@50 per run), as Markdown and JSON."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")
HEAD = ("R@10", "N@10", "R@50", "N@50")


def markdown_table(rows: Sequence[Mapping[str, Any]], label: str = "run") -> str:
    """``rows``: dicts with ``name`` and ``test`` (metric -> value), optionally ``best_epoch``, ``seconds``."""
    lines = [f"| {label} | " + " | ".join(HEAD) + " | best epoch | seconds |", "|---" * (len(HEAD) + 3) + "|"]
    for r in rows:
        vals = " | ".join(f"{r['test'][m]:.4f}" for m in METRICS)
        lines.append(f"| {r['name']} | {vals} | {r.get('best_epoch', '')} | {r.get('seconds', '')} |")
    return "\n".join(lines)

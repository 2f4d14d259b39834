"""Results tables in the paper's layout (R@10, N@10, R@50, N@50 per run), as Markdown and JSON.

Two shapes: :func:`markdown_table` lists runs one per row (the demo); :func:`domain_table` /
:func:`render_domain_table` give one row per domain with the four metrics of every run side by side and
relative-improvement columns between runs (the fan-out of :mod:`missrec.transfer.fanout`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from missrec.io import atomic_open, write_json

log = logging.getLogger(__name__)

METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")
HEAD = ("R@10", "N@10", "R@50", "N@50")

# what each fan-out run is in the paper's terms
RUN_LEGEND = {
    "transductive": "MISSRec (item features + ID)",
    "inductive": "MISSRec (item features, no ID)",
    "sasrec": "SASRec (ID)",
}


def markdown_table(rows: Sequence[Mapping[str, Any]], label: str = "run") -> str:
    """``rows``: dicts with ``name`` and ``test`` (metric -> value), optionally ``best_epoch``, ``seconds``."""
    lines = [f"| {label} | " + " | ".join(HEAD) + " | best epoch | seconds |", "|---" * (len(HEAD) + 3) + "|"]
    for r in rows:
        vals = " | ".join(f"{r['test'][m]:.4f}" for m in METRICS)
        lines.append(f"| {r['name']} | {vals} | {r.get('best_epoch', '')} | {r.get('seconds', '')} |")
    return "\n".join(lines)


def relative_improvement(ours: float | None, base: float | None) -> float | None:
    """``(ours - base) / base`` in percent; ``None`` when either is missing or ``base`` is 0."""
    if ours is None or base is None or base == 0:
        return None
    return 100.0 * (ours - base) / base


def domain_table(
    jobs: Sequence[Mapping[str, Any]],
    domains: Sequence[str],
    runs: Sequence[str],
    comparisons: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """One row per domain: the test metrics of every run, then the relative improvements.

    ``jobs``: dicts with ``domain``, ``run`` (e.g. ``"transductive"``, ``"inductive-scratch"``),
    ``status`` (``ok`` | ``skipped`` | ``failed``) and, unless failed, ``test`` (metric -> value).
    ``comparisons``: ``(ours, base)`` run pairs; each gives four ``"<ours> vs <base> R@10"``-style columns
    holding ``100 * (ours - base) / base``. Returns ``{"columns", "rows"}``; a row has ``domain``,
    ``values`` (column -> float or None) and ``status`` (run -> status, ``missing`` if no such job).
    """
    by_key = {(j["domain"], j["run"]): j for j in jobs}
    columns = [f"{r} {h}" for r in runs for h in HEAD]
    columns += [f"{a} vs {b} {h}" for a, b in comparisons for h in HEAD]
    rows = []
    for d in domains:
        values: dict[str, float | None] = {}
        status: dict[str, str] = {}
        tests: dict[str, Mapping[str, float] | None] = {}
        for r in runs:
            job = by_key.get((d, r))
            status[r] = job["status"] if job is not None else "missing"
            tests[r] = job.get("test") if job is not None and job["status"] != "failed" else None
            for m, h in zip(METRICS, HEAD):
                values[f"{r} {h}"] = None if tests[r] is None else float(tests[r][m])
        for a, b in comparisons:
            for m, h in zip(METRICS, HEAD):
                ta, tb = tests.get(a), tests.get(b)
                values[f"{a} vs {b} {h}"] = relative_improvement(
                    None if ta is None else float(ta[m]), None if tb is None else float(tb[m])
                )
        rows.append({"domain": d, "values": values, "status": status})
    return {"columns": columns, "runs": list(runs), "comparisons": [list(c) for c in comparisons], "rows": rows}


def render_domain_table(table: Mapping[str, Any]) -> str:
    """Markdown of :func:`domain_table`'s result; a failed run's cells read ``failed``."""
    columns = table["columns"]
    lines = ["| domain | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in table["rows"]:
        cells = []
        for col in columns:
            v = row["values"][col]
            run = _run_of(col, table["runs"])
            if run is not None:  # a metric cell
                st = row["status"][run]
                cells.append("failed" if st == "failed" else "–" if v is None else f"{v:.4f}")
            else:  # an improvement cell
                cells.append("–" if v is None else f"{v:+.1f}%")
        lines.append(f"| {row['domain']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def legend(runs: Sequence[str], pretrained: bool = False) -> str:
    """One line naming what each run column is in the paper's terms."""
    parts = []
    for r in runs:
        base, _, suffix = r.partition("-")
        name = RUN_LEGEND.get(base, base)
        if suffix == "scratch":
            name += ", no pre-training"
        elif pretrained and base != "sasrec":
            name += ", pre-trained"
        parts.append(f"`{r}` = {name}")
    return "Runs: " + "; ".join(parts) + ". `A vs B` columns: relative improvement 100·(A − B)/B."


def job_line(row: Mapping[str, Any]) -> str:
    """One line for a finished fan-out job: its status, time and test metrics (or its error)."""
    name = f"{row['domain']}/{row['run']}"
    if row["status"] == "failed":
        return f"{name} FAILED after {row['seconds']} s: {row['error'].splitlines()[0]} (log: {row['log']})"
    vals = " ".join(f"{h} {row['test'][m]:.4f}" for m, h in zip(METRICS, HEAD))
    return f"{name} {row['status']} in {row['seconds']} s (best epoch {row.get('best_epoch')}): {vals}"


def write_fanout_results(
    out_dir: str | Path,
    jobs: Sequence[Mapping[str, Any]],
    domains: Sequence[str],
    runs: Sequence[str],
    comparisons: Sequence[tuple[str, str]],
    extra: Mapping[str, Any] | None = None,
    pretrained: bool = False,
) -> dict[str, Any]:
    """Write ``out_dir/results.md`` and ``results.json`` (atomically) for the fan-out's ``jobs`` rows.

    A failed job (``status == "failed"``, with ``error``, ``log``, ``log_tail``) is marked in the table and
    reported below it with its exception and the tail of its log. Returns the JSON summary plus
    ``"markdown"``.
    """
    out_dir = Path(out_dir)
    table = domain_table(jobs, domains, runs, comparisons)
    failed = [r for r in jobs if r["status"] == "failed"]
    md = [f"# Fine-tuning results ({len(jobs)} jobs, {len(failed)} failed)", "",
          render_domain_table(table), "", legend(runs, pretrained=pretrained),
          "Test split, full ranking over all items; the best epoch is chosen on validation NDCG@10."]
    if failed:
        md += ["", "## Failed jobs"]
        for r in failed:
            md += ["", f"### {r['domain']}/{r['run']}", "", f"`{r['error'].splitlines()[0]}`", "",
                   f"Log `{r['log']}`, last lines:", "", "```", r["log_tail"], "```"]
    markdown = "\n".join(md) + "\n"
    summary = {
        **dict(extra or {}), "domains": list(domains), "table": table, "jobs": [dict(r) for r in jobs],
        "failed": [f"{r['domain']}/{r['run']}" for r in failed],
        "counts": {s: sum(r["status"] == s for r in jobs) for s in ("ok", "skipped", "failed")},
    }
    write_json(out_dir / "results.json", summary)
    with atomic_open(out_dir / "results.md") as fh:
        fh.write(markdown)
    for r in failed:
        log.error("%s/%s failed: %s\n--- last lines of %s ---\n%s", r["domain"], r["run"], r["error"], r["log"],
                  r["log_tail"])
    log.info("results: %s (%d ok, %d skipped, %d failed)", out_dir / "results.md", summary["counts"]["ok"],
             summary["counts"]["skipped"], len(failed))
    return {**summary, "markdown": markdown}


def _run_of(column: str, runs: Sequence[str]) -> str | None:
    for r in runs:
        for h in HEAD:
            if column == f"{r} {h}":
                return r
    return None

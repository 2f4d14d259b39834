"""The state of a fan-out job's run folder: is it finished, with which config, and what its log says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from missrec.transfer.results import METRICS

# config keys that do not change a run's results: a difference in them does not force a rerun
IGNORED_KEYS = ("output_dir", "train.progress", "train.threads", "data.num_workers")


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ (keys in :data:`IGNORED_KEYS` left out)."""
    a, b = flat(old), flat(new)
    return sorted(k for k in set(a) | set(b) if k not in IGNORED_KEYS and a.get(k, "<unset>") != b.get(k, "<unset>"))


def read_complete_metrics(run_dir: Path) -> dict[str, Any] | None:
    """``run_dir/metrics.json`` when it is complete (parses, has every test metric), else ``None``."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    test = metrics.get("test") if isinstance(metrics, dict) else None
    if not isinstance(test, dict) or not all(isinstance(test.get(m), (int, float)) for m in METRICS):
        return None
    return metrics


def inspect_run(run_dir: Path, config: dict[str, Any]) -> tuple[str, list[str], dict[str, Any] | None]:
    """``("done", [], metrics)``, ``("changed", differing keys, metrics)``, or ``("todo", [], None)``."""
    metrics = read_complete_metrics(run_dir)
    if metrics is None:
        return "todo", [], None
    try:
        old = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "changed", ["config.json (missing or unreadable)"], metrics
    diffs = config_diff(old, config)
    return ("changed", diffs, metrics) if diffs else ("done", [], metrics)


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a text file ('' if it cannot be read)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])

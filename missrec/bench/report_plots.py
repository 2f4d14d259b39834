"""PNG plots of ``bench.py report`` (matplotlib, Agg, no global pyplot state), written atomically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from missrec.io import atomic_open

COLOURS = {"dpc_knn": "#1f77b4", "kmeans": "#ff7f0e", "exact_reference": "#2ca02c", "official": "#7f7f7f"}
LABELS = {"dpc_knn": "DPC-KNN on FAISS", "kmeans": "FAISS k-means", "exact_reference": "exact O(N²) DPC-KNN"}
SHARE_COLOURS = {"mid": "#2ca02c", "data": "#ff7f0e", "step": "#1f77b4", "checkpoint": "#7f7f7f"}


def _figure(width: float = 6.4, height: float = 3.6, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", metadata={"Software": None})
    return path


def _bar_labels(ax: Any, bars: Any, texts: Sequence[str]) -> None:
    for bar, text in zip(bars, texts):
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")


def plot_bars(path: Path, labels: Sequence[str], values: Sequence[float], ylabel: str, title: str,
              log: bool = False, fmt: str = "{:,.0f}") -> Path:
    """One bar per label, each annotated with its value."""
    fig, ax = _figure()
    bars = ax.bar(list(labels), list(values), color=["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"][: len(values)])
    _bar_labels(ax, bars, [fmt.format(v) for v in values])
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.15)
    return _save(fig, path)


def plot_mid(path: Path, runs: Sequence[Mapping[str, Any]], outlook: Sequence[Mapping[str, Any]]) -> Path:
    """Log-log seconds and peak RSS against tokens per method; runs stopped at the time limit are drawn
    as open markers at the limit (a lower bound); the exact reference's O(N^2) time extrapolation and
    the official dense N x N matrix are dashed / dotted."""
    fig, (ax_t, ax_m) = _figure(10, 4, 2)
    for method in ("dpc_knn", "kmeans", "exact_reference"):
        ok = sorted((r for r in runs if r.get("method") == method and r.get("status") == "ok"),
                    key=lambda r: r["tokens"])
        c = COLOURS[method]
        if ok:
            ax_t.plot([r["tokens"] for r in ok], [r["seconds_total"] for r in ok], "o-", color=c, label=LABELS[method])
            ax_m.plot([r["tokens"] for r in ok], [r["peak_rss_gib"] for r in ok], "o-", color=c, label=LABELS[method])
        late = [r for r in runs if r.get("method") == method and r.get("status") == "timeout"]
        for r in late:
            ax_t.plot([r["tokens"]], [r["seconds_at_least"]], "^", mfc="none", color=c, ms=9,
                      label=f"{LABELS[method]}: stopped (≥)")
            base = [x for x in ok if x["tokens"] == r.get("extrapolated_from")]
            if base and r.get("seconds_extrapolated"):
                ax_t.plot([base[0]["tokens"], r["tokens"]], [base[0]["seconds_total"], r["seconds_extrapolated"]],
                          "--", color=c, alpha=0.6, label=f"{LABELS[method]}, O(N²) extrapolated")
            if r.get("process_peak_rss_gib"):
                ax_m.plot([r["tokens"]], [r["process_peak_rss_gib"]], "^", mfc="none", color=c, ms=9)
    ext = [o for o in outlook if "reference_seconds_extrapolated" in o]
    ref = [r for r in runs if r.get("method") == "exact_reference" and r.get("status") == "ok"]
    if ext and ref:
        last = max(ref, key=lambda r: r["tokens"])
        xs = [last["tokens"], *[o["tokens"] for o in ext]]
        ys = [last["seconds_total"], *[o["reference_seconds_extrapolated"] for o in ext]]
        ax_t.plot(xs, ys, "--", color=COLOURS["exact_reference"], alpha=0.6, label="exact, O(N²) extrapolated")
    sizes = sorted({r["tokens"] for r in runs})
    if sizes:
        ax_m.plot(sizes, [n * n * 4 / float(1 << 30) for n in sizes], ":", color=COLOURS["official"],
                  label="dense N×N float32 (official code; not run)")
    for ax, ylabel in ((ax_t, "seconds"), (ax_m, "peak RSS (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens (width 300)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax_t.set_title("interest discovery time", fontsize=10)
    ax_m.set_title("peak memory", fontsize=10)
    return _save(fig, path)


def plot_pretrain(path: Path, seq_per_second: Mapping[str, float], shares: Mapping[str, Mapping[str, float]],
                  efficiency: Mapping[str, float]) -> Path:
    """Left: seq/s per rank count (efficiency annotated); right: stacked time shares per rank count."""
    fig, (ax_r, ax_s) = _figure(10, 4, 2)
    ranks = list(seq_per_second)
    bars = ax_r.bar([f"{r} rank{'s' if r != '1' else ''}" for r in ranks], [seq_per_second[r] for r in ranks],
                    color="#1f77b4")
    _bar_labels(ax_r, bars, [f"{seq_per_second[r]:,.0f}" + (f" (eff. {efficiency[r]:.2f})" if r in efficiency
                                                              else "") for r in ranks])
    ax_r.set_ylabel("sequences / s (all ranks)")
    ax_r.set_title("pre-training throughput", fontsize=10)
    ax_r.margins(y=0.15)
    bottom = [0.0] * len(ranks)
    keys = [k for k in ("mid", "data", "step", "checkpoint") if any(k in shares[r] for r in ranks)]
    keys += sorted({k for r in ranks for k in shares[r]} - set(keys))
    for k in keys:
        vals = [100 * shares[r].get(k, 0.0) for r in ranks]
        ax_s.bar([f"{r} rank{'s' if r != '1' else ''}" for r in ranks], vals, bottom=bottom,
                 color=SHARE_COLOURS.get(k, "#9467bd"),
                 label=f"{ {'mid': 'MID'}.get(k, k)} ({' / '.join(f'{v:.1f} %' for v in vals)})")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax_s.set_ylabel("% of busy time")
    ax_s.set_ylim(0, 100)
    ax_s.set_title("where the time goes (rank 0)", fontsize=10)
    ax_s.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), title="share per rank count",
                title_fontsize=8)
    return _save(fig, path)


def plot_scale(path: Path, runs: Sequence[Mapping[str, Any]]) -> Path:
    """Per catalogue size: peak memory per rank, sequences per second, and MID seconds against N log N scaled
    from the smallest size (dashed)."""
    import math

    fig, axes = _figure(12, 3.6, 3)
    items = [r["items"] for r in runs]
    panels = (("peak_rss_gib", "peak memory per rank (GiB, page cache excluded)"),
              ("seq_per_s", "sequences / s (2 ranks)"), ("mid_seconds", "interest discovery (s per epoch)"))
    for ax, (key, title) in zip(axes, panels):
        ax.plot(items, [r[key] for r in runs], marker="o", color="#1f77b4")
        for x, r in zip(items, runs):
            ax.annotate(f"{r[key]:,.2f}" if key == "peak_rss_gib" else f"{r[key]:,.0f}", (x, r[key]),
                        fontsize=8, xytext=(0, 4), textcoords="offset points", ha="center")
        ax.set_xscale("log")
        ax.set_xlabel("items in the catalogue")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
    n0, t0 = 2 * items[0], runs[0]["mid_seconds"]
    ref = [t0 * (2 * n * math.log(2 * n)) / (n0 * math.log(n0)) for n in items]
    axes[2].plot(items, ref, linestyle="--", color="#7f7f7f", label="N log N from the smallest")
    axes[2].set_yscale("log")
    axes[2].set_ylim(bottom=max(1e-1, min(r["mid_seconds"] for r in runs) / 2))
    axes[2].legend(fontsize=8)
    return _save(fig, path)


__all__ = ["plot_bars", "plot_mid", "plot_pretrain", "plot_scale"]

"""Markdown of ``bench.py report`` from its results dict (``results.json``), with the PNG plots.

A stage that failed is shown with its error; one that was skipped says so; a section that cannot be
rendered (a result missing a field) shows that error instead of stopping the report.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from missrec.bench import report_plots as plots
from missrec.io import atomic_open

log = logging.getLogger(__name__)

TITLES = {
    "loader": "1. Data loader vs SASRec training rate (Scientific)",
    "mid": "2. Interest discovery (MID) scaling",
    "extract": "3. Feature extraction scaling (Ray actors, tiny open_clip)",
    "pretrain": "4. Pre-training scaling (DeepSpeed on CPU)",
    "finetune": "5. Fine-tuning epoch time",
    "flops": "6. Dense matmul ceiling and achieved FLOP/s of a training step",
    "scale": "7. Pre-training as the catalogue grows (2 ranks, CPU)",
}
METHOD_NAMES = {"dpc_knn": "DPC-KNN on FAISS", "kmeans": "FAISS k-means", "exact_reference": "exact O(N²) DPC-KNN"}


def _n(v: Any, digits: int = 1) -> str:
    """A number for a table: thousands separators, ``digits`` decimals; '–' for None."""
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _rel(path: Path, md_dir: Path) -> str:
    return Path(os.path.relpath(path, md_dir)).as_posix()


# ------------------------------------------------------------------------------------------ sections
def _loader(r: Mapping[str, Any], figs: Path, machine: Mapping[str, Any]) -> tuple[list[str], list[Path]]:
    rd, sr = r["reader"], r["sasrec"]
    lines = [
        (f"Train split of `{r['data']}` ({_n(rd['train_rows'])} rows, {rd['train_shards']} shards of 5,000), "
        f"batch 512. Reader: {rd['num_workers']} DataLoader workers, {rd['epochs']} epochs, no model. SASRec: "
        f"paper settings (objective `last`), {r['sasrec_measured_over']}, {sr['threads']} torch thread(s), "
        "reading the same shards in-process."), "",
    ]
    lines += _table(["what", "sequences / s"], [
        ["shard reader", _n(r["reader_sequences_per_second"])],
        ["SASRec training", _n(r["sasrec_training_sequences_per_second"])],
        ["ratio reader / training", f"{_n(r['ratio'])} ×"],
    ])
    p = plots.plot_bars(figs / "loader.png", ["shard reader", "SASRec training"],
                        [r["reader_sequences_per_second"], r["sasrec_training_sequences_per_second"]],
                        "sequences / s (log)", "reader vs training consumption", log=True)
    return lines, [p]


def _mid(r: Mapping[str, Any], figs: Path, machine: Mapping[str, Any]) -> tuple[list[str], list[Path]]:
    lines = [
        (f"Gaussian mixture of N/50 components, width {r['dim']}, C = {r['clusters_ratio']} · N clusters, "
        f"k = {r['knn']}; each run in a fresh process (peak RSS includes the interpreter, torch, FAISS and "
        f"the N × {r['dim']} float32 tokens); a run still going after {_n(r['timeout_s'], 0)} s "
        f"({_n(r.get('kmeans_timeout_s', r['timeout_s']), 0)} s for k-means) is stopped."), "",
    ]
    rows = []
    for x in sorted(r["runs"], key=lambda x: (x["tokens"], x["method"])):
        name = METHOD_NAMES.get(x["method"], x["method"])
        if x["status"] == "ok":
            q = x.get("ari_vs_planted")
            if x["method"] == "exact_reference":
                q = f"FAISS DPC-KNN vs exact: ARI {_n(x['ari_faiss_vs_exact'], 4)}" + (
                    ", same centres" if x.get("same_centres") else "")
            else:
                recall = (x.get("info") or {}).get("knn_recall")
                q = f"ARI vs planted {_n(q, 3)}" + (f", kNN recall {_n(recall, 4)}" if recall is not None else "")
            rows.append([_n(x["tokens"]), name, _n(x["seconds_total"], 2), _n(x["peak_rss_gib"], 2), q])
        elif x["status"] == "timeout":
            est = (f"; ≈ {_duration(x['seconds_extrapolated'])} by O(N²) from {_n(x['extrapolated_from'])}"
                   if x.get("seconds_extrapolated") else "")
            rows.append([_n(x["tokens"]), name, f"> {_n(x['seconds_at_least'], 0)} (stopped{est})",
                         f"≥ {_n(x.get('process_peak_rss_gib'), 2)}", "did not finish in the time limit"])
        else:
            rows.append([_n(x["tokens"]), name, "failed", "–", x.get("error", "")[:200].replace("|", "/")])
    lines += _table(["tokens", "method", "seconds", "peak RSS (GiB)", "quality"], rows)
    if r.get("beyond_reference"):
        top = max((x["tokens"] for x in r["runs"] if x["method"] == "exact_reference"), default=None)
        ram = machine.get("ram_gib")

        def gib(v: float) -> str:
            return _n(v, 1 if v >= 10 else 2) + (" (> RAM)" if ram and v > ram else "")

        lines += [(f"Why the exact reference is not run above {_n(top)} tokens: its time grows as N² · D "
                   "(every distance is computed, twice: for the kNN and for the nearest denser token); the "
                   f"times below are extrapolated from the {_n(top)}-token run. It works in [1024, N] float64 "
                   "tiles, so its memory grows only as O(1024 · N + N · D) (estimate below: float64 tokens plus "
                   "three tiles); the official code's dense N × N float32 distance matrix grows as N²"
                   + (f". RAM here: {ram} GiB." if ram else ".")), ""]
        lines += _table(["tokens", "official dense N×N (GiB)", "blocked reference, estimated (GiB)",
                         "exact reference time, O(N²) extrapolated"], [
            [_n(o["tokens"]), gib(o["official_dense_nxn_gib"]), gib(o["blocked_reference_gib"]),
             _duration(o.get("reference_seconds_extrapolated"))] for o in r["beyond_reference"]])
    p = plots.plot_mid(figs / "mid_scaling.png", r["runs"], r.get("beyond_reference", []))
    return lines, [p]


def _duration(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 120:
        return f"{s:,.0f} s"
    if s < 7200:
        return f"{s / 60:,.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:,.1f} h"
    return f"{s / 86400:,.0f} days"


def _extract(r: Mapping[str, Any], figs: Path, machine: Mapping[str, Any]) -> tuple[list[str], list[Path]]:
    runs = r["runs"]
    names = {"in_process": "in-process (no Ray)", "1": "1 actor", "2": "2 actors"}
    lines = [(f"{_n(r['items'])} synthetic items with images, model `{r['model']}`, chunks of {r['chunk_size']}, "
             f"{r['torch_threads_per_actor']} torch thread per actor; the rate is over the encoding phase "
             "(start-up reported apart)."), ""]
    lines += _table(["pool", "items / s (encoding)", "start-up s", "end-to-end items / s"], [
        [names.get(k, k), _n(v["encode_items_per_second"]), _n(v["startup_seconds"]),
         _n(v["end_to_end_items_per_second"])] for k, v in runs.items()])
    if "scaling_efficiency" in r:
        lines += [(f"Scaling efficiency 1 → 2 actors: **{r['scaling_efficiency']:.2f}** "
                  "(rate with 2 / (2 × rate with 1))."), ""]
    keys = [k for k in ("in_process", "1", "2") if k in runs] + [k for k in runs if k not in ("in_process", "1", "2")]
    p = plots.plot_bars(figs / "extract_scaling.png", [names.get(k, k) for k in keys],
                        [runs[k]["encode_items_per_second"] for k in keys], "items / s",
                        f"feature extraction (efficiency {r.get('scaling_efficiency', float('nan')):.2f})")
    return lines, [p]


def _pretrain(r: Mapping[str, Any], figs: Path, machine: Mapping[str, Any]) -> tuple[list[str], list[Path]]:
    eff = r.get("scaling_efficiency", {})
    lines = [(f"Synthetic source domains, per-rank batch {r['per_rank_batch']}, {r['steps']} steps, "
             f"`cluster_configs/{r['zero']}.json`, one torch thread per rank; the rate excludes start-up "
             "(job wall time, start-up included, in the last column)."), ""]
    shares = r["time_share"]
    rows = []
    for n, rate in r["seq_per_second"].items():
        sh = shares[n]
        rows.append([n, _n(rate), _n(eff.get(n), 3) if n != "1" else "1 (baseline)",
                     *(f"{100 * sh.get(k, 0.0):.1f} %" for k in ("mid", "data", "step", "checkpoint")),
                     _n(r["job_seconds"][n])])
    lines += _table(["ranks", "seq / s", "efficiency", "MID", "data", "step", "checkpoint", "job s"], rows)
    p = plots.plot_pretrain(figs / "pretrain_scaling.png", r["seq_per_second"], shares, eff)
    return lines, [p]


def _finetune(r: Mapping[str, Any], figs: Path, machine: Mapping[str, Any]) -> tuple[list[str], list[Path]]:
    runs = r["runs"]
    names = {"sasrec": "SASRec (IDs)", "missrec": "MISSRec transductive (feat1CLS + feat3CLS + IDs)"}
    lines = [(f"`missrec.transfer.finetune.run_finetune` with one epoch{' capped at 10 steps' if r['quick'] else ''}, "
             f"batch 512, {r['threads']} torch thread(s); MISSRec's epoch includes its interest discovery. "
             "An epoch marked * is extrapolated from the timed steps."), ""]
    rows = [[names.get(k, k), f"`{v['data']}`", _n(v["train_rows"]), f"{v['steps_timed']} / {v['steps_per_epoch']}",
             _n(v["epoch_seconds"], 1) + (" *" if v["epoch_extrapolated"] else ""), _n(v["seconds_per_step"], 3),
             _n(v["sequences_per_second"]), _n(v["eval_seconds"], 2)] for k, v in runs.items()]
    lines += _table(["model", "data", "train rows", "steps timed", "epoch s", "s / step", "seq / s",
                     "validation s"], rows)
    p = plots.plot_bars(figs / "finetune_epoch.png", [k for k in runs], [v["epoch_seconds"] for v in runs.values()],
                        "seconds per training epoch", "fine-tuning epoch time", fmt="{:,.1f}")
    return lines, [p]


def _flops(r: Mapping[str, Any], figs: Path, machine: Mapping[str, Any]) -> tuple[list[str], list[Path]]:
    mm, s = r["matmul"], r["sasrec"]
    lines = [
        (f"Ceiling: `torch.mm` of two {mm['n']}×{mm['n']} {mm['dtype']} matrices, {mm['repeats']} timed "
        f"repeats, {mm['threads']} torch thread(s) (the training default here): best **{_n(mm['gflops_max'])} "
        f"GFLOP/s**, median {_n(mm['gflops_median'])}."), "",
        (f"Training step FLOPs by `torch.utils.flop_counter.FlopCounterMode` (forward + backward; matmul-type "
         f"ops only), summed over the training batches of 512 rows "
         f"{'spread over one epoch by length' if r.get('quick') else 'of one whole epoch'}: SASRec on "
         f"`scientific`, {s['batches']} batches, longest histories {min(s['lengths'])}–{max(s['lengths'])}"
         + (f"; MISSRec on `scientific_mm`, {r['missrec']['batches']} batches"
            if "batches" in (r.get("missrec") or {}) else "")
         + ". The step time (loss, backward, Adam) is measured separately without the counter; "
         "GFLOP/s = FLOPs / step seconds."), "",
        "Closed form for SASRec (objective `last`, B rows, L = longest history in the batch, D = hidden, "
        "N = items): embedding lookups free; per layer Q/K/V/output projections 4·B·L·D²·2, attention "
        "scores and weighted sum 2·B·L²·D·2, FFN 2·B·L·D·inner·2; output layer over all items 2·B·D·N; "
        "backward = 2 × forward, so a step is 3 × forward."
        + (f" Closed form / counter over these batches: **{s['analytic_over_counted']:.4f}**."
           if s.get("analytic_over_counted") is not None else ""), "",
    ]
    rows = [["dense matmul (ceiling)", "–", "–", _n(mm["gflops_max"]), "1.000"]]
    for key, name in (("sasrec", "SASRec step"), ("missrec", "MISSRec transductive step")):
        x = r.get(key) or {}
        if "error" in x:
            rows.append([name, "failed", "–", "–", x["error"][:200].replace("|", "/")])
        elif x:
            rows.append([name, f"{x['flops_total'] / x['batches'] / 1e9:,.1f}", _n(x["seconds_per_step"], 3),
                         _n(x["achieved_gflops"]), f"{x['fraction_of_ceiling']:.3f}"])
    lines += _table(["what", "GFLOP per step", "s / step", "GFLOP/s", "fraction of ceiling"], rows)
    ops = ", ".join(f"{k.replace('aten.', '')} {v / s['flops_total']:.1%}" for k, v in
                    sorted(s["flops_by_op"].items(), key=lambda kv: -kv[1]))
    lines += [(f"SASRec FLOPs by op: {ops}. The rest of the step (LayerNorm, softmax, dropout, GELU, "
              "the full-item cross-entropy, Adam) is not counted, and the step's matmuls are smaller and thinner "
               "than the 2048² ceiling's, so the fraction is a lower bound on how busy the cores are."), ""]
    labels, vals = ["matmul ceiling", "SASRec step"], [mm["gflops_max"], s["achieved_gflops"]]
    if "achieved_gflops" in (r.get("missrec") or {}):
        labels.append("MISSRec step")
        vals.append(r["missrec"]["achieved_gflops"])
    p = plots.plot_bars(figs / "flops.png", labels, vals, "GFLOP/s", "achieved vs dense matmul", fmt="{:,.1f}")
    return lines, [p]


def _scale(r: Mapping[str, Any], figs: Path, machine: Mapping[str, Any]) -> tuple[list[str], list[Path]]:
    st = r.get("settings", {})
    lines = [(f"`python launcher/bench.py scale` ({st.get('steps')} steps of {st.get('batch_size_per_rank')} rows per "
              f"rank, width {st.get('hidden')}, 2 modalities of {st.get('feature_dim')}-d {st.get('feature_dtype')} "
              "features, one thread and one DataLoader worker per rank"
              + (f", `{' '.join(r['overrides'])}`" if r.get("overrides") else "") + "). Peak memory is a rank's "
              "anonymous memory with its worker's (page cache excluded); MID is the epoch's interest discovery."), ""]
    rows = [[f"{x['items']:,}", f"{x['rows']:,}", _n(x["peak_rss_gib"], 2), _n(x["seq_per_s"]), _n(x["mid_seconds"]),
             _n(x["shard_read_per_s"])] for x in r["runs"]]
    lines += _table(["items", "training rows", "peak GiB per rank", "seq / s", "MID s", "reader rows / s"], rows)
    if "ratios" in r:
        ra, met = r["ratios"], r.get("targets_met", {})
        lines += [(f"Largest against smallest: peak memory x{ra['peak_rss']} (target <= 1.5: "
                   f"{'met' if met.get('peak_rss_at_most_1.5x') else 'missed'}), seq/s x{ra['seq_per_s']} (within 15 %: "
                   f"{'met' if met.get('seq_per_s_within_15pct') else 'missed'}), MID x{ra['mid_seconds']} against N log N "
                   f"x{ra['n_log_n']} ({'met' if met.get('mid_no_faster_than_n_log_n') else 'missed'})."), ""]
    return lines, [plots.plot_scale(figs / "scale.png", r["runs"])]


SECTIONS: dict[str, Callable[[Mapping[str, Any], Path, Mapping[str, Any]], tuple[list[str], list[Path]]]] = {
    "loader": _loader, "mid": _mid, "extract": _extract, "pretrain": _pretrain, "finetune": _finetune,
    "flops": _flops, "scale": _scale,
}


def _machine(m: Mapping[str, Any]) -> list[str]:
    v = m.get("versions", {})
    gpus = ", ".join(m.get("gpus") or []) or "none"
    rows = [
        ["date (UTC)", m.get("date_utc")], ["CPU", m.get("cpu_model")],
        ["cores", (f"{m.get('logical_cores')} logical, {m.get('physical_cores') or '?'} physical, "
                  f"{m.get('usable_cores')} usable; torch default threads {m.get('torch_default_threads')}")],
        ["RAM", f"{m.get('ram_gib')} GiB"], ["GPU", gpus], ["OS / Python", f"{m.get('os')} / {m.get('python')}"],
        ["versions", ", ".join(f"{k} {val}" for k, val in v.items())],
        ["git commit", f"`{m.get('git_commit')}`" + (f" (+{m['git_modified_files']} modified tracked files)"
                                                      if m.get("git_modified_files") else "")],
        ["load average at start", m.get("load_average")],
    ]
    return _table(["", ""], [[k, "–" if val is None else val] for k, val in rows])


def render_markdown(results: Mapping[str, Any], fig_dir: Path, md_dir: Path) -> tuple[str, list[Path]]:
    """The report's Markdown text and the PNGs it wrote into ``fig_dir`` (links relative to ``md_dir``)."""
    cfg = results.get("config", {})
    stages = results.get("stages", {})
    cmd = "python launcher/bench.py report" + (" --quick" if cfg.get("quick") else "") + (
        f" --skip {','.join(cfg['skip'])}" if cfg.get("skip") else "")
    lines = [
        "# Benchmarks", "",
        (f"Generated by `{cmd}` in {_duration(results.get('seconds_total'))}; raw figures in "
        f"[`{_rel(fig_dir / 'results.json', md_dir)}`]({_rel(fig_dir / 'results.json', md_dir)}). "
        "Each stage ran in its own process, one after the other; on a shared machine the load average "
        "below says how quiet it was."), "",
        "## Machine", "", *_machine(results.get("machine", {})),
        "## Stages", "",
    ]
    lines += _table(["stage", "status", "seconds"], [
        [TITLES.get(k, k), v["status"] + (f": {v.get('error', '')[:120]}" if v["status"] == "failed" else ""),
         _n(v.get("seconds"))] for k, v in stages.items()])
    figures: list[Path] = []
    for name, section in SECTIONS.items():
        if name not in stages:
            continue
        st = stages[name]
        lines += [f"## {TITLES[name]}", ""]
        if st["status"] == "skipped":
            lines += ["Skipped (`--skip`).", ""]
            continue
        if st["status"] != "ok":
            lines += [f"**Failed** after {_n(st.get('seconds'))} s: `{st.get('error', '?')}`", ""]
            if st.get("traceback"):
                lines += ["```text", st["traceback"].strip()[-2000:], "```", ""]
            continue
        try:
            text, pngs = section(st["result"], fig_dir, results.get("machine", {}))
        except Exception as e:  # noqa: BLE001 - one bad section does not lose the report
            log.warning("could not render %s: %s", name, e)
            lines += [f"Could not render this section: `{type(e).__name__}: {e}` (raw figures in results.json).", ""]
            continue
        lines += text
        lines += [f"![{TITLES[name]}]({_rel(p, md_dir)})\n" for p in pngs]
        figures += pngs
    lines += _gpu(results.get("gpu"))
    return "\n".join(lines).rstrip() + "\n", figures


def _gpu(gpu: Mapping[str, Any] | None) -> list[str]:
    """The GPU check's record (``results.json`` key ``gpu``, what ``bench.py gpu`` printed), or what it runs."""
    lines = ["## 8. GPU check", "",
             ("`python launcher/bench.py gpu --data-root ../shared/datasets/scientific_mm` runs, on one GPU, DeepSpeed "
              "pre-training on CUDA (NCCL, bf16, ZeRO-2) with interest discovery on faiss-gpu, 3 epochs of "
              "scientific_mm, MID on 1 M tokens with faiss-gpu, a tiny open_clip model's extraction on CUDA and the "
              "scale benchmark at 1 M items; each check prints its figures or its error."), ""]
    if not gpu:
        return lines + ["Not run on a GPU yet: no GPU machine was lent when this report was written.", ""]
    lines += [(f"Ran on {gpu.get('device')} ({gpu.get('date', 'date not recorded')}), torch {gpu.get('torch')}, "
              f"faiss {gpu.get('faiss')}."), ""]
    rows = [[name, "ok" if c.get("ok") else f"failed: {str(c.get('error', ''))[:150]}", _n(c.get("seconds"))]
            for name, c in gpu.get("checks", {}).items()]
    return lines + _table(["check", "result", "seconds"], rows)


def render_report(results: Mapping[str, Any], output: str | Path) -> list[Path]:
    """Write the Markdown to ``output`` and its PNGs to ``output`` without the suffix; returns the PNGs."""
    md = Path(output)
    fig_dir = md.with_suffix("")
    fig_dir.mkdir(parents=True, exist_ok=True)
    text, figures = render_markdown(results, fig_dir, md.parent)
    with atomic_open(md, "w") as fh:
        fh.write(text)
    return figures


__all__ = ["render_markdown", "render_report"]

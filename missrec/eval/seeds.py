"""Two groups of runs compared over seeds: mean, spread and Welch's t-test for each metric.

    python launcher/compare.py --runs runs/ind-s2020 runs/ind-s1 runs/ind-s2 \\
        --baseline docs/benchmarks/official_code_inductive.json

One test split scores a model trained with one seed; the next seed can move R@50 by more than the
difference between two codes (docs/experiments.md). A claim that one code beats another therefore needs
several seeds of each, and a test of the difference of their means against its standard error.

A *source* is a run folder (its ``metrics.json``), a JSON file with one run's metrics (a
``metrics.json``, or the last line of ``launcher/evaluate.py``), or a JSON file ``{"runs": [...]}``
listing several (each a flat metric dict or one with a ``test`` / ``valid`` entry).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from missrec.errors import InputError, MissingInputError
from missrec.transfer.results import METRICS  # the paper's four metrics, in its order


@dataclass(frozen=True)
class Comparison:
    """One metric of group ``a`` against group ``b``: ``diff`` = mean(a) - mean(b); ``se`` its standard
    error; Welch's ``t``, its degrees of freedom ``df``, the two-sided ``p`` and the 95 % confidence interval
    ``ci_low`` .. ``ci_high`` of ``diff`` (``None`` when a group has fewer than 2 runs or neither varies).

    With a non-inferiority ``margin`` m >= 0, ``p_noninferior`` is the one-sided p of the null hypothesis
    "``a`` trails ``b`` by m or more" (true diff <= -m); below 0.05 it shows ``a`` within m of ``b`` or better.
    With m = 0 it is the one-sided p of "``a`` beats ``b``"."""

    n_a: int
    mean_a: float
    sd_a: float | None
    n_b: int
    mean_b: float
    sd_b: float | None
    diff: float
    se: float | None
    t: float | None
    df: float | None
    p: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    margin: float | None = None
    p_noninferior: float | None = None


def _metric_dicts(obj: object, split: str, where: str) -> list[dict[str, float]]:
    entries = obj["runs"] if isinstance(obj, Mapping) and "runs" in obj else [obj]
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{where}: 'runs' must be a non-empty list")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping):
            raise InputError(f"{where}: run {i} is not a JSON object")
        m = e.get(split, e)
        if not isinstance(m, Mapping):
            raise InputError(f"{where}: run {i}: {split!r} is not a JSON object")
        vals = {k: m[k] for k in METRICS if k in m}
        if not vals:
            raise InputError(f"{where}: run {i} has none of {list(METRICS)} (under {split!r} or at the top)")
        for k, v in vals.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError(f"{where}: run {i}: {k} is not a finite number: {v!r}")
        out.append({k: float(v) for k, v in vals.items()})
    return out


def load_metrics(source: str | Path, split: str = "test") -> list[dict[str, float]]:
    """The runs' metric dicts (``recall@10`` ...) of one source (see the module docstring)."""
    path = Path(source)
    if path.is_dir():
        path = path / "metrics.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MissingInputError(f"{path}: no such file (a run folder needs its metrics.json)") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        # launcher output saved whole: its last line is the JSON
        numbered = [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
        if not numbered:
            raise InputError(f"{path}: empty file") from None
        n, last = numbered[-1]
        try:
            obj = json.loads(last)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {n}: not JSON ({e.msg})") from None
    return _metric_dicts(obj, split, str(path))


def load_group(sources: Iterable[str | Path], split: str = "test") -> list[dict[str, float]]:
    """Every run of every source, in order."""
    runs = [m for s in sources for m in load_metrics(s, split)]
    if not runs:
        raise ValueError("a group needs at least one run")
    return runs


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile_two_sided(p: float, df: float) -> float:
    """The ``t`` >= 0 with ``P(|T| >= t) = p`` (e.g. p = 0.05: the 97.5 % point), by bisection."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > p else (lo, mid)
    return (lo + hi) / 2.0


def _mean_sd(x: Sequence[float]) -> tuple[float, float | None]:
    mean = sum(x) / len(x)
    if len(x) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1))


def t_upper_p(t: float, df: float) -> float:
    """P(T >= t) for Student's t with ``df`` degrees of freedom (one-sided)."""
    half = t_two_sided_p(t, df) / 2.0
    return half if t >= 0 else 1.0 - half


def welch(a: Sequence[float], b: Sequence[float], margin: float | None = None) -> Comparison:
    """Welch's unequal-variance t-test of mean(a) - mean(b); with ``margin`` also the one-sided
    non-inferiority test of :class:`Comparison`."""
    if not a or not b:
        raise InputError("both groups need at least one value")
    if margin is not None and not (math.isfinite(margin) and margin >= 0):
        raise InputError(f"the non-inferiority margin must be a finite number >= 0, got {margin}")
    (ma, sa), (mb, sb) = _mean_sd(a), _mean_sd(b)
    se = t = df = p = lo = hi = p_ni = None
    if sa is not None and sb is not None:
        va, vb = sa * sa / len(a), sb * sb / len(b)
        if va + vb > 0:
            se = math.sqrt(va + vb)
            t = (ma - mb) / se
            df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
            p = t_two_sided_p(t, df)
            half = t_quantile_two_sided(0.05, df) * se
            lo, hi = ma - mb - half, ma - mb + half
            if margin is not None:
                p_ni = t_upper_p((ma - mb + margin) / se, df)
    return Comparison(len(a), ma, sa, len(b), mb, sb, ma - mb, se, t, df, p, lo, hi, margin, p_ni)


def compare_groups(
    a: Sequence[Mapping[str, float]], b: Sequence[Mapping[str, float]], metrics: Sequence[str] = METRICS,
    margin: float | None = None,
) -> dict[str, Comparison]:
    """Per metric, group ``a``'s runs against group ``b``'s (metrics missing from any run are refused);
    ``margin``: the non-inferiority margin of :func:`welch`."""
    out = {}
    for k in metrics:
        for name, g in (("first", a), ("second", b)):
            missing = [i for i, m in enumerate(g) if k not in m]
            if missing:
                raise InputError(f"{k} is missing from run(s) {missing} of the {name} group")
        out[k] = welch([m[k] for m in a], [m[k] for m in b], margin)
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _interval(c: Comparison) -> str:
    return "" if c.ci_low is None else f"{c.ci_low:+.4f} .. {c.ci_high:+.4f}"


def render_comparison(results: Mapping[str, Comparison], labels: tuple[str, str] = ("ours", "baseline")) -> str:
    """A Markdown table: one row per metric, means ± sd of both groups, the difference with its 95 %
    interval, its se, t, df and p; with a margin, one more column: the non-inferiority p."""
    la, lb = labels
    margin = next((c.margin for c in results.values() if c.margin is not None), None)
    head = f"| metric | {la} | {lb} | difference | 95 % interval | se | t | df | p (two-sided) |"
    if margin is not None:
        head += f" p ({la} trails by >= {margin:g}) |"
    lines = [head, "|---" * (9 + (margin is not None)) + "|"]
    for k, c in results.items():
        row = (
            f"| {k} | {c.mean_a:.4f} ± {_fmt(c.sd_a, '.4f')} (n={c.n_a}) | {c.mean_b:.4f} ± {_fmt(c.sd_b, '.4f')} "
            f"(n={c.n_b}) | {c.diff:+.4f} | {_interval(c)} | {_fmt(c.se, '.4f')} | {_fmt(c.t, '+.2f')} | {_fmt(c.df, '.1f')} | "
            f"{_fmt(c.p, '.2f')} |"
        )
        lines.append(row + (f" {_fmt(c.p_noninferior, '.3f')} |" if margin is not None else ""))
    return "\n".join(lines)


def comparison_json(results: Mapping[str, Comparison]) -> dict[str, dict[str, float | int | None]]:
    return {k: asdict(c) for k, c in results.items()}

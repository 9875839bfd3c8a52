"""The figures of a scaling study, from ``DIR/runs.csv`` and (when fitted) ``DIR/fit.json``.

Each figure is written as PNG (300 dpi) and SVG (text kept as text, so labels can be searched
and edited) at a paper's sizes: 8-9 pt type, one column (~3.5 in) or two (7 in) wide, labelled
axes with units, log axes for the scaling variables, a colour per model size from a sequential
colormap (a qualitative one for data mixes, which have no order). Matplotlib's object API is used
without pyplot, so no display and no global backend are touched.

Runs are drawn by design point, the runs planned alike (size, budget, schedule, ratio; the seeds
of one point): each point at the mean of its runs' realised x and y, with a bar from the lowest to
the highest run, and each run a faint dot behind it. The legend says so.

1. ``loss_vs_compute``: validation loss against training FLOPs, one curve per model size (and
   mixing schedule), the compute frontier (the lowest mean loss reached with at most that
   compute) and the L(C) fit with its 95% band. A study of one model size with data mixes has no
   such figure: its question is the next one.
2. ``fit_curves``: loss against data per model size with the joint law and its band, and loss
   against parameters at each size's largest budget with L(N) (or, where the table cannot
   identify L(N), the joint law at that budget); the largest model's runs as predicted by the fit
   that did not see them. Intervals with an end at a bound are starred: not identified.
3. ``paired_vs_single``: loss and the linear-probe metric against single-modality molecules seen
   at a fixed paired set, one curve per mixing schedule, each starting from the paired-only
   baseline (ratio 0, at x = 0 on a symmetric-log axis); one figure per model size and paired set.
   The schedules' points at one ratio are drawn a few percent apart along x, so that their bars
   can be read.

A figure whose data are missing is skipped with a note; a directory without runs.csv, or whose
table has no finished run, is a :class:`ScalingError`.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable, Optional

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

from flexmol.scaling import ScalingError
from flexmol.scaling.fit import compute_frontier, is_done, read_runs, run_name

STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.labelsize": 8,
    "axes.titlesize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "svg.fonttype": "none",  # text stays text in the SVG
    "svg.hashsalt": "flexmol",  # stable ids: the same study gives the same file
}
DPI = 300
SIZE_COLORMAP = "viridis"
MIX_COLORMAP = "tab10"
ONE_COLUMN, TWO_COLUMNS = 3.5, 7.0  # inches
DODGE = 1.04  # schedules' points at one x are drawn this factor apart
DEFAULT_COLUMNS = {"n": "params", "d": "molecules", "loss": "val_loss", "c": "flops", "budget": "budget"}
DESIGN_COLUMNS = ("size", "params", "budget", "schedule", "ratio")  # what a run plans; its seed aside
BASELINE_SCHEDULE = "paired_only"  # the ratio-0 run of a paired/single study, where every schedule starts
_PROBE_METRICS = {  # suffix of probe_<task>_<metric>: label, higher is better
    "roc_auc": ("ROC-AUC", True), "pr_auc": ("PR-AUC", True), "accuracy": ("accuracy", True),
    "r2": ("R²", True), "spearman": ("Spearman ρ", True), "pearson": ("Pearson r", True),
    "rmse": ("RMSE", False), "mae": ("MAE", False),
}
_LABELS = {"params": "Parameters", "molecules": "Molecules seen", "unique_molecules": "Unique molecules",
           "flops": "Training compute (FLOPs)", "flops_padded": "Training compute, padded (FLOPs)",
           "val_loss": "Validation loss"}


def _stderr(message: str) -> None:
    print(f"flexmol scaling plot: {message}", file=sys.stderr)


def plot_study(directory, out=None, *, note: Callable[[str], None] = _stderr) -> list[Path]:
    """Draw the study's figures into ``out`` (default ``directory/figures``) and return the files
    written, PNG and SVG for each figure; ``note`` is told of each figure skipped and why."""
    directory = Path(directory)
    figures = build_figures(directory, note=note)
    out = Path(out) if out is not None else directory / "figures"
    if out.exists() and not out.is_dir():
        raise ScalingError(f"--out {out}: not a directory")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with matplotlib.rc_context(STYLE):
        for name, fig in figures.items():
            for suffix, options in ((".png", {"dpi": DPI}), (".svg", {"metadata": {"Date": None}})):
                path = out / f"{name}{suffix}"
                fig.savefig(path, **options)
                written.append(path)
    return written


def build_figures(directory, *, note: Callable[[str], None] = _stderr) -> dict[str, Figure]:
    """The study's figures by name, not yet saved."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ScalingError(f"{directory}: no such study directory")
    table = directory / "runs.csv"
    if not table.is_file():
        raise ScalingError(f"{directory}: no runs.csv (write it with `flexmol scaling run`)")
    header, rows = read_runs(table)
    done = [(run_name(r, i), r) for i, r in enumerate(rows) if is_done(r)]
    if not done:
        raise ScalingError(f"{table}: no run with status done ({len(rows)} rows)")
    fit = _read_fit(directory / "fit.json")
    columns = {**DEFAULT_COLUMNS, **(fit or {}).get("columns", {})}
    runs = _Runs(header, done)
    figures: dict[str, Figure] = {}
    with matplotlib.rc_context(STYLE):
        for name, draw in (("loss_vs_compute", lambda: _loss_vs_compute(runs, columns, fit)),
                           ("fit_curves", lambda: _fit_curves(runs, columns, fit)),
                           ("paired_vs_single", lambda: _paired_vs_single(runs, columns))):
            try:
                drawn = draw()
            except _Skip as why:
                note(f"skipped {name}: {why}")
                continue
            figures.update(drawn if isinstance(drawn, dict) else {name: drawn})
    return figures


class _Skip(Exception):
    """A figure whose data are missing; the message says which."""


def _read_fit(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        fit = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScalingError(f"{path}: not a fit.json ({exc}); refit with `flexmol scaling fit`") from None
    if not isinstance(fit, dict) or not all(k in fit for k in ("E", "A", "B", "alpha", "beta", "columns")):
        raise ScalingError(f"{path}: not a fit.json (no joint law); refit with `flexmol scaling fit`")
    return fit


class _Runs:
    """The done runs' columns as float arrays (NaN where a cell is empty or not a number)."""

    def __init__(self, header: list[str], done: list[tuple[str, dict]]):
        self.header = header
        self.names = [n for n, _ in done]
        self.rows = [r for _, r in done]

    def __len__(self) -> int:
        return len(self.rows)

    def has(self, column: str) -> bool:
        return column in self.header and bool(np.isfinite(self.num(column)).any())

    def num(self, column: str) -> np.ndarray:
        out = np.full(len(self.rows), np.nan)
        for i, row in enumerate(self.rows):
            try:
                out[i] = float(row.get(column) or "nan")
            except ValueError:
                pass
        return out

    def text(self, column: str) -> list[str]:
        return [(row.get(column) or "").strip() for row in self.rows]

    def design(self, keep: np.ndarray, *realised: np.ndarray) -> list[np.ndarray]:
        """The rows of ``keep`` grouped by design point: equal cells in every design column (the
        seeds of one point together). A table that plans neither a budget nor a ratio groups by
        the ``realised`` values as well, so that each of its runs stays a point of its own."""
        planned = [c for c in DESIGN_COLUMNS if c in self.header]
        keys = [tuple(row.get(c, "").strip() for c in planned) for row in self.rows]
        if not (self.has("budget") or self.has("ratio")):
            keys = [k + tuple(float(v[i]) for v in realised) for i, k in enumerate(keys)]
        groups: dict[tuple, list[int]] = {}
        for i in np.flatnonzero(keep):
            groups.setdefault(keys[i], []).append(i)
        return [np.array(g) for g in groups.values()]

    def positive(self, *columns: str) -> np.ndarray:
        """Rows whose ``columns`` all hold finite numbers > 0; _Skip naming a column none has."""
        for column in columns:
            if not self.has(column):
                raise _Skip(f"no values in column {column!r}")
        keep = np.ones(len(self.rows), bool)
        for column in columns:
            v = self.num(column)
            keep &= np.isfinite(v) & (v > 0)
        if not keep.any():
            raise _Skip(f"no run with positive {', '.join(columns)}")
        return keep


# ------------------------------------------------------------------------------------------------
# Helpers


def si(x: float) -> str:
    """1234567 -> '1.2M': counts of parameters, molecules and FLOPs as a paper writes them."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            v = x / scale
            return f"{v:.2g}{unit}" if v < 10 else f"{v:.0f}{unit}"
    return f"{x:.3g}"


def sci(x: float) -> str:
    """1e12 -> '10^12', 2e12 -> '2x10^12' (mathtext): compute as a paper writes it."""
    exponent = math.floor(math.log10(x) + 1e-9)
    mantissa = round(x / 10 ** exponent, 1)
    head = "" if mantissa == 1 else f"{mantissa:g}\\times"
    return f"${head}10^{{{exponent}}}$"


def _plain(x: float) -> str:
    return f"{x:g}"


def _log_ticks(ax, which: str, fmt: Callable[[float], str]) -> None:
    """Ticks a reader can read on a log axis: 1-2-5 per decade over a wide range (decades when
    that is too many, every other one past six), three or four even steps over a narrow range; labelled
    with ``fmt``, the minor ticks left unlabelled so that labels never collide."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    if hi / lo >= 10:
        decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        for mantissas in ((1, 2, 5), (1,)):
            ticks = [m * 10.0 ** e for e in decades for m in mantissas if lo <= m * 10.0 ** e <= hi]
            if len(ticks) <= 6:
                break
        ticks = ticks[:: math.ceil(len(ticks) / 6)]
    else:
        ticks = [t for t in MaxNLocator(3 if which == "x" else 4).tick_values(lo, hi) if lo <= t <= hi and t > 0]
        if fmt is _plain and len(ticks) > 1:  # one number of decimals along the axis: 2.90, 2.95, 3.00
            decimals = max(0, -math.floor(math.log10(min(np.diff(ticks))) + 1e-9))
            fmt = lambda v: f"{v:.{decimals}f}"  # noqa: E731
    if not ticks:  # a range too narrow for any round value: matplotlib's own ticks
        return
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    axis.set_minor_formatter(NullFormatter())


def _format(column: str) -> Callable[[float], str]:
    """Tick labels for a column: FLOPs in powers of ten, counts as 20k/1.5M, losses as numbers."""
    if "flops" in column:
        return sci
    if column in ("params", "molecules", "unique_molecules", "budget") or column.startswith("molecules_"):
        return si
    return _plain


def _label(column: str) -> str:
    return _LABELS.get(column, column.replace("_", " "))


def _size_colours(sizes) -> dict[float, tuple]:
    cmap = matplotlib.colormaps[SIZE_COLORMAP]
    positions = np.linspace(0.05, 0.85, len(sizes)) if len(sizes) > 1 else [0.45]
    return {s: cmap(p) for s, p in zip(sizes, positions)}


def _band(samples: dict, f, x: np.ndarray, names: tuple[str, ...]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The 2.5 and 97.5 percentiles of ``f(params, x)`` over bootstrap parameter samples."""
    if not samples or not all(samples.get(n) for n in names):
        return None
    params = {n: np.asarray(samples[n])[:, None] for n in names}
    values = f(params, x[None, :])
    return np.percentile(values, 2.5, axis=0), np.percentile(values, 97.5, axis=0)


def _joint(p, N, D):
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def _power(coefficient: str, exponent: str):
    return lambda p, x: p["E"] + p[coefficient] / x ** p[exponent]


def _span(x: np.ndarray, pad: float = 1.3) -> np.ndarray:
    return np.geomspace(x.min() / pad, x.max() * pad, 200)


def _interval(fit: dict, name: str) -> str:
    """`` [lo, hi]``, ``*`` on an end at its bound (fit.json's identification): not identified."""
    iv = fit.get("intervals", {}).get(name)
    if not iv:
        return ""
    at = (fit.get("identification", {}).get(name) or {}).get("interval_at_bounds") or (False, False)
    return " [" + ", ".join(f"{v:.2f}{'*' if a else ''}" for v, a in zip(iv, at)) + "]"


def _not_identified(ax, fit: dict, law: str) -> None:
    """A legend line naming the law's parameters that sit at a bound (fit.json's identification)."""
    names = [n for n, i in (fit.get("identification") or {}).items()
             if i.get("estimate_at") or any(i.get("interval_at_bounds") or ())]
    if names:
        symbols = [{"alpha": "α", "beta": "β", "gamma": "γ"}.get(n, n) for n in names]
        ax.plot([], [], " ", label=f"{law}: {', '.join(symbols)} at a bound (*): not identified")


def _figure(width: float, height: float, panels: int = 1):
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, axes


def _means(x: np.ndarray, y: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """Per design point, in order of x: mean x, mean y, lowest y, highest y, runs."""
    rows = sorted((x[g].mean(), y[g].mean(), y[g].min(), y[g].max(), len(g)) for g in groups)
    return np.array(rows, float).reshape(-1, 5)


def _series(ax, x: np.ndarray, y: np.ndarray, groups: list[np.ndarray], colour, label: Optional[str] = None, *,
            ls: str = "-", marker: str = "o", start: Optional[np.ndarray] = None) -> np.ndarray:
    """Design points as a curve: each run a faint dot, each point's mean a marker with a bar from
    its lowest to its highest run, joined in order of x (``ls="none"``: not joined). ``start`` (the
    rows of one point, e.g. the paired-only baseline) begins the line without a marker of this
    colour. Returns the means (see :func:`_means`)."""
    points = _means(x, y, groups)
    runs = np.concatenate(groups) if groups else np.zeros(0, int)
    if len(runs) > len(groups):
        ax.plot(x[runs], y[runs], "o", color=colour, alpha=0.4, ms=3, mew=0)
    line = points if start is None or not len(start) else np.vstack([_means(x, y, [start]), points])
    marked = list(range(len(line) - len(points), len(line)))
    ax.plot(line[:, 0], line[:, 1], color=colour, ls=ls, marker=marker, markevery=marked, label=label)
    spread = points[:, 4] > 1
    if spread.any():
        p = points[spread]
        ax.errorbar(p[:, 0], p[:, 1], yerr=[p[:, 1] - p[:, 2], p[:, 3] - p[:, 1]], fmt="none", ecolor=colour,
                    elinewidth=0.8, capsize=2)
    return points


def _seed_keys(ax, groups: list[np.ndarray]) -> None:
    """Legend entries for the mean-and-bar convention, when some point has several runs."""
    counts = sorted({len(g) for g in groups})
    if counts[-1] < 2:
        return
    n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    ax.errorbar([], [], yerr=[], fmt="o", color="0.4", capsize=2, elinewidth=0.8,
                label=f"mean of {n} seeds, bar: min-max")
    ax.plot([], [], "o", color="0.4", alpha=0.4, ms=3, mew=0, label="one seed")


def _schedules(runs: _Runs, keep: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The rows of ``keep`` of each mixing schedule, and those of the paired-only baseline (schedule
    paired_only, or ratio 0) that begins every schedule's curve. A table without schedules is
    one curve, named ''."""
    schedule = np.array(runs.text("schedule") if "schedule" in runs.header else [""] * len(runs))
    ratio = runs.num("ratio")
    baseline = keep & ((schedule == BASELINE_SCHEDULE) | (ratio == 0))
    names = sorted(set(schedule[keep & ~baseline]))
    return {name: keep & ~baseline & (schedule == name) for name in names}, baseline


def _legend(fig, axes, **options) -> None:
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, **options)


# ------------------------------------------------------------------------------------------------
# The figures


def _loss_vs_compute(runs: _Runs, columns: dict, fit: Optional[dict]) -> Figure:
    n, c, loss = columns["n"], columns["c"], columns["loss"]
    keep = runs.positive(n, c, loss)
    N, C, L = runs.num(n), runs.num(c), runs.num(loss)
    curves, baseline = _schedules(runs, keep)
    sizes = np.unique(N[keep])
    mixes = baseline.any() or set(curves) != {""}
    if mixes and len(sizes) == 1:
        raise _Skip(f"one model size ({si(sizes[0])} {n}) with data mixes: loss against the mix is in "
                    f"paired_vs_single")
    fig, (ax,) = _figure(5.0, 4.0)
    styles = dict(zip(curves, ("-", ":", "-.", (0, (5, 1, 1, 1))) * len(curves)))  # "--" is the frontier's
    for size, colour in _size_colours(sizes).items():
        here = N == size
        start = np.flatnonzero(baseline & here)
        for i, (name, rows) in enumerate(curves.items()):
            _series(ax, C, L, runs.design(rows & here, C), colour, None if i else f"{si(size)} params",
                    ls=styles[name], start=start)
        if len(start):
            _series(ax, C, L, [start], colour, None, marker="s", ls="none")
    if mixes:
        for name, style in styles.items():
            ax.plot([], [], color="0.3", ls=style, label=name.replace("_", " "))
        if baseline.any():
            ax.plot([], [], "s", color="0.3", label="paired only")
    groups = runs.design(keep, C)
    points = _means(C, L, groups)
    on = compute_frontier(points[:, 0], points[:, 1])
    fc, fl = points[on, 0], points[on, 1]
    ax.plot(np.append(fc, C[keep].max()), np.append(fl, fl[-1]), color="0.2", lw=1, ls="--", drawstyle="steps-post",
            label="compute frontier (means)")
    law = (fit or {}).get("L_C", {})
    if "gamma" in law:
        x = _span(fc)
        band = _band(law.get("bootstrap", {}).get("samples"), _power("A", "gamma"), x, ("E", "A", "gamma"))
        if band:
            ax.fill_between(x, *band, color="0.5", alpha=0.25, lw=0, label="L(C) 95% band")
        ax.plot(x, _power("A", "gamma")(law, x), color="0.2", lw=1.5,
                label=f"L(C) fit, γ = {law['gamma']:.2f}{_interval(law, 'gamma')}")
        _not_identified(ax, law, "L(C)")
    _seed_keys(ax, groups)
    ax.set(xscale="log", yscale="log", xlabel=_label(c), ylabel=_label(loss))
    _log_ticks(ax, "x", _format(c))
    _log_ticks(ax, "y", _format(loss))
    fig.legend(loc="outside lower center", ncol=2)
    return fig


def _planned_budget(runs: _Runs, columns: dict) -> np.ndarray:
    """Each run's planned data budget; its realised data in a table without a budget column."""
    return runs.num(columns["budget"]) if runs.has(columns["budget"]) else runs.num(columns["d"])


def _fit_curves(runs: _Runs, columns: dict, fit: Optional[dict]) -> Figure:
    if fit is None:
        raise _Skip("no fit.json (write it with `flexmol scaling fit`)")
    n, d, loss = columns["n"], columns["d"], columns["loss"]
    keep = runs.positive(n, d, loss)
    N, D, L = runs.num(n), runs.num(d), runs.num(loss)
    fig, (by_data, by_size) = _figure(TWO_COLUMNS, 4.2, panels=2)
    colours = _size_colours(np.unique(N[keep]))
    samples = fit.get("bootstrap", {}).get("samples")
    x = _span(D[keep])
    for size, colour in colours.items():
        band = _band(samples, lambda p, d_: _joint(p, size, d_), x, ("E", "A", "B", "alpha", "beta"))
        if band:
            by_data.fill_between(x, *band, color=colour, alpha=0.2, lw=0)
        by_data.plot(x, _joint(fit, size, x), color=colour, lw=1)
        _series(by_data, D, L, runs.design(keep & (N == size), D), colour, f"{si(size)} params", ls="none")
    by_data.plot([], [], color="0.3", lw=1, label="L(N, D) fit, shaded: 95% band")  # a key for the curves
    ext = fit.get("extrapolation", {})
    if "fit" in ext:
        largest = max(colours)
        by_data.plot(x, _joint(ext["fit"], largest, x), color=colours[largest], lw=1, ls="--",
                     label=f"{si(largest)}: predicted by smaller models")
    by_data.set(xscale="log", yscale="log", xlabel=_label(d), ylabel=_label(loss),
                title=f"L(N, D): α = {fit['alpha']:.2f}{_interval(fit, 'alpha')}, "
                      f"β = {fit['beta']:.2f}{_interval(fit, 'beta')}")
    _log_ticks(by_data, "x", _format(d))
    _log_ticks(by_data, "y", _format(loss))

    law = fit.get("L_N", {})
    planned = _planned_budget(runs, columns)
    at_largest = keep & np.array([planned[i] == planned[keep & (N == N[i])].max() for i in range(len(N))])
    for size, colour in colours.items():
        _series(by_size, N, L, runs.design(at_largest & (N == size), D), colour, ls="none")
    xs = _span(N[at_largest])
    if "alpha" in law:
        band = _band(law.get("bootstrap", {}).get("samples"), _power("A", "alpha"), xs, ("E", "A", "alpha"))
        if band:
            by_size.fill_between(xs, *band, color="0.5", alpha=0.25, lw=0, label="L(N) 95% band")
        by_size.plot(xs, _power("A", "alpha")(law, xs), color="0.2", lw=1.2,
                     label=f"L(N), α = {law['alpha']:.2f}{_interval(law, 'alpha')}")
    else:  # L(N) not identified by these sizes: the joint law at the largest budget's mean data
        d_star = D[at_largest].mean()
        band = _band(samples, lambda p, n_: _joint(p, n_, d_star), xs, ("E", "A", "B", "alpha", "beta"))
        if band:
            by_size.fill_between(xs, *band, color="0.5", alpha=0.25, lw=0)
        by_size.plot(xs, _joint(fit, xs, d_star), color="0.2", lw=1.2, label=f"L(N, D) at D = {si(d_star)} (joint fit)")
    if "rows" in ext:
        rows = set(np.array(runs.names)[at_largest])
        held = [r for r in ext["rows"] if r["run"] in rows] or ext["rows"]
        by_size.plot([r[n] for r in held], [r["predicted"] for r in held], "x", color="black", ms=6, mew=1.2,
                     label=f"predicted from smaller models (mean error {100 * ext['mean_abs_relative_error']:.1f}%)")
    by_size.set(xscale="log", yscale="log", xlabel=_label(n), ylabel=_label(loss),
                title="L(N), each size at its largest budget")
    _log_ticks(by_size, "x", _format(n))
    _log_ticks(by_size, "y", _format(loss))
    _not_identified(by_data, fit, "L(N, D)")
    _not_identified(by_size, law, "L(N)")
    _seed_keys(by_size, runs.design(keep, D))
    _legend(fig, (by_data, by_size), loc="outside lower center", ncol=2)
    return fig


def _probe(runs: _Runs, keep: np.ndarray) -> Optional[tuple[str, str]]:
    """The first probe_* column with values in ``keep``, and its axis label."""
    for column in runs.header:
        if column.startswith("probe_") and np.isfinite(runs.num(column)[keep]).any():
            body = column[len("probe_"):]
            for suffix, (metric, higher) in _PROBE_METRICS.items():
                if body.endswith("_" + suffix):
                    task = body[: -len(suffix) - 1].upper()
                    return column, f"{task} {metric}, linear probe\n({'higher' if higher else 'lower'} is better)"
            return column, f"{body.replace('_', ' ')}, linear probe"
    return None


def _single_modality(runs: _Runs, keep: np.ndarray, baseline: np.ndarray) -> tuple[str, np.ndarray]:
    """The x of the paired/single figure: single-modality molecules seen (``molecules_single_*``,
    empty read as 0 on the baseline, which saw none), else the planned ratio."""
    for column in runs.header:
        if column.startswith("molecules_single_") and (runs.num(column)[keep] > 0).any():
            break
    else:
        column = "ratio"
        if not runs.has(column):
            raise _Skip("neither molecules_single_2d nor ratio has values")
    x = runs.num(column)
    x[baseline & np.isnan(x)] = 0.0
    return column, x


def _paired_vs_single(runs: _Runs, columns: dict) -> dict[str, Figure]:
    """Loss and probe metric against single-modality molecules, one curve per schedule; one
    figure per (model size, paired set)."""
    loss_column = columns["loss"]
    curves, baseline = _schedules(runs, np.isfinite(runs.num(loss_column)))
    if set(curves) <= {""} and not baseline.any():
        raise _Skip("no run with a schedule (not a paired/single study)")
    mixed = baseline | np.any([rows for name, rows in curves.items() if name], axis=0)
    xcol, x = _single_modality(runs, mixed, baseline)
    mixed &= np.isfinite(x) & (x >= 0)
    if not mixed.any():
        raise _Skip(f"no run with a schedule, {loss_column} and {xcol}")
    # the planned paired set (the runner's paired_size column) when the table has it: realised unique
    # counts differ by a few molecules between runs of one design
    planned = runs.num("paired_size")
    params, paired = runs.num(columns["n"]), planned if np.isfinite(planned).any() else runs.num("unique_paired")
    groups = sorted({(p, q) for p, q, m in zip(params, paired, mixed) if m},
                    key=lambda g: tuple(-1 if math.isnan(v) else v for v in g))
    figures = {}
    for p, q in groups:
        keep = mixed & _same(params, p) & _same(paired, q)
        name = "paired_vs_single" if len(groups) == 1 else (
            "paired_vs_single_" + "_".join(s for s in (_tag(p, "params"), _tag(q, "paired")) if s))
        if name in figures:  # values that print alike: the exact numbers
            name += "_" + "_".join(f"{v:.0f}" for v in (p, q) if not math.isnan(v))
        figures[name] = _mix_figure(runs, keep, {k: v & keep for k, v in curves.items() if k}, baseline & keep,
                                    loss_column, xcol, x, p, q)
    return figures


def _same(values: np.ndarray, v: float) -> np.ndarray:
    return np.isnan(values) if math.isnan(v) else values == v


def _tag(v: float, what: str) -> str:
    return "" if math.isnan(v) else f"{si(v)}{what}".replace(".", "p")


def _mix_figure(runs: _Runs, keep: np.ndarray, curves: dict[str, np.ndarray], baseline: np.ndarray,
                loss_column: str, xcol: str, x: np.ndarray, params: float, paired: float) -> Figure:
    probe = _probe(runs, keep)
    fig, axes = _figure(TWO_COLUMNS if probe else ONE_COLUMN + 1, 3.2, panels=2 if probe else 1)
    cmap = matplotlib.colormaps[MIX_COLORMAP]
    panels = [(loss_column, _label(loss_column))] + ([probe] if probe else [])
    for ax, (column, label) in zip(axes, panels):
        y = runs.num(column)
        ok = keep & np.isfinite(y)
        start = np.flatnonzero(baseline & ok)
        for i, (schedule, rows) in enumerate(curves.items()):
            if (rows & ok).any():  # side by side, so that bars at one x do not hide each other
                dodged = x * DODGE ** (i - (len(curves) - 1) / 2)
                _series(ax, dodged, y, runs.design(rows & ok, x), cmap(i), schedule.replace("_", " "), start=start)
        if len(start):  # the shared start of every curve, drawn once
            _series(ax, x, y, [start], "black", "paired only", marker="s", ls="none")
        _seed_keys(ax, runs.design(ok, x))
        positive = x[keep][x[keep] > 0]
        linthresh = positive.min() if positive.size else 1.0
        ax.set_xscale("symlog", linthresh=linthresh, linscale=0.6)
        ax.set_xlim(left=-0.25 * linthresh, right=1.3 * x[keep].max())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _, f=_format(xcol): f(v) if v else "0"))
        ticks = _mix_ticks(runs, keep, x)
        if len(ticks) <= 6:  # few values (a ratio ladder): tick each of them
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel=f"Single-modality ({xcol.rsplit('_', 1)[-1].upper()}) molecules seen"
               if xcol.startswith("molecules_single_") else "Single-modality : paired ratio", ylabel=label)
    title = ", ".join(t for t in (f"paired set {si(paired)} molecules" if not math.isnan(paired) else "",
                                  f"model {si(params)} params" if not math.isnan(params) else "") if t)
    if title:
        fig.suptitle(title)
    _legend(fig, axes[:1], loc="outside lower center", ncol=min(3, len(curves) + 1), title="data mix")
    return fig


def _mix_ticks(runs: _Runs, keep: np.ndarray, x: np.ndarray) -> list[float]:
    """One x tick per planned ratio, at the mean x of its runs (every schedule's); per distinct x
    in a table without ratios."""
    if not runs.has("ratio"):
        return sorted(set(x[keep]))
    ratio = runs.num("ratio")
    return sorted(float(x[keep & (ratio == r)].mean()) for r in np.unique(ratio[keep]))

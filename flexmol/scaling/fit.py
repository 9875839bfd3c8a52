"""Scaling-law fits to a study's results table, with bootstrap intervals.

The joint law is Chinchilla's approach 3, L(N, D) = E + A/N^alpha + B/D^beta, fitted the way the
2024 replication (Besiroglu et al.) showed it must be: in log space, L_hat = logsumexp(a - alpha
log N, b - beta log D, e) with a = log A, b = log B, e = log E, by minimising the *sum* over runs of
a Huber loss (delta = 1e-3) of log L_hat - log L. The sum, not the mean: a mean shrinks the
objective by the number of runs and L-BFGS-B, whose stopping rule compares decreases to
max(|f|, 1), stops before the optimum. The optimiser runs from the best points of a grid of
starts (scaled to the data, so tiny molecular models and billion-parameter ones get the same
coverage), within bounds: E at most the smallest observed loss and exponents in [0, 3].

Runs are grouped by what was planned, not by what was realised: a *design point* is a model size
and a planned data ``budget`` (the molecules a run actually sees differ a little from seed to
seed), so the seeds of a point stay together. The single-variable laws L(N), L(D) and L(C) use the
rows that measure them: every size at its largest budget, the largest model at every budget, and
the compute frontier of the design points (those no cheaper point beats, on mean compute and
loss), each with all its seeds. A table without a budget column falls back to the data column.

A fit the data cannot identify says so. A law needs its parameter count plus two design points
(distinct values of its variable: seeds repeat a point, they do not add one), or it is skipped
with the reason. Every fit gets percentile 95% intervals from ``bootstrap`` resamples of its rows
(each refit from the full fit and a few grid starts) and, for each bounded parameter, the share of
resamples that end at a bound (E near 0 or at the smallest loss, an exponent at 0 or 3): an
interval end that at least 2.5% of them reach is at the bound, and that parameter is not
identified by these data. fit.json lists every such case, and every skipped fit, in ``warnings``;
the joint fit's resampled parameters are kept so that figures can draw bands.

Two checks a paper needs come with the fit: the extrapolation (fit without the largest model,
predict its runs) and compute-optimal N(C), D(C) from a compute model C = k N^a D^b fitted to the
measured FLOPs (the pair track makes compute quadratic in atoms, so 6ND does not hold). A table
without compute gets the joint law, L(N) and L(D), and a reason in place of L(C) and N(C), D(C).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Optional

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import huber
from threadpoolctl import threadpool_limits

from flexmol.scaling import ScalingError

HUBER_DELTA = 1e-3
EXPONENT_BOUNDS = (0.0, 3.0)
MIN_LEVELS = 3  # distinct values a variable needs in a bootstrap resample for its term to be fitted
E_NEAR_ZERO = 1e-3  # E below this share of the smallest loss is at its lower bound, 0
BOUND_TOLERANCE = 1e-4  # an exponent this close to 0 or 3, or E to its upper bound (relatively), is at it
# The grid of starts: exponents, E as a fraction of the smallest loss, and (joint law) the share of
# the reducible loss at the median run carried by the N term; coefficients follow from these.
GRID_EXPONENTS = (0.05, 0.15, 0.3, 0.5, 0.8, 1.2, 2.0)
GRID_E_FRACTIONS = (0.05, 0.35, 0.65, 0.9)
GRID_SHARES = (0.2, 0.5, 0.8)
STARTS = 16  # L-BFGS-B runs per fit: the best grid points
BOOTSTRAP_STARTS = 4  # per resample: the full fit plus this many best grid points
# Tight enough that the optimiser, not its stopping rule, decides where the fit ends.
_LBFGS = {"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-10}
_CONFIDENCE = (2.5, 97.5)


@dataclass(frozen=True)
class _Law:
    """E + sum_i C_i / x_i^k_i, fitted as theta = (log C_1.., k_1.., log E)."""

    formula: str
    name: str
    coefficients: tuple[str, ...]
    exponents: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return ("E", *self.coefficients, *self.exponents)

    @property
    def min_points(self) -> int:
        """Design points the law needs: one per parameter and two to spare."""
        return len(self.names) + 2

    def params(self, theta: np.ndarray) -> dict[str, float]:
        k = len(self.coefficients)
        out = {"E": float(np.exp(theta[-1]))}
        out.update({n: float(np.exp(c)) for n, c in zip(self.coefficients, theta[:k])})
        out.update({n: float(x) for n, x in zip(self.exponents, theta[k:2 * k])})
        return out


JOINT = _Law("L(N, D) = E + A/N^alpha + B/D^beta", "L(N, D)", ("A", "B"), ("alpha", "beta"))
LAW_N = _Law("L(N) = E + A/N^alpha", "L(N)", ("A",), ("alpha",))
LAW_D = _Law("L(D) = E + B/D^beta", "L(D)", ("B",), ("beta",))
LAW_C = _Law("L(C) = E + A/C^gamma", "L(C)", ("A",), ("gamma",))


# ------------------------------------------------------------------------------------------------
# The table


def read_runs(path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a results CSV; a :class:`ScalingError` naming the file otherwise."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, restkey="\0extra")
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except FileNotFoundError:
        raise ScalingError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ScalingError(f"{path}: is a directory, not a CSV file") from None
    except UnicodeDecodeError:
        raise ScalingError(f"{path}: binary data, not a CSV file") from None
    except csv.Error as exc:
        raise ScalingError(f"{path}: not a CSV file ({exc})") from None
    if not header:
        raise ScalingError(f"{path}: empty, no header row")
    for i, row in enumerate(rows, start=2):
        if "\0extra" in row:
            raise ScalingError(f"{path}: line {i} has more cells than the header's {len(header)} columns")
    return header, rows


def run_name(row: dict, index: int) -> str:
    return row.get("run") or f"row {index + 1}"


def is_done(row: dict) -> bool:
    """A row the fits and figures use: status ``done`` (every row, in a table without status)."""
    return (row.get("status") or "done").strip() == "done"


def _group_ids(*values: np.ndarray) -> np.ndarray:
    """An integer per row, equal for rows equal in every one of ``values`` (e.g. size and budget)."""
    if not len(values[0]):
        return np.zeros(0, int)
    return np.unique(np.stack(values, axis=1), axis=0, return_inverse=True)[1].ravel()


@dataclass
class _Table:
    runs: list[str]
    N: np.ndarray
    D: np.ndarray
    L: np.ndarray
    planned: np.ndarray  # each run's planned data budget; its realised D in a table without one
    C: Optional[np.ndarray]  # None when the table has no usable compute column ...
    no_compute: Optional[str]  # ... and this says why
    ignored: dict[str, int]

    @property
    def design(self) -> np.ndarray:
        """An id per run of its design point (model size, planned budget), shared by its seeds."""
        return _group_ids(self.N, self.planned)


def _values(path: Path, done: list[tuple[int, dict]], column: str) -> np.ndarray:
    out = np.empty(len(done))
    for j, (i, row) in enumerate(done):
        cell = (row.get(column) or "").strip()
        try:
            value = float(cell)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ScalingError(f"{path}: run {run_name(row, i)} has {column}={cell!r}; a fit needs a finite number > 0")
        out[j] = value
    return out


def _load(path: Path, columns: dict[str, str]) -> tuple[_Table, str]:
    """The done runs, and the column their design points are planned by (budget, else the data).

    N, D and the loss are required on every done run; a budget column, when it has any value,
    too. Compute is optional: without the column, or with a cell that is not a number > 0, C is
    None and ``no_compute`` says why."""
    header, rows = read_runs(path)
    missing = [columns[k] for k in ("n", "d", "loss") if columns[k] not in header]
    if missing:
        raise ScalingError(f"{path}: no column {missing[0]!r} (columns: {', '.join(header)})")
    done = [(i, r) for i, r in enumerate(rows) if is_done(r)]
    ignored: dict[str, int] = {}
    for r in rows:
        if not is_done(r):
            status = r["status"].strip() or "(empty)"
            ignored[status] = ignored.get(status, 0) + 1
    N, D, L = (_values(path, done, columns[k]) for k in ("n", "d", "loss"))

    def filled(column: str) -> bool:
        return column in header and any((r.get(column) or "").strip() for _, r in done)

    planned_by = columns["budget"] if filled(columns["budget"]) else columns["d"]
    planned = _values(path, done, planned_by) if planned_by != columns["d"] else D
    C, no_compute = None, None
    if not filled(columns["c"]):
        where = "no values in" if columns["c"] in header else "no"
        no_compute = f"{where} column {columns['c']!r}"
    else:
        try:
            C = _values(path, done, columns["c"])
        except ScalingError as exc:
            no_compute = str(exc).removeprefix(f"{path}: ")
    runs = [run_name(r, i) for i, r in done]
    return _Table(runs, N, D, L, planned, C, no_compute, ignored), planned_by


# ------------------------------------------------------------------------------------------------
# The optimiser


def _terms(theta: np.ndarray, logx: np.ndarray) -> np.ndarray:
    """log of each term of the law, (..., runs, k + 1), for theta of shape (..., 2k + 1)."""
    k = logx.shape[1]
    theta = np.asarray(theta)[..., None, :]
    power = theta[..., :k] - theta[..., k:2 * k] * logx
    return np.concatenate([power, np.broadcast_to(theta[..., -1:], power.shape[:-1] + (1,))], axis=-1)


def _logsumexp(terms: np.ndarray) -> np.ndarray:
    """log sum exp over the last axis (scipy's is ten times slower on these small arrays)."""
    top = terms.max(axis=-1)
    return top + np.log(np.exp(terms - top[..., None]).sum(axis=-1))


def _objective(theta: np.ndarray, logx: np.ndarray, logy: np.ndarray) -> tuple[float, np.ndarray]:
    """Summed Huber loss of the log residuals, and its gradient."""
    k = logx.shape[1]
    terms = _terms(theta, logx)
    pred = _logsumexp(terms)
    weight = np.exp(terms - pred[:, None])  # d pred / d term (a softmax)
    residual = pred - logy
    slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA)[:, None] * weight  # Huber' = clip(r)
    grad = np.concatenate([slope[:, :k].sum(0), -(slope[:, :k] * logx).sum(0), slope[:, k:].sum(0)])
    return float(huber(HUBER_DELTA, residual).sum()), grad


def _grid(logx: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Starts scaled to the data: for each exponent set, E and split of the reducible loss, the
    coefficients that put the law through the median run."""
    k = logx.shape[1]
    centre = np.median(logx, axis=0)
    shares = [(1.0,)] if k == 1 else [(s, 1 - s) for s in GRID_SHARES]
    starts = []
    for exponents in product(GRID_EXPONENTS, repeat=k):
        for fraction in GRID_E_FRACTIONS:
            E = fraction * y.min()
            for share in shares:
                coefficients = np.log(np.array(share) * (np.median(y) - E)) + np.array(exponents) * centre
                starts.append([*coefficients, *exponents, math.log(E)])
    return np.array(starts)


def _best_starts(grid: np.ndarray, logx: np.ndarray, logy: np.ndarray, count: int) -> np.ndarray:
    losses = huber(HUBER_DELTA, _logsumexp(_terms(grid, logx)) - logy).sum(-1)
    return grid[np.argsort(losses)[:count]]


def _minimise(logx: np.ndarray, logy: np.ndarray, starts: np.ndarray):
    """The best L-BFGS-B result over ``starts``, within the bounds."""
    k = logx.shape[1]
    bounds = [(None, None)] * k + [EXPONENT_BOUNDS] * k + [(None, float(logy.min()))]
    lo = np.array([-np.inf if b[0] is None else b[0] for b in bounds])
    hi = np.array([np.inf if b[1] is None else b[1] for b in bounds])
    best = None
    for start in starts:
        res = minimize(_objective, np.clip(start, lo, hi), args=(logx, logy), jac=True,
                       method="L-BFGS-B", bounds=bounds, options=_LBFGS)
        if best is None or res.fun < best.fun:
            best = res
    return best


def _levels(x: np.ndarray) -> int:
    return len(np.unique(x))


def _percentiles(samples: dict[str, list[float]]) -> dict[str, list[float]]:
    """Percentile 95% intervals; None for a parameter without samples."""
    return {k: [float(v) for v in np.percentile(s, _CONFIDENCE)] if s else None for k, s in samples.items()}


def _at_bounds(law: _Law, params: dict[str, float], min_loss: float) -> dict[str, tuple[bool, bool]]:
    """Whether each bounded parameter sits at its lower and at its upper bound. E's upper bound is
    the smallest loss of the rows fitted; its lower one is 0, which the fit only approaches."""
    lo, hi = EXPONENT_BOUNDS
    sides = {"E": (params["E"] <= E_NEAR_ZERO * min_loss, params["E"] >= (1 - BOUND_TOLERANCE) * min_loss)}
    sides.update({n: (params[n] <= lo + BOUND_TOLERANCE, params[n] >= hi - BOUND_TOLERANCE) for n in law.exponents})
    return sides


def _identification(law: _Law, params: dict[str, float], intervals: dict, min_loss: float,
                    counts: dict[str, list[int]], used: int) -> dict[str, dict]:
    """Per bounded parameter: its bounds, where the estimate sits (``lower``, ``upper`` or None),
    the share of resamples at each bound, and whether each end of the 95% interval is at one."""
    ends = [{n: iv[i] for n, iv in intervals.items()} for i in (0, 1)] if all(intervals.values()) else None
    sides = [_at_bounds(law, end, min_loss) for end in ends] if ends else None
    out = {}
    for name, (low, high) in _at_bounds(law, params, min_loss).items():
        out[name] = {"bounds": [0.0, min_loss] if name == "E" else list(EXPONENT_BOUNDS),
                     "estimate_at": "lower" if low else "upper" if high else None,
                     "resamples_at_bounds": [c / used for c in counts[name]] if used else None,
                     "interval_at_bounds": [any(s[name]) for s in sides] if sides else None}
    return out


def _fit_law(law: _Law, x: np.ndarray, y: np.ndarray, levels: np.ndarray, *, bootstrap: int,
             rng: np.random.Generator) -> dict:
    """Fit ``law`` to the points (x: runs x variables, y: losses), with bootstrap intervals.

    ``levels`` (runs x variables) holds each run's planned value of each variable. A resample with
    fewer than MIN_LEVELS distinct planned values of a variable cannot fit its term; it is drawn
    but not refitted, and counted in ``bootstrap.skipped``."""
    logx, logy = np.log(x), np.log(y)
    best = _minimise(logx, logy, _best_starts(_grid(logx, y), logx, logy, STARTS))
    params = law.params(best.x)
    result = {"law": law.formula, **params, "objective": float(best.fun), "optimizer": str(best.message)}
    samples: dict[str, list[float]] = {name: [] for name in law.names}
    at_bounds = {name: [0, 0] for name in ("E", *law.exponents)}
    skipped = 0
    for _ in range(bootstrap):
        idx = rng.integers(0, len(y), len(y))
        if min(_levels(levels[idx, j]) for j in range(levels.shape[1])) < MIN_LEVELS:
            skipped += 1
            continue
        lx, ly = logx[idx], logy[idx]
        starts = np.vstack([best.x, _best_starts(_grid(lx, y[idx]), lx, ly, BOOTSTRAP_STARTS)])
        sample = law.params(_minimise(lx, ly, starts).x)
        for name, value in sample.items():
            samples[name].append(value)
        for name, sides in _at_bounds(law, sample, float(y[idx].min())).items():
            at_bounds[name] = [count + side for count, side in zip(at_bounds[name], sides)]
    result["intervals"] = _percentiles(samples)
    result["identification"] = _identification(law, params, result["intervals"], float(y.min()), at_bounds,
                                               bootstrap - skipped)
    result["identified"] = not any(i["estimate_at"] or any(i["interval_at_bounds"] or ())
                                   for i in result["identification"].values())
    result["bootstrap"] = {"requested": bootstrap, "used": bootstrap - skipped, "skipped": skipped, "samples": samples}
    return result


# ------------------------------------------------------------------------------------------------
# The fits


def _single(law: _Law, table: _Table, keep: np.ndarray, x: np.ndarray, levels: np.ndarray, selection: str,
            what: str, bootstrap: int, rng: np.random.Generator) -> dict:
    """A one-variable law on the rows ``keep``; a ``skipped`` reason when they cannot identify it.

    ``levels`` holds each run's design value of the variable: its seeds count once."""
    count = _levels(levels[keep])
    if count < law.min_points:
        return {"law": law.formula, "selection": selection,
                "skipped": f"{count} distinct {what} among {selection}; its {len(law.names)} parameters "
                           f"need at least {law.min_points}"}
    fit = _fit_law(law, x[keep][:, None], table.L[keep], levels[keep][:, None], bootstrap=bootstrap, rng=rng)
    return {**fit, "selection": selection, "rows": [r for r, k in zip(table.runs, keep) if k]}


def _at_largest_budget(table: _Table) -> np.ndarray:
    """Every run (all seeds) of each model size at that size's largest planned budget."""
    keep = np.zeros(len(table.N), bool)
    for n in np.unique(table.N):
        here = table.N == n
        keep |= here & (table.planned == table.planned[here].max())
    return keep


def compute_frontier(C: np.ndarray, L: np.ndarray, groups: Optional[np.ndarray] = None) -> np.ndarray:
    """The runs on the compute frontier, as a boolean mask: those of the groups that no cheaper (or
    equally cheap) group beats, on the groups' mean compute and loss. ``groups`` holds an id per
    run (the seeds of one design point share one, see :func:`_group_ids`); without it each run is
    its own group."""
    ids = np.arange(len(C)) if groups is None else np.asarray(groups)
    _, inverse = np.unique(ids, return_inverse=True)
    inverse = inverse.ravel()
    runs = np.bincount(inverse)
    mean_c, mean_l = np.bincount(inverse, C) / runs, np.bincount(inverse, L) / runs
    on = np.zeros(len(runs), bool)
    best = math.inf
    for g in np.lexsort((mean_l, mean_c)):
        if mean_l[g] < best:
            on[g], best = True, mean_l[g]
    return on[inverse]


def _extrapolation(table: _Table, columns: dict[str, str], planned_by: str) -> dict:
    """Fit the joint law without the largest model and predict that model's runs."""
    largest = table.N.max()
    held = table.N == largest
    train = ~held
    what = f"without the largest model ({columns['n']}={largest:.6g}, {held.sum()} runs)"
    problem = _too_few(table.N[train], table.planned[train], columns["n"], planned_by)
    if problem:
        return {"held_out": {columns["n"]: float(largest)}, "skipped": f"cannot fit {what}: {problem}"}
    logx, logy = np.log(np.stack([table.N, table.D], axis=1)), np.log(table.L)
    starts = _best_starts(_grid(logx[train], table.L[train]), logx[train], logy[train], STARTS)
    best = _minimise(logx[train], logy[train], starts)
    predicted = np.exp(_logsumexp(_terms(best.x, logx[held])))
    error = (predicted - table.L[held]) / table.L[held]
    rows = [{"run": r, columns["n"]: float(n), columns["d"]: float(d), "observed": float(o), "predicted": float(p),
             "relative_error": float(e)}
            for r, n, d, o, p, e in zip(np.array(table.runs)[held], table.N[held], table.D[held], table.L[held],
                                         predicted, error)]
    return {"held_out": {columns["n"]: float(largest)}, "fit": JOINT.params(best.x), "n_fit_points": int(train.sum()),
            "rows": rows, "mean_abs_relative_error": float(np.abs(error).mean()),
            "max_abs_relative_error": float(np.abs(error).max())}


def _compute_optimal(table: _Table, joint: dict, c_column: str) -> dict:
    """Minimise the joint law along C(N, D) = C for compute from the table's smallest to a decade
    past its largest, with C(N, D) = k N^a D^b fitted to the measured compute by least squares.

    Along the constraint L = E + A N^-alpha + B (C/(k N^a))^(-beta/b); its optimum scales as
    N_opt ~ C^p with p = beta / (alpha b + beta a) and D_opt ~ C^q with q = (1 - a p) / b (Chinchilla's
    beta/(alpha+beta) and alpha/(alpha+beta) when a = b = 1). The points are found numerically; the
    exponents' intervals apply these formulas to the bootstrap samples."""
    if table.C is None:
        return {"skipped": f"no measured compute ({table.no_compute})"}
    X = np.column_stack([np.ones(len(table.C)), np.log(table.N), np.log(table.D)])
    y = np.log(table.C)
    coef, _, rank, _ = np.linalg.lstsq(X, y, rcond=None)
    if rank < 3:
        return {"skipped": f"N and D are collinear in the table; C = k N^a D^b cannot be fitted to {c_column}"}
    r2 = 1 - float(((y - X @ coef) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-300))
    logk, a, b = (float(v) for v in coef)
    model = {"formula": "C = k N^a D^b", "k": math.exp(logk), "a": a, "b": b, "r2": r2}
    if b <= 0:
        return {"compute_model": model, "skipped": f"the fitted compute model does not grow with data (b={b:.3g})"}
    E, A, alpha, B, beta = (joint[k] for k in ("E", "A", "alpha", "B", "beta"))
    span = (math.log(table.N.min()) - 6 * math.log(10), math.log(table.N.max()) + 6 * math.log(10))
    points = []
    for logc in np.linspace(np.log(table.C.min()), np.log(table.C.max()) + math.log(10), 13):
        def loss(logn, logc=logc):
            logd = (logc - logk - a * logn) / b
            return E + A * math.exp(-alpha * logn) + B * math.exp(-beta * logd)

        res = minimize_scalar(loss, bounds=span, method="bounded", options={"xatol": 1e-10})
        logn = float(res.x)
        points.append({"C": math.exp(logc), "N_opt": math.exp(logn), "D_opt": math.exp((logc - logk - a * logn) / b),
                       "L_opt": float(res.fun), "at_search_bound": bool(min(abs(logn - s) for s in span) < 1e-6)})
    logc = np.log([p["C"] for p in points])
    p = float(np.polyfit(logc, np.log([q["N_opt"] for q in points]), 1)[0])
    q = float(np.polyfit(logc, np.log([q["D_opt"] for q in points]), 1)[0])
    s = joint["bootstrap"].get("samples", {})
    ps = [bt / (al * b + bt * a) for al, bt in zip(s.get("alpha", []), s.get("beta", [])) if al * b + bt * a > 0]
    return {"compute_model": model, "points": points, "N_exponent": p, "D_exponent": q,
            "intervals": _percentiles({"N_exponent": ps, "D_exponent": [(1 - a * v) / b for v in ps]})}


def _too_few(N: np.ndarray, planned: np.ndarray, n_column: str, d_column: str) -> Optional[str]:
    """Why the joint law cannot be fitted to these runs, or None."""
    if not len(N):
        return "no done run"
    for values, column in ((N, n_column), (planned, d_column)):
        if _levels(values) < MIN_LEVELS:
            return (f"{_levels(values)} distinct {column} value(s); the joint fit needs at least {MIN_LEVELS} "
                    f"model sizes and {MIN_LEVELS} data values")
    points = _levels(_group_ids(N, planned))
    if points < JOINT.min_points:
        return (f"{points} design points ({n_column} x {d_column}) in {len(N)} done run(s); the joint fit's "
                f"{len(JOINT.names)} parameters need at least {JOINT.min_points}")
    return None


def fit_csv(csv, out, *, n_column: str = "params", d_column: str = "molecules", loss_column: str = "val_loss",
            c_column: str = "flops", budget_column: str = "budget", bootstrap: int = 200, seed: int = 0) -> dict:
    """Fit the scaling laws to the ``done`` runs of a results table and write ``out/fit.json``.

    Returns the dict written: the joint law's ``E, A, B, alpha, beta`` and ``intervals`` at the top
    level with its ``identification``, the single-variable fits ``L_N``, ``L_D``, ``L_C``,
    ``extrapolation``, ``compute_optimal`` and ``warnings`` (every parameter not identified, every
    fit or check skipped). A table that cannot support the joint fit is a :class:`ScalingError`; a
    single-variable fit or check its rows cannot support carries a ``skipped`` reason instead.

    BLAS runs on one thread meanwhile: L-BFGS-B's tiny vector operations are thirty times slower
    when OpenBLAS wakes a thread pool for each of them on a busy machine."""
    csv, out = Path(csv), Path(out)
    if bootstrap < 0:
        raise ScalingError(f"--bootstrap must be >= 0, not {bootstrap}")
    if out.exists() and not out.is_dir():
        raise ScalingError(f"--out {out}: not a directory")
    columns = {"n": n_column, "d": d_column, "loss": loss_column, "c": c_column, "budget": budget_column}
    table, planned_by = _load(csv, columns)
    problem = _too_few(table.N, table.planned, n_column, planned_by)
    if problem:
        raise ScalingError(f"{csv}: {problem}")
    with threadpool_limits(1, user_api="blas"):
        result = _fit_table(table, columns, planned_by, bootstrap, seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fit.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    return result


def _fit_table(table: _Table, columns: dict[str, str], planned_by: str, bootstrap: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n, c = columns["n"], columns["c"]
    design = table.design
    joint = _fit_law(JOINT, np.stack([table.N, table.D], axis=1), table.L, np.stack([table.N, table.planned], axis=1),
                     bootstrap=bootstrap, rng=rng)
    largest = table.N == table.N.max()
    if table.C is None:
        L_C = {"law": LAW_C.formula, "skipped": f"no measured compute ({table.no_compute})"}
    else:
        L_C = _single(LAW_C, table, compute_frontier(table.C, table.L, design), table.C, design,
                      f"the {c} frontier (design points no cheaper one beats)", "design points", bootstrap, rng)
    result = {
        **{k: joint[k] for k in ("E", "A", "B", "alpha", "beta", "intervals", "identification", "identified")},
        "law": JOINT.formula,
        "n_points": len(table.L),
        "n_design_points": _levels(design),
        "ignored_rows": table.ignored,
        "columns": columns,
        "planned_by": planned_by,
        "huber_delta": HUBER_DELTA,
        "exponent_bounds": list(EXPONENT_BOUNDS),
        "objective": joint["objective"],
        "optimizer": joint["optimizer"],
        "bootstrap": {**joint["bootstrap"], "seed": seed},
        "L_N": _single(LAW_N, table, _at_largest_budget(table), table.N, table.N,
                       f"each {n} at its largest {planned_by}", f"{n} values", bootstrap, rng),
        "L_D": _single(LAW_D, table, largest, table.D, table.planned,
                       f"the largest model ({n}={table.N.max():.6g})", f"{planned_by} values", bootstrap, rng),
        "L_C": L_C,
        "extrapolation": _extrapolation(table, columns, planned_by),
        "compute_optimal": _compute_optimal(table, joint, c),
    }
    result["warnings"] = fit_warnings(result)
    return result


# ------------------------------------------------------------------------------------------------
# The summary


def _g(x: float) -> str:
    return f"{x:.4g}"


_SIDES = ("lower", "upper")


def _bound_text(name: str, side: str, bounds: list[float]) -> str:
    if name == "E":
        return "near 0" if side == "lower" else f"at the smallest loss {_g(bounds[1])}"
    return f"at {_g(bounds[_SIDES.index(side)])}"


def _star(flag) -> str:
    return "*" if flag else ""


def _with_stars(fit: dict, name: str) -> tuple[str, str]:
    """A parameter's value and its 95% interval as text, ``*`` on each that sits at a bound."""
    info = fit.get("identification", {}).get(name, {})
    lo_at, hi_at = info.get("interval_at_bounds") or (False, False)
    iv = fit["intervals"][name]
    interval = f"[{_g(iv[0])}{_star(lo_at)}, {_g(iv[1])}{_star(hi_at)}]" if iv else "[no bootstrap]"
    return _g(fit[name]) + _star(info.get("estimate_at")), interval


def fit_warnings(result: dict) -> list[str]:
    """Each parameter the data do not identify (its estimate or an interval end at a bound), and
    each fit or check that was skipped, as one sentence."""
    out = []
    for key, name in (("", JOINT.name), ("L_N", LAW_N.name), ("L_D", LAW_D.name), ("L_C", LAW_C.name)):
        fit = result[key] if key else result
        if "skipped" in fit:
            out.append(f"{name} skipped: {fit['skipped']}")
            continue
        for p, info in fit.get("identification", {}).items():
            if not (info["estimate_at"] or any(info["interval_at_bounds"] or ())):
                continue
            value, interval = _with_stars(fit, p)
            shares = [f"{100 * s:.0f}% {_bound_text(p, side, info['bounds'])}"
                      for side, s in zip(_SIDES, info["resamples_at_bounds"] or ()) if s]
            resamples = f" (bootstrap resamples: {', '.join(shares)})" if shares else ""
            out.append(f"{name}: {p} = {value}, 95% interval {interval}{resamples}: * at a bound, "
                       f"not identified by these data")
    for key, label in (("extrapolation", "extrapolation"), ("compute_optimal", "compute-optimal")):
        if "skipped" in result[key]:
            out.append(f"{label} skipped: {result[key]['skipped']}")
    return out


def _param_lines(fit: dict, names: tuple[str, ...]) -> list[str]:
    lines = []
    for name in names:
        value, interval = _with_stars(fit, name)
        lines.append(f"  {name:<6}{value:>12}   {interval}")
    return lines


def _plain_interval(iv) -> str:
    return f"[{_g(iv[0])}, {_g(iv[1])}]" if iv else "[no bootstrap]"


def format_fit(result: dict) -> str:
    """A short human summary: parameters with 95% intervals (``*`` where a bound, not the data,
    decides them), extrapolation error, compute-optimal exponents."""
    c = result["columns"]
    boot = result["bootstrap"]
    lines = [f"{result['law']}  ({c['n']}, {c['d']}, {c['loss']}; {result['n_points']} runs; "
             f"95% intervals from {boot['used']}/{boot['requested']} bootstrap resamples)"]
    lines += _param_lines(result, JOINT.names)
    for key, law in (("L_N", LAW_N), ("L_D", LAW_D), ("L_C", LAW_C)):
        fit = result[key]
        if "skipped" in fit:
            lines.append(f"{fit['law']}: skipped ({fit['skipped']})")
        else:
            lines.append(f"{fit['law']}  ({len(fit['rows'])} runs: {fit['selection']})")
            lines += _param_lines(fit, law.names)
    if any("*" in line for line in lines):
        lines.append("  * at a bound (E near 0 or at the smallest loss, an exponent at 0 or 3): not identified by "
                     "these data")
    ext = result["extrapolation"]
    if "skipped" in ext:
        lines.append(f"extrapolation: skipped ({ext['skipped']})")
    else:
        (col, n), = ext["held_out"].items()
        lines.append(f"extrapolation: fit without {col}={_g(n)} on {ext['n_fit_points']} runs, predict its "
                     f"{len(ext['rows'])} runs: mean |relative error| {100 * ext['mean_abs_relative_error']:.2f}%, "
                     f"max {100 * ext['max_abs_relative_error']:.2f}%")
    opt = result["compute_optimal"]
    if "skipped" in opt:
        lines.append(f"compute-optimal: skipped ({opt['skipped']})")
    else:
        m, iv = opt["compute_model"], opt["intervals"]
        lines.append(f"compute-optimal (C = {_g(m['k'])} N^{m['a']:.3f} D^{m['b']:.3f}, R^2 {m['r2']:.4f}): "
                     f"N_opt ~ C^{opt['N_exponent']:.3f} {_plain_interval(iv['N_exponent'])}, "
                     f"D_opt ~ C^{opt['D_exponent']:.3f} {_plain_interval(iv['D_exponent'])}")
    ignored = result.get("ignored_rows") or {}
    if ignored:
        lines.append("ignored: " + ", ".join(f"{n} {s} run(s)" for s, n in ignored.items()))
    return "\n".join(lines)

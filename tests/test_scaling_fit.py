"""Scaling-law fits on tables drawn from a known law: the exponents are recovered inside their
bootstrap intervals, the optimiser reaches the optimum of the summed Huber loss within its bounds,
the extrapolation check tells a law that holds from one that breaks, compute-optimal exponents
match Chinchilla's, and a table that cannot support a fit is one line naming what is wrong."""
import csv
import json
from itertools import product

import numpy as np
import pytest
from scipy.special import huber

from flexmol.cli import main as cli
from flexmol.scaling import ScalingError
from flexmol.scaling.fit import HUBER_DELTA, fit_csv, format_fit

LAW = {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28}
SIZES = np.logspace(5, 7, 5)
BUDGETS = np.logspace(5, 8, 5)


def law(N, D, p=LAW):
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def write_table(path, *, sigma=0.0, seed=0, sizes=SIZES, budgets=BUDGETS, largest_factor=1.0,
                compute=lambda N, D: 6 * N * D, failed=0, loss=law):
    """A runs.csv as the runner writes it, from ``loss`` with multiplicative log-normal noise; the
    largest model's losses scaled by ``largest_factor``; ``failed`` failed runs with empty cells."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "status", "size", "params", "molecules", "flops", "val_loss", "wall_seconds"])
        for i, N in enumerate(sizes):
            for j, D in enumerate(budgets):
                value = loss(N, D) * np.exp(sigma * rng.standard_normal())
                if N == max(sizes):
                    value *= largest_factor
                w.writerow([f"s{i}-d{j}", "done", f"s{i}", int(N), int(D), compute(N, D), repr(float(value)), 1.0])
        for k in range(failed):
            w.writerow([f"broken{k}", "failed", "s0", int(sizes[0]), "", "", "", ""])
    return path


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    d = tmp_path_factory.mktemp("noisy")
    return fit_csv(write_table(d / "runs.csv", sigma=0.01, seed=0, failed=2), d, bootstrap=40, seed=0)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    return fit_csv(write_table(d / "runs.csv"), d, bootstrap=0)


def test_noisy_law_exponents_fall_inside_narrow_bootstrap_intervals(noisy):
    for name in ("alpha", "beta"):
        lo, hi = noisy["intervals"][name]
        assert lo <= LAW[name] <= hi, (name, noisy[name], lo, hi)
        assert lo <= noisy[name] <= hi and 0 < hi - lo < 0.2, (name, lo, hi)
    assert set(noisy["intervals"]) == {"E", "A", "B", "alpha", "beta"}
    assert noisy["bootstrap"]["used"] == 40 and len(noisy["bootstrap"]["samples"]["alpha"]) == 40


def test_noiseless_law_is_recovered_to_one_part_in_a_thousand(clean):
    for name, value in LAW.items():
        assert clean[name] == pytest.approx(value, rel=1e-3), name


def test_the_fit_minimises_the_summed_huber_loss_of_log_residuals(noisy, tmp_path):
    """The reported objective is the sum (not the mean) over runs, and the optimiser reached a
    minimum: no step along any parameter lowers it, and the true law does no better."""
    rows = list(csv.DictReader(open(write_table(tmp_path / "runs.csv", sigma=0.01, seed=0))))
    N, D, L = (np.array([float(r[k]) for r in rows]) for k in ("params", "molecules", "val_loss"))

    def objective(p):
        return huber(HUBER_DELTA, np.log(law(N, D, p)) - np.log(L)).sum()

    best = {k: noisy[k] for k in LAW}
    assert noisy["objective"] == pytest.approx(objective(best), rel=1e-9)
    assert noisy["objective"] < objective(LAW)
    for name in LAW:
        for step in (-1e-4, 1e-4):
            assert objective({**best, name: best[name] * (1 + step)}) >= noisy["objective"] * (1 - 1e-9), name


def test_E_stays_below_the_smallest_loss_even_when_a_robust_fit_would_not(tmp_path):
    """One run far below the law: the Huber loss would ignore it and put E at 1.7, above it."""
    def loss(N, D):
        return 0.8 if (N, D) == (SIZES[2], BUDGETS[2]) else law(N, D)

    fit = fit_csv(write_table(tmp_path / "runs.csv", loss=loss), tmp_path, bootstrap=3)
    assert fit["E"] <= 0.8 * (1 + 1e-12)


def test_exponents_stay_within_their_bounds(tmp_path):
    steep = {**LAW, "A": 1e30, "alpha": 5.0}
    fit = fit_csv(write_table(tmp_path / "runs.csv", loss=lambda N, D: law(N, D, steep)), tmp_path, bootstrap=3)
    assert fit["exponent_bounds"] == [0.0, 3.0]
    assert fit["alpha"] == pytest.approx(3.0)
    assert max(fit["bootstrap"]["samples"]["alpha"]) <= 3.0


def test_bootstrap_is_seeded_and_resamples_the_runs(tmp_path):
    table = write_table(tmp_path / "runs.csv", sigma=0.01, seed=3, sizes=SIZES[:4], budgets=BUDGETS[:4])
    a = fit_csv(table, tmp_path / "a", bootstrap=4, seed=1)
    b = fit_csv(table, tmp_path / "b", bootstrap=4, seed=1)
    c = fit_csv(table, tmp_path / "c", bootstrap=4, seed=2)
    assert a["bootstrap"]["samples"] == b["bootstrap"]["samples"]
    assert a["bootstrap"]["samples"]["alpha"] != c["bootstrap"]["samples"]["alpha"]
    assert len(set(a["bootstrap"]["samples"]["alpha"])) == 4  # every resample a different fit
    assert json.loads((tmp_path / "a" / "fit.json").read_text())["intervals"] == a["intervals"]


def test_single_variable_fits_use_the_rows_that_measure_them(clean):
    n = clean["L_N"]
    assert n["rows"] == [f"s{i}-d4" for i in range(5)]  # each size at its largest budget
    assert n["alpha"] == pytest.approx(LAW["alpha"], rel=1e-3)
    assert n["E"] == pytest.approx(LAW["E"] + LAW["B"] / BUDGETS[-1] ** LAW["beta"], rel=1e-3)
    d = clean["L_D"]
    assert d["rows"] == [f"s4-d{j}" for j in range(5)] and d["beta"] == pytest.approx(LAW["beta"], rel=1e-3)
    c = clean["L_C"]
    cheaper_wins = {}
    for i, N in enumerate(SIZES):  # a frontier run is beaten by no cheaper run
        for j, D in enumerate(BUDGETS):
            cheaper_wins[f"s{i}-d{j}"] = any(6 * n_ * d_ < 6 * N * D and law(n_, d_) < law(N, D)
                                             for n_ in SIZES for d_ in BUDGETS)
    assert set(c["rows"]) == {r for r, beaten in cheaper_wins.items() if not beaten}
    assert 0 < c["gamma"] < 3 and {"E", "A", "gamma"} <= set(c["intervals"])


def test_extrapolation_is_tiny_when_the_law_holds(clean):
    ext = clean["extrapolation"]
    assert ext["held_out"] == {"params": SIZES[-1]} and ext["n_fit_points"] == 20 and len(ext["rows"]) == 5
    assert ext["max_abs_relative_error"] < 1e-4


def test_extrapolation_is_large_when_the_largest_model_breaks_the_law(tmp_path):
    fit = fit_csv(write_table(tmp_path / "runs.csv", largest_factor=1.2), tmp_path, bootstrap=0)
    ext = fit["extrapolation"]
    assert ext["mean_abs_relative_error"] == pytest.approx(1 - 1 / 1.2, abs=0.02)
    assert all(r["predicted"] < r["observed"] for r in ext["rows"])


def test_extrapolation_is_refused_when_too_few_sizes_would_remain(tmp_path):
    fit = fit_csv(write_table(tmp_path / "runs.csv", sizes=SIZES[:3]), tmp_path, bootstrap=0)
    assert "alpha" in fit and "2 distinct params" in fit["extrapolation"]["skipped"]
    assert "extrapolation: skipped" in format_fit(fit)


def test_compute_optimal_exponents_match_chinchilla_when_compute_is_kND(clean):
    opt = clean["compute_optimal"]
    model = opt["compute_model"]
    assert model["k"] == pytest.approx(6, rel=1e-4)  # the table holds int(N), int(D)
    assert model["r2"] == pytest.approx(1)
    assert (model["a"], model["b"]) == (pytest.approx(1), pytest.approx(1))
    a, b = LAW["alpha"], LAW["beta"]
    assert opt["N_exponent"] == pytest.approx(b / (a + b), abs=1e-3)
    assert opt["D_exponent"] == pytest.approx(a / (a + b), abs=1e-3)
    C = [p["C"] for p in opt["points"]]
    assert C[0] == pytest.approx(6 * SIZES[0] * BUDGETS[0]) and C[-1] == pytest.approx(60 * SIZES[-1] * BUDGETS[-1])
    fitted = {k: clean[k] for k in LAW}
    for p in opt["points"]:  # each point is on its compute contour and no neighbour on it does better
        assert model["k"] * p["N_opt"] ** model["a"] * p["D_opt"] ** model["b"] == pytest.approx(p["C"], rel=1e-9)
        assert law(p["N_opt"], p["D_opt"], fitted) == pytest.approx(p["L_opt"], rel=1e-12)
        for f in (0.99, 1.01):
            N = p["N_opt"] * f
            D = (p["C"] / (model["k"] * N ** model["a"])) ** (1 / model["b"])
            assert law(N, D, fitted) > p["L_opt"]


def test_compute_optimal_follows_the_measured_compute_not_6ND(tmp_path):
    """Compute quadratic-ish in model size, C = 3 N^1.5 D: N_opt ~ C^(beta / (alpha b + beta a))."""
    fit = fit_csv(write_table(tmp_path / "runs.csv", compute=lambda N, D: 3 * N ** 1.5 * D), tmp_path, bootstrap=0)
    opt = fit["compute_optimal"]
    assert opt["compute_model"]["a"] == pytest.approx(1.5) and opt["compute_model"]["b"] == pytest.approx(1)
    a, b = LAW["alpha"], LAW["beta"]
    assert opt["N_exponent"] == pytest.approx(b / (a + 1.5 * b), abs=1e-3)
    assert opt["D_exponent"] == pytest.approx(1 - 1.5 * b / (a + 1.5 * b), abs=1e-3)


def test_failed_runs_are_ignored_and_counted(noisy):
    assert noisy["n_points"] == 25 and noisy["ignored_rows"] == {"failed": 2}
    assert noisy["columns"] == {"n": "params", "d": "molecules", "loss": "val_loss", "c": "flops", "budget": "budget"}
    assert noisy["planned_by"] == "molecules"  # no budget column: design points by the data column
    assert noisy["huber_delta"] == 1e-3


def test_summary_shows_parameters_intervals_extrapolation_and_compute_optimal(noisy):
    text = format_fit(noisy)
    lo, hi = noisy["intervals"]["alpha"]
    assert f"[{lo:.4g}, {hi:.4g}]" in text
    for needle in ("L(N, D) = E + A/N^alpha + B/D^beta", "L(N) = ", "L(D) = ", "L(C) = ", "extrapolation:",
                   "N_opt ~ C^", "D_opt ~ C^", "40/40 bootstrap", "2 failed run(s)"):
        assert needle in text, needle


def test_cli_fits_a_table_and_writes_fit_json(tmp_path, capsys):
    table = write_table(tmp_path / "runs.csv", sigma=0.005, sizes=SIZES[1:], budgets=BUDGETS[1:])
    rc = cli(["scaling", "fit", str(table), "--out", str(tmp_path / "fit"), "--bootstrap", "5", "--seed", "1",
              "--d-column", "molecules", "--c-column", "flops"])
    out = capsys.readouterr().out
    assert rc == 0 and "alpha" in out and "extrapolation: fit without params=1e+07" in out
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert {"E", "A", "B", "alpha", "beta", "intervals", "L_N", "L_D", "L_C", "extrapolation",
            "compute_optimal", "n_points"} <= set(fit)
    assert fit["bootstrap"]["requested"] == 5 and fit["bootstrap"]["seed"] == 1


def _rows(path, rows, header=("run", "status", "params", "molecules", "flops", "val_loss")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _grid(n_sizes=3, n_budgets=3, **override):
    rows = []
    for i in range(n_sizes):
        for j in range(n_budgets):
            name = f"s{i}-d{j}"
            N, D = 10 ** (5 + i), 10 ** (5 + j)
            rows.append([name, "done", N, D, 6 * N * D, override.get(name, law(N, D))])
    return rows


@pytest.mark.parametrize("make, needles", [
    (lambda d: d / "missing.csv", ["missing.csv", "no such file"]),
    (lambda d: d, ["is a directory"]),
    (lambda d: (d / "b.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00") and d / "b.csv", ["b.csv", "not a CSV"]),
    (lambda d: (d / "e.csv").write_text("") or d / "e.csv", ["e.csv", "empty"]),
    (lambda d: _rows(d / "t.csv", _grid(), header=("run", "status", "params", "molecules", "flops", "loss")),
     ["no column 'val_loss'", "columns: run, status, params, molecules, flops, loss"]),
    (lambda d: _rows(d / "t.csv", _grid(**{"s1-d2": -0.5})), ["run s1-d2", "val_loss='-0.5'", "> 0"]),
    (lambda d: _rows(d / "t.csv", _grid(**{"s2-d0": "nan"})), ["run s2-d0", "val_loss='nan'"]),
    (lambda d: _rows(d / "t.csv", _grid(**{"s0-d1": ""})), ["run s0-d1", "val_loss=''"]),
    (lambda d: _rows(d / "t.csv", [r for r in _grid() if r[0] not in ("s0-d1", "s1-d2", "s2-d0")]),
     ["6 design points (params x molecules) in 6 done run(s)", "5 parameters need at least 7"]),
    (lambda d: _rows(d / "t.csv", _grid(n_sizes=1, n_budgets=6)), ["1 distinct params", "3 model sizes"]),
    (lambda d: _rows(d / "t.csv", _grid(n_sizes=6, n_budgets=1)), ["1 distinct molecules", "3 data values"]),
    (lambda d: _rows(d / "t.csv", [r[:2] + ["1", "2", "3", "4", "5"] for r in _grid()]), ["line 2", "more cells"]),
])
def test_a_table_that_cannot_support_a_fit_is_one_line_naming_why(tmp_path, capsys, make, needles):
    path = make(tmp_path)
    with pytest.raises(ScalingError):
        fit_csv(path, tmp_path / "out", bootstrap=0)
    assert cli(["scaling", "fit", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("flexmol scaling fit: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "out").exists()


def test_a_bad_out_or_bootstrap_is_refused_before_fitting(tmp_path, capsys):
    table = _rows(tmp_path / "t.csv", _grid())
    (tmp_path / "taken").write_text("x")
    assert cli(["scaling", "fit", str(table), "--out", str(tmp_path / "taken")]) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "taken").read_text() == "x"
    assert cli(["scaling", "fit", str(table), "--out", str(tmp_path / "o"), "--bootstrap", "-1"]) == 2
    assert "--bootstrap must be >= 0" in capsys.readouterr().err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# Tables as the runner writes them: several seeds per design point, realised molecules off budget

RUNNER_COLUMNS = ["run", "status", "size", "params", "budget", "schedule", "ratio", "seed", "molecules",
                  "unique_molecules", "molecules_paired", "molecules_single_2d", "molecules_single_3d",
                  "unique_paired", "unique_single_2d", "unique_single_3d", "passes", "steps", "flops",
                  "flops_padded", "val_loss", "val/paired/total", "probe_b3db_roc_auc", "wall_seconds", "error"]


def runner_table(path, *, sizes=SIZES, budgets=BUDGETS, seeds=(0, 1), sigma=0.0, loss=law, drop=()):
    """A ladder's runs.csv in the runner's shape (``s1-b4000-s0``: size, budget, seed): each run
    sees a seed-dependent 0-1.5% fewer molecules than its budget (as real runs do: 3946 and 3931
    of 4000), so the realised D of a size's largest budget is largest for one seed or the other;
    its loss is the law at the molecules it saw, with log-normal noise; ``drop``: columns left out."""
    rng = np.random.default_rng(7)
    columns = [c for c in RUNNER_COLUMNS if c not in drop]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        for (i, N), B, s in product(enumerate(sizes, start=1), budgets, seeds):
            D = int(B * (1 - 0.015 * rng.random()))
            value = float(loss(N, D) * np.exp(sigma * rng.standard_normal()))
            w.writerow({"run": f"s{i}-b{int(B)}-s{s}", "status": "done", "size": f"s{i}", "params": int(N),
                        "budget": int(B), "seed": s, "molecules": D, "unique_molecules": D, "molecules_paired": D,
                        "unique_paired": D, "passes": 1.0, "steps": D // 64, "flops": 7.5 * N * D,
                        "flops_padded": 7.7 * N * D, "val_loss": value, "val/paired/total": value,
                        "probe_b3db_roc_auc": 0.7, "wall_seconds": 40.0, "error": ""})
    return path


def test_single_variable_fits_take_every_seed_of_the_planned_points(tmp_path):
    """L(N) takes each size at its largest *planned* budget with all its seeds, though the seeds'
    realised molecule counts differ; L(D) all runs of the largest model; L(C) the design points on
    the frontier of mean compute and loss, each with all its seeds."""
    table = runner_table(tmp_path / "runs.csv", sigma=0.01)
    rows = list(csv.DictReader(open(table)))
    at_largest = [r for r in rows if r["budget"] == str(int(BUDGETS[-1]))]
    assert len({r["molecules"] for r in at_largest}) == 10  # realised D: a different value for every run
    fit = fit_csv(table, tmp_path, bootstrap=0)
    assert fit["planned_by"] == "budget" and fit["n_points"] == 50 and fit["n_design_points"] == 25
    assert fit["L_N"]["rows"] == [r["run"] for r in at_largest] and "largest budget" in fit["L_N"]["selection"]
    assert fit["L_D"]["rows"] == [r["run"] for r in rows if r["size"] == "s5"]
    point = {r["run"]: (r["size"], r["budget"]) for r in rows}
    mean = {}
    for r in rows:
        mean.setdefault(point[r["run"]], []).append((float(r["flops"]), float(r["val_loss"])))
    mean = {k: np.mean(v, axis=0) for k, v in mean.items()}
    frontier = {k for k, (c, l) in mean.items() if not any(c2 <= c and l2 < l for c2, l2 in mean.values())}
    assert sorted(fit["L_C"]["rows"]) == sorted(r["run"] for r in rows if point[r["run"]] in frontier)
    assert len(fit["extrapolation"]["rows"]) == 10


def test_a_budget_column_without_values_falls_back_to_the_data_column(tmp_path):
    table = runner_table(tmp_path / "runs.csv", drop=("budget",))
    fit = fit_csv(table, tmp_path, bootstrap=0)
    assert fit["planned_by"] == "molecules" and fit["n_design_points"] == 50
    assert len(fit["L_N"]["rows"]) == 5  # each size at its largest realised D: one seed each


def test_a_single_variable_fit_needs_its_parameters_plus_two_design_points(tmp_path):
    """A 4 x 4 ladder with two seeds: eight runs per size, but four sizes cannot identify L(N)'s three
    parameters with any to spare; the joint law (16 points, 5 parameters) is fitted."""
    fit = fit_csv(runner_table(tmp_path / "runs.csv", sizes=SIZES[:4], budgets=BUDGETS[:4]), tmp_path, bootstrap=0)
    assert "alpha" in fit and fit["n_design_points"] == 16
    for key, what in (("L_N", "4 distinct params values"), ("L_D", "4 distinct budget values")):
        assert fit[key]["skipped"].startswith(what) and "its 3 parameters need at least 5" in fit[key]["skipped"]
    assert f"L(N) skipped: {fit['L_N']['skipped']}" in fit["warnings"]
    assert "L(N) = E + A/N^alpha: skipped (4 distinct params values" in format_fit(fit)


def _flat_in_size(N, D):  # every size nearly the same loss: the N term has nothing to fit
    return law(N, D, {**LAW, "A": 1e-6})


def _step_after_smallest(N, D):  # the smallest size 10% worse, the others alike
    return law(N, D) * (1.1 if N == SIZES[0] else 1.0) - LAW["A"] / N ** LAW["alpha"]


@pytest.mark.parametrize("loss", [_flat_in_size, _step_after_smallest])
def test_a_law_the_data_cannot_identify_is_flagged(tmp_path, loss):
    """Sizes the loss barely tells apart: alpha runs to a bound in the fit and in its resamples;
    the estimate, the interval's end, the summary and fit.json's warnings say so."""
    fit = fit_csv(write_table(tmp_path / "runs.csv", sigma=0.01, loss=loss), tmp_path, bootstrap=10, seed=0)
    info = fit["identification"]["alpha"]
    assert fit["identified"] is False and info["estimate_at"] and info["interval_at_bounds"][1]
    assert fit["intervals"]["alpha"][1] == 3.0 and info["resamples_at_bounds"][1] >= 0.025
    warning = [w for w in fit["warnings"] if w.startswith("L(N, D): alpha = 3*, 95% interval [")]
    assert len(warning) == 1, fit["warnings"]
    assert warning[0].endswith("% at 3): * at a bound, not identified by these data")
    assert f"{100 * info['resamples_at_bounds'][1]:.0f}% at 3" in warning[0]
    assert json.loads((tmp_path / "fit.json").read_text())["warnings"] == fit["warnings"]
    text = format_fit(fit)
    assert any(line.startswith("  alpha           3*   [") and line.endswith(", 3*]") for line in text.splitlines())
    assert "* at a bound (E near 0 or at the smallest loss, an exponent at 0 or 3): not identified" in text


def test_a_law_the_data_identify_has_no_flag(noisy):
    assert noisy["identified"] is True and noisy["warnings"] == []
    assert all(not i["estimate_at"] and i["interval_at_bounds"] == [False, False] and i["resamples_at_bounds"]
               == [0.0, 0.0] for i in noisy["identification"].values())
    assert set(noisy["identification"]) == {"E", "alpha", "beta"} and "*" not in format_fit(noisy)


@pytest.mark.parametrize("edit, reason", [
    (lambda rows: [{k: v for k, v in r.items() if k != "flops"} for r in rows], "no column 'flops'"),
    (lambda rows: [{**r, "flops": ""} for r in rows], "no values in column 'flops'"),
    (lambda rows: [{**r, "flops": "" if r["run"] == "s2-b100000-s0" else r["flops"]} for r in rows],
     "run s2-b100000-s0 has flops=''; a fit needs a finite number > 0"),
])
def test_without_compute_the_laws_of_N_and_D_are_fitted_and_L_C_is_skipped(tmp_path, capsys, edit, reason):
    rows = edit(list(csv.DictReader(open(runner_table(tmp_path / "full.csv", seeds=(0,))))))
    table = tmp_path / "runs.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert cli(["scaling", "fit", str(table), "--out", str(tmp_path / "fit"), "--bootstrap", "0"]) == 0
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert fit["alpha"] == pytest.approx(LAW["alpha"], rel=1e-2) and "alpha" in fit["L_N"] and "beta" in fit["L_D"]
    assert fit["L_C"]["skipped"] == f"no measured compute ({reason})"
    assert fit["compute_optimal"]["skipped"] == f"no measured compute ({reason})"
    assert f"compute-optimal skipped: no measured compute ({reason})" in fit["warnings"]
    out = capsys.readouterr().out
    assert f"L(C) = E + A/C^gamma: skipped (no measured compute ({reason}))" in out

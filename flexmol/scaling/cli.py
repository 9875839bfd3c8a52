"""``flexmol scaling plan|run|fit|plot``: argument parsing only; the work is in the modules."""
from __future__ import annotations

import argparse
import sys

from flexmol.scaling import ScalingError


def add_parsers(sub, make) -> None:
    """The ``scaling`` verbs under ``sub``; ``make(sub, name, help, description)`` builds a parser."""
    verbs = make(sub, "scaling", "scaling studies: plan, run, fit and plot a sweep").add_subparsers(
        dest="scaling_command", required=True)

    plan = make(verbs, "plan", "print a sweep's runs with parameters, budgets and estimated compute",
                "Read a sweep spec (configs/scaling/*.yaml), check every axis against the models and the "
                "data, and print one line per run: model size and parameters, molecules (paired, single), "
                "steps and estimated FLOPs. Exit 2 with the reason when an axis cannot be honoured.")
    plan.add_argument("spec", help="a sweep spec YAML")
    plan.add_argument("--no-flops", action="store_true",
                      help="skip the FLOPs estimate (it measures each model size on real batches)")
    plan.set_defaults(func=cmd_plan)

    run = make(verbs, "run", "train and evaluate every run of a sweep (Ray), resumable",
               "Run every run of a sweep spec as one Ray task (a local Ray unless RAY_ADDRESS names a cluster): "
               "pre-training with the spec's fixed settings, validation on the study's held-out set, the linear "
               "probe, measured FLOPs. Finished runs are never repeated; a killed sweep resumes where it stopped; a "
               "failed run is reported with its log and the others go on. Writes OUT/runs.csv.")
    run.add_argument("spec", help="a sweep spec YAML")
    run.add_argument("--out", required=True, help="the study's directory (runs/, runs.csv, study.json)")
    run.add_argument("--parallel", type=int, help="runs at once (default: the spec's run.parallel)")
    run.add_argument("--only", nargs="+", metavar="RUN", help="run only these runs (names as plan prints them)")
    run.set_defaults(func=cmd_run)

    fit = make(verbs, "fit", "fit scaling laws to a results table, with bootstrap intervals",
               "Fit L(N), L(D), L(C) with an irreducible term and the joint L(N, D) = E + A/N^alpha + B/D^beta "
               "(Huber loss on log residuals, summed; L-BFGS from a grid of starts; E below the smallest loss) to "
               "a runs.csv, with bootstrap 95% intervals, the extrapolation check (fit without the largest model, "
               "predict it) and compute-optimal N(C), D(C). Writes OUT/fit.json.")
    fit.add_argument("csv", help="a results table (flexmol scaling run's runs.csv)")
    fit.add_argument("--out", required=True, help="directory for fit.json")
    fit.add_argument("--n-column", default="params", help="model size column")
    fit.add_argument("--d-column", default="molecules", help="data column")
    fit.add_argument("--loss-column", default="val_loss", help="loss column")
    fit.add_argument("--c-column", default="flops", help="compute column (L(C) and compute-optimal are skipped without it)")
    fit.add_argument("--budget-column", default="budget",
                     help="planned data column: runs at one (size, budget) are one design point, seeds together")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    fit.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    fit.set_defaults(func=cmd_fit)

    plot = make(verbs, "plot", "the study's figures (PNG and SVG) from runs.csv and fit.json",
                "Draw the figures of a study directory: loss against compute per model size with the "
                "compute-optimal frontier, fitted curves with interval bands, and loss and the probe metric "
                "against single-modality molecules per mixing schedule. Writes DIR/figures/*.png and *.svg.")
    plot.add_argument("directory", help="a study directory (runs.csv; fit.json when fitted)")
    plot.add_argument("--out", help="directory for the figures (default: DIR/figures)")
    plot.set_defaults(func=cmd_plot)


def _failed(verb: str, exc: BaseException) -> int:
    print(f"flexmol scaling {verb}: {exc}", file=sys.stderr)
    return 2


def cmd_plan(args: argparse.Namespace) -> int:
    from flexmol.config import ConfigError
    from flexmol.scaling.spec import load_spec, plan_table

    try:
        spec = load_spec(args.spec)
        print(plan_table(spec, measure=not args.no_flops))
    except (ScalingError, ConfigError) as exc:
        return _failed("plan", exc)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flexmol.config import ConfigError
    from flexmol.scaling.runner import run_sweep

    try:
        return run_sweep(args.spec, args.out, parallel=args.parallel, only=args.only)
    except (ScalingError, ConfigError) as exc:
        return _failed("run", exc)


def cmd_fit(args: argparse.Namespace) -> int:
    from flexmol.scaling.fit import fit_csv, format_fit

    try:
        result = fit_csv(args.csv, args.out, n_column=args.n_column, d_column=args.d_column,
                         loss_column=args.loss_column, c_column=args.c_column, budget_column=args.budget_column,
                         bootstrap=args.bootstrap,
                         seed=args.seed)
    except ScalingError as exc:
        return _failed("fit", exc)
    print(format_fit(result))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from flexmol.scaling.plots import plot_study

    try:
        for path in plot_study(args.directory, args.out):
            print(path)
    except ScalingError as exc:
        return _failed("plot", exc)
    return 0

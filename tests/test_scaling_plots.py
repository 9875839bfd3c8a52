"""The study's figures from synthetic results tables: each written as PNG and SVG at print
resolution, with labelled axes, paper-sized type and no overlapping text; a figure without its
data is skipped with a note, and a directory without results is one line naming it."""
import csv
import itertools
import json
import struct
import xml.etree.ElementTree as ET

import matplotlib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.text import Text

from flexmol.cli import main as cli
from flexmol.scaling import ScalingError
from flexmol.scaling.fit import fit_csv
from flexmol.scaling.plots import build_figures, plot_study

# The header of a paired/single study's runs.csv as `flexmol scaling run` writes it (a ladder's is the same
# without the single_2d losses).
COLUMNS = ["run", "status", "size", "params", "budget", "schedule", "ratio", "seed", "molecules", "unique_molecules",
           "molecules_paired", "molecules_single_2d", "molecules_single_3d", "unique_paired", "unique_single_2d",
           "unique_single_3d", "passes", "steps", "flops", "flops_padded", "val_loss", "val/paired/contrastive",
           "val/paired/total", "val/single_2d/total", "probe_b3db_roc_auc", "wall_seconds", "error"]
SIZES = [122635, 439243, 1103675, 2238547]
BUDGETS = [4000, 8000, 16000, 32000]
PAIRED = 2000  # unique paired molecules, each seen twice
RATIOS = (0, 0.5, 1, 2, 4)


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS + [k for k in rows[0] if k not in COLUMNS], restval="")
        w.writeheader()
        w.writerows(rows)
    return path


def ladder_rows(sizes=SIZES, seeds=(0, 1)):
    """A model ladder as the runner writes it: size x budget x seed (``s1-b4000-s0``), each run a
    little short of its budget by a seed-dependent count (3946 and 3931 of 4000), a Chinchilla-like
    loss at what it saw with 5% noise between seeds; and one failed run."""
    rng = np.random.default_rng(0)
    rows = []
    for (i, N), B, s in itertools.product(enumerate(sizes, start=1), BUDGETS, seeds):
        D = int(B * (1 - 0.015 * rng.random()))
        loss = (1.2 + 60 / N ** 0.3 + 90 / D ** 0.35) * np.exp(0.05 * rng.standard_normal())
        rows.append({"run": f"s{i}-b{B}-s{s}", "status": "done", "size": f"s{i}", "params": N, "budget": B,
                     "seed": s, "molecules": D, "unique_molecules": D, "molecules_paired": D, "unique_paired": D,
                     "passes": 1.0, "steps": D // 59, "flops": 4.7e3 * N * D, "flops_padded": 4.8e3 * N * D,
                     "val_loss": loss, "val/paired/total": loss, "probe_b3db_roc_auc": 0.7 + 0.01 * i,
                     "wall_seconds": 40.0})
    rows.append({"run": f"s{len(sizes)}-b64000-s0", "status": "failed", "size": f"s{len(sizes)}",
                 "params": sizes[-1], "budget": 64000, "seed": 0, "error": "killed"})
    return rows


def mix_rows(sizes=(SIZES[1],), seeds=(0, 1, 2), baseline_single=""):
    """A paired/single study as the runner writes it: a fixed paired set, single-modality 2D at
    RATIOS times its size, ``mixed`` or ``two_phase``; ratio 0 is one ``paired_only`` run per seed.
    Realised counts differ per seed and schedule (a mixed run draws both sources in proportion);
    the paired-only run's single-modality cells are ``baseline_single`` (empty in older tables)."""
    rng = np.random.default_rng(0)
    rows = []
    for N, ratio, s in itertools.product(sizes, RATIOS, seeds):
        for schedule in ("paired_only",) if ratio == 0 else ("mixed", "two_phase"):
            budget = 2 * PAIRED * (1 + ratio)
            paired = 2 * PAIRED - 4 * s if schedule != "mixed" else int(2 * PAIRED * (1 + 0.08 * rng.standard_normal()))
            single = int((budget - paired) * (1 - 0.01 * rng.random())) if ratio else baseline_single
            gain = np.log1p(ratio) * (1.5 if schedule == "mixed" else -0.3)
            loss = 23.4 - gain + 0.8 * rng.standard_normal()
            rows.append({"run": f"s2-{schedule}-r{ratio}-s{s}", "status": "done", "size": "s2", "params": N,
                         "budget": budget, "schedule": schedule, "ratio": float(ratio), "seed": s,
                         "molecules": paired + (single or 0), "unique_molecules": PAIRED * (1 + ratio),
                         "molecules_paired": paired, "molecules_single_2d": single, "unique_paired": PAIRED,
                         "unique_single_2d": int(PAIRED * ratio) if ratio else baseline_single, "passes": 2.0,
                         "flops": 2.1e7 * (paired + (single or 0)) * N / 4e5, "val_loss": loss,
                         "val/paired/total": loss, "wall_seconds": 30.0,
                         "probe_b3db_roc_auc": 0.74 + gain / 50 + 0.01 * rng.standard_normal()})
    return rows


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    d = tmp_path_factory.mktemp("ladder")
    fit_csv(_write(d / "runs.csv", ladder_rows()), d, bootstrap=10)
    return d


@pytest.fixture(scope="module")
def ladder5(tmp_path_factory):
    """Five sizes: enough for L(N) on its own."""
    d = tmp_path_factory.mktemp("ladder5")
    fit_csv(_write(d / "runs.csv", ladder_rows(sizes=[*SIZES, 4_500_000], seeds=(0,))), d, bootstrap=10)
    return d


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    _write(d / "runs.csv", mix_rows())
    return d


def _png_width(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", head[16:20])[0]


def _svg_texts(path):
    root = ET.parse(path).getroot()  # raises on malformed XML
    width_in = float(root.get("width").removesuffix("pt")) / 72
    return width_in, " ".join(t for t in root.itertext() if t.strip())


def test_every_figure_is_written_as_png_and_svg_at_print_resolution(ladder, mix, tmp_path):
    written = plot_study(ladder, note=lambda m: None) + plot_study(mix, tmp_path / "mixfig", note=lambda m: None)
    assert [p.name for p in written] == ["loss_vs_compute.png", "loss_vs_compute.svg", "fit_curves.png",
                                        "fit_curves.svg", "paired_vs_single.png", "paired_vs_single.svg"]
    assert written[0].parent == ladder / "figures" and written[-1].parent == tmp_path / "mixfig"
    for png, svg in zip(written[::2], written[1::2]):
        width_in, _ = _svg_texts(svg)
        assert 3.5 <= width_in <= 7.0, svg
        assert _png_width(png) / width_in >= 200, png


@pytest.mark.parametrize("study, name, labels", [
    ("ladder", "loss_vs_compute", ["Training compute (FLOPs)", "Validation loss", "123k params", "2.2M params",
                                   "compute frontier (means)", "L(C) fit", "mean of 2 seeds, bar: min-max",
                                   "one seed"]),
    ("ladder", "fit_curves", ["Molecules seen", "Parameters", "Validation loss", "L(N, D)", "L(N, D) at D = 32k",
                              "predicted from smaller models", "mean of 2 seeds, bar: min-max"]),
    ("ladder5", "fit_curves", ["L(N), α", "L(N) 95% band"]),
    ("mix", "paired_vs_single", ["Single-modality (2D) molecules seen", "Validation loss", "B3DB ROC-AUC",
                                 "higher is better", "mixed", "two phase", "paired only", "paired set 2k molecules",
                                 "model 439k params", "mean of 3 seeds, bar: min-max"]),
])
def test_svg_parses_and_keeps_its_labels_as_text(request, tmp_path, study, name, labels):
    plot_study(request.getfixturevalue(study), tmp_path, note=lambda m: None)
    _, text = _svg_texts(tmp_path / f"{name}.svg")
    for label in labels:
        assert label in text, label


def _texts(fig):
    """The text a reader sees: tick labels only for ticks inside the axes' limits."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    ticks, shown = set(), set()
    for ax in fig.axes:
        for axis, i in ((ax.xaxis, 0), (ax.yaxis, 1)):
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                ticks |= {tick.label1, tick.label2}
                if lo - 1e-9 * abs(hi - lo) <= tick.get_loc() <= hi + 1e-9 * abs(hi - lo):
                    shown.add(tick.label1)
    return renderer, [t for t in fig.findobj(Text)
                      if t.get_visible() and t.get_text().strip() and (t not in ticks or t in shown)]


@pytest.mark.parametrize("study", ["ladder", "ladder5", "mix"])
def test_text_is_paper_sized_and_never_overlaps(request, study):
    figures = build_figures(request.getfixturevalue(study), note=lambda m: None)
    assert figures
    for name, fig in figures.items():
        renderer, texts = _texts(fig)
        assert all(8 <= t.get_fontsize() <= 10 for t in texts), name
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
        for (a, ba), (b, bb) in itertools.combinations(boxes, 2):
            overlap = min(ba.x1, bb.x1) - max(ba.x0, bb.x0) > 1 and min(ba.y1, bb.y1) - max(ba.y0, bb.y0) > 1
            assert not overlap, (name, a, b)
        fig_box = fig.bbox
        for text, box in boxes:  # nothing cut off at the edges
            assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= fig_box.x1 + 1 and box.y1 <= fig_box.y1 + 1, (name, text)


def test_sizes_are_coloured_from_a_sequential_colormap_on_log_axes(ladder):
    fig = build_figures(ladder, note=lambda m: None)["loss_vs_compute"]
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    curves = [line for line in ax.get_lines() if line.get_label().endswith(" params")]
    assert [c.get_label() for c in curves] == ["123k params", "439k params", "1.1M params", "2.2M params"]
    viridis = matplotlib.colormaps["viridis"]
    assert [c.get_color() for c in curves] == [viridis(p) for p in np.linspace(0.05, 0.85, 4)]


def _curves(ax):
    """The lines through design points: those with a marker and more than one point."""
    return [line for line in ax.get_lines() if line.get_marker() not in ("None", "", " ") and line.get_linestyle()
            not in ("None", "", " ") and len(line.get_xdata()) > 1]


def _by_point(rows, key, x, y):
    """Mean x and mean, lowest, highest y of the rows grouped by ``key``."""
    out = {}
    for r in rows:
        out.setdefault(key(r), []).append((float(r[x] or 0), float(r[y])))
    return {k: (np.mean([a for a, _ in v]), np.mean([b for _, b in v]), min(b for _, b in v), max(b for _, b in v))
            for k, v in out.items()}


def _bars(ax):
    """The (x, low, high) of every vertical error bar on ``ax``."""
    out = []
    for coll in ax.collections:
        if type(coll).__name__ == "LineCollection":
            out += [(seg[0][0], min(seg[0][1], seg[1][1]), max(seg[0][1], seg[1][1])) for seg in coll.get_segments()]
    return out


def test_loss_vs_compute_draws_each_size_through_the_means_of_its_seeds(ladder):
    """Two seeds per size and budget, each with its own realised compute: one point per budget at
    the mean compute and mean loss, a bar from the lower to the higher seed, no sawtooth."""
    rows = [r for r in csv.DictReader(open(ladder / "runs.csv")) if r["status"] == "done"]
    ax = build_figures(ladder, note=lambda m: None)["loss_vs_compute"].axes[0]
    curves = [line for line in ax.get_lines() if line.get_label().endswith(" params")]
    points = _by_point(rows, lambda r: (r["params"], r["budget"]), "flops", "val_loss")
    for size, line in zip(SIZES, curves):
        expected = sorted(v for (n, _), v in points.items() if n == str(size))
        assert len(line.get_xdata()) == len(BUDGETS) and np.all(np.diff(line.get_xdata()) > 0)
        assert np.allclose(line.get_xdata(), [e[0] for e in expected], rtol=1e-12)
        assert np.allclose(line.get_ydata(), [e[1] for e in expected], rtol=1e-12)
    bars = _bars(ax)
    for x, _, lo, hi in points.values():
        assert any(np.isclose(bx, x) and np.isclose(blo, lo) and np.isclose(bhi, hi) for bx, blo, bhi in bars)


def test_fit_curves_draw_a_band_per_size_and_mark_the_held_out_model(ladder):
    fig = build_figures(ladder, note=lambda m: None)["fit_curves"]
    by_data, by_size = fig.axes[:2]
    bands = [c for c in by_data.collections if isinstance(c, PolyCollection)]
    assert len(bands) == len(SIZES)  # one band per size
    for band in bands:
        assert np.ptp(band.get_paths()[0].vertices[:, 1]) > 0
    marks = [line for line in by_size.get_lines() if line.get_marker() == "x"]
    assert len(marks) == 1 and set(marks[0].get_xdata()) == {SIZES[-1]}
    assert len(marks[0].get_xdata()) == 2  # both seeds of the largest model at its largest budget
    assert any(line.get_linestyle() == "--" for line in by_data.get_lines())  # the extrapolated curve


def test_L_of_N_panel_takes_every_seed_at_each_sizes_largest_planned_budget(ladder):
    """The seeds of a size's largest budget saw different numbers of molecules; the panel's point
    is the mean of both, not the seed that happened to see more."""
    rows = [r for r in csv.DictReader(open(ladder / "runs.csv")) if r["status"] == "done"]
    at_largest = [r for r in rows if r["budget"] == str(BUDGETS[-1])]
    assert all(len({r["molecules"] for r in at_largest if r["params"] == str(n)}) == 2 for n in SIZES)
    by_size = build_figures(ladder, note=lambda m: None)["fit_curves"].axes[1]
    points = [(line.get_xdata()[0], line.get_ydata()[0]) for line in by_size.get_lines()
              if line.get_marker() == "o" and len(line.get_xdata()) == 1 and line.get_alpha() is None]
    expected = _by_point(at_largest, lambda r: r["params"], "params", "val_loss")
    assert np.allclose(sorted(points), sorted((x, y) for x, y, _, _ in expected.values()), rtol=1e-12)


def test_an_interval_at_a_bound_is_starred_and_explained(ladder, tmp_path):
    fit = json.loads((ladder / "fit.json").read_text())
    fit["intervals"]["alpha"] = [0.4, 3.0]
    fit["identification"]["alpha"] = {**fit["identification"]["alpha"], "interval_at_bounds": [False, True]}
    (tmp_path / "fit.json").write_text(json.dumps(fit))
    (tmp_path / "runs.csv").write_text((ladder / "runs.csv").read_text())
    fig = build_figures(tmp_path, note=lambda m: None)["fit_curves"]
    assert "α = " in fig.axes[0].get_title() and "[0.40, 3.00*]" in fig.axes[0].get_title()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("L(N, D): ") and "α" in t and t.endswith("at a bound (*): not identified") for t in legend)


@pytest.mark.parametrize("baseline_single", ["", 0])
def test_paired_vs_single_starts_every_schedule_at_the_paired_only_runs(tmp_path, baseline_single):
    """Per schedule: the paired-only baseline at x = 0 (empty single-modality cells read as 0),
    then one point per ratio at the mean realised molecules and mean value over the seeds, with a
    min-max bar; schedules a few percent apart along x."""
    rows = mix_rows(baseline_single=baseline_single)
    _write(tmp_path / "runs.csv", rows)
    fig = build_figures(tmp_path, note=lambda m: None)["paired_vs_single"]
    rows = [{k: str(v) for k, v in r.items()} for r in rows]
    for ax, column in zip(fig.axes[:2], ("val_loss", "probe_b3db_roc_auc")):
        assert ax.get_xscale() == "symlog" and ax.get_xlim()[0] < 0 < ax.get_xlim()[1]
        base = [float(r[column]) for r in rows if r["schedule"] == "paired_only"]
        curves = {c.get_label(): c for c in _curves(ax)}
        assert list(curves) == ["mixed", "two phase"]
        for i, (label, schedule) in enumerate((("mixed", "mixed"), ("two phase", "two_phase"))):
            line = curves[label]
            points = _by_point([r for r in rows if r["schedule"] == schedule], lambda r: r["ratio"],
                               "molecules_single_2d", column)
            expected = sorted(points.values())
            assert line.get_xdata()[0] == 0 and line.get_ydata()[0] == pytest.approx(np.mean(base), rel=1e-12)
            assert len(line.get_xdata()) == len(RATIOS)
            assert np.allclose(line.get_xdata()[1:], [e[0] * 1.04 ** (i - 0.5) for e in expected], rtol=1e-12)
            assert np.allclose(line.get_ydata()[1:], [e[1] for e in expected], rtol=1e-12)
        baseline = [line for line in ax.get_lines() if line.get_label() == "paired only"]
        assert len(baseline) == 1 and list(baseline[0].get_xdata()) == [0]
        assert (0, min(base), max(base)) in [(x, pytest.approx(lo), pytest.approx(hi)) for x, lo, hi in _bars(ax)]
    assert fig.axes[1].get_ylabel().startswith("B3DB ROC-AUC")


def test_paired_vs_single_falls_back_to_the_ratio_and_ticks_each_value(tmp_path):
    _write(tmp_path / "runs.csv", [{k: v for k, v in r.items() if k != "molecules_single_2d"} for r in mix_rows()])
    ax = build_figures(tmp_path, note=lambda m: None)["paired_vs_single"].axes[0]
    assert ax.get_xlabel() == "Single-modality : paired ratio" and ax.get_xscale() == "symlog"
    assert list(ax.get_xticks()) == [0, 0.5, 1, 2, 4]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.5", "1", "2", "4"]
    assert all(line.get_xdata()[0] == 0 for line in _curves(ax))


def test_one_paired_vs_single_figure_per_model_size_and_compute_curves_per_schedule(tmp_path):
    """Two sizes with data mixes: a paired/single figure each, and loss against compute with one
    curve per size and schedule, each from that size's paired-only point, never a zigzag."""
    _write(tmp_path / "runs.csv", mix_rows(sizes=(SIZES[0], SIZES[2])))
    figures = build_figures(tmp_path, note=lambda m: None)
    assert {"paired_vs_single_123kparams_2kpaired", "paired_vs_single_1p1Mparams_2kpaired"} <= set(figures)
    ax = figures["loss_vs_compute"].axes[0]
    curves = _curves(ax)
    assert len(curves) == 4 and {c.get_linestyle() for c in curves} == {"-", ":"}
    for line in curves:
        assert len(line.get_xdata()) == len(RATIOS) and np.all(np.diff(line.get_xdata()) > 0)
    labels = [t.get_text() for t in figures["loss_vs_compute"].legends[0].get_texts()]
    assert {"123k params", "1.1M params", "mixed", "two phase", "paired only"} <= set(labels)


def test_a_single_size_with_data_mixes_has_no_loss_against_compute(mix):
    notes = []
    assert "loss_vs_compute" not in build_figures(mix, note=notes.append)
    assert notes[0] == ("skipped loss_vs_compute: one model size (439k params) with data mixes: loss against the "
                        "mix is in paired_vs_single")


def test_figures_without_their_data_are_skipped_with_a_note(tmp_path):
    _write(tmp_path / "runs.csv", ladder_rows())  # no fit.json, no schedule
    notes = []
    written = plot_study(tmp_path, note=notes.append)
    assert [p.name for p in written] == ["loss_vs_compute.png", "loss_vs_compute.svg"]
    assert notes == ["skipped fit_curves: no fit.json (write it with `flexmol scaling fit`)",
                     "skipped paired_vs_single: no run with a schedule (not a paired/single study)"]
    rows = [{k: v for k, v in r.items() if k != "probe_b3db_roc_auc"} for r in mix_rows()]
    _write(tmp_path / "noprobe" / "runs.csv", rows)  # no probe: the loss panel alone
    fig = build_figures(tmp_path / "noprobe", note=notes.append)["paired_vs_single"]
    assert len([ax for ax in fig.axes if ax.get_lines()]) == 1


def test_a_directory_without_results_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "failed" / "runs.csv", [r for r in ladder_rows() if r["status"] == "failed"])
    _write(tmp_path / "badfit" / "runs.csv", ladder_rows())
    (tmp_path / "badfit" / "fit.json").write_text("{not json")
    cases = [(tmp_path / "nowhere", "no such study directory"), (tmp_path / "empty", "no runs.csv"),
             (tmp_path / "failed", "no run with status done"), (tmp_path / "badfit", "fit.json: not a fit.json")]
    for directory, needle in cases:
        with pytest.raises(ScalingError, match=needle):
            plot_study(directory)
        assert cli(["scaling", "plot", str(directory)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("flexmol scaling plot: ") and needle in err, err
        assert str(directory.name) in err
    assert not (tmp_path / "empty" / "figures").exists()


def test_cli_plots_a_study_and_prints_the_files(ladder, tmp_path, capsys):
    assert cli(["scaling", "plot", str(ladder), "--out", str(tmp_path / "figs")]) == 0
    captured = capsys.readouterr()
    printed = captured.out.split()
    assert printed == [str(tmp_path / "figs" / f"{n}.{s}") for n in ("loss_vs_compute", "fit_curves")
                       for s in ("png", "svg")]
    assert all((tmp_path / "figs" / p).stat().st_size > 1000 for p in printed)
    assert "skipped paired_vs_single" in captured.err


def test_runs_of_one_planned_paired_set_share_one_figure_whatever_they_saw(tmp_path):
    """Mixed runs draw each batch's source at random, so the paired molecules they saw differ a
    little; the planned ``paired_size`` groups them (one figure, not one per realised count)."""
    rows = mix_rows()
    for i, r in enumerate(rows):
        r["paired_size"] = 2000
        r["unique_paired"] = (1984, 1850, 2000)[i % 3]
    _write(tmp_path / "runs.csv", rows)
    assert list(k for k in build_figures(tmp_path, note=lambda m: None) if k.startswith("paired_vs_single")) == \
        ["paired_vs_single"]

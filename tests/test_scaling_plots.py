"""The study's figures from synthetic results tables: each written as PNG and SVG at print
resolution, with labelled axes, paper-sized type and no overlapping text; a figure without its
data is skipped with a note, and a directory without results is one line naming it."""
import csv
import itertools
import struct
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from flexmol.cli import main as cli
from flexmol.scaling import ScalingError
from flexmol.scaling.fit import fit_csv
from flexmol.scaling.plots import build_figures, plot_study, si

COLUMNS = ["run", "status", "size", "params", "budget", "schedule", "ratio", "seed", "molecules", "unique_molecules",
           "molecules_paired", "molecules_single_2d", "unique_paired", "unique_single_2d", "passes", "steps",
           "flops", "flops_padded", "val_loss", "val/paired/contrastive", "probe_b3db_roc_auc", "wall_seconds"]
SIZES = [2.1e5, 6.5e5, 1.9e6, 5.2e6]
BUDGETS = [2.5e4, 5e4, 1e5, 2e5]


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, restval="")
        w.writeheader()
        w.writerows(rows)
    return path


def ladder_rows(seed=0):
    """4 sizes x 4 budgets from a Chinchilla-like law with 1% noise, and one failed run."""
    rng = np.random.default_rng(seed)
    rows = []
    for (i, N), (j, D) in itertools.product(enumerate(SIZES), enumerate(BUDGETS)):
        loss = (1.2 + 60 / N ** 0.3 + 90 / D ** 0.35) * np.exp(0.01 * rng.standard_normal())
        rows.append({"run": f"s{i + 1}-d{j}", "status": "done", "size": f"s{i + 1}", "params": int(N),
                     "budget": int(D), "molecules": int(D), "flops": 9 * N * D, "val_loss": loss,
                     "probe_b3db_roc_auc": 0.7 + 0.01 * i})
    rows.append({"run": "s4-d9", "status": "failed", "size": "s4", "params": int(SIZES[-1])})
    return rows


def mix_rows(sizes=(SIZES[1],), paired=20000, seed=0):
    """Paired set fixed; single-modality 2D at 0, 0.5, 1, 2, 4x, mixed or two-phase; two seeds."""
    rng = np.random.default_rng(seed)
    rows = []
    for N, schedule, ratio, s in itertools.product(sizes, ("mixed", "two_phase"), (0, 0.5, 1, 2, 4), (0, 1)):
        gain = np.log1p(ratio) * (0.12 if schedule == "mixed" else 0.1)
        rows.append({"run": f"{si(N)}-{schedule}-r{ratio}-s{s}", "status": "done", "params": int(N),
                     "schedule": schedule, "ratio": ratio, "seed": s, "molecules": int(3 * paired * (1 + ratio)),
                     "molecules_paired": 3 * paired, "molecules_single_2d": int(3 * paired * ratio),
                     "unique_paired": paired, "unique_single_2d": int(paired * ratio),
                     "flops": 9 * N * paired * (1 + ratio), "val_loss": 3 - gain + 0.01 * rng.standard_normal(),
                     "probe_b3db_roc_auc": 0.75 + gain / 5 + 0.005 * rng.standard_normal()})
    return rows


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    d = tmp_path_factory.mktemp("ladder")
    fit_csv(_write(d / "runs.csv", ladder_rows()), d, bootstrap=10)
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
                                        "fit_curves.svg", "loss_vs_compute.png", "loss_vs_compute.svg",
                                        "paired_vs_single.png", "paired_vs_single.svg"]
    assert written[0].parent == ladder / "figures" and written[-1].parent == tmp_path / "mixfig"
    for png, svg in zip(written[::2], written[1::2]):
        width_in, _ = _svg_texts(svg)
        assert 3.5 <= width_in <= 7.0, svg
        assert _png_width(png) / width_in >= 200, png


@pytest.mark.parametrize("study, name, labels", [
    ("ladder", "loss_vs_compute", ["Training compute (FLOPs)", "Validation loss", "210k params", "5.2M params",
                                   "compute frontier", "L(C) fit"]),
    ("ladder", "fit_curves", ["Molecules seen", "Parameters", "Validation loss", "L(N, D)", "L(N), α",
                              "predicted from smaller models"]),
    ("mix", "paired_vs_single", ["Single-modality (2D) molecules seen", "Validation loss", "B3DB ROC-AUC",
                                 "higher is better", "mixed", "two phase", "paired set 20k molecules",
                                 "model 650k params"]),
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


@pytest.mark.parametrize("study", ["ladder", "mix"])
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
    assert [c.get_label() for c in curves] == ["210k params", "650k params", "1.9M params", "5.2M params"]
    import matplotlib
    viridis = matplotlib.colormaps["viridis"]
    assert [c.get_color() for c in curves] == [viridis(p) for p in np.linspace(0.05, 0.85, 4)]


def test_fit_curves_draw_a_band_per_size_and_mark_the_held_out_model(ladder):
    fig = build_figures(ladder, note=lambda m: None)["fit_curves"]
    by_data, by_size = fig.axes[:2]
    assert len(by_data.collections) == len(SIZES)  # one band per size
    for band in by_data.collections:
        assert np.ptp(band.get_paths()[0].vertices[:, 1]) > 0
    marks = [line for line in by_size.get_lines() if line.get_marker() == "x"]
    assert len(marks) == 1 and marks[0].get_xdata()[0] == int(SIZES[-1])
    assert any(line.get_linestyle() == "--" for line in by_data.get_lines())  # the extrapolated curve


def test_paired_vs_single_shows_x_zero_and_one_curve_per_schedule(mix):
    fig = build_figures(mix, note=lambda m: None)["paired_vs_single"]
    loss_ax, probe_ax = fig.axes[:2]
    for ax in (loss_ax, probe_ax):
        assert ax.get_xscale() == "symlog" and ax.get_xlim()[0] < 0 < ax.get_xlim()[1]
        curves = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert [c.get_label() for c in curves] == ["mixed", "two phase"]
        assert all(c.get_xdata()[0] == 0 and len(c.get_xdata()) == 5 for c in curves)  # seeds averaged
    assert probe_ax.get_ylabel().startswith("B3DB ROC-AUC")


def test_paired_vs_single_falls_back_to_the_ratio_and_ticks_each_value(tmp_path):
    _write(tmp_path / "runs.csv", [{k: v for k, v in r.items() if k != "molecules_single_2d"} for r in mix_rows()])
    ax = build_figures(tmp_path, note=lambda m: None)["paired_vs_single"].axes[0]
    assert ax.get_xlabel() == "Single-modality : paired ratio" and ax.get_xscale() == "symlog"
    assert list(ax.get_xticks()) == [0, 0.5, 1, 2, 4]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.5", "1", "2", "4"]


def test_one_paired_vs_single_figure_per_model_size(tmp_path):
    _write(tmp_path / "runs.csv", mix_rows(sizes=(SIZES[0], SIZES[2])))
    names = [p.name for p in plot_study(tmp_path, note=lambda m: None)]
    assert "paired_vs_single_210kparams_20kpaired.svg" in names and "paired_vs_single_1p9Mparams_20kpaired.svg" in names


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

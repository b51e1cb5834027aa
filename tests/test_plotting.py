"""Pictures (score_toolkit.plotting): what each matplotlib panel draws is read back from its axes and checked
against closed forms (contour of a Gaussian, histogram counts, exact score directions, trajectory segments);
image grids pixel by pixel; charts from a benchmark CSV; the Pillow-only path works without matplotlib."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from score_toolkit import plotting as P
from score_toolkit.analytic import gaussian
from score_toolkit.plotting import curves

REPO = Path(__file__).resolve().parent.parent


def _axes():
    return P.figure_grid(1)[1][0]


def _legend_labels(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


def test_contour_panel_draws_the_one_sigma_circle_and_the_samples():
    """N(0, I): density / max = exp(-r^2 / 2), so the level exp(-1/2) is the unit circle."""
    g = gaussian([0.0, 0.0], 1.0)
    sample = torch.tensor([[2.0, -1.0], [9.0, 9.0]], dtype=torch.float64)
    ax = _axes()
    assert P.contour_panel(g.log_prob, (-4.0, 4.0, -4.0, 4.0), sample, levels=[math.exp(-0.5)], ax=ax) is ax
    (cs,) = [c for c in ax.collections if hasattr(c, "levels")]
    verts = np.concatenate([p.vertices for p in cs.get_paths() if len(p.vertices)])
    radii = np.hypot(verts[:, 0], verts[:, 1])
    assert np.abs(radii - 1.0).max() < 2e-3  # grid of 200 points over 8 units, linear interpolation
    assert len(verts) > 50
    (dots,) = [c for c in ax.collections if c.get_label() == "2 samples"]
    np.testing.assert_allclose(dots.get_offsets(), sample.numpy())
    assert ax.get_xlim() == (-4.0, 4.0) and ax.get_ylim() == (-4.0, 4.0)
    assert "1 of 2 outside" in [t.get_text() for t in ax.texts]
    assert _legend_labels(ax) == ["density contours: 0.61 x max", "2 samples"]
    assert any(a.get_ylabel() == "density / its maximum" for a in ax.figure.axes)  # the shading's colour bar
    with pytest.raises(ValueError, match="between 0 and 1"):
        P.contour_panel(g.log_prob, (-4, 4, -4, 4), levels=[1.5])
    with pytest.raises(ValueError, match="xmin < xmax"):
        P.contour_panel(g.log_prob, (4, -4, -4, 4))


def test_default_contours_are_the_sigma_lines():
    g = gaussian([1.0, 0.0], 0.25)  # covariance 0.25 I (std 0.5): the k-sigma line is the circle of radius 0.5 k around (1, 0)
    ax = _axes()
    P.contour_panel(g.log_prob, (-2.0, 4.0, -3.0, 3.0), shade=False, ax=ax)
    (cs,) = [c for c in ax.collections if hasattr(c, "levels")]
    np.testing.assert_allclose(cs.levels, [-k * k / 2 for k in (4, 3, 2, 1)])
    for level_paths, k in zip(cs.get_paths(), (4, 3, 2, 1)):
        r = np.hypot(level_paths.vertices[:, 0] - 1.0, level_paths.vertices[:, 1])
        assert np.abs(r - 0.5 * k).max() < 0.01
    assert _legend_labels(ax) == ["density contours: 1-4σ lines"]
    assert len(ax.figure.axes) == 1  # no shading, no colour bar


def test_density_panel_shows_the_density_relative_to_its_maximum():
    g = gaussian([0.0, 0.0], 1.0)
    ax = _axes()
    P.density_panel(g.log_prob, (-3.0, 3.0, -2.0, 2.0), title="true density", resolution=61, ax=ax)
    (im,) = ax.images
    arr = np.asarray(im.get_array())
    xs, ys = np.linspace(-3, 3, 61), np.linspace(-2, 2, 61)
    xx, yy = np.meshgrid(xs, ys)
    np.testing.assert_allclose(arr, np.exp(-(xx**2 + yy**2) / 2), atol=1e-12)  # row 0 is y = -2 (origin lower)
    assert im.origin == "lower" and tuple(im.get_extent()) == (-3.0, 3.0, -2.0, 2.0)
    assert ax.get_title() == "true density" and ax.get_xlabel() == "$x_1$"


def test_histogram_panel_counts_the_samples():
    x = torch.tensor([[0.1, 0.1], [0.2, 0.15], [0.9, -0.9], [5.0, 0.0]], dtype=torch.float64)
    ax = _axes()
    P.histogram_panel(x, (-1.0, 1.0, -1.0, 1.0), bins=2, ax=ax)
    counts = np.asarray(ax.images[0].get_array())
    # rows are y (bottom row first), columns x: two points in the upper right cell, one in the lower right
    np.testing.assert_array_equal(counts, [[0, 1], [0, 2]])
    assert "1 of 4 outside" in [t.get_text() for t in ax.texts]
    assert any(a.get_ylabel() == "samples per bin" for a in ax.figure.axes)
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        P.histogram_panel(torch.zeros(3, 3), (-1, 1, -1, 1))


def test_score_field_panel_points_along_the_score():
    """score(x) = -x (N(0, I)): every arrow points to the origin, lengths proportional to |x|, the longest
    0.9 lattice spacing, colours |s|."""
    ax = _axes()
    P.score_field_panel(lambda x: -x, (-1.0, 1.0, -1.0, 1.0), grid=4, title="score", ax=ax)
    (q,) = [c for c in ax.collections if hasattr(c, "U")]
    xy = np.asarray(q.get_offsets())
    uv = np.stack([q.U, q.V], 1)
    k = 0.9 * 0.5 / np.hypot(0.75, 0.75)  # spacing 2/4 = 0.5; the corner points are the farthest
    np.testing.assert_allclose(uv, -k * xy, atol=1e-12)
    np.testing.assert_allclose(np.asarray(q.get_array()), np.hypot(xy[:, 0], xy[:, 1]))
    assert q.scale == 1.0 and q.scale_units == "xy" and q.angles == "xy"  # arrows in data units
    assert any(a.get_ylabel() == "|score|" for a in ax.figure.axes)
    # with a time: score_fn(points, t) gets t as a (n,) float64 tensor
    seen = []
    P.score_field_panel(lambda x, t: seen.append(t) or -x, (-1.0, 1.0, -1.0, 1.0), 0.3, grid=3, ax=_axes())
    assert seen[0].shape == (9,) and float(seen[0][0]) == 0.3
    with pytest.raises(ValueError, match="NaN"):
        P.score_field_panel(lambda x, t: x * math.nan, (0, 1, 0, 1), 0.5)
    with pytest.raises(TypeError, match="log_prob"):
        P.score_field_panel(lambda x: -x, (0, 1, 0, 1), background=Image.new("RGB", (4, 4)))


def test_trajectory_panel_draws_each_step_and_marks_start_and_end():
    traj = [torch.tensor([[-1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.5], [0.0, 1.0]]),
            torch.tensor([[1.0, 1.0], [0.0, 2.0]])]
    ax = _axes()
    P.trajectory_panel(traj, (-2.0, 2.0, -2.0, 2.0), times=[1.0, 0.5, 0.0], ax=ax)
    lines = [c for c in ax.collections if c.__class__.__name__ == "LineCollection"]
    segs = np.asarray(lines[0].get_segments())
    expected = [[[-1, 0], [0, 0.5]], [[0, 0.5], [1, 1]], [[0, 0], [0, 1]], [[0, 1], [0, 2]]]
    np.testing.assert_allclose(segs, expected)
    np.testing.assert_allclose(lines[0].get_array(), [0.75, 0.25, 0.75, 0.25])  # coloured by the time t
    start, end = (c for c in ax.collections if c.get_label() in ("start", "end"))
    np.testing.assert_allclose(start.get_offsets(), [[-1, 0], [0, 0]])
    np.testing.assert_allclose(end.get_offsets(), [[1, 1], [0, 2]])
    assert any(a.get_ylabel() == "time t" for a in ax.figure.axes)
    with pytest.raises(ValueError, match="at least 2 states"):
        P.trajectory_panel(traj[:1], (-2, 2, -2, 2))
    with pytest.raises(ValueError, match="one time per state"):
        P.trajectory_panel(traj, (-2, 2, -2, 2), times=[1.0])


def test_trajectory_grid_layout_and_time_labels():
    t_len, b = 5, 3
    states = [torch.full((b, 1, 4, 4), -1.0 + 2.0 * i / (t_len - 1)) for i in range(t_len)]
    ax = _axes()
    P.trajectory_grid(states, num_samples=2, num_frames=3, times=[1.0, 0.75, 0.5, 0.25, 0.0], ax=ax)
    grid = np.asarray(ax.images[0].get_array())
    # 3 frames (states 0, 2, 4) across, 2 samples down, tiles of 4 px with 2 px padding
    assert grid.shape == (2 * 6 + 2, 3 * 6 + 2, 3)
    assert grid[2, 2, 0] == 0 and grid[2, 8, 0] == 128 and grid[2, 14, 0] == 255  # -1, 0, 1: black, grey, white
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "0.5", "0"]
    np.testing.assert_allclose(ax.get_xticks(), [3.5, 9.5, 15.5])  # the tiles' centres
    assert ax.get_xlabel() == "time t" and ax.get_ylabel() == "sample"
    img = P.trajectory_grid(states, num_samples=2, num_frames=3)
    assert isinstance(img, Image.Image)
    with pytest.raises(ValueError, match="one time per state"):
        P.trajectory_grid(states, times=[1.0])


def test_image_grid_pixels():
    x = torch.stack([torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), 1.0), torch.zeros(1, 2, 2)])
    arr = np.asarray(P.image_grid(x, nrow=2, scale=1, padding=1))
    assert arr.shape == (2 * 3 + 1, 2 * 3 + 1, 3)
    assert arr[1, 1, 0] == 0 and arr[1, 4, 0] == 255 and arr[4, 1, 0] == 128 and arr[4, 4, 0] == 255
    with pytest.raises(ValueError, match="1 or 3"):
        P.image_grid(torch.zeros(2, 2, 4, 4))


def test_line_chart_axes_series_and_reference_lines():
    ax = _axes()
    P.line_chart({"b": ([100, 1, 10, -5], [0.01, 1, 0.1, 3]), "a": ([1, 2], [2, 1])}, hlines={"noise floor": 0.05},
                 title="err vs NFE", xlabel="NFE", ylabel="err", ax=ax)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    b_line = next(ln for ln in ax.lines if ln.get_label() == "b")
    np.testing.assert_allclose(b_line.get_xdata(), [1, 10, 100])  # sorted; the negative x left out of a log axis
    np.testing.assert_allclose(b_line.get_ydata(), [1, 0.1, 0.01])
    floor = next(ln for ln in ax.lines if ln.get_label() == "noise floor")
    assert floor.get_linestyle() == "--" and set(floor.get_ydata()) == {0.05}
    assert _legend_labels(ax) == ["b", "a", "noise floor"]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("err vs NFE", "NFE", "err")
    lin = _axes()
    P.line_chart({"a": ([-1, 0, 1], [-2, 0, 2])}, log_x=False, log_y=False, ax=lin)
    assert lin.get_xscale() == "linear" and len(lin.lines[0].get_xdata()) == 3
    with pytest.raises(ValueError, match="at least one series"):
        P.line_chart({})
    with pytest.raises(ValueError, match="same length"):
        P.line_chart({"a": ([1, 2], [1])})
    with pytest.raises(ValueError, match="positive"):
        P.line_chart({"a": ([-1], [1])})


def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_error_vs_nfe_chart_from_a_benchmark_csv(tmp_path, monkeypatch):
    rows = []
    for sampler, order in (("euler", 1), ("heun", 2)):
        for case in ("ring", "aniso16"):
            for nfe in (10, 20, 40):
                rows.append({"sampler": sampler, "variant": "", "process": "VP", "case": case, "nfe": nfe,
                             "wsw": 1.0 / nfe**order, "wsw_floor": 1e-3, "note": "x"})
    rows.append({**rows[0], "nfe": "", "wsw": "failed"})  # a failed run: skipped
    path = tmp_path / "samplers_accuracy.csv"
    _write_csv(path, rows)
    figures = []
    render = P.figure_to_image
    monkeypatch.setattr(curves, "figure_to_image", lambda fig: figures.append(fig) or render(fig))
    img = P.error_vs_nfe_chart(path, size=(400, 300))
    assert isinstance(img, Image.Image) and img.width > 2 * 400 and img.height == 300
    panels = [ax for ax in figures[0].axes if ax.get_visible()]
    assert sorted(ax.get_title() for ax in panels) == ["aniso16 / VP: wsw vs NFE", "ring / VP: wsw vs NFE"]
    for ax in panels:
        heun = next(ln for ln in ax.lines if ln.get_label() == "heun")
        np.testing.assert_allclose(heun.get_ydata(), [1 / 100, 1 / 400, 1 / 1600])
        assert next(ln for ln in ax.lines if ln.get_label() == "noise floor").get_ydata()[0] == 1e-3
    # the same colour for the same sampler in every panel, and one legend for the figure
    colours = {(ln.get_label(), ln.get_color()) for ax in panels for ln in ax.lines}
    assert len(colours) == 3
    (legend,) = figures[0].legends
    assert [t.get_text() for t in legend.get_texts()] == ["euler", "heun", "noise floor"]
    one = P.error_vs_nfe_chart([r for r in P.read_benchmark_csv(path) if r["case"] == "ring"], "wsw",
                               size=(400, 300))
    assert one.width < img.width
    with pytest.raises(ValueError, match="metric column 'nope'"):
        P.error_vs_nfe_chart(path, "nope")
    with pytest.raises(ValueError, match="'nfe' column"):
        P.error_vs_nfe_chart([{"sampler": "a", "wsw": "1"}])
    with pytest.raises(FileNotFoundError):
        P.read_benchmark_csv(tmp_path / "missing.csv")


def test_save_png_round_trip_of_images_and_figures(tmp_path):
    img = P.image_grid(torch.rand(4, 1, 8, 8) * 2 - 1, scale=2)
    path = P.save_png(img, tmp_path / "sub" / "grid.png")
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(img))
    fig, axes = P.figure_grid(2, panel_size=(200, 150))
    assert len(axes) == 2
    fig_path = P.save_png(fig, tmp_path / "fig.png")
    assert Image.open(fig_path).size == (400, 150)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "sub"]  # no temporary file left
    with pytest.raises(TypeError, match="PIL.Image or a matplotlib Figure"):
        P.save_png("not a picture", tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least 64 x 64"):
        P.figure_grid(1, panel_size=(10, 10))


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)


# as if matplotlib were not installed: importing it raises ImportError, importlib.util.find_spec returns None
_BLOCK_MATPLOTLIB = """
    import sys

    sys.modules["matplotlib"] = None
"""


def test_without_matplotlib_sampling_works_and_charts_say_how_to_install(tmp_path):
    """The main job (score-toolkit sample of the shipped digits model) writes its image grid with Pillow only;
    a chart raises ImportError with the install hint (the demo says so before training, exit 1); 2-D samples are
    written without a picture (warned)."""
    code = _BLOCK_MATPLOTLIB + """
    import warnings
    from pathlib import Path

    import torch

    from score_toolkit import plotting as P
    from score_toolkit.cli import main

    out = Path(sys.argv[1])
    assert main(["sample", "--num-samples", "4", "--steps", "3", "--output-dir", str(out / "digits")]) == 0
    assert (out / "digits" / "samples.png").is_file()
    try:
        P.histogram_panel(torch.zeros(3, 2), (-1, 1, -1, 1))
    except ImportError as err:
        assert "pip install 'score-toolkit[plot]'" in str(err), err
    else:
        raise AssertionError("no ImportError without matplotlib")
    assert main(["demo", "--output", str(out / "demo.png"), "--steps", "5"]) == 1  # said before training
    assert not (out / "demo.png").exists()
    from score_toolkit.sample_folder import _write_picture

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _write_picture(out / "v.png", torch.randn(10, 2), 64) is None
    assert any("score-toolkit[plot]" in str(w.message) for w in caught)
    assert sys.modules["matplotlib"] is None and "matplotlib.figure" not in sys.modules
    print("ok")
    """
    res = _run_python(code, str(tmp_path))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_panels_never_use_pyplot():
    """Figures are made on an explicit Agg canvas: no pyplot, no window, nothing left registered."""
    code = """
    import sys

    import torch

    from score_toolkit import plotting as P
    from score_toolkit.analytic import ring_mixture

    m = ring_mixture()
    x = m.sample(100, generator=torch.Generator().manual_seed(0))
    P.contour_panel(m.log_prob, (-6, 6, -6, 6), x)
    P.line_chart({"a": ([1, 2], [1, 2])})
    assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
    print("ok")
    """
    res = _run_python(code)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]

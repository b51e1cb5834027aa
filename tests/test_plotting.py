"""Pictures (score_toolkit.plotting): geometry of contour lines and arrows checked against closed forms, panels
checked pixel by pixel where a pixel has a known meaning, charts from a benchmark CSV."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from score_toolkit import plotting as P
from score_toolkit.analytic import gaussian


def test_contour_segments_of_a_circle():
    n, r = 101, 30.0
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    field = np.hypot(xx - 50, yy - 50)
    segs = P.contour_segments(field, r)
    ends = segs.reshape(-1, 2)
    radii = np.hypot(ends[:, 0] - 50, ends[:, 1] - 50)
    assert np.abs(radii - r).max() < 0.05  # linear interpolation of a distance field along grid edges
    length = np.linalg.norm(segs[:, 1] - segs[:, 0], axis=1).sum()
    assert length == pytest.approx(2 * math.pi * r, rel=0.01)


def test_contour_segments_saddle_and_empty():
    yy, xx = np.mgrid[-10:11, -10:11].astype(float)
    segs = P.contour_segments(xx * yy, 4.5)
    pts = segs.reshape(-1, 2) - 10  # back to centred coordinates
    prod = pts[:, 0] * pts[:, 1]
    assert np.abs(prod - 4.5).max() < 0.3
    assert P.contour_segments(xx * yy, 1e6).shape == (0, 2, 2)
    with pytest.raises(ValueError, match="2-D array"):
        P.contour_segments(np.zeros(5), 0.0)


def test_contour_panel_draws_samples_and_iso_lines():
    g = gaussian([0.0, 0.0], 1.0)
    extent = (-4.0, 4.0, -4.0, 4.0)
    size = 201
    sample = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    img = P.contour_panel(g.log_prob, extent, sample, size=size, levels=[math.exp(-0.5)], shade=False)
    arr = np.asarray(img)
    assert arr.shape == (size, size, 3)
    # the sample's dot: pixel (u, v) of (2, -1)
    u, v = (2 + 4) / 8 * (size - 1), (4 - -1) / 8 * (size - 1)
    assert tuple(arr[round(v), round(u)]) == (255, 80, 40)
    # the 1-sigma contour of N(0, I) is the unit circle: dark pixels at radius 25 px, none far from it
    dark = np.argwhere(arr.sum(2) < 400)
    rad = np.hypot(dark[:, 1] - 100, dark[:, 0] - 100)
    on_line = np.abs(rad - 25) < 1.5
    assert on_line.sum() > 100
    assert np.all(on_line | (np.hypot(dark[:, 1] - round(u), dark[:, 0] - round(v)) < 2))
    with pytest.raises(ValueError, match="between 0 and 1"):
        P.contour_panel(g.log_prob, extent, levels=[1.5])


def test_arrow_segments_geometry():
    origins = np.array([[10.0, 10.0], [0.0, 0.0]])
    vectors = np.array([[4.0, 0.0], [0.0, -2.0]])
    segs = P._arrow_segments(origins, vectors, head=0.5)
    assert segs.shape == (6, 2, 2)
    np.testing.assert_allclose(segs[:2, 0], origins)
    np.testing.assert_allclose(segs[:2, 1], origins + vectors)
    for stroke in (segs[2:4], segs[4:6]):
        back = stroke[:, 1] - stroke[:, 0]
        np.testing.assert_allclose(np.linalg.norm(back, axis=1), 0.5 * np.linalg.norm(vectors, axis=1))
        cos = -(back * vectors).sum(1) / (np.linalg.norm(back, axis=1) * np.linalg.norm(vectors, axis=1))
        np.testing.assert_allclose(cos, math.cos(math.radians(25)))


def test_score_field_panel_points_along_the_score():
    """A constant score (1, 0): every arrow is a horizontal shaft to the right of its lattice point."""
    size, grid = 160, 4
    img = P.score_field_panel(lambda x, t: torch.stack([torch.ones(len(x)), torch.zeros(len(x))], 1).double(),
                              (0.0, 1.0, 0.0, 1.0), 0.5, grid=grid, size=size)
    arr = np.asarray(img).sum(2) < 200
    spacing = (size - 1) / grid
    for i in range(grid):
        c = (i + 0.5) * spacing
        band = arr[math.floor(c) : math.floor(c) + 2].any(0)  # Pillow rounds line coordinates either way
        # the shaft covers 0.9 spacing to the right of the origin; nothing lies between its tip and the next origin
        assert band[round(c) + 2 : round(c + 0.8 * spacing)].all()
        assert not band[round(c + 0.9 * spacing) + 2 : round(c + spacing) - 1].any()
        if i == 0:
            assert not band[: round(c) - 1].any()
    with pytest.raises(ValueError, match="NaN"):
        P.score_field_panel(lambda x, t: x * math.nan, (0, 1, 0, 1), 0.5)


def test_trajectory_panel_marks_start_and_end():
    size = 101
    traj = [torch.tensor([[-1.0, 0.0]]), torch.tensor([[0.0, 0.5]]), torch.tensor([[1.0, 1.0]])]
    arr = np.asarray(P.trajectory_panel(traj, (-2.0, 2.0, -2.0, 2.0), size=size))
    start = (round((2 - 0) / 4 * 100), round((-1 + 2) / 4 * 100))  # (row, col)
    end = (round((2 - 1) / 4 * 100), round((1 + 2) / 4 * 100))
    assert tuple(arr[start]) == (150, 150, 150)
    assert tuple(arr[end]) == (214, 39, 40)
    with pytest.raises(ValueError, match="at least 2 states"):
        P.trajectory_panel(traj[:1], (-2, 2, -2, 2))


def test_trajectory_grid_layout():
    t_len, b = 5, 3
    states = [torch.full((b, 1, 4, 4), -1.0 + 2.0 * i / (t_len - 1)) for i in range(t_len)]
    img = P.trajectory_grid(states, num_samples=2, num_frames=3, scale=1)
    # 3 frames (states 0, 2, 4) across, 2 samples down, tiles of 4 px with 2 px padding
    assert img.size == (3 * 6 + 2, 2 * 6 + 2)
    arr = np.asarray(img)
    assert arr[2, 2, 0] == 0 and arr[2, 8, 0] == 128 and arr[2, 14, 0] == 255  # -1, 0, 1 -> black, grey, white
    labelled = P.trajectory_grid(states, num_samples=2, num_frames=3, scale=1, times=[1.0, 0.75, 0.5, 0.25, 0.0])
    assert labelled.size[1] == img.size[1] + 14
    with pytest.raises(ValueError, match="one time per state"):
        P.trajectory_grid(states, times=[1.0])


def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_error_vs_nfe_chart_from_a_benchmark_csv(tmp_path):
    rows = []
    for sampler, order in (("euler", 1), ("heun", 2)):
        for case in ("ring", "aniso16"):
            for nfe in (10, 20, 40):
                rows.append({"sampler": sampler, "variant": "", "process": "VP", "case": case, "nfe": nfe,
                             "wsw": 1.0 / nfe**order, "wsw_floor": 1e-3, "note": "x"})
    rows.append({**rows[0], "nfe": "", "wsw": "failed"})  # a failed run: skipped
    path = tmp_path / "samplers_accuracy.csv"
    _write_csv(path, rows)
    img = P.error_vs_nfe_chart(path, size=(400, 200))
    assert img.size == (2 * 400 + 8, 200)  # two panels (ring / VP, aniso16 / VP) side by side
    one = P.error_vs_nfe_chart([r for r in P.read_benchmark_csv(path) if r["case"] == "ring"], "wsw", size=(400, 200))
    assert one.size == (400, 200)
    # a long legend widens the picture instead of squeezing the plot away
    wide = P.line_chart({"a very long series label " * 3: ([1, 2], [1, 2])}, size=(200, 150))
    assert wide.size[0] > 200 + 6 * 75
    with pytest.raises(ValueError, match="metric column 'nope'"):
        P.error_vs_nfe_chart(path, "nope")
    with pytest.raises(ValueError, match="'nfe' column"):
        P.error_vs_nfe_chart([{"sampler": "a", "wsw": "1"}])
    with pytest.raises(FileNotFoundError):
        P.read_benchmark_csv(tmp_path / "missing.csv")


def test_line_chart_places_points_monotonically():
    img = P.line_chart({"a": ([1, 10, 100], [1, 0.1, 0.01])}, size=(300, 200))
    arr = np.asarray(img)
    blue = np.argwhere((arr == P.PALETTE[0]).all(2))
    blue = blue[blue[:, 1] < 300 - 40]  # leave out the legend
    # a straight line on log-log axes from top left to bottom right: rows increase with columns
    order = np.argsort(blue[:, 1])
    corr = np.corrcoef(blue[order, 1], blue[order, 0])[0, 1]
    assert corr > 0.99
    with pytest.raises(ValueError, match="at least one series"):
        P.line_chart({})


def test_save_png_round_trip(tmp_path):
    img = P.image_grid(torch.rand(4, 1, 8, 8) * 2 - 1, scale=2)
    path = P.save_png(img, tmp_path / "sub" / "grid.png")
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(img))
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

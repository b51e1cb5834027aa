"""Pictures of samples, densities, trajectories, score fields and benchmark curves, written atomically as PNG.

Charts are drawn with matplotlib (the ``plot`` extra: ``pip install 'score-toolkit[plot]'``), with axes, colour
bars, legends and titles; image grids are plain Pillow (which diffusers already needs), so sampling and
exporting image models never need matplotlib.

* 2-D densities (:func:`density_panel`), sample histograms and scatters (:func:`histogram_panel`,
  :func:`scatter_panel`), samples over the true density's contour lines (:func:`contour_panel`);
* image grids (:func:`image_grid`, Pillow only) and side-by-side pictures (:func:`side_by_side`);
* trajectories of a few samples over time (:func:`trajectory_panel` for 2-D points, :func:`trajectory_grid`
  for images), from ``SamplerOutput.trajectory`` (``return_trajectory=True``);
* the score field as arrows (:func:`score_field_panel`);
* line charts (:func:`line_chart`) and error-vs-NFE curves from the sampler benchmark's CSV
  (:func:`read_benchmark_csv`, :func:`error_vs_nfe_chart`).

Every drawing function returns a ``PIL.Image`` (:func:`save_png` writes it), or, given ``ax=`` (a matplotlib
``Axes``), draws into that axes and returns it, so that panels can share one figure (:func:`figure_grid`).
A picture that is a by-product of other work uses :func:`figure_grid_or_warn`: without matplotlib it warns
and the work goes on.

Figures are made with ``matplotlib.figure.Figure`` on an explicit Agg canvas, never through ``pyplot``: no window
opens, whatever the user's matplotlib backend, and no figure stays registered in pyplot's global list (nothing to
close; a figure is freed with its last reference).
"""

from __future__ import annotations

from .curves import DEFAULT_ERROR_COLUMNS, error_vs_nfe_chart, line_chart, read_benchmark_csv
from .densities import contour_panel, density_panel, histogram_panel, scatter_panel, score_field_panel
from .figures import figure_grid, figure_grid_or_warn, figure_to_image, require_matplotlib, save_png
from .images import image_grid, side_by_side
from .trajectories import trajectory_grid, trajectory_panel

__all__ = [
    "density_panel",
    "histogram_panel",
    "scatter_panel",
    "image_grid",
    "side_by_side",
    "save_png",
    "contour_panel",
    "trajectory_panel",
    "trajectory_grid",
    "score_field_panel",
    "line_chart",
    "read_benchmark_csv",
    "error_vs_nfe_chart",
    "figure_grid",
    "figure_grid_or_warn",
    "figure_to_image",
    "require_matplotlib",
    "DEFAULT_ERROR_COLUMNS",
]

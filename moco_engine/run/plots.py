"""Line charts as PNG files, drawn with matplotlib (its Agg backend: no display needed): kNN
accuracy against epochs, a sweep's metric against the swept parameter."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; chosen before pyplot is ever imported

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter  # noqa: E402


def line_figure(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    references: dict[str, float] | None = None,
) -> Figure:
    """Each series (name -> [(x, y), ...]) as a line with markers, on one axes.

    ``log_x``: a base-2 log x axis ticked at the data's x values (queue sizes).
    ``references``: horizontal dashed lines (name -> y), e.g. a published figure or chance.
    """
    points = [p for values in series.values() for p in values]
    if not points:
        raise ValueError("nothing to plot")
    fig = Figure(figsize=(8, 4.5), dpi=125, layout="constrained")
    ax = fig.add_subplot()
    for name, values in series.items():
        xs, ys = zip(*sorted(values))
        ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.6, label=name)
    for name, y in (references or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1.0, color="0.45", label=name)
    if log_x:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sorted({x for x, _ in points})))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.xaxis.set_minor_locator(FixedLocator([]))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)  # the grid under the lines and inside the frame
    if len(series) + len(references or {}) > 1:
        ax.legend(frameon=False, loc="best")
    return fig


def line_plot(
    series: dict[str, list[tuple[float, float]]],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    references: dict[str, float] | None = None,
) -> Path:
    """:func:`line_figure` saved as a PNG at ``path``; returns the path."""
    path = Path(path)
    line_figure(series, title, xlabel, ylabel, log_x, references).savefig(path)
    return path


def preview_figure(images, pairs_per_row: int = 4) -> Figure:
    """Query/key view pairs as a grid: ``images`` (2n, H, W, 3) in [0, 1], the query of pair i
    at 2i and its key at 2i + 1; each image titled, a narrow empty column between pairs."""
    n = len(images) // 2
    rows = -(-n // pairs_per_row)
    columns = 3 * pairs_per_row - 1  # query, key, gap, query, key, gap, ...
    widths = [1, 1, 0.3] * (pairs_per_row - 1) + [1, 1]
    fig = Figure(figsize=(sum(widths) * 1.3, rows * 1.5), dpi=110, layout="constrained")
    grid = fig.add_gridspec(rows, columns, width_ratios=widths)
    for i in range(n):
        row, slot = divmod(i, pairs_per_row)
        for j, name in enumerate(("query", "key")):
            ax = fig.add_subplot(grid[row, 3 * slot + j])
            ax.imshow(images[2 * i + j], interpolation="nearest")
            ax.set_title(f"{name} {i + 1}", fontsize=8)
            ax.set_axis_off()
    return fig

"""Line charts as PNG files, drawn with Pillow (already a dependency): kNN accuracy against
epochs, a sweep's metric against the swept parameter. No plotting library is needed."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (steps of 1, 2 or 5 × 10^k)."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    ticks = [round(math.floor(lo / step) * step, 10)]
    while ticks[-1] < hi - step * 1e-9:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _label(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 or value == int(value) else f"{value:g}"


def line_plot(
    series: dict[str, list[tuple[float, float]]],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    size: tuple[int, int] = (1000, 560),
) -> Path:
    """Draw each series (name -> [(x, y), ...]) as a line with markers and save a PNG.

    ``log_x`` spaces the x axis logarithmically (base 2 ticks at the data's x values), as for
    queue sizes. Returns the path written.
    """
    points = [p for values in series.values() for p in values]
    if not points:
        raise ValueError("nothing to plot")
    width, height = size
    legend = max(len(name) for name in series) * 6 + 50
    left, right, top, bottom = 80, legend, 50, 60
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    def fx(x: float) -> float:
        return math.log2(x) if log_x else x

    xs = [fx(x) for x, _ in points]
    ys = [y for _, y in points]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if not log_x:
        x_ticks = nice_ticks(x_lo, x_hi)
        x_lo, x_hi = x_ticks[0], x_ticks[-1]
    y_ticks = nice_ticks(min(ys), max(ys))
    y_lo, y_hi = y_ticks[0], y_ticks[-1]
    if y_hi == y_lo:
        y_hi = y_lo + 1

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (fx(x) - x_lo) / (x_hi - x_lo) * (width - left - right)
        py = height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)
        return px, py

    # Axes, grid and ticks.
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for y in y_ticks:
        _, py = to_px(2 ** x_lo if log_x else x_lo, y)
        draw.line([left, py, width - right, py], fill="#dddddd")
        draw.text((left - 8, py), _label(y), fill="black", font=font, anchor="rm")
    if log_x:
        x_ticks = sorted({x for x, _ in points})
    for x in x_ticks:
        if not (x_lo - 1e-9 <= fx(x) <= x_hi + 1e-9):
            continue
        px, _ = to_px(x, y_lo)
        draw.line([px, height - bottom, px, height - bottom + 5], fill="black")
        draw.text((px, height - bottom + 8), _label(x), fill="black", font=font, anchor="mt")
    draw.text((width / 2 - right / 2 + left / 2, 20), title, fill="black", font=font, anchor="mm")
    draw.text((width / 2 - right / 2 + left / 2, height - 18), xlabel + (" (log scale)" if log_x else ""),
              fill="black", font=font, anchor="mm")
    draw.text((12, top - 20), ylabel, fill="black", font=font)

    # Lines and the legend.
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pixels = [to_px(x, y) for x, y in sorted(values)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = top + 10 + 18 * i
        draw.line([width - right + 12, ly, width - right + 32, ly], fill=colour, width=3)
        draw.text((width - right + 38, ly), name, fill="black", font=font, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path

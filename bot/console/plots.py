"""Small line plots rendered on the server as SVG (matplotlib's object API: no pyplot state, so
safe from any thread). Pages embed them with `web.svg_image` as <img src="data:…">."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]


def line_svg(
    series: Sequence[Series],
    *,
    xlabel: str,
    ylabel: str,
    xticks: Sequence[str] | None = None,
    width: float = 6.4,
    height: float = 2.8,
) -> str:
    """One line per series (points marked); with `xticks` the x values are 0..n-1 named by them.

    Labels are plain ASCII on purpose: the server may have no CJK font, and a missing glyph
    would be a warning per plot. Returns the SVG document as text."""
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasSVG(figure)
    axes = figure.add_subplot()
    drawn = 0
    for one in series:
        if len(one.xs):
            axes.plot(list(one.xs), list(one.ys), marker="o", markersize=3, linewidth=1.5, label=one.label)
            drawn += 1
    if xticks is not None:
        axes.set_xticks(range(len(xticks)), list(xticks), rotation=30 if len(xticks) > 4 else 0, ha="right")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.ticklabel_format(axis="y", useOffset=False)  # "+2.9999" above the axis reads as noise
    if drawn > 1:
        axes.legend(loc="best", fontsize="small")
    if not drawn:
        axes.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=axes.transAxes)
    out = io.StringIO()
    figure.savefig(out, format="svg", metadata={"Date": None})
    return out.getvalue()

"""Results in a notebook: a layers x heads HTML grid, a plotly heatmap, and tidy rows for pandas.

A result class inherits `NotebookDisplay` and says what its grid and its rows are; Jupyter then shows it
as a compact grid (plain HTML and CSS, nothing fetched from the network), `.plot()` draws the same grid
as an interactive plotly heatmap and `.to_pandas()` turns the rows into a DataFrame. plotly and pandas
are optional (the `notebook` extra) and imported only when asked for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import html
import importlib
from dataclasses import dataclass, field
from typing import Any

from .errors import AttentionLensError

LABEL_CHARS = 12
"""Longer cell labels are cut in the HTML grid; the hover text holds the whole of them."""
CELL_STYLE = "padding:1px 4px;border:1px solid #ddd;white-space:nowrap"


@dataclass
class Cell:
    """What one (layer, head) shows: a number for the colour, a short label, and a hover text."""

    value: float | None
    label: str
    hover: str = ""


@dataclass
class Grid:
    """One cell per (layer, head) a result covers; heads it does not cover stay blank."""

    title: str
    value_name: str
    """What the colour measures, e.g. 'top-token probability'."""
    layers: list[int]
    heads: list[int]
    cells: dict[tuple[int, int], Cell] = field(default_factory=dict)
    low: float | None = None
    """Value drawn palest (default: the smallest value shown)."""
    high: float | None = None
    """Value drawn darkest (default: the largest value shown)."""

    def value_range(self) -> tuple[float, float]:
        values = [c.value for c in self.cells.values() if c.value is not None]
        low = self.low if self.low is not None else min(values, default=0.0)
        high = self.high if self.high is not None else max(values, default=1.0)
        return low, high if high > low else low + 1.0


class NotebookDisplay(ABC):
    """Mixin: `_repr_html_`, `plot()` and `to_pandas()` for a result that defines `grid()` and `to_records()`."""

    @abstractmethod
    def grid(self) -> Grid:
        """The layers x heads cells to draw."""

    @abstractmethod
    def to_records(self) -> list[dict]:
        """Tidy rows: one dict of plain values per observation."""

    def _repr_html_(self) -> str:
        return grid_html(self.grid())

    def plot(self, **grid_options: Any) -> Any:
        """A plotly heatmap of the grid (layers down, heads across); hover shows each head's details."""
        return grid_figure(self.grid(**grid_options))

    def to_pandas(self) -> Any:
        """`to_records()` as a pandas DataFrame."""
        pandas = optional_import("pandas", "to_pandas()")
        return pandas.DataFrame.from_records(self.to_records())


def optional_import(module: str, what: str) -> Any:
    """Import a package of the `notebook` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise AttentionLensError(
            f"{what} needs {module.split('.')[0]}; install it with: pip install 'attention-lens[notebook]'"
        ) from None


def visible(token: str) -> str:
    """Spaces and newlines shown, so ' the' and 'the' differ on screen."""
    return token.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥") or "∅"


def grid_html(grid: Grid) -> str:
    """The grid as one self-contained HTML table: rows are layers, columns heads, colour the value."""
    low, high = grid.value_range()
    header = "".join(f'<th style="{CELL_STYLE}">H{head}</th>' for head in grid.heads)
    rows = []
    for layer in grid.layers:
        cells = "".join(_html_cell(grid.cells.get((layer, head)), low, high) for head in grid.heads)
        rows.append(f'<tr><th style="{CELL_STYLE}">{layer}</th>{cells}</tr>')
    legend = (f"colour: {html.escape(grid.value_name)} from {low:.3g} (pale) to {high:.3g} (dark); "
              "hover a cell for details")
    return (
        f'<div class="attention-lens-grid"><div><b>{html.escape(grid.title)}</b></div>'
        f'<table style="border-collapse:collapse;font:11px/1.3 ui-monospace,monospace">'
        f'<tr><th style="{CELL_STYLE}">layer</th>{header}</tr>{"".join(rows)}</table>'
        f'<div style="font-size:10px;color:#666">{legend}</div></div>'
    )


def _html_cell(cell: Cell | None, low: float, high: float) -> str:
    if cell is None:
        return f'<td style="{CELL_STYLE}"></td>'
    label = html.escape(cell.label if len(cell.label) <= LABEL_CHARS else cell.label[: LABEL_CHARS - 1] + "…")
    colours = ""
    if cell.value is not None:
        strength = min(1.0, max(0.0, (cell.value - low) / (high - low)))
        colours = f";background:rgba(31,90,180,{strength:.3f});color:{'#fff' if strength > 0.55 else '#000'}"
    return f'<td title="{html.escape(cell.hover)}" style="{CELL_STYLE}{colours}">{label}</td>'


def grid_figure(grid: Grid) -> Any:
    """The grid as a plotly heatmap; the same cells, colours scaled by value, full hover texts."""
    graph_objects = optional_import("plotly.graph_objects", "plot()")
    low, high = grid.value_range()

    def table(read) -> list[list]:  # (layer, head), None where the grid has no cell
        return [[None if (layer, head) not in grid.cells else read(grid.cells[layer, head]) for head in grid.heads]
                for layer in grid.layers]

    heatmap = graph_objects.Heatmap(
        z=table(lambda c: c.value), x=[f"H{head}" for head in grid.heads], y=[str(layer) for layer in grid.layers],
        text=table(lambda c: c.label), texttemplate="%{text}", textfont={"size": 9},
        customdata=table(lambda c: c.hover.replace("\n", "<br>")), hovertemplate="%{customdata}<extra></extra>",
        colorscale="Blues", zmin=low, zmax=high, colorbar={"title": {"text": grid.value_name}},
    )
    figure = graph_objects.Figure(heatmap)
    figure.update_layout(title=grid.title, xaxis_title="head", yaxis_title="layer",
                         height=max(300, 22 * len(grid.layers) + 120))
    figure.update_yaxes(autorange="reversed", type="category")
    figure.update_xaxes(type="category", side="top")
    return figure

"""Results in a notebook: a layers x heads HTML grid, a plotly heatmap, and tidy rows for pandas.

The analysis results (DecodeResult, Evaluation, Specialization, SearchResult) hold data and know nothing of
display; this module says what each one's grid is and attaches `grid()`, `_repr_html_`, `.plot()` and
`.to_pandas()` to them (importing attention_lens does it). Jupyter then shows a result as a compact grid (plain
HTML and CSS, nothing fetched from the network), `.plot()` draws the same grid as an interactive plotly heatmap
and `.to_pandas()` turns the result's `to_records()` rows into a DataFrame. plotly and pandas are optional (the
`notebook` extra) and imported only when asked for.
"""

from __future__ import annotations

import html
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from .concepts import SearchResult
from .decode import DecodeResult
from .errors import AttentionLensError
from .evaluate import Evaluation
from .specialize import Specialization

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


class NotebookDisplay:
    """What `attach` gives a result class that has `grid()` and `to_records()`."""

    def _repr_html_(self) -> str:
        return grid_html(self.grid())

    def plot(self, **grid_options: Any) -> Any:
        """A plotly heatmap of the grid (layers down, heads across); hover shows each head's details."""
        return grid_figure(self.grid(**grid_options))

    def to_pandas(self) -> Any:
        """`to_records()` as a pandas DataFrame."""
        pandas = optional_import("pandas", "to_pandas()")
        return pandas.DataFrame.from_records(self.to_records())


def attach(result_class: type, grid: Callable[..., Grid]) -> None:
    """Give `result_class` its notebook display: `grid()` (from `grid(result, ...)`), the HTML grid, plot, pandas."""
    result_class.grid = grid
    for name in ("_repr_html_", "plot", "to_pandas"):
        setattr(result_class, name, vars(NotebookDisplay)[name])


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


# ----- each result's grid -----------------------------------------------------------------------------


def decode_grid(result: DecodeResult, position: int | None = None) -> Grid:
    """Top token and its probability per head at `position` (default: the last decoded one)."""
    position = result.positions[-1] if position is None else position % len(result.tokens)
    if position not in result.positions:
        raise AttentionLensError(f"position {position} was not decoded; decoded: {result.positions}")
    records = [r for r in result.heads if r.position == position]
    grid = Grid(title=f"{result.kind} lens, position {position} ({visible(result.tokens[position])}): "
                      "top token and its probability",
                value_name="top-token probability", low=0.0, high=1.0,
                layers=sorted({r.layer for r in records}), heads=sorted({r.head for r in records}))
    for r in records:
        best = r.top[0]
        hover = "\n".join(f"{visible(t.token)}  {t.shown()}" for t in r.top)
        grid.cells[r.layer, r.head] = Cell(best.prob if best.prob is not None else 0.0,
                                           f"{visible(best.token)} {best.shown()}",
                                           f"L{r.layer}.H{r.head}\n{hover}")
    return grid


def evaluation_grid(result: Evaluation) -> Grid:
    """Held-out KL per head (nats; lower is better), hover: top-1 and the gain over each baseline."""
    grid = Grid(title="held-out KL(model || lens) per head, nats", value_name="KL (nats)",
                layers=sorted({r.layer for r in result.heads}), heads=sorted({r.head for r in result.heads}))
    for r in result.heads:
        gains = ", ".join(f"{name} {b.gain:+.2f}" for name, b in r.baselines.items() if b.gain is not None)
        hover = (f"L{r.layer}.H{r.head}  KL {r.kl} [{r.kl_low}, {r.kl_high}]\n"
                 f"top-1 {r.top1}  top token {visible(r.top_token.token)}\ngain over: {gains}")
        grid.cells[r.layer, r.head] = Cell(r.kl, "-" if r.kl is None else f"{r.kl:.2f}", hover)
    return grid


def specialization_grid(result: Specialization) -> Grid:
    """Most promoted token per head, coloured by the share of positions its top tokens take."""
    grid = Grid(title="what each head promotes (most frequent lens top token)", value_name="top-token mass",
                layers=sorted({r.layer for r in result.heads}), heads=sorted({r.head for r in result.heads}),
                low=0.0, high=1.0)
    for r in result.heads:
        promoted = r.promoted
        label = f"{visible(promoted[0].token)} {promoted[0].share:.0%}" if promoted else "-"
        tokens = ", ".join(f"{visible(p.token)} {p.share:.0%}" for p in promoted[:8])
        hover = (f"L{r.layer}.H{r.head}: {r.description}\nentropy {r.entropy_bits:.2f} bits, "
                 f"top mass {r.top_mass:.0%}, group {r.group}\n{tokens}")
        grid.cells[r.layer, r.head] = Cell(r.top_mass, label, hover)
    return grid


def search_grid(result: SearchResult) -> Grid:
    """The lift of the concept per head (nats over the head's average token)."""
    words = ", ".join(result.concept.words)
    grid = Grid(title=f"lift of the concept ({words}) per head, {result.kind} lens", value_name="lift (nats)",
                layers=list(result.layers), heads=list(result.heads))
    rank = {head: i for i, head in enumerate(result.ranked())}
    for i, layer in enumerate(result.layers):
        for j, head in enumerate(result.heads):
            score = float(result.scores[i, j])
            grid.cells[layer, head] = Cell(score, f"{score:+.2f}",
                                           f"L{layer}.H{head}: lift {score:+.3f} nats, rank {rank[layer, head] + 1}")
    return grid


GRIDS = {DecodeResult: decode_grid, Evaluation: evaluation_grid, Specialization: specialization_grid,
         SearchResult: search_grid}
"""Result class -> its grid; `attach`ed when this module is imported."""
for _result_class, _grid in GRIDS.items():
    attach(_result_class, _grid)

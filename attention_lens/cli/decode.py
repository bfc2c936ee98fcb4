"""`attention-lens decode`: the tokens each head's lens reads from its output on a prompt."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from ..decode import DecodeResult, decode as decode_prompt
from ..errors import AttentionLensError
from ..readings import choose_reading
from ..results import UNREAD_SHARE, HeadTop
from ..notebook import visible
from .common import emit_json, lens_and_model, parse_indices
from .numbers import MAX_K, within
from .options import AsJson, Device, DeviceMap, Heads, Layers, LensModel, LensSpec, PriorData, Reading, Revision

LAYER_COLUMN = 5
"""Width of the table's layer column."""
CELL_PADDING = 3
"""What rich adds around each cell: one space either side and the column rule."""


def decode(
    text: str = typer.Argument(..., help="The prompt."),
    lens: LensSpec = "logit",
    model: LensModel = None,
    k: int = typer.Option(10, "-k", "--k", help="Top-k tokens per head.", callback=within(1, MAX_K)),
    position: str = typer.Option("-1", help="Position to decode (0-based, negative from the end) or 'all'."),
    layers: Layers = None,
    heads: Heads = None,
    device: Device = "cpu",
    revision: Revision = None,
    device_map: DeviceMap = None,
    exact: bool = typer.Option(False, help="Compute the readout in fp32 throughout (~2.5x slower on CPU). By "
                               "default a bf16 screen + fp32 recheck gives the same tokens and logits, and "
                               "probabilities within ~1% (relative)."),
    reading: Reading = None,
    prior_data: PriorData = None,
    as_json: AsJson = False,
) -> None:
    """Show the tokens each head's lens reads from its output on a prompt.

    --json: {heads: [...]}."""
    lens_obj, loaded = lens_and_model(lens, model, device, revision, device_map)
    chosen = choose_reading(loaded, lens_obj, reading, prior_data)
    chosen_layers = parse_indices(layers, loaded.n_layers, "layer")
    chosen_heads = parse_indices(heads, loaded.n_heads, "head")
    result = decode_prompt(loaded, lens_obj, text, k=k, position=position, exact=exact, **chosen.decode_args())
    result.heads = [r for r in result.heads if (chosen_layers is None or r.layer in chosen_layers)
                    and (chosen_heads is None or r.head in chosen_heads)]
    if not result.heads:
        raise AttentionLensError(f"the lens covers none of the chosen heads (it covers layers "
                                 f"{lens_obj.config.layers}, heads {lens_obj.config.heads})")
    if as_json:
        emit_json(result.to_json())
        return
    cells = {(r.position, r.layer, r.head): f"{visible(r.top[0].token)} {r.top[0].shown()}{_unread_mark(r)}"
             for r in result.heads}
    # A terminal gets tables that fit its width; a file or pipe gets one table as wide as all heads need.
    terminal = Console(stderr=False)
    widest = max(len(cell) for cell in cells.values()) + CELL_PADDING
    all_heads = sorted({r.head for r in result.heads})
    needed = LAYER_COLUMN + CELL_PADDING + len(all_heads) * widest + 1
    console = terminal if terminal.is_terminal else Console(width=max(needed, 80))
    per_table = max(1, (console.width - LAYER_COLUMN - CELL_PADDING - 1) // widest)
    for pos in result.positions:
        for start in range(0, len(all_heads), per_table):
            console.print(_decode_table(result, pos, cells, all_heads[start:start + per_table]))


def _unread_mark(record: HeadTop) -> str:
    """' ?' after an effect reading that predicted under UNREAD_SHARE of its head's effect on held-back text."""
    return " ?" if record.unread else ""


def _decode_table(result: DecodeResult, position: int, cells: dict, heads: list[int]) -> Table:
    """Layers x `heads` at one position; every cell whole (a token is never cut: it folds onto a second line)."""
    shown = {"raw": "top token and its probability",
             "promoted": "top token over the prior (ranked by q·log(q/prior), shown as log(q/prior), nats)",
             "effect": "top token of the predicted effect of removing the head (logit change)"}[result.reading]
    table = Table(title=f"{result.kind} lens, {result.reading} reading, position {position} "
                        f"({visible(result.tokens[position])}): {shown}", show_lines=False)
    table.add_column("layer", justify="right", no_wrap=True, min_width=LAYER_COLUMN)
    for head in heads:
        table.add_column(f"H{head}", overflow="fold")
    for layer in sorted({r.layer for r in result.heads}):
        table.add_row(str(layer), *(cells.get((position, layer, head), "") for head in heads))
    if result.unread_heads():
        table.caption = (f"(?) on training text held back from the lens, this reading predicted under "
                         f"{UNREAD_SHARE:.0%} of the head's measured effect; what removing the head does is "
                         "measured by `attention-lens effects`")
    return table

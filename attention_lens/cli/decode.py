"""`attention-lens decode`: the tokens each head's lens reads from its output on a prompt."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from ..decode import DecodeResult, decode as decode_prompt
from ..notebook import visible
from ..results import TokenScore
from .common import emit_json, lens_and_model
from .options import Device, LensModel, LensSpec


def decode(
    text: str = typer.Argument(..., help="The prompt."),
    lens: LensSpec = "logit",
    model: LensModel = None,
    k: int = typer.Option(10, "-k", "--k", help="Top-k tokens per head."),
    position: str = typer.Option("-1", help="Position to decode (0-based, negative from the end) or 'all'."),
    device: Device = "cpu",
    exact: bool = typer.Option(False, help="Compute the readout in fp32 throughout (~2.5x slower on CPU). By "
                               "default a bf16 screen + fp32 recheck gives the same tokens and logits, and "
                               "probabilities within ~1% (relative)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document: {heads: [...]}."),
) -> None:
    """Show the tokens each head's lens reads from its output on a prompt."""
    lens_obj, loaded = lens_and_model(lens, model, device)
    result = decode_prompt(loaded, lens_obj, text, k=k, position=position, exact=exact)
    if as_json:
        emit_json(result.to_json())
        return
    console = Console()
    for pos in result.positions:
        console.print(_decode_table(result, pos))


def _decode_table(result: DecodeResult, position: int) -> Table:
    records = [r for r in result.heads if r.position == position]
    heads = sorted({r.head for r in records})
    table = Table(title=f"{result.kind} lens, position {position} ({visible(result.tokens[position])}): top token and its probability",
                  show_lines=False)
    table.add_column("layer", justify="right", no_wrap=True, min_width=5)
    for head in heads:
        table.add_column(f"H{head}", no_wrap=True, overflow="ellipsis", max_width=14)
    by_layer: dict[int, dict[int, TokenScore]] = {}
    for r in records:
        by_layer.setdefault(r.layer, {})[r.head] = r.top[0]
    for layer, cells in sorted(by_layer.items()):
        table.add_row(str(layer), *(f"{visible(cells[h].token)} {cells[h].prob:.0%}" for h in heads))
    return table

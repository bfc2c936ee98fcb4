"""Prompt -> the top-k tokens each head's lens reads from its output, per position."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import AttentionLensError
from .heads import run_with_heads
from .lens import Lens
from .models import Model
from .notebook import Cell, Grid, NotebookDisplay, visible


@dataclass
class DecodeResult(NotebookDisplay):
    """Per-(layer, head, position) top-k of a lens on one prompt; `heads` is the --json document's list.

    In a notebook it shows itself as a layers x heads grid of each head's top token at the last decoded
    position; `.plot(position=...)` draws it with plotly, `.to_pandas()` gives one row per top-k entry.
    """

    text: str
    tokens: list[str]
    """The prompt's tokens as text."""
    positions: list[int]
    kind: str
    heads: list[dict] = field(default_factory=list)
    """Records {layer, head, position, top: [{token, id, logit, prob}]}."""

    def to_json(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "positions": self.positions, "lens": self.kind,
                "heads": self.heads}

    def top_token(self, layer: int, head: int, position: int) -> str:
        for record in self.heads:
            if (record["layer"], record["head"], record["position"]) == (layer, head, position):
                return record["top"][0]["token"]
        raise KeyError((layer, head, position))

    def to_records(self) -> list[dict]:
        """One row per (layer, head, position, rank): token, id, logit and probability."""
        return [{"layer": r["layer"], "head": r["head"], "position": r["position"],
                 "position_token": self.tokens[r["position"]], "rank": rank, **entry}
                for r in self.heads for rank, entry in enumerate(r["top"])]

    def grid(self, position: int | None = None) -> Grid:
        """Top token and its probability per head at `position` (default: the last decoded one)."""
        position = self.positions[-1] if position is None else position % len(self.tokens)
        if position not in self.positions:
            raise AttentionLensError(f"position {position} was not decoded; decoded: {self.positions}")
        records = [r for r in self.heads if r["position"] == position]
        grid = Grid(title=f"{self.kind} lens, position {position} ({visible(self.tokens[position])}): "
                          "top token and its probability",
                    value_name="top-token probability", low=0.0, high=1.0,
                    layers=sorted({r["layer"] for r in records}), heads=sorted({r["head"] for r in records}))
        for r in records:
            best = r["top"][0]
            hover = "\n".join(f"{visible(t['token'])}  {t['prob']:.1%}" for t in r["top"])
            grid.cells[r["layer"], r["head"]] = Cell(best["prob"], f"{visible(best['token'])} {best['prob']:.0%}",
                                                     f"L{r['layer']}.H{r['head']}\n{hover}")
        return grid


@torch.no_grad()
def decode(model: Model, lens: Lens, text: str, k: int = 10, position: int | str = -1) -> DecodeResult:
    """Top-k tokens of every lens head at `position` (default: last; 'all' for every position)."""
    if lens._model is not model:
        lens.to(model.device).bind(model)
    if k < 1:
        raise AttentionLensError(f"k must be at least 1; got {k}")
    input_ids = model.encode(text)
    length = input_ids.shape[1]
    positions = _positions(position, length)
    _, capture = run_with_heads(model, input_ids, lens.config.layers, final_residual=lens.kind == "dla")
    final_scale = capture.final_scale(positions)  # one prompt: its tokens are the positions
    result = DecodeResult(text=text, tokens=[model.token_text(int(i)) for i in input_ids[0]],
                          positions=positions, kind=lens.kind)
    k = min(k, model.vocab)
    tops = []
    for group in _layer_groups(lens.config.layers, len(positions) * len(lens.config.heads)):
        # Several layers per readout: W_U is read once per group instead of once per layer.
        hidden = torch.stack([lens.hidden(capture.heads.pop(layer).z[0, positions], layer) for layer in group])
        logits = lens.readout(hidden, final_scale).float()  # (layer, position, lens head, vocab)
        top_logits, top_ids = logits.topk(k, dim=-1)
        top_probs = (top_logits - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
        for i, layer in enumerate(group):
            tops.append((layer, top_ids[i].tolist(), top_logits[i].tolist(), top_probs[i].tolist()))
    distinct = sorted({i for _, ids, _, _ in tops for row in ids for head in row for i in head})
    texts = dict(zip(distinct, model.token_texts(distinct)))
    for layer, ids, logits, probs in tops:
        for p_index, pos in enumerate(positions):
            for h_index, head in enumerate(lens.config.heads):
                result.heads.append({
                    "layer": layer, "head": head, "position": pos,
                    "top": [{"token": texts[i], "id": i, "logit": round(lg, 4), "prob": round(pr, 6)}
                            for i, lg, pr in zip(ids[p_index][h_index], logits[p_index][h_index], probs[p_index][h_index])],
                })
    return result


def _layer_groups(layers: list[int], rows_per_layer: int, max_rows: int = 2048) -> list[list[int]]:
    """Consecutive layers in groups of at most max_rows head-positions (bounds the logits' memory)."""
    size = max(1, max_rows // rows_per_layer)
    return [layers[i : i + size] for i in range(0, len(layers), size)]


def _positions(position: int | str, length: int) -> list[int]:
    if position == "all":
        return list(range(length))
    try:
        index = int(position)
    except ValueError:
        raise AttentionLensError(f"--position must be an integer or 'all'; got {position!r}") from None
    if not -length <= index < length:
        raise AttentionLensError(f"position {index} is outside the prompt's {length} tokens")
    return [index % length]

"""Prompt -> the top-k tokens each head's lens reads from its output, per position."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import AttentionLensError
from .heads import run_with_heads
from .lens import Lens
from .models import Model
from .readings import held_back_shares
from .results import UNREAD_SHARE, HeadTop, TokenScore
from .vocab_topk import Screen, VocabTopK, vocab_topk


@dataclass
class DecodeResult:
    """Per-(layer, head, position) top-k of a lens on one prompt; `heads` is the --json document's list.

    In a notebook it shows itself as a layers x heads grid of each head's top token at the last decoded
    position; `.plot(position=...)` draws it with plotly, `.to_pandas()` gives one row per top-k entry.
    """

    text: str
    tokens: list[str]
    """The prompt's tokens as text."""
    positions: list[int]
    kind: str
    heads: list[HeadTop] = field(default_factory=list)
    """One record per (layer, head, position)."""
    reading: str = "raw"
    """raw | promoted | effect: what the tokens are ranked by (readings.py)."""

    def to_json(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "positions": self.positions, "lens": self.kind,
                "reading": self.reading, "heads": [record.to_json() for record in self.heads],
                "unread": [list(head) for head in self.unread_heads()], "unread_below": UNREAD_SHARE}

    def unread_heads(self) -> list[tuple[int, int]]:
        """(layer, head) of the heads whose effect reading predicted under results.UNREAD_SHARE of their measured
        effect on held-back text (an effect lens fitted in the KL's metric keeps that share per head)."""
        return sorted({(r.layer, r.head) for r in self.heads if r.unread})

    def top_token(self, layer: int, head: int, position: int) -> str:
        for record in self.heads:
            if (record.layer, record.head, record.position) == (layer, head, position):
                return record.top[0].token
        raise KeyError((layer, head, position))

    def to_records(self) -> list[dict]:
        """One row per (layer, head, position, rank): token, id, logit and probability."""
        return [{"layer": r.layer, "head": r.head, "position": r.position,
                 "position_token": self.tokens[r.position], "rank": rank, **entry.to_json()}
                for r in self.heads for rank, entry in enumerate(r.top)]



@torch.no_grad()
def decode(model: Model, lens: Lens, text: str, k: int = 10, position: int | str = -1,
           exact: bool = False, reading: str = "raw", prior: Tensor | None = None,
           means: Tensor | None = None) -> DecodeResult:
    """Top-k tokens of every lens head at `position` (default: last; 'all' for every position).

    Ids and logits are those of an fp32 readout (a bf16 screen proposes candidates, fp32 rechecks them and a
    bound certifies the result; see vocab_topk). Probabilities use bf16 logits for tokens outside the top 64:
    measured within 1.1% (relative) of fp32 on SmolLM2. `exact=True` computes everything in fp32 (~2.5x slower).

    reading='promoted' ranks tokens by their share of KL(lens || prior), q log(q / prior), with `prior` (vocab,) a
    log-distribution (readings.prior_log_probs), and reports log(q / prior) as `promoted`; reading='effect' by E_h = read(z_h) - read(z̄_h), z̄_h from `means`
    (layer, head, d_head), the raw projection inputs' means (readings.cached_head_means). Both in fp32.
    """
    if lens._model is not model:
        lens.to(model.device).bind(model)
    if not 1 <= k <= model.vocab:  # a k past the vocabulary is a mistake, not a request for everything
        raise AttentionLensError(f"`k` (top-k) must be from 1 to the vocabulary size, {model.vocab}; got {k}")
    if reading not in ("raw", "promoted", "effect"):
        raise AttentionLensError(f"unknown reading {reading!r}; use raw, promoted or effect")
    if (reading == "promoted" and prior is None) or (reading == "effect" and means is None):
        raise AttentionLensError(f"the {reading} reading needs its corpus statistics: "
                                 f"{'prior' if reading == 'promoted' else 'means'} (see attention_lens.readings)")
    input_ids = model.encode(text)
    length = input_ids.shape[1]
    positions = _positions(position, length)
    _, capture = run_with_heads(model, input_ids, lens.config.layers, final_residual=lens.kind_spec.needs_final_residual)
    final_scale = capture.final_scale(positions)  # one prompt: its tokens are the positions
    result = DecodeResult(text=text, tokens=[model.token_text(int(i)) for i in input_ids[0]],
                          positions=positions, kind=lens.kind, reading=reading)
    if reading != "raw":
        _decode_reading(lens, capture, positions, final_scale, k, reading, prior, means, result)
        return result
    tops = []
    # A full lens's hidden vectors already are (rows x vocab) logits: bound their memory per group.
    max_rows = 1 << 20 if lens.kind_spec.to_unembedding else 2048
    for group in _layer_groups(lens.config.layers, len(positions) * len(lens.config.heads), max_rows):
        hidden = torch.stack([lens.hidden(capture.heads.pop(layer).z[0, positions], layer) for layer in group])
        top = _top_k(lens, hidden, final_scale, k, exact)  # rows: (layer, position, lens head) flattened
        shape = (len(group), len(positions), len(lens.config.heads), k)
        ids, logits, probs = (t.view(shape) for t in (top.ids, _rounded(top.logits, 4), _rounded(top.probs(), 6)))
        for i, layer in enumerate(group):
            tops.append((layer, ids[i].tolist(), logits[i].tolist(), probs[i].tolist()))
    distinct = sorted({i for _, ids, _, _ in tops for row in ids for head in row for i in head})
    texts = dict(zip(distinct, model.token_texts(distinct)))
    for layer, ids, logits, probs in tops:
        for p_index, pos in enumerate(positions):
            for h_index, head in enumerate(lens.config.heads):
                top = [TokenScore(token=texts[i], id=i, logit=lg, prob=pr)
                       for i, lg, pr in zip(ids[p_index][h_index], logits[p_index][h_index], probs[p_index][h_index])]
                result.heads.append(HeadTop(layer=layer, head=head, position=pos, top=top))
    return result


def _decode_reading(lens: Lens, capture, positions: list[int], final_scale: Tensor | None, k: int, reading: str,
                    prior: Tensor | None, means: Tensor | None, result: DecodeResult) -> None:
    """The promoted and effect readings, layer by layer in fp32: (position, head, vocab) at a time."""
    model = lens.model
    k = min(k, model.vocab)
    rows = []
    for layer in lens.config.layers:
        heads = capture.heads.pop(layer)
        z = heads.z[0, positions]  # (position, head, d_head)
        logits = lens.logits(z, layer, final_scale).float()  # (position, lens head, vocab)
        if reading == "promoted":
            log_q = torch.log_softmax(logits, dim=-1)
            log_ratio = log_q - prior
            # Ranked by each token's share of KL(lens || prior), q log(q / prior): ranked by log(q / prior) alone,
            # tokens the prior almost never predicts (SmolLM2 on SOTU: "}$", "ished") won every head at q ~ 1e-5.
            top = (log_q.exp() * log_ratio).topk(k, dim=-1)
            values = {"logit": logits.gather(-1, top.indices), "prob": log_q.gather(-1, top.indices).exp(),
                      "promoted": log_ratio.gather(-1, top.indices), "share": top.values}
        else:
            z_bar = means[layer].to(z.dtype).expand_as(z)
            if heads.scale is not None:  # Gemma: the lens reads z times the post-attention norm's scale
                z_bar = z_bar * heads.scale[0, positions][:, None, None]
            top = (logits - lens.logits(z_bar, layer, final_scale).float()).topk(k, dim=-1)
            values = {"logit": top.values, "change": top.values}
        rows.append((layer, top.indices.tolist(),
                     {name: _rounded(value, 6 if name == "prob" else 4).tolist() for name, value in values.items()}))
    distinct = sorted({i for _, ids, _ in rows for row in ids for head in row for i in head})
    texts = dict(zip(distinct, model.token_texts(distinct)))
    shares = held_back_shares(lens) if reading == "effect" else {}
    for layer, ids, values in rows:
        for p_index, pos in enumerate(positions):
            for h_index, head in enumerate(lens.config.heads):
                top = [TokenScore(token=texts[i], id=i, **{"prob": None, **{
                           name: value[p_index][h_index][rank] for name, value in values.items()}})
                       for rank, i in enumerate(ids[p_index][h_index])]
                result.heads.append(HeadTop(layer=layer, head=head, position=pos, top=top,
                                            held_back_recovered=shares.get((layer, head))))


def _top_k(lens: Lens, hidden: Tensor, final_scale: Tensor | None, k: int, exact: bool) -> VocabTopK:
    """Top-k of the lens's logits for each row of hidden (..., d_model | vocab), flattened to rows."""
    unembed = lens.model.unembed
    kind = lens.kind_spec
    if not kind.to_unembedding or (kind.model_readout and unembed.softcap is not None):
        return VocabTopK.of_logits(lens.readout(hidden, final_scale).float().flatten(0, -2), k)  # rows x vocab
    y = lens.unembed_input(hidden, final_scale).flatten(0, -2)  # (rows, d_model)
    bias = unembed.b_U if kind.model_readout else None
    screen = unembed.derived(("decode screen", bias is None), lambda: Screen(unembed.W_U, bias))
    return vocab_topk(y, unembed.W_U, bias, k, exact, screen)


def _rounded(values: Tensor, decimals: int) -> Tensor:
    """Rounded to `decimals` in float64, where n / 10^d is the double nearest the decimal (as round() gives),
    at tensor speed instead of one Python call per number."""
    scale = 10.0**decimals
    return (values.double() * scale).round() / scale


def _layer_groups(layers: list[int], rows_per_layer: int, max_rows: int) -> list[list[int]]:
    """Consecutive layers in groups of at most max_rows head-positions (bounds the logits' memory)."""
    size = max(1, max_rows // rows_per_layer)
    return [layers[i : i + size] for i in range(0, len(layers), size)]


def _positions(position: int | str, length: int) -> list[int]:
    if position == "all":
        return list(range(length))
    try:
        index = int(position)
    except ValueError:
        raise AttentionLensError(f"`position` must be an integer or 'all'; got {position!r}") from None
    if not -length <= index < length:
        raise AttentionLensError(f"position {index} is outside the prompt's {length} tokens")
    return [index % length]

"""Head effects, measured: what replacing each head's output does to the model's next-token distribution.

For head h of layer L at a scored position, T_h = log P - log P_ablated_h, where P_ablated_h is the model's
output with z_h replaced (by its training-split mean, zero, or its value on other text) through the same
kind of pre-hook on the output projection that `ablate` uses. One full forward pass per head would cost
n_layers x n_heads passes; replay.py runs the clean pass once and replays only blocks L.. for all of layer L's
heads at once, ~sum_L n_heads (n_layers - L) / n_layers forward-equivalents. This module feeds it the corpus
(held-out windows, training-split means) and turns the measured batches into the `effects` report: effect size
with a bootstrap interval, the tokens each head raises and lowers, where it matters most. The same batches feed
the effect fidelity of lenses (effect_eval.py) and the effect lens's training (effect_lens.py).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from itertools import cycle
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from .data import DataConfig
from .errors import AttentionLensError
from .intervene import HeadMeans
from .models import Model
from .replay import MODES, Ablation, EffectBatch, LayerEffect, tile_layout
from .stream import HeadStream

__all__ = ["MODES", "Ablation", "EffectBatch", "EffectsConfig", "HeadEffects", "LayerEffect", "head_effects",
           "measured_batches"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class EffectsConfig:
    """How head effects are measured."""

    tokens: int = 1024
    """Held-out tokens to measure on (whole windows)."""
    batch_size: int = 4
    """Windows per clean pass; a layer's replay runs heads x windows sequences at once."""
    mode: str = "mean"
    """What replaces z_h: mean (its mean over the training split), zero, or resample (its value at the same
    position of a training-split window)."""
    mean_tokens: int = 8192
    """Training-split tokens averaged into each head's mean z_h (mode mean)."""
    seed: int = 0
    """Seeds the document order, the resampled windows and the bootstrap."""
    bootstrap: int = 200
    """Bootstrap replicates (Poisson weights per window) behind the 95% intervals."""
    top: int = 10
    """Tokens per head listed as most raised and most lowered."""
    examples: int = 3
    """Positions per head kept where removing it changes the output most."""
    dtype: str = "bfloat16"
    """Precision of the stored change of the final residual and of its product with W_U (the clean logits
    stay fp32, so the rounding scales with the change itself: ~0.4% of it in bf16)."""
    block_rows: int = 256
    """Head-token rows per vocabulary-sized tile (memory vs. speed)."""


# ----- the corpus side --------------------------------------------------------------------------------


def head_means(model: Model, data: DataConfig, tokens: int, batch_size: int, seed: int) -> Tensor:
    """(layer, head, d_head) mean raw z_h over `tokens` tokens of the training split of `data`."""
    stream = HeadStream(model, data, split="train", seed=seed, batch_size=batch_size,
                        windows=math.ceil(tokens / data.seq_len))
    with HeadMeans(model) as recorder, torch.no_grad():
        for batch in stream.batches():
            model.hf.base_model(input_ids=batch.to(model.device), use_cache=False)
    return recorder.means


def measured_batches(model: Model, data: DataConfig, layers: Iterable[int], config: EffectsConfig,
                     on_progress: Callable[[int, int], None] | None = None,
                     split: str = "held") -> Iterator[EffectBatch]:
    """Measured effects, batch by batch, on the held-out split of `data` (the whole corpus when holdout is 0),
    or on its training split (split='train', what the effect lens trains on); the replacement values always
    come from the training split."""
    check_config(config)
    means = None
    if config.mode == "mean":
        means = head_means(model, data, config.mean_tokens, config.batch_size, config.seed)
    ablation = Ablation(model, layers, config.mode, means, DTYPES[config.dtype])
    count = math.ceil(config.tokens / data.seq_len)
    if split == "held" and data.holdout == 0:
        split = "all"
    scored = HeadStream(model, data, split=split, seed=config.seed, batch_size=config.batch_size, windows=count)
    sources = None
    if config.mode == "resample":
        # Another order of the training split, so the replacement comes from unrelated text.
        pool = list(HeadStream(model, data, split="train", seed=config.seed + 1, windows=count).windows())
        if not pool:
            raise AttentionLensError(f"the training split is too small for one window of {data.seq_len} tokens")
        sources = cycle(pool)
    planned, seen = count * data.seq_len, 0
    for batch in scored.batches():
        source = None if sources is None else torch.stack([next(sources) for _ in range(batch.shape[0])])
        measured = ablation.measure(batch.to(model.device), None if source is None else source.to(model.device))
        seen += batch.numel()
        if on_progress is not None:
            on_progress(seen, planned)
        yield measured


def check_config(config: EffectsConfig) -> None:
    if config.mode not in MODES:
        raise AttentionLensError(f"unknown ablation mode {config.mode!r}; use {', '.join(MODES)}")
    if config.dtype not in DTYPES:
        raise AttentionLensError(f"unknown dtype {config.dtype!r}; use {' or '.join(DTYPES)}")
    if min(config.tokens, config.batch_size, config.mean_tokens, config.block_rows, config.top) < 1:
        raise AttentionLensError("tokens, batch size, mean tokens, block rows and top must be at least 1")
    if config.bootstrap < 2:
        raise AttentionLensError(f"the bootstrap needs at least 2 replicates; got {config.bootstrap}")
    if config.examples < 0:
        raise AttentionLensError(f"examples must be >= 0; got {config.examples}")


# ----- bootstrap over windows -------------------------------------------------------------------------


class WindowBootstrap:
    """Per-window sums of several quantities, resampled together: each replicate weighs each window by one
    Poisson(1) draw (resampling windows with replacement in the limit; nothing per window is stored)."""

    def __init__(self, replicates: int, seed: int):
        self.replicates = replicates
        self.generator = torch.Generator().manual_seed(seed)
        self.sums: dict[str, Tensor] = {}

    def add(self, per_window: dict[str, Tensor]) -> None:
        """per_window: name -> (window, ...) sums; every name shares this call's weights."""
        windows = next(iter(per_window.values())).shape[0]
        weights = torch.poisson(torch.ones(self.replicates, windows, dtype=torch.float64), generator=self.generator)
        for name, value in per_window.items():
            replicate = torch.einsum("rw,w...->r...", weights, value.double().cpu())
            self.sums[name] = self.sums[name] + replicate if name in self.sums else replicate

    def ratio_interval(self, numerator: str, denominator: str) -> tuple[Tensor, Tensor]:
        """95% interval of sum numerator / sum denominator over the replicates."""
        values = self.sums[numerator] / self.sums[denominator]
        values = torch.where(torch.isfinite(values), values, torch.nan)
        bounds = torch.nanquantile(values, torch.tensor([0.025, 0.975], dtype=values.dtype), dim=0)
        return bounds[0], bounds[1]


# ----- the effects report -----------------------------------------------------------------------------


@dataclass
class HeadEffects:
    """Per-head measured effects and their summary; `to_json()` is the `effects --json` document."""

    summary: dict
    heads: list[dict]
    setup: dict
    change: Tensor = field(repr=False)
    """(layer, head, vocab): mean over scored positions of log P - log P_ablated (positive: the head raises
    the token), for the measured layers in order."""
    layers: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"summary": self.summary, "heads": self.heads, **self.setup}

    def head(self, layer: int, head: int) -> dict:
        for record in self.heads:
            if (record["layer"], record["head"]) == (layer, head):
                return record
        raise KeyError((layer, head))

    def token_change(self, token_ids: Iterable[int]) -> Tensor:
        """(layer, head): mean change of log-probability over `token_ids` and the scored positions when the head
        is removed, signed as in `change` (positive: the head raises these tokens). For scoring token sets."""
        ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long)
        if ids.numel() == 0:
            raise AttentionLensError("token_change needs at least one token id")
        return self.change[..., ids].mean(-1)


class EffectTotals:
    """Streamed sums behind `HeadEffects`: KL per window (bootstrapped), mean change per token, top positions."""

    def __init__(self, model: Model, layers: list[int], config: EffectsConfig):
        self.model, self.layers, self.config = model, layers, config
        shape = (len(layers), model.n_heads)
        self.change = torch.zeros(*shape, model.vocab, dtype=torch.float64)
        self.kl = torch.zeros(shape, dtype=torch.float64)
        self.count = 0
        self.bootstrap = WindowBootstrap(config.bootstrap, config.seed)
        self.examples: list[list[tuple[float, list[int], int]]] = [[] for _ in range(shape[0] * shape[1])]

    @torch.no_grad()
    def add(self, batch: EffectBatch) -> None:
        model, dtype = self.model, DTYPES[self.config.dtype]
        log_p = batch.clean_log_probs(model)
        tokens, heads = log_p.shape[0], model.n_heads
        kl_tokens = torch.zeros(tokens, len(self.layers), heads)
        everyone = list(range(heads))
        for i, layer in enumerate(self.layers):
            for part, rows in tile_layout(tokens, heads, self.config.block_rows):
                shift = batch.logit_change(model, layer, rows, dtype, everyone[part])  # log P_ablated - log P + c
                norm = torch.logsumexp(shift + log_p[rows], dim=-1, keepdim=True)  # that constant c
                change = shift.neg_().add_(norm)  # log P - log P_ablated, (head, rows, vocab)
                kl_tokens[rows, i, part] = torch.einsum("hrv,rv->rh", change, log_p[rows].exp())
                weights = batch.scored[rows].to(change.dtype)
                self.change[i, part] += torch.einsum("hrv,r->hv", change, weights).double().cpu()
        kl_tokens = kl_tokens * batch.scored[:, None, None].cpu()
        per_window = kl_tokens.view(batch.windows, -1, len(self.layers), heads).sum(1)  # (window, layer, head)
        counts = batch.scored.view(batch.windows, -1).sum(1).double().cpu()
        self.kl += per_window.sum(0).double()
        self.count += int(counts.sum())
        self.bootstrap.add({"kl": per_window, "count": counts[:, None, None].expand_as(per_window)})
        self._keep_examples(batch, kl_tokens)

    def _keep_examples(self, batch: EffectBatch, kl_tokens: Tensor) -> None:
        keep = self.config.examples
        if keep == 0:
            return
        ids = batch.input_ids.cpu()
        length = ids.shape[1]
        flat = kl_tokens.flatten(1)  # (tokens, layer * head)
        values, rows = flat.topk(min(keep, flat.shape[0]), dim=0)  # (keep, layer * head)
        for column in range(flat.shape[1]):
            found = self.examples[column]
            for value, row in zip(values[:, column].tolist(), rows[:, column].tolist()):
                window, position = divmod(row, length)
                context = ids[window, max(0, position - 12):position + 1].tolist()
                following = int(ids[window, position + 1]) if position + 1 < length else -1
                found.append((value, context, following))
            found.sort(key=lambda e: -e[0])
            del found[keep:]

    def result(self, setup: dict) -> HeadEffects:
        model, top = self.model, self.config.top
        if self.count == 0:
            raise AttentionLensError("no scored positions: every measured position is an attention sink")
        change = (self.change / self.count).float()
        kl = self.kl / self.count
        low, high = self.bootstrap.ratio_interval("kl", "count")
        lowest = change.topk(top, dim=-1, largest=False)
        highest = change.topk(top, dim=-1)
        used = set(lowest.indices.flatten().tolist()) | set(highest.indices.flatten().tolist())
        for found in self.examples:
            for _, context, following in found:
                used.update(context + ([following] if following >= 0 else []))
        ordered = sorted(used)
        texts = dict(zip(ordered, model.token_texts(ordered)))

        def entries(top_k) -> list[dict]:
            return [{"token": texts[t], "id": t, "change": round(c, 5)}
                    for t, c in zip(top_k[0].tolist(), top_k[1].tolist())]

        heads = []
        for i, layer in enumerate(self.layers):
            for head in range(model.n_heads):
                column = i * model.n_heads + head
                heads.append({
                    "layer": layer, "head": head,
                    "effect_kl": _round(kl[i, head]), "effect_kl_low": _round(low[i, head]),
                    "effect_kl_high": _round(high[i, head]),
                    "raises": entries((highest.indices[i, head], highest.values[i, head])),
                    "lowers": entries((lowest.indices[i, head], lowest.values[i, head])),
                    "examples": [{"context": "".join(texts[t] for t in context),
                                  "next_token": texts[following] if following >= 0 else None,
                                  "effect_kl": _round(value)}
                                 for value, context, following in self.examples[column]],
                })
        return HeadEffects(summary=summarize(heads, model.n_layers, self.count), heads=heads, setup=setup,
                           change=change, layers=list(self.layers))


def summarize(heads: list[dict], n_layers: int, tokens: int) -> dict:
    """Mean and median effect, the largest heads, and the same per depth third."""
    effects = [h["effect_kl"] for h in heads]
    ranked = sorted(heads, key=lambda h: -h["effect_kl"])
    thirds = {}
    for name, (low, high) in depth_thirds(n_layers).items():
        chosen = [h["effect_kl"] for h in heads if low <= h["layer"] < high]
        thirds[name] = {"heads": len(chosen), "effect_kl_mean": _mean(chosen),
                        "effect_kl_median": _round(statistics.median(chosen)) if chosen else None}
    return {
        "heads": len(heads), "tokens": tokens,
        "effect_kl_mean": _mean(effects), "effect_kl_median": _round(statistics.median(effects)),
        "largest": [{"layer": h["layer"], "head": h["head"], "effect_kl": h["effect_kl"],
                     "raises": h["raises"][0]["token"] if h["raises"] else None} for h in ranked[:10]],
        "by_depth": thirds,
    }


def depth_thirds(n_layers: int) -> dict[str, tuple[int, int]]:
    """Early / middle / late thirds of the layers, as half-open ranges."""
    cuts = [0, round(n_layers / 3), round(2 * n_layers / 3), n_layers]
    return {name: (cuts[i], cuts[i + 1]) for i, name in enumerate(("early", "middle", "late"))}


def head_effects(model: Model, data: DataConfig, config: EffectsConfig = EffectsConfig(),
                 layers: Iterable[int] | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> HeadEffects:
    """Measure every head of `layers` (default: all) on the held-out split of `data`: its effect size
    (mean KL(P || P_ablated) with a bootstrap interval), the tokens it raises and lowers most on average,
    and the positions where it matters most."""
    layers = sorted(set(range(model.n_layers) if layers is None else layers))
    totals = EffectTotals(model, layers, config)
    for batch in measured_batches(model, data, layers, config, on_progress):
        totals.add(batch)
    setup = {"model": model.name, "data": data.data, "holdout": data.holdout, "seq_len": data.seq_len,
             "tokens": totals.count, "mode": config.mode, "mean_tokens": config.mean_tokens if config.mode == "mean"
             else None, "seed": config.seed, "bootstrap": config.bootstrap, "dtype": config.dtype,
             "change": "mean over scored positions of log P - log P_ablated, nats (positive: the head raises it)",
             "sink_positions": "left out: position 0 of each window and end/begin-of-text tokens"}
    return totals.result(setup)


def _round(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else float(f"{value:.6g}")  # 6 significant digits


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return _round(sum(values) / len(values)) if values else None

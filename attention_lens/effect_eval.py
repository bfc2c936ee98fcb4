"""Effect fidelity: for each head, how much of its measured effect a lens's reading predicts, against the dla,
logit, zero and other lenses' readings and the in-hindsight linear ceiling.

Per head, over scored held-out positions (bootstrap over windows for the intervals):
- recovered = 1 - mean KL(P || softmax(log P_ablated + E)) / mean KL(P || P_ablated)
  (1: the reading explains the whole effect; 0: no better than predicting no effect; can be negative);
- corr: correlation over the vocabulary of the centred E and T = log P - log P_ablated, averaged over positions;
- top10_agreement: overlap of the 10 tokens E pushes most with the 10 whose log-probability falls most when the
  head is removed, averaged over positions.
The ceiling is an effect lens fitted by least squares on the scored batches themselves (`fit_effect_lens`): the
best linear reading of z_h - z̄_h in hindsight, under the squared error of every logit's change. In hindsight it
also fits what is particular to the scored text (a head's effect is heavy-tailed: a few positions carry much of
it), so with two or more batches the same fit is cross-fitted too (`crossfit`: each half of the batches read by the
fit on the other half): what of the ceiling carries to text the map was not fitted on.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .data import DataConfig
from .effect_lens import dot, expectation, factors_of, fit_effect_lens, lse_, predicted_effect, tiles
from .effects import DTYPES, EffectsConfig, WindowBootstrap, depth_thirds, measured_batches
from .errors import AttentionLensError
from .lens import Lens
from .replay import EffectBatch

TOP = 10
TOP_FRACTION = 0.1
"""The heads with the largest measured effect that the `_top10pct` summaries cover."""


@dataclass
class EffectEvalConfig:
    """How lenses are scored against measured effects."""

    effects: EffectsConfig = field(default_factory=EffectsConfig)
    ceiling: bool = True
    """Fit and report the in-hindsight linear ceiling."""
    ridge: float = 1e-3
    """Ridge strength of the ceiling's least squares, relative to each head's mean input variance."""


@dataclass
class EffectFidelity:
    """Per-head `effect` records (keyed by (layer, head)) and the summary keys eval adds."""

    heads: dict[tuple[int, int], dict]
    summary: dict
    setup: dict


class _Totals:
    """Streamed per-window sums for every reading, with one shared bootstrap."""

    def __init__(self, readings: list[str], shape: tuple[int, int], config: EffectsConfig):
        self.readings = readings
        self.shape = shape
        self.sums: dict[str, Tensor] = {}
        self.bootstrap = WindowBootstrap(config.bootstrap, config.seed)

    def add(self, per_window: dict[str, Tensor]) -> None:
        for name, value in per_window.items():
            total = value.sum(0).double()
            self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.bootstrap.add({k: v for k, v in per_window.items() if k.startswith(("kl_", "count"))})


@torch.no_grad()
def effect_fidelity(lens: Lens, data: DataConfig, config: EffectEvalConfig = EffectEvalConfig(),
                    others: dict[str, Lens] | None = None,
                    on_progress: Callable[[int, int], None] | None = None,
                    on_scored: Callable[[int, int], None] | None = None) -> EffectFidelity:
    """Score `lens` and the baselines (dla, logit, zero, `others` by name) against the effects measured on the
    held-out split of `data`. The measured batches are kept (d_model numbers per head-token) so the ceiling can
    be fitted on them before scoring. `on_progress(done, planned)` follows the measurement and `on_scored(done,
    total)` the scoring (tokens), which takes longer: every reading is compared over the vocabulary."""
    model = lens.model
    layers, heads = lens.config.layers, lens.config.heads
    readings: dict[str, Lens] = {"lens": lens}
    for name in ("dla", "logit"):
        readings[name] = Lens.from_model(model, name, layers, heads)
    for name, other in (others or {}).items():
        readings[name] = other
    measured = list(measured_batches(model, data, layers, config.effects, on_progress))
    crossfit: list[Lens] = []
    if config.ceiling:
        readings["ceiling"] = _fitted(lens, measured, config.ridge)
        if len(measured) >= 2:  # the other half's fit for each batch: what of the ceiling is not overfitting
            crossfit = [_fitted(lens, measured[1::2], config.ridge), _fitted(lens, measured[0::2], config.ridge)]
            readings["crossfit"] = crossfit[0]
    totals = _Totals(list(readings), (len(layers), len(heads)), config.effects)
    total, done = sum(batch.input_ids.numel() for batch in measured), 0
    for index, batch in enumerate(measured):
        if crossfit:
            readings["crossfit"] = crossfit[index % 2]
        totals.add(_score_batch(readings, batch, config.effects))
        done += batch.input_ids.numel()
        if on_scored is not None:
            on_scored(done, total)
    return _records(lens, totals, config, measured)


def _fitted(lens: Lens, measured: list[EffectBatch], ridge: float) -> Lens:
    """An effect lens on `lens`'s layers and heads, fitted by least squares on `measured`."""
    fitted = Lens.from_model(lens.model, "effect", lens.config.layers, lens.config.heads)
    fit_effect_lens(fitted, measured, ridge)
    return fitted


def _score_batch(readings: dict[str, Lens], batch: EffectBatch, config: EffectsConfig) -> dict[str, Tensor]:
    """Per-window sums (window, layer, head) of every score of every reading, and the measured KL."""
    lens = readings["lens"]
    model, heads = lens.model, lens.config.heads
    dtype = DTYPES[config.dtype]
    tokens, n_layers = batch.final.shape[0], len(lens.config.layers)
    names = ["kl_ablated", "count"] + [f"{score}_{name}" for name in readings for score in ("kl", "corr", "top")]
    sums = {name: torch.zeros(tokens, n_layers, len(heads)) for name in names}
    for i, layer in enumerate(lens.config.layers):
        factors = {name: factors_of(reading, layer) for name, reading in readings.items()}
        for tile in tiles(model, batch, layer, heads, config.block_rows, dtype):
            rows, part, weight = tile.rows, tile.heads, tile.scored.float()[:, None]
            change, p, log_p = tile.change, tile.p, tile.log_p  # change: -T up to a constant per (head, row)
            vocab = change.shape[-1]
            change_p = expectation(change, p)
            change_sum = change.sum(-1)
            change_norm = _centred_norm(dot(change, change), change_sum, vocab)
            # What removing the head lowers most: T's largest entries, the change's smallest.
            falls = change.topk(TOP, dim=-1, largest=False).indices
            sums["kl_ablated"][rows, i, part] = (lse_(change + log_p) - change_p).T * weight
            sums["count"][rows, i, part] = weight.expand(-1, change.shape[0])
            for name, reading in readings.items():
                factors_t, constant = factors[name]
                effect = predicted_effect(reading, layer, batch, rows, factors_t[part], constant, part)
                effect_sum = effect.sum(-1)
                covariance = dot(effect, change) - effect_sum * change_sum / vocab
                effect_norm = _centred_norm(dot(effect, effect), effect_sum, vocab)
                corr = -covariance / (effect_norm * change_norm).clamp_min(1e-30)
                sums[f"corr_{name}"][rows, i, part] = corr.T * weight
                pushes = effect.topk(TOP, dim=-1).indices
                overlap = (pushes[..., :, None] == falls[..., None, :]).any(-1).float().mean(-1)
                sums[f"top_{name}"][rows, i, part] = overlap.T * weight
                effect_p = expectation(effect, p)
                # KL(P || softmax(log P + change + E)) = log E_P[exp(change + E)] - E_P[change + E]; effect is
                # overwritten by the sum.
                kl = lse_(effect.add_(change).add_(log_p)) - change_p - effect_p
                sums[f"kl_{name}"][rows, i, part] = kl.T * weight
    windows = batch.windows
    return {name: value.view(windows, -1, n_layers, len(heads)).sum(1) for name, value in sums.items()}


def _centred_norm(square: Tensor, total: Tensor, vocab: int) -> Tensor:
    """|a - mean(a)| over the vocabulary from sum(a^2) and sum(a)."""
    return (square - total * total / vocab).clamp_min(0).sqrt()


def _records(lens: Lens, totals: _Totals, config: EffectEvalConfig, measured: list[EffectBatch]) -> EffectFidelity:
    count = totals.sums["count"]
    if float(count.max()) == 0:
        raise AttentionLensError("no scored positions: every measured position is an attention sink")
    ablated = totals.sums["kl_ablated"] / count
    boot = totals.bootstrap

    def recovered(name: str) -> Tensor:
        return 1 - (totals.sums[f"kl_{name}"] / count) / ablated

    def interval(name: str) -> tuple[Tensor, Tensor]:
        sums = boot.sums
        values = 1 - sums[f"kl_{name}"] / sums["kl_ablated"]
        values = torch.where(torch.isfinite(values), values, torch.nan)
        bounds = torch.nanquantile(values, torch.tensor([0.025, 0.975], dtype=values.dtype), dim=0)
        return bounds[0], bounds[1]

    def difference(a: str, b: str) -> tuple[Tensor, Tensor]:
        sums = boot.sums
        values = (sums[f"kl_{b}"] - sums[f"kl_{a}"]) / sums["kl_ablated"]  # recovered(a) - recovered(b)
        values = torch.where(torch.isfinite(values), values, torch.nan)
        bounds = torch.nanquantile(values, torch.tensor([0.025, 0.975], dtype=values.dtype), dim=0)
        return bounds[0], bounds[1]

    names = [n for n in totals.readings if n != "lens"]
    scores = {name: {"recovered": recovered(name), "interval": interval(name),
                     "corr": totals.sums[f"corr_{name}"] / count, "top": totals.sums[f"top_{name}"] / count}
              for name in totals.readings}
    beats_dla = difference("lens", "dla")
    records: dict[tuple[int, int], dict] = {}
    for i, layer in enumerate(lens.config.layers):
        for j, head in enumerate(lens.config.heads):
            main = scores["lens"]
            record = {
                "effect_kl": _round(ablated[i, j]),
                "recovered": _round(main["recovered"][i, j]),
                "recovered_low": _round(main["interval"][0][i, j]),
                "recovered_high": _round(main["interval"][1][i, j]),
                "corr": _round(main["corr"][i, j]),
                "top10_agreement": _round(main["top"][i, j]),
                "minus_dla_low": _round(beats_dla[0][i, j]), "minus_dla_high": _round(beats_dla[1][i, j]),
                "beats_dla": bool(beats_dla[0][i, j] > 0),
                "baselines": {},
            }
            for name in names:
                if name in ("ceiling", "crossfit"):
                    continue
                s = scores[name]
                record["baselines"][name] = {
                    "recovered": _round(s["recovered"][i, j]), "recovered_low": _round(s["interval"][0][i, j]),
                    "recovered_high": _round(s["interval"][1][i, j]), "corr": _round(s["corr"][i, j]),
                    "top10_agreement": _round(s["top"][i, j])}
            record["baselines"]["zero"] = {"recovered": 0.0, "recovered_low": 0.0, "recovered_high": 0.0,
                                           "corr": None, "top10_agreement": None}
            for fit in ("ceiling", "crossfit"):
                if fit in scores:
                    found = scores[fit]
                    record[f"{fit}_recovered"] = _round(found["recovered"][i, j])
                    record[f"{fit}_recovered_low"] = _round(found["interval"][0][i, j])
                    record[f"{fit}_recovered_high"] = _round(found["interval"][1][i, j])
                    record[f"{fit}_corr"] = _round(found["corr"][i, j])
                    record[f"{fit}_top10_agreement"] = _round(found["top"][i, j])
            records[layer, head] = record
    tokens = int(sum(int(b.scored.sum()) for b in measured))
    setup = {"effects": {"mode": config.effects.mode, "tokens": tokens, "mean_tokens": config.effects.mean_tokens,
                         "dtype": config.effects.dtype, "seed": config.effects.seed,
                         "readings": ["lens", *names, "zero"],
                         "ceiling": "effect lens fitted by least squares on the scored positions (in hindsight)"
                         if config.ceiling else None,
                         "crossfit": "the same fit on the other half of the scored batches (2-fold): the part of "
                         "the ceiling that carries to text it was not fitted on" if "crossfit" in scores else None}}
    return EffectFidelity(heads=records, summary=summarize(records, lens.model.n_layers), setup=setup)


def summarize(records: dict[tuple[int, int], dict], n_layers: int) -> dict:
    """The issue's summary keys, for all heads, the top 10% by measured effect, and per depth third."""
    ranked = sorted(records.items(), key=lambda item: -(item[1]["effect_kl"] or 0))
    top = ranked[:max(1, math.ceil(TOP_FRACTION * len(ranked)))]
    summary = {"effect_heads": len(records), "effect_top10pct_heads": [f"{layer}.{head}" for (layer, head), _ in top]}
    summary.update(_group(dict(ranked), ""))
    summary.update(_group(dict(top), "_top10pct"))
    for name, (low, high) in depth_thirds(n_layers).items():
        chosen = {key: r for key, r in records.items() if low <= key[0] < high}
        if chosen:
            summary[f"effect_by_depth_{name}"] = _group(chosen, "")
    return summary


def _group(records: dict, suffix: str) -> dict:
    values = list(records.values())

    def median(get) -> float | None:
        found = [v for v in (get(r) for r in values) if v is not None]
        return _round(statistics.median(found)) if found else None

    out = {
        f"effect_recovered_median{suffix}": median(lambda r: r["recovered"]),
        f"effect_corr_median{suffix}": median(lambda r: r["corr"]),
        f"top10_agreement_median{suffix}": median(lambda r: r["top10_agreement"]),
        f"frac_beats_dla_effect{suffix}": _round(sum(r["beats_dla"] for r in values) / len(values)) if values else None,
    }
    for name in sorted({n for r in values for n in r["baselines"]} - {"zero"}):
        out[f"{name}_effect_recovered_median{suffix}"] = median(lambda r: r["baselines"][name]["recovered"])
        out[f"{name}_top10_agreement_median{suffix}"] = median(lambda r: r["baselines"][name]["top10_agreement"])
    if values and "crossfit_recovered" in values[0]:
        out[f"crossfit_recovered_median{suffix}"] = median(lambda r: r["crossfit_recovered"])
    if values and "ceiling_recovered" in values[0]:
        out[f"ceiling_recovered_median{suffix}"] = median(lambda r: r["ceiling_recovered"])
        out[f"ceiling_ratio_median{suffix}"] = median(
            lambda r: r["recovered"] / r["ceiling_recovered"] if r["ceiling_recovered"] and r["ceiling_recovered"] > 0
            and r["recovered"] is not None else None)
    return out


def merge_into(document: dict, fidelity: EffectFidelity) -> dict:
    """An eval --json document with every head record's `effect` and the summary's effect keys added."""
    for record in document["heads"]:
        effect = fidelity.heads.get((record["layer"], record["head"]))
        if effect is not None:
            record["effect"] = effect
    document["summary"].update(fidelity.summary)
    document.update(fidelity.setup)
    return document


def _round(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else float(f"{value:.6g}")  # 6 significant digits

"""Readings of a head's effect: the predicted effect E_h of any lens, its KL to the measured effect, and the
effect lens's fit (least squares, closed form) and training (KL), all tile by tile from measured batches.

A lens's predicted effect is its logit change between the head's actual z_h and the ablated value:
E_h = read(z_h) - read(z̄_h). The reading explains the measured effect when softmax(log P_ablated_h + E_h)
matches the clean P. Every vocabulary-sized quantity exists one (head, rows, vocab) tile at a time; the
lens enters through its factored form ([z, 1] / divisor @ F_h^T), so its gradient is accumulated on the
(head, d_head + 1, vocab) factors and pushed into the parameters once per layer, as the predictive trainer does.

Every KL is taken on the change of the logits d (EffectBatch.logit_change), never on normalized log-probabilities:
KL(P || softmax(log P + d)) = log E_P[exp(d)] - E_P[d], and a constant added to a row of d drops out. So the
ablated KL is that of d = the measured change, a reading's explained KL that of d = change + E, and neither
P_ablated's normalizer nor the clean logits are needed (the difference of two normalized log-probabilities would
cancel ~20-nat terms to reach KLs of ~1e-3 nats; this form never does).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor

from .data import DataConfig
from .effect_fit import fit_effect_lens_kl, kl_problem, residual_energy
from .effects import DTYPES, EffectsConfig, measured_batches
from .errors import AttentionLensError
from .lens import Lens
from .models import Model
from .replay import EffectBatch, tile_layout


@dataclass
class Tile:
    """One (head, rows, vocab) tile of a layer's measured effects: what every reading is compared with."""

    layer: int
    heads: slice
    """Which of the measured heads (positions in their list)."""
    rows: slice
    log_p: Tensor
    """(rows, vocab) clean log P."""
    change: Tensor
    """(head, rows, vocab) log P_ablated_h - log P, up to a constant per (head, row) (EffectBatch.logit_change)."""
    scored: Tensor
    """(rows,) bool."""

    @property
    def p(self) -> Tensor:
        return self.log_p.exp()


def tiles(model: Model, batch: EffectBatch, layer: int, heads: list[int], block_rows: int,
          dtype: torch.dtype) -> Iterable[Tile]:
    """The layer's measured effects on `heads`, block_rows head-token rows per tile (laid out by tile_layout)."""
    log_p = batch.clean_log_probs(model)
    for part, rows in tile_layout(log_p.shape[0], len(heads), block_rows):
        change = batch.logit_change(model, layer, rows, dtype, heads[part])
        yield Tile(layer=layer, heads=part, rows=rows, log_p=log_p[rows], change=change, scored=batch.scored[rows])


def predicted_effect(lens: Lens, layer: int, batch: EffectBatch, rows: slice,
                     factors_t: Tensor, constant: Tensor | None, part: slice = slice(None)) -> Tensor:
    """E_h = read(z_h) - read(z̄_h), (head, rows, vocab), for the `part` of the lens's heads whose factors
    (head, d_head + 1, vocab) are `factors_t`.

    Attribution lenses (dla, effect) are linear: E_h = (z_h - z̄_h) F_h / sigma_final. Self-normalized lenses
    (logit, affine) divide each reading by its own sigma, so the difference is taken on [z, 1] / divisor;
    a soft-capped readout caps each reading before the difference.
    """
    effect = batch.layers[layer]
    z, z_bar, scale = effect.z[rows], effect.z_ablated[rows], batch.final_scale[rows]
    heads = lens.config.heads

    def scaled(values: Tensor) -> Tensor:  # [z_h, 1] / divisor, (head, rows, d_head + 1)
        ones = torch.ones(*values.shape[:-2], len(heads), 1, device=values.device)
        augmented = torch.cat([values[:, heads], ones], dim=-1)
        return (augmented / lens.divisor(values, layer, scale)[..., None]).transpose(0, 1)[part]

    caps = lens.kind_spec.model_readout and lens.model.unembed.softcap is not None
    if not caps:
        return torch.bmm(scaled(z) - scaled(z_bar), factors_t)
    unembed = lens.model.unembed
    read = [torch.bmm(scaled(values), factors_t) for values in (z, z_bar)]
    if constant is not None:
        read = [r + constant for r in read]
    return unembed.cap(read[0]) - unembed.cap(read[1])


def lse_(x: Tensor) -> Tensor:
    """logsumexp over the last axis, overwriting x: one max, an in-place exp and a sum (torch.logsumexp makes
    three vocabulary-sized temporaries, and these tiles are tens of MB)."""
    top = x.amax(-1, keepdim=True)
    return x.sub_(top).exp_().sum(-1).log_().add_(top[..., 0])


def dot(a: Tensor, b: Tensor) -> Tensor:
    """Per (head, row) dot product over the vocabulary, in one read of each (a * b would write a third tensor)."""
    return torch.einsum("hrv,hrv->hr", a, b)


def expectation(a: Tensor, p: Tensor) -> Tensor:
    """E_P[a] per (head, row): a (head, rows, vocab), p (rows, vocab)."""
    return torch.einsum("hrv,rv->hr", a, p)


def factors_of(lens: Lens, layer: int) -> tuple[Tensor, Tensor | None]:
    """The lens's factors laid out (head, d_head + 1, vocab), fp32, and its per-vocab constant."""
    factors, constant = lens.vocab_factors(layer)
    return factors.float().transpose(1, 2).contiguous(), constant


# ----- the effect lens: least squares, then KL --------------------------------------------------------


@torch.no_grad()
def fit_effect_lens(lens: Lens, measured: Iterable[EffectBatch], ridge: float = 1e-3) -> int:
    """Set every head of an effect `lens` to the least-squares map from (z_h - z̄_h) / sigma_final to the measured
    change of what meets W_U, clean minus ablated (divided by the final norm's gain): the linear reading that
    best matches the change of every logit (centred) over the vocabulary, solved in d_model space. Returns the
    number of scored positions used.

    The change of the logits, centred over the vocabulary, is exactly W_U (clean - ablated) on unsoftcapped
    models, so least squares over the whole vocabulary equals least squares in the residual (the metric drops
    out of an unconstrained multi-output fit).
    """
    if not lens.kind_spec.reads_effects:
        raise AttentionLensError(f"fit_effect_lens fits effect lenses; got a {lens.kind} lens")
    model, heads = lens.model, lens.config.heads
    gain = model.unembed.gamma
    safe_gain = torch.where(gain.abs() < 1e-6, torch.full_like(gain, 1e-6), gain)
    width = model.d_head
    moments = {layer: (torch.zeros(len(heads), width, width, dtype=torch.float64),
                       torch.zeros(len(heads), width, model.d_model, dtype=torch.float64))
               for layer in lens.config.layers}
    count = 0
    for batch in measured:
        keep = batch.scored
        count += int(keep.sum())
        for layer in lens.config.layers:
            effect = batch.layers[layer]
            u = batch.dla_input(layer, keep)[:, heads].double()
            target = -(effect.delta[heads][:, keep].double() / safe_gain.double())  # (head, rows, d_model)
            target = model.unembed.center(target)
            uu, ut = moments[layer]
            uu += torch.einsum("rhd,rhe->hde", u, u).cpu()
            ut += torch.einsum("rhd,hrm->hdm", u, target).cpu()
    if count == 0:
        raise AttentionLensError("no scored positions to fit the effect lens on")
    eye = torch.eye(width, dtype=torch.float64)
    for layer, (uu, ut) in moments.items():
        strength = ridge * torch.diagonal(uu, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
        M = torch.linalg.solve(uu + strength[:, None, None] * eye, ut)  # (head, d_head, d_model)
        lens.set_layer("delta", layer, M.float().to(model.device) - model.W_O[layer, heads])
    return count


def effect_kl_step(lens: Lens, batch: EffectBatch, block_rows: int, dtype: torch.dtype,
                   backward_scale: float | None = None) -> Tensor:
    """Mean KL(P || softmax(log P_ablated + E)) per (layer, lens head) over the batch's scored positions; with
    `backward_scale`, gradients of backward_scale * its sum over scored head-tokens flow into the lens.

    Only the factors' gradient (head, d_head + 1, vocab) is accumulated over tiles, then back-propagated into the
    parameters once per layer: nothing vocabulary-sized per head-token enters autograd.
    """
    if not lens.kind_spec.reads_effects:
        raise AttentionLensError(f"the effect objective trains effect lenses (kind effect); got a {lens.kind} lens")
    model, heads = lens.model, lens.config.heads
    train = backward_scale is not None
    out = []
    scored = batch.scored.float()
    for layer in lens.config.layers:
        with torch.set_grad_enabled(train):
            factors, _ = lens.vocab_factors(layer)  # (head, vocab, d_head + 1)
        factors_t = factors.detach().float().transpose(1, 2).contiguous()
        grad_t = torch.zeros_like(factors_t) if train else None
        effect = batch.layers[layer]
        total = torch.zeros(len(heads))
        for tile in tiles(model, batch, layer, heads, block_rows, dtype):
            part = tile.heads
            u = batch.dla_input(layer, tile.rows)[:, heads[part]]  # (rows, head, d_head)
            u = torch.cat([u, torch.zeros(*u.shape[:-1], 1)], dim=-1).transpose(0, 1)  # (head, rows, d_head + 1)
            shift = torch.baddbmm(tile.change, u, factors_t[part])  # change + E, (head, rows, vocab)
            p = tile.p
            weight = scored[tile.rows]
            expected = expectation(shift, p)
            top = shift.add_(tile.log_p).amax(-1, keepdim=True)  # in place: the explained distribution's logits
            explained = shift.sub_(top).exp_()  # in place: q times a constant per (head, row)
            norm = explained.sum(-1, keepdim=True)
            kl = (norm[..., 0].log() + top[..., 0] - expected) * weight  # log E_P[exp(shift)] - E_P[shift]
            total[part] += kl.sum(-1).cpu()
            if train:
                residual = explained.div_(norm).sub_(p).mul_(weight[:, None])  # (q - p) on scored rows
                grad_t[part].add_(torch.bmm(u.transpose(1, 2), residual), alpha=backward_scale)
        if train:
            factors.backward(grad_t.transpose(1, 2).to(factors.dtype))
        out.append(total / max(1.0, float(scored.sum())))
    return torch.stack(out)


def train_effect_lens(lens: Lens, measured: list[EffectBatch], epochs: int, lr: float, block_rows: int,
                      dtype: torch.dtype, on_step: Callable[[int, int, float], None] | None = None) -> float:
    """Adam on the effect objective over `measured` (kept in memory: the replays are the expensive part, so
    every epoch reuses them). Returns the last epoch's mean KL per scored head-token."""
    optimizer = torch.optim.Adam(lens.parameters(), lr=lr)
    steps, step, loss = epochs * len(measured), 0, float("nan")
    for _ in range(epochs):
        losses = []
        for batch in measured:
            tokens = max(1.0, float(batch.scored.sum()))
            optimizer.zero_grad(set_to_none=True)
            per_head = effect_kl_step(lens, batch, block_rows, dtype, backward_scale=1.0 / tokens)
            if not torch.isfinite(per_head).all():
                raise AttentionLensError("non-finite effect loss; lower the learning rate")
            optimizer.step()
            step += 1
            losses.append(per_head.mean().item())
            if on_step is not None:
                on_step(step, steps, losses[-1])
        loss = sum(losses) / len(losses)
    return loss


@dataclass
class EffectTrainConfig:
    """How an effect lens is trained."""

    effects: EffectsConfig = field(default_factory=lambda: EffectsConfig(tokens=2048))
    """The measurement it trains on (token budget, ablation mode, precision), on the training split."""
    epochs: int = 4
    """Passes of Adam over the measured batches (measuring is the expensive part, so they are reused)."""
    lr: float = 1e-3
    """Adam's learning rate."""
    fit: bool = True
    """Start from the least-squares fit of the measured effects (else from dla)."""
    fit_metric: str = "kl"
    """What the fit weighs: kl (each logit change by P of its token, shrunk toward dla with a strength picked per
    head on held-back windows; effect_fit.py) or logits (every vocabulary token alike, ridge toward zero)."""
    top: int = 128
    """fit_metric kl: the top tokens of P per position that enter the metric."""
    ridge: float = 1e-3
    """fit_metric logits: ridge strength, relative to each head's mean input variance."""


FIT_METRICS = ("kl", "logits")


def check_train_config(config: EffectTrainConfig) -> None:
    if config.epochs < 0 or not config.lr > 0:
        raise AttentionLensError("epochs must be >= 0 and the learning rate positive")
    if config.fit_metric not in FIT_METRICS:
        raise AttentionLensError(f"unknown fit metric {config.fit_metric!r}; use {' or '.join(FIT_METRICS)}")
    if config.top < 1:
        raise AttentionLensError(f"the fit's top tokens must be at least 1; got {config.top}")


TRAIN_HELD_BACK = 5
"""A trained effect lens is fitted and trained on all measured windows but every 5th, and checked on those (every
4th window of the rest picks the fit's strengths, `effect_fit.held_back_windows`)."""


def split_windows(measured: list[EffectBatch], every: int) -> tuple[list[EffectBatch], list[EffectBatch]]:
    """The batches with every `every`-th window (numbered across batches) unscored, and the same batches with only
    those scored, each list without batches left with nothing scored; (measured, []) where that would leave either
    side with no scored position."""
    training, check, first = [], [], 0
    for batch in measured:
        seq_len = batch.input_ids.shape[1]
        window = first + torch.arange(batch.scored.shape[0], device=batch.scored.device) // seq_len
        held = window % every == every - 1
        training.append(dataclasses.replace(batch, scored=batch.scored & ~held))
        check.append(dataclasses.replace(batch, scored=batch.scored & held))
        first += batch.windows
    training, check = [b for b in training if b.scored.any()], [b for b in check if b.scored.any()]
    return (training, check) if training and check else (measured, [])


def held_back_check(lens: Lens, check: list[EffectBatch], top: int) -> dict:
    """How much of each head's measured effect the lens predicts on the `check` batches (held out of its fit and
    training): 1 - residual / measured energy in the KL's metric (to second order, the share of the effect's KL
    explained), per "layer.head", as the fit reports it for its own held-back windows."""
    if not check:
        return {"every": TRAIN_HELD_BACK, "windows": 0, "positions": 0, "recovered_median": None,
                "recovered_by_head": {}}
    problem = kl_problem(lens, check, top)
    layers, heads = lens.config.layers, lens.config.heads
    maps = torch.cat([lens.kind_spec.affine_map(lens, layer)[0] for layer in layers]).detach().float().cpu()
    recovered = 1 - residual_energy(problem, maps) / residual_energy(problem, torch.zeros_like(maps)).clamp_min(1e-30)
    names = [f"{layer}.{head}" for layer in layers for head in heads]
    return {"every": TRAIN_HELD_BACK, "windows": int(problem.windows.unique().numel()), "positions": problem.positions,
            "recovered_median": float(recovered.median()),
            "recovered_by_head": {name: round(float(value), 4) for name, value in zip(names, recovered)}}


def train_effect(lens: Lens, data: DataConfig, config: EffectTrainConfig,
                 on_progress: Callable[[int, int], None] | None = None,
                 on_step: Callable[[int, int, float], None] | None = None,
                 on_note: Callable[[str], None] | None = None) -> dict:
    """Measure effects on the training split of `data`, fit the effect lens in closed form, then train it on
    KL(P || softmax(log P_ablated + E)); records how in `lens.config.training` and returns that record.
    `on_note` hears each stage as it starts (scoring all measured batches takes minutes on a CPU)."""
    if not lens.kind_spec.reads_effects:
        raise AttentionLensError(f"the effect objective trains effect lenses; got a {lens.kind} lens (use kind effect)")
    check_train_config(config)
    note = on_note or (lambda text: None)
    measured = list(measured_batches(lens.model, data, lens.config.layers, config.effects, on_progress, split="train"))
    dtype = DTYPES[config.effects.dtype]
    # The KL-metric fit guards itself: each head keeps dla unless its fit reads held-back windows better. Only the
    # least-squares fit, and training, need the KL of the whole measurement (minutes of scoring per pass).
    scored = not (config.fit and config.fit_metric == "kl" and config.epochs == 0)
    # Trained, the lens keeps every TRAIN_HELD_BACK-th window out of the fit and of Adam, and is checked on them
    # afterwards (the fit's own held-back check describes the fit, not what Adam makes of it).
    training, check = split_windows(measured, TRAIN_HELD_BACK) if config.epochs > 0 else (measured, [])

    def loss() -> float:
        return torch.stack([effect_kl_step(lens, b, config.effects.block_rows, dtype) for b in training]).mean().item()

    start_loss, start, fitted, fit_loss, chosen = None, "initial", 0, None, {}
    if scored:
        note("scoring the lens as it starts (KL per scored head-token, all measured batches)")
        start_loss = loss()
        note(f"start: KL {start_loss:.6f}")
    if config.fit:
        initial = {name: t.clone() for name, t in lens.state_dict().items()}
        if config.fit_metric == "kl":
            note(f"fitting in the KL's metric (top {config.top} tokens), a ridge strength per head on held-back windows")
            kl_fit = fit_effect_lens_kl(lens, training, config.top, on_note=note)
            fitted, chosen = kl_fit.positions, kl_fit.summary()
        else:
            fitted = fit_effect_lens(lens, training, config.ridge)
        start = "fit"
        note(f"fitted on {fitted} positions")
        if scored:
            fit_loss = loss()
            note(f"fit: KL {fit_loss:.6f}")
            if fit_loss > start_loss:  # least squares weighs every logit alike; KL may prefer where we started
                lens.load_state_dict(initial)
                start = "initial (the fit was worse in KL)"
                note("the fit is worse in KL than the start: training from the start")
    final_loss = start_loss if fit_loss is None else min(start_loss, fit_loss)  # where training starts
    if start != "fit" or config.epochs > 0:
        # The held-back shares describe the fitted maps; a lens restored to its start or trained on no longer has
        # them, and decode must not mark (or clear) its heads by them.
        chosen.pop("held_back_recovered_by_head", None)
    held_back = None
    if config.epochs > 0:
        train_effect_lens(lens, training, config.epochs, config.lr, config.effects.block_rows, dtype, on_step)
        note("scoring the trained lens")
        final_loss = loss()
        held_back = held_back_check(lens, check, config.top)
        if held_back["positions"]:
            note(f"on the {held_back['windows']} held-back windows the trained lens predicted a median "
                 f"{held_back['recovered_median']:.2f} of its heads' effects")
    tokens = sum(int(b.scored.sum()) for b in training)
    record = {"objective": "effect", "data": dataclasses.asdict(data), "effects": dataclasses.asdict(config.effects),
              "epochs": config.epochs, "lr": config.lr, "fit": config.fit, "fit_metric": config.fit_metric,
              "top": config.top, "ridge": config.ridge, "fit_choice": chosen,
              "start": start, "tokens_seen": tokens, "fit_tokens": fitted, "start_loss": start_loss,
              "fit_loss": fit_loss, "final_loss": final_loss}
    if held_back is not None:
        record["held_back"] = held_back
    lens.config.training = record
    return record

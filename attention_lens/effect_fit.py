"""The effect lens's closed-form fit in the KL's own metric: a ridge regression of each head's measured logit change
onto its (z_h - z̄_h) / sigma_final, weighted as the effect score weighs a logit change, shrunk toward dla.

To second order, KL(P || softmax(log P + d)) = 1/2 Var_P(d): a wrong logit change counts in proportion to the
probability the model puts on that token, and a constant per position drops out. A least-squares fit that weighs
every vocabulary token alike (`fit_effect_lens`) spends the map on tokens the model never predicts. Only the `top`
tokens of P per position enter (SmolLM2 on SOTU: the top 128 hold a median 92% of P), so the metric at a position
is low-rank: B_p (top, d_model), the P-centred rows of W_U diag(gamma) C times sqrt(p). Per head, the fit minimizes

    sum_p || B_p M^T u_p - y_p ||^2  +  strength * scale * || M - W_O ||^2

with y_p the measured logit change at those tokens, centred and weighted the same way. The penalty pulls toward
dla (M = W_O), not toward zero: where the measured effect does not carry to held-back text, the lens stays dla.
Each head's strength is picked on held-back windows of the training data (every `held_back`-th window), from a
grid, dla itself included. It is solved by conjugate gradients, all heads at once, preconditioned by the Kronecker
approximation (sum_p u_p u_p^T) x mean_p B_p^T B_p + ridge; nothing is ever (d_head * d_model)^2.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable

import torch
from torch import Tensor

from .errors import AttentionLensError
from .lens import Lens
from .replay import EffectBatch

STRENGTHS = (100.0, 10.0, 1.0, 0.1)
"""Ridge strengths tried per head, strongest first (each solve starts from the previous one). On SmolLM2 with 2,032
training positions, 0.01 was picked for 7 of 270 heads and cost 4 of the fit's 10 minutes: left out."""
CHUNK = 256
"""Positions per step of the normal operator (its (positions, d_model, heads) temporaries)."""


@dataclass
class Problem:
    """The weighted regression of every (layer, lens head), layer-major, over a set of scored positions."""

    metric: Tensor
    """(positions, top, d_model): B_p, the KL's metric at each position, restricted to P's top tokens."""
    inputs: Tensor
    """(positions, head, d_head): u = (z_h - z̄_h) / sigma_final."""
    targets: Tensor
    """(positions, top, head): the measured change of the logits, clean minus ablated, centred and weighted."""
    windows: Tensor
    """(positions,): which window each position comes from (numbered across batches)."""

    def take(self, keep: Tensor) -> Problem:
        return Problem(self.metric[keep], self.inputs[keep], self.targets[keep], self.windows[keep])

    @property
    def positions(self) -> int:
        return self.metric.shape[0]

    @cached_property
    def right_hand_side(self) -> Tensor:
        """The normal equations' right-hand side without the ridge (normal_target): one pass, whatever the
        strength (the held-back choice solves the same problem once per strength)."""
        return normal_target(self)

    @cached_property
    def conditioning(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The ridge's scale per head and the eigenbases of the preconditioner's Kronecker factors (penalty_scale):
        (scale, input values, input vectors, metric values, metric vectors), computed once per problem."""
        scale, inputs_moment, metric_moment = penalty_scale(self)
        input_values, input_vectors = torch.linalg.eigh(inputs_moment.double())
        metric_values, metric_vectors = torch.linalg.eigh(metric_moment.double())
        return scale, input_values, input_vectors, metric_values, metric_vectors


def kl_problem(lens: Lens, measured: Iterable[EffectBatch], top: int) -> Problem:
    """The regression of `lens`'s layers and heads on the measured batches' scored positions."""
    model, heads = lens.model, lens.config.heads
    unembed = model.unembed
    lens_rows = unembed.center(unembed.W_U.float() * unembed.gamma.float())  # (vocab, d_model): W_U diag(gamma) C
    top = min(top, unembed.vocab)
    metrics, inputs, targets, windows, first_window = [], [], [], [], 0
    for batch in measured:
        keep = batch.scored
        seq_len = batch.input_ids.shape[1]
        log_p, ids = batch.clean_log_probs(model)[keep].topk(top, dim=-1)  # (positions, top)
        p = log_p.exp()
        mass = p.sum(-1, keepdim=True)
        rows = lens_rows[ids]  # (positions, top, d_model)
        metrics.append(_weighted_centred(rows, p, mass))
        inputs.append(torch.cat([batch.dla_input(layer, keep)[:, heads] for layer in lens.config.layers], 1))
        change = torch.cat([_change_at(model, batch, layer, heads, ids, keep) for layer in lens.config.layers], -1)
        targets.append(_weighted_centred(-change, p, mass))  # (positions, top, head)
        windows.append(first_window + torch.nonzero(keep)[:, 0] // seq_len)
        first_window += batch.windows
    if not metrics or sum(m.shape[0] for m in metrics) == 0:
        raise AttentionLensError("no scored positions to fit the effect lens on")
    return Problem(torch.cat(metrics), torch.cat(inputs).float(), torch.cat(targets), torch.cat(windows))


def _weighted_centred(values: Tensor, p: Tensor, mass: Tensor) -> Tensor:
    """sqrt(p) * (values - their P-mean over the top tokens): squared norms of the result are P-variances.
    values (positions, top, n), p (positions, top), mass (positions, 1)."""
    mean = (p[..., None] * values).sum(1, keepdim=True) / mass[..., None]
    return p.sqrt()[..., None] * (values - mean)


def _change_at(model, batch: EffectBatch, layer: int, heads: list[int], ids: Tensor, keep: Tensor) -> Tensor:
    """(positions, top, head): log P_ablated - log P up to a constant per position, at the tokens `ids`, as
    EffectBatch.logit_change computes it (the soft-cap included), but only there."""
    unembed = model.unembed
    readout = unembed.W_U.float()[ids]  # (positions, top, d_model)
    delta = batch.layers[layer].delta[heads][:, keep].float().permute(1, 2, 0)  # (positions, d_model, head)
    change = torch.bmm(readout, delta)
    if unembed.softcap is None:
        return change
    clean = torch.einsum("ptm,pm->pt", readout, batch.final[keep].float())[..., None]
    if unembed.b_U is not None:
        clean = clean + unembed.b_U.float()[ids][..., None]
    return unembed.capped_change(clean, change)


# ----- the solver ---------------------------------------------------------------------------------------


def normal_product(problem: Problem, maps: Tensor) -> Tensor:
    """sum_p u_p (B_p^T B_p M_h^T u_p)^T per head: the data term's Hessian (halved) applied to maps (head, d_head,
    d_model)."""
    out = torch.zeros_like(maps)
    for start in range(0, problem.positions, CHUNK):
        metric, inputs = problem.metric[start:start + CHUNK], problem.inputs[start:start + CHUNK]
        written = torch.einsum("phd,hdm->pmh", inputs, maps)  # (positions, d_model, head)
        pulled = torch.bmm(metric.transpose(1, 2), torch.bmm(metric, written))
        out += torch.einsum("phd,pmh->hdm", inputs, pulled)
    return out


def normal_target(problem: Problem) -> Tensor:
    """sum_p u_p (B_p^T y_p)^T per head, (head, d_head, d_model)."""
    out = torch.zeros(problem.inputs.shape[1], problem.inputs.shape[2], problem.metric.shape[2])
    for start in range(0, problem.positions, CHUNK):
        pulled = torch.bmm(problem.metric[start:start + CHUNK].transpose(1, 2), problem.targets[start:start + CHUNK])
        out += torch.einsum("phd,pmh->hdm", problem.inputs[start:start + CHUNK], pulled)
    return out


def residual_energy(problem: Problem, maps: Tensor) -> Tensor:
    """sum_p || B_p M_h^T u_p - y_p ||^2 per head: twice the KL left unexplained, to second order."""
    out = torch.zeros(problem.inputs.shape[1])
    for start in range(0, problem.positions, CHUNK):
        rows = slice(start, start + CHUNK)
        out += miss_energy(problem, rows, torch.einsum("phd,hdm->pmh", problem.inputs[rows], maps))
    return out


def miss_energy(problem: Problem, rows: slice, written: Tensor) -> Tensor:
    """sum_p || B_p w_p - y_p ||^2 per head over positions `rows`, for any predicted writes w (positions, d_model,
    head): `residual_energy`'s term, also for readers that are not linear maps."""
    miss = torch.bmm(problem.metric[rows], written) - problem.targets[rows]  # (positions, top, head)
    return miss.pow(2).sum((0, 1))


def penalty_scale(problem: Problem) -> tuple[Tensor, Tensor, Tensor]:
    """Per head: the scale that makes the ridge strength unit-free (its mean input variance times the metric's mean
    diagonal, times positions), and the Kronecker factors of the preconditioner."""
    inputs_moment = torch.einsum("phd,phe->hde", problem.inputs, problem.inputs)  # (head, d_head, d_head)
    metric_moment = torch.zeros(problem.metric.shape[2], problem.metric.shape[2])
    for start in range(0, problem.positions, CHUNK):
        chunk = problem.metric[start:start + CHUNK]
        metric_moment += torch.einsum("ptm,ptn->mn", chunk, chunk)
    metric_moment /= max(1, problem.positions)
    scale = torch.diagonal(inputs_moment, dim1=1, dim2=2).mean(-1) * torch.diagonal(metric_moment).mean()
    return scale.clamp_min(1e-12), inputs_moment, metric_moment


def solve(problem: Problem, strength: Tensor, anchor: Tensor, start: Tensor | None = None,
          iterations: int = 100, tolerance: float = 1e-2) -> Tensor:
    """The ridge solution per head (head, d_head, d_model) by preconditioned conjugate gradients, from `start`
    (default the anchor) until every head's residual is below `tolerance` of its right-hand side."""
    scale, input_values, input_vectors, metric_values, metric_vectors = problem.conditioning
    ridge = (strength * scale)[:, None, None]
    # The Hessian sum_p (u_p u_p^T) ⊗ (B_p^T B_p) + ridge is close to S ⊗ A_bar + ridge (S = sum_p u_p u_p^T,
    # A_bar = mean_p B_p^T B_p), whose inverse is exact in the two eigenbases: divide by s_i a_j + ridge.
    spectrum = (input_values.clamp_min(0)[:, :, None] * metric_values.clamp_min(0)[None, None, :]
                + ridge.double() + 1e-9 * scale.double()[:, None, None]).float()  # (head, d_head, d_model)
    input_vectors, metric_vectors = input_vectors.float(), metric_vectors.float()

    def precondition(r: Tensor) -> Tensor:
        rotated = input_vectors.transpose(1, 2) @ r @ metric_vectors
        return input_vectors @ (rotated / spectrum) @ metric_vectors.T

    target = problem.right_hand_side + ridge * anchor
    maps = (anchor if start is None else start).clone()
    residual = target - normal_product(problem, maps) - ridge * maps
    target_norm = target.norm(dim=(1, 2)).clamp_min(1e-30)
    preconditioned = precondition(residual)
    direction = preconditioned.clone()
    rz = (residual * preconditioned).sum((1, 2))
    for _ in range(iterations):
        if (residual.norm(dim=(1, 2)) / target_norm).max() < tolerance:
            break
        product = normal_product(problem, direction) + ridge * direction
        curvature = (direction * product).sum((1, 2))
        step = torch.where(curvature > 0, rz / curvature.clamp_min(1e-30), torch.zeros_like(rz))[:, None, None]
        maps += step * direction
        residual -= step * product
        preconditioned = precondition(residual)
        rz_next = (residual * preconditioned).sum((1, 2))
        direction = preconditioned + (rz_next / rz.clamp_min(1e-30))[:, None, None] * direction
        rz = rz_next
    return maps


# ----- the fit ------------------------------------------------------------------------------------------


@dataclass
class KLFit:
    """What the fit chose, per (layer, lens head), layer-major."""

    strength: Tensor
    """(head,): the ridge strength picked on held-back windows; inf where dla itself did best there."""
    held_back_recovered: Tensor
    """(head,): 1 - residual / measured energy on the held-back windows, at the picked strength (to second
    order, the share of the effect's KL explained on text the fit did not see)."""
    positions: int
    heads: list[tuple[int, int]]
    """(layer, head) of each entry, layer-major."""

    def summary(self) -> dict:
        """For the lens's training record: how many heads kept dla, the strengths picked, the held-back share
        (median, and per head as "layer.head" where there were windows to hold back: decode shows it)."""
        finite = torch.isfinite(self.strength)
        picked = self.strength[finite].tolist()
        known = torch.isfinite(self.held_back_recovered)
        recovered = self.held_back_recovered[known]
        return {"positions": self.positions, "heads_kept_dla": int((~finite).sum()),
                "strengths": {f"{value:g}": picked.count(value) for value in sorted(set(picked))},
                "held_back_recovered_median": float(recovered.median()) if recovered.numel() else None,
                "held_back_recovered_by_head": {f"{layer}.{head}": round(float(value), 4) for (layer, head), value, ok
                                                in zip(self.heads, self.held_back_recovered, known) if ok}}


def fit_effect_lens_kl(lens: Lens, measured: Iterable[EffectBatch], top: int = 128, held_back: int = 4,
                       strengths: tuple[float, ...] = STRENGTHS, iterations: int = 100,
                       on_note: Callable[[str], None] | None = None) -> KLFit:
    """Set every head of an effect `lens` to its KL-metric ridge fit toward dla (module docstring), each head's
    strength picked on every `held_back`-th window; with fewer than two windows there is nothing to hold back and
    the middle strength is used."""
    if not lens.kind_spec.reads_effects:
        raise AttentionLensError(f"fit_effect_lens_kl fits effect lenses; got a {lens.kind} lens")
    note = on_note or (lambda text: None)
    model, layers, heads = lens.model, lens.config.layers, lens.config.heads
    problem = kl_problem(lens, measured, top)
    anchor = model.W_O[layers][:, heads].flatten(0, 1).float().cpu()  # (layer * head, d_head, d_model): dla
    maps, strength, recovered = fit_maps(problem, anchor, held_back, strengths, iterations, note)
    for index, layer in enumerate(layers):
        part = maps[index * len(heads):(index + 1) * len(heads)]
        lens.set_layer("delta", layer, part.to(model.device) - model.W_O[layer, heads])
    return KLFit(strength=strength, held_back_recovered=recovered, positions=problem.positions,
                 heads=[(layer, head) for layer in layers for head in heads])


def fit_maps(problem: Problem, anchor: Tensor, held_back: int = 4, strengths: tuple[float, ...] = STRENGTHS,
             iterations: int = 100, note: Callable[[str], None] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Each head's map (head, d_head, d_model) fitted toward `anchor` on all of `problem`, at the strength that did
    best on every `held_back`-th window (pick_strengths; the anchor itself where it won), that strength and its
    held-back share. With nothing to hold back, the middle strength and a NaN share."""
    note = note or (lambda text: None)
    check = held_back_windows(problem.windows, held_back)
    n_heads = anchor.shape[0]
    if not check.any() or check.all():
        strength = torch.full((n_heads,), strengths[len(strengths) // 2])
        recovered, start = torch.full((n_heads,), float("nan")), anchor
    else:
        strength, recovered, start = pick_strengths(problem.take(~check), problem.take(check), anchor, strengths,
                                                    iterations, note)
    finite = torch.isfinite(strength)
    maps = anchor.clone()
    if finite.any():
        note(f"refitting on all {problem.positions} positions")
        maps = solve(problem, torch.where(finite, strength, torch.full_like(strength, 1e6)), anchor, start=start,
                     iterations=iterations)
        maps[~finite] = anchor[~finite]
    return maps, strength, recovered


def held_back_windows(windows: Tensor, held_back: int = 4) -> Tensor:
    """(positions,) bool: the positions of every `held_back`-th window, which fit_maps picks strengths on
    (held_back < 2: all or none, no choice)."""
    return windows % max(held_back, 1) == held_back - 1


def pick_strengths(fit: Problem, check: Problem, anchor: Tensor, strengths: tuple[float, ...], iterations: int,
                    note: Callable[[str], None]) -> tuple[Tensor, Tensor, Tensor]:
    """Per head, the strength whose fit on `fit` leaves the least residual on `check` (inf: dla, M = W_O), that
    held-back share, and the fit itself (where the refit on all positions starts)."""
    measured = residual_energy(check, torch.zeros_like(anchor)).clamp_min(1e-30)
    best = residual_energy(check, anchor)
    chosen = torch.full_like(best, float("inf"))
    maps, best_maps = anchor, anchor.clone()
    for strength in sorted(strengths, reverse=True):
        maps = solve(fit, torch.full_like(best, strength), anchor, start=maps, iterations=iterations)
        left = residual_energy(check, maps)
        better = left < best
        best, chosen = torch.where(better, left, best), torch.where(better, torch.full_like(chosen, strength), chosen)
        best_maps[better] = maps[better]
        note(f"ridge {strength:g}: better on the held-back windows for {int(better.sum())} heads")
    return chosen, 1 - best / measured, best_maps

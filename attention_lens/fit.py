"""Closed-form affine lenses: per-head ridge regression of z_h onto the normalized final residual."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .data import DataConfig
from .errors import AttentionLensError
from .kinds import kind_names
from .lens import Lens
from .stream import HeadStream


@dataclass
class FitConfig:
    """How the closed-form fit runs."""

    tokens: int = 65_536
    """Token budget for the statistics."""
    batch_size: int = 8
    """Windows per forward pass."""
    ridge: float = 1e-2
    """Ridge strength, relative to the mean variance of each head's z_h."""
    seed: int = 0
    """Seeds the data order."""
    skip_positions: int = 1
    """Leading positions of each window left out: position 0 is an attention sink with massive activations."""
    constant_steps: int = 25
    """L-BFGS iterations for the best constant lens b*."""


@dataclass
class FitReport:
    tokens: int
    constant_kl: float
    """KL of the best constant predictor to the mean next-token distribution (its own fit), nats."""


@dataclass
class _Moments:
    """Running float64 sums for one layer's heads: enough for centered least squares."""

    count: int
    sum_z: Tensor  # (head, d_head)
    sum_t: Tensor  # (d_model,)
    zz: Tensor  # (head, d_head, d_head)
    zt: Tensor  # (head, d_head, d_model)


@torch.no_grad()
def fit(lens: Lens, data: DataConfig, config: FitConfig, on_batch: Callable[[int], None] | None = None) -> FitReport:
    """Set every head of an affine `lens` to its ridge solution, with the bias at the best constant lens; record
    how (data, split, tokens, seed, settings) in `lens.config.training`.

    Target: the final residual normalized as the final norm does (C r / sigma(r)), so the positions with
    massive activations do not dominate, and a lens vector x ~ target decodes like the model. Then
    x_h = z_h M_h + b_h with M_h = (Cov(z) + lambda I)^-1 Cov(z, t) and b_h = b* - mean(z_h) M_h: at its average
    input every head predicts the best constant distribution, and deviations carry what the head knows.
    """
    if not lens.kind_spec.closed_form:
        raise AttentionLensError(f"fit makes {' or '.join(kind_names(closed_form=True))} lenses; got a {lens.kind} lens")
    model = lens.model
    if data.seq_len <= config.skip_positions:
        raise AttentionLensError(f"`seq_len` must exceed the {config.skip_positions} skipped leading positions")
    stream = HeadStream(model, data, lens.config.layers, split="train", seed=config.seed,
                        batch_size=config.batch_size, final_residual=True)
    moments = {layer: _empty_moments(lens) for layer in lens.config.layers}
    mean_p = torch.zeros(model.vocab, dtype=torch.float64, device=model.device)
    sum_target = torch.zeros(model.d_model, dtype=torch.float64, device=model.device)
    seen = 0
    for batch in stream:
        keep = slice(config.skip_positions, None)
        residual = batch.capture.final_residual[:, keep].flatten(0, 1)  # (tokens, d_model)
        target = model.unembed.center(residual) / model.unembed.scale(residual)[:, None]
        mean_p += torch.softmax(batch.logits[:, keep].flatten(0, 1).float(), dim=-1).sum(0).double()
        sum_target += target.sum(0).double()
        for _, layer, z in batch.layers(lens.config.layers):
            z = z[:, keep][..., lens.config.heads, :].flatten(0, 1)  # (tokens, head, d_head)
            _accumulate(moments[layer], z.double(), target.double())
        seen += residual.shape[0]
        if on_batch is not None:
            on_batch(seen)
        if seen >= config.tokens:
            break
    constant, constant_kl = best_constant(model, (mean_p / seen).float(), config.constant_steps,
                                          start=(sum_target / seen).float())
    for layer in lens.config.layers:
        _solve_into(lens, layer, moments[layer], constant, config.ridge)
    lens.config.training = {"method": "fit", "data": dataclasses.asdict(data), "split": "train",
                            **dataclasses.asdict(config), "tokens_seen": seen, "constant_kl_train": constant_kl}
    return FitReport(tokens=seen, constant_kl=constant_kl)


def _empty_moments(lens: Lens) -> _Moments:
    heads, d_head, d_model = len(lens.config.heads), lens.config.d_head, lens.config.d_model
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=lens.model.device)  # noqa: E731
    return _Moments(0, zeros(heads, d_head), zeros(d_model), zeros(heads, d_head, d_head), zeros(heads, d_head, d_model))


def _accumulate(moments: _Moments, z: Tensor, target: Tensor) -> None:
    moments.count += z.shape[0]
    moments.sum_z += z.sum(0)
    moments.sum_t += target.sum(0)
    moments.zz += torch.einsum("thd,the->hde", z, z)
    moments.zt += torch.einsum("thd,tm->hdm", z, target)


@torch.no_grad()
def _solve_into(lens: Lens, layer: int, moments: _Moments, constant: Tensor, ridge: float) -> None:
    n = moments.count
    mean_z, mean_t = moments.sum_z / n, moments.sum_t / n
    cov_zz = moments.zz / n - torch.einsum("hd,he->hde", mean_z, mean_z)
    cov_zt = moments.zt / n - torch.einsum("hd,m->hdm", mean_z, mean_t)
    d_head = cov_zz.shape[-1]
    # Ridge relative to each head's own scale: heads differ in loudness by orders of magnitude.
    strength = ridge * torch.diagonal(cov_zz, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    eye = torch.eye(d_head, dtype=cov_zz.dtype, device=cov_zz.device)
    M = torch.linalg.solve(cov_zz + strength[:, None, None] * eye, cov_zt)  # (head, d_head, d_model)
    b = constant.double() - torch.einsum("hd,hdm->hm", mean_z, M)
    lens.kind_spec.set_affine(lens, layer, M, b)


def best_constant(model, mean_p: Tensor, steps: int = 25, start: Tensor | None = None) -> tuple[Tensor, float]:
    """The unit-rms vector b* whose logits W_U norm(b*) best match the mean distribution (min KL).

    L-BFGS from `start`; fit passes the mean normalized final residual, whose logits already resemble the mean
    distribution (SmolLM2: 1.41 nats from there; 25 iterations reach 0.30, where 300 Adam steps from a
    least-squares start stopped at 0.38). Without a start: the unembedding rows weighted by mean_p.
    """
    unembed = model.unembed
    neg_entropy = (mean_p * torch.log(mean_p.clamp_min(1e-30))).sum()
    if start is None:
        # The unembedding rows weighted by how much more probable than uniform their token is. (The least-squares
        # preimage of log mean_p often led L-BFGS to a worse stationary point on tiny random models.)
        start = (unembed.W_U * unembed.gamma).T @ (mean_p - 1 / mean_p.numel())
    b = start.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([b], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def kl() -> Tensor:
        optimizer.zero_grad()
        loss = neg_entropy - (mean_p * torch.log_softmax(unembed(b), dim=-1)).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(kl)
    b = b.detach()
    loss = neg_entropy - (mean_p * torch.log_softmax(unembed(b), dim=-1)).sum()
    return unembed.center(b) / unembed.scale(b), loss.item()

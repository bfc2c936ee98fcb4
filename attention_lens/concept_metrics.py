"""What an intervention does to a concept: the model's next-token metrics on a set of windows (Metrics, measure)
and their change against the unmodified model (Effect, compare, effect)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .intervene import Head, HeadIntervention, Intervention
from .models import Model


@dataclass
class Metrics:
    """The model's next-token behaviour on a set of windows (means over target positions)."""

    concept_logprob: float
    """Mean log p(target) where the target is a concept token."""
    other_logprob: float
    """Mean log p(target) where it is not."""
    concept_mass: float
    """Mean total probability of the concept tokens, over all positions."""
    loss: float
    """Mean next-token loss (nats) over all positions."""
    concept_targets: int
    other_targets: int
    per_window: Tensor | None = field(default=None, repr=False)
    """(window, 4) float64: summed log p of concept targets, their count, summed log p of other targets, their
    count; what a bootstrap over windows resamples. Measured with frequency-matching weights: (window, 6), the
    other targets' weighted log p and their summed weight added."""
    matched_logprob: float | None = None
    """Mean log p(target) over the other targets weighted to the concept targets' token frequencies
    (verify.frequency_matched_weights); None when measured without weights."""

    @staticmethod
    def from_sums(per_window: Tensor, mass: float) -> "Metrics":
        """Metrics from `per_window` (window, 4 or 6) sums (see the field) and the concept's summed probability
        mass over all scored positions."""
        sums = per_window.double().cpu()
        totals = sums.sum(0).tolist()
        concept, n_concept, other, n_other = totals[:4]
        n_concept, n_other = int(n_concept), int(n_other)
        matched = totals[4] / totals[5] if len(totals) == 6 and totals[5] > 0 else None
        return Metrics(concept_logprob=concept / max(n_concept, 1), other_logprob=other / max(n_other, 1),
                       concept_mass=mass / max(n_concept + n_other, 1),
                       loss=-(concept + other) / max(n_concept + n_other, 1),
                       concept_targets=n_concept, other_targets=n_other, per_window=sums, matched_logprob=matched)

    def to_json(self) -> dict:
        record = {"concept_logprob": self.concept_logprob, "other_logprob": self.other_logprob,
                  "concept_mass": self.concept_mass, "loss": self.loss, "concept_targets": self.concept_targets,
                  "other_targets": self.other_targets}
        if self.matched_logprob is not None:
            record["matched_logprob"] = self.matched_logprob
        return record


def target_sums(target_log_p: Tensor, targets: Tensor, ids: Tensor, other_weights: Tensor | None) -> Tensor:
    """`Metrics.per_window`'s sums (..., window, 4 or 6) from log p(target) (..., window, pos) at `targets`
    (window, pos): concept targets are those in `ids`; with `other_weights` (vocab,), the weighted sums of the
    other targets too."""
    is_concept = torch.isin(targets, ids)
    weights = [is_concept.double(), (~is_concept).double()]  # (window, pos) each
    if other_weights is not None:
        weights.append(other_weights.to(target_log_p.device, torch.float64)[targets] * ~is_concept)
    columns = []
    for weight in weights:  # each kind of target: its weighted log p, its weight
        columns += [(target_log_p * weight).sum(-1), weight.sum(-1).expand(target_log_p.shape[:-1])]
    return torch.stack(columns, -1)


@torch.no_grad()
def measure(model: Model, windows: Tensor, concept_ids: Sequence[int], batch_size: int = 4,
            other_weights: Tensor | None = None) -> Metrics:
    """Metrics of whatever forward pass the model currently runs (hooks included) on `windows`; with
    `other_weights` (verify.frequency_matched_weights), the frequency-matched log p too."""
    ids = torch.tensor(list(concept_ids), device=model.device)
    per_window, mass = [], 0.0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(model.device)
        logits = model.hf(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (batch, pos - 1, vocab)
        log_p = torch.log_softmax(logits, dim=-1)
        targets = batch[:, 1:]
        target_log_p = log_p.gather(-1, targets[..., None])[..., 0].double()  # (batch, pos - 1)
        per_window.append(target_sums(target_log_p, targets, ids, other_weights))
        mass += torch.logsumexp(log_p[..., ids], dim=-1).exp().sum().item()
    return Metrics.from_sums(torch.cat(per_window), mass)


@dataclass
class Effect:
    """What an intervention on `heads` changed, against the unmodified model on the same windows."""

    heads: list[Head]
    metrics: Metrics
    concept_drop: float
    """Drop in mean log p(concept target), nats (positive: the concept got less likely)."""
    other_drop: float
    """Drop in mean log p(non-concept target): generic damage."""
    mass_change: float
    """Relative change of the concept's total probability mass (-0.5: halved)."""
    loss_change: float
    """Change in overall next-token loss, nats: collateral damage."""

    matched_drop: float | None = None
    """Drop in the frequency-matched mean log p of non-concept targets (Metrics.matched_logprob); None without it."""

    @property
    def specific_drop(self) -> float:
        return self.concept_drop - self.other_drop

    @property
    def matched_specific_drop(self) -> float | None:
        """Concept drop minus the drop on other targets as frequent as the concept's: specificity that generic
        damage to rare (or common) tokens cannot imitate."""
        return None if self.matched_drop is None else self.concept_drop - self.matched_drop

    def to_json(self) -> dict:
        record = {"heads": [f"{layer}.{head}" for layer, head in self.heads], "concept_drop": self.concept_drop,
                  "other_drop": self.other_drop, "specific_drop": self.specific_drop,
                  "mass_change": self.mass_change, "loss_change": self.loss_change,
                  "concept_logprob": self.metrics.concept_logprob, "concept_mass": self.metrics.concept_mass,
                  "loss": self.metrics.loss}
        if self.matched_drop is not None:
            record["matched_drop"] = self.matched_drop
            record["matched_specific_drop"] = self.matched_specific_drop
        return record


@torch.no_grad()
def effect(model: Model, heads: Sequence[Head], edit: Intervention, windows: Tensor, concept_ids: Sequence[int],
           clean: Metrics, means: Tensor | None = None) -> Effect:
    """Apply `edit` (prepared here) to `heads` while measuring `windows`; compare with the `clean` metrics."""
    chosen = list(heads)
    with HeadIntervention(model, chosen, edit.prepared(model, chosen, windows, means)):
        metrics = measure(model, windows, concept_ids)
    return compare(chosen, metrics, clean)


def compare(heads: Sequence[Head], metrics: Metrics, clean: Metrics) -> Effect:
    """What an intervention on `heads` that measured `metrics` changed against the `clean` metrics."""
    return Effect(heads=list(heads), metrics=metrics,
                  concept_drop=clean.concept_logprob - metrics.concept_logprob,
                  other_drop=clean.other_logprob - metrics.other_logprob,
                  mass_change=metrics.concept_mass / clean.concept_mass - 1 if clean.concept_mass else 0.0,
                  loss_change=metrics.loss - clean.loss,
                  matched_drop=None if clean.matched_logprob is None or metrics.matched_logprob is None
                  else clean.matched_logprob - metrics.matched_logprob)

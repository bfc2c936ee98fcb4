"""Interventions on heads: zero, mean-replace or scale chosen heads' z_h in the forward pass; measure the effect.

The edit happens where the lens reads: a forward pre-hook on the attention output projection rewrites the
chosen heads' slices of its input, the concatenated z. Under Gemma-2/3's post-attention norm that input is
z *before* the norm, so the norm's per-position scale is recomputed from the edited block output: removing
a head also rescales what the other heads of its layer write (the model's own arithmetic, not an artefact).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from .data import DataConfig
from .errors import AttentionLensError
from .models import Model
from .stream import HeadStream

MAX_SCALE = 1e6
"""Largest |factor| a scale edit may multiply a head's output by (fp32 overflows not far beyond)."""

Head = tuple[int, int]
"""(layer, head)."""


@dataclass(frozen=True)
class Edit:
    """What happens to a chosen head's z_h: 'zero', 'mean' (its mean over the corpus), or 'scale' by `factor`."""

    mode: str
    factor: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "Edit":
        """'zero', 'mean' or 'scale=X' (X may be negative: -1 flips what the head writes)."""
        name, _, value = text.strip().partition("=")
        if name in ("zero", "mean") and not value:
            return cls(name)
        if name == "scale":
            try:
                factor = float(value)
            except ValueError:
                factor = None
            if factor is not None:
                if not (math.isfinite(factor) and abs(factor) <= MAX_SCALE):
                    raise AttentionLensError(f"scale={value}: the factor must be a finite number from "
                                             f"-{MAX_SCALE:g} to {MAX_SCALE:g}")
                return cls("scale", factor)
        raise AttentionLensError(f"`mode` {text!r}: use zero, mean, or scale=X (e.g. scale=-1, scale=3)")

    def __str__(self) -> str:
        return f"scale={self.factor:g}" if self.mode == "scale" else self.mode


def parse_heads(text: str, model: Model) -> list[Head]:
    """'12.3,14.0' -> [(12, 3), (14, 0)], checked against the model."""
    heads: list[Head] = []
    for part in text.split(","):
        layer, dot, head = part.strip().partition(".")
        if not (dot and layer.isdigit() and head.isdigit()):
            raise AttentionLensError(f"`heads` {text!r}: use LAYER.HEAD pairs like 12.3,14.0")
        pair = (int(layer), int(head))
        if pair[0] >= model.n_layers or pair[1] >= model.n_heads:
            raise AttentionLensError(f"head {part.strip()} is out of range: the model has {model.n_layers} layers "
                                     f"x {model.n_heads} heads (0-{model.n_layers - 1}.0-{model.n_heads - 1})")
        if pair not in heads:
            heads.append(pair)
    return heads


class HeadIntervention:
    """Context manager: while active, every forward pass applies `edit` to the z_h of `heads`.

    `means` (layer, head, d_head) is needed for mode 'mean': the raw projection inputs, from `HeadMeans`.
    """

    def __init__(self, model: Model, heads: Iterable[Head], edit: Edit, means: Tensor | None = None):
        if edit.mode == "mean" and means is None:
            raise AttentionLensError("mean ablation needs the heads' mean outputs over a corpus (HeadMeans)")
        self.model, self.edit, self.means = model, edit, means
        self.by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            self.by_layer.setdefault(layer, []).append(head)
        self._handles: list = []

    def __enter__(self) -> "HeadIntervention":
        for layer, heads in self.by_layer.items():
            hook = self._hook(layer, heads)
            self._handles.append(self.model.out_proj(layer).register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int, heads: list[int]):
        model, edit = self.model, self.edit

        def hook(module, args):
            z = args[0].unflatten(-1, (model.n_heads, model.d_head)).clone()  # (batch, pos, head, d_head)
            for head in heads:
                if edit.mode == "zero":
                    z[..., head, :] = 0
                elif edit.mode == "mean":
                    z[..., head, :] = self.means[layer, head].to(z.dtype)
                else:
                    z[..., head, :] *= edit.factor
            return (z.flatten(-2), *args[1:])

        return hook


class HeadMeans:
    """Context manager: records the mean of every head's z_h (raw projection input) over the forward passes."""

    def __init__(self, model: Model):
        self.model = model
        self.total = torch.zeros(model.n_layers, model.n_heads, model.d_head, dtype=torch.float64,
                                 device=model.device)
        self.count = 0
        self._handles: list = []

    def __enter__(self) -> "HeadMeans":
        for layer in range(self.model.n_layers):
            self._handles.append(self.model.out_proj(layer).register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int):
        def hook(module, args):
            z = args[0].unflatten(-1, (self.model.n_heads, self.model.d_head))  # (batch, pos, head, d_head)
            self.total[layer] += z.double().sum((0, 1))
            if layer == 0:
                self.count += z.shape[0] * z.shape[1]

        return hook

    @property
    def means(self) -> Tensor:
        """(layer, head, d_head), fp32."""
        return (self.total / max(self.count, 1)).float()


def concept_windows(model: Model, data: DataConfig, concept_ids: Sequence[int], tokens: int,
                    seed: int = 0) -> Tensor:
    """Windows (window, seq_len) of held-out text in which a concept token is a true next token somewhere.

    Concept tokens are rare in running text; keeping only windows that hold one gives the measurement
    enough target positions for the same forward-pass budget. Held-out documents (all documents when
    data.holdout is 0) keep the text the heads are verified on apart from the text they were found on.
    """
    stream = HeadStream(model, data, split="held" if data.holdout > 0 else "all", seed=seed)
    ids = torch.tensor(list(concept_ids))
    kept: list[Tensor] = []
    for window in stream.windows():
        if torch.isin(window[1:], ids).any():
            kept.append(window)
        if len(kept) * data.seq_len >= tokens:
            break
    if not kept:
        raise AttentionLensError("no concept token occurs as a next token in the held-out text; "
                                 "use more data, other words, or `holdout` 0")
    return torch.stack(kept)


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


@torch.no_grad()
def measure(model: Model, windows: Tensor, concept_ids: Sequence[int], batch_size: int = 4) -> Metrics:
    """Metrics of whatever forward pass the model currently runs (hooks included) on `windows`."""
    ids = torch.tensor(list(concept_ids), device=model.device)
    sums = dict(concept=0.0, other=0.0, mass=0.0, n_concept=0, n_other=0)
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(model.device)
        logits = model.hf(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (batch, pos - 1, vocab)
        log_p = torch.log_softmax(logits, dim=-1)
        targets = batch[:, 1:]
        target_log_p = log_p.gather(-1, targets[..., None])[..., 0]  # (batch, pos - 1)
        is_concept = torch.isin(targets, ids)
        sums["concept"] += target_log_p[is_concept].sum().item()
        sums["other"] += target_log_p[~is_concept].sum().item()
        sums["mass"] += torch.logsumexp(log_p[..., ids], dim=-1).exp().sum().item()
        sums["n_concept"] += int(is_concept.sum())
        sums["n_other"] += int((~is_concept).sum())
    n_concept, n_other = sums["n_concept"], sums["n_other"]
    return Metrics(concept_logprob=sums["concept"] / max(n_concept, 1), other_logprob=sums["other"] / max(n_other, 1),
                   concept_mass=sums["mass"] / (n_concept + n_other),
                   loss=-(sums["concept"] + sums["other"]) / (n_concept + n_other),
                   concept_targets=n_concept, other_targets=n_other)


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

    @property
    def specific_drop(self) -> float:
        return self.concept_drop - self.other_drop

    def to_json(self) -> dict:
        return {"heads": [f"{layer}.{head}" for layer, head in self.heads], "concept_drop": self.concept_drop,
                "other_drop": self.other_drop, "specific_drop": self.specific_drop,
                "mass_change": self.mass_change, "loss_change": self.loss_change,
                "concept_logprob": self.metrics.concept_logprob, "concept_mass": self.metrics.concept_mass,
                "loss": self.metrics.loss}


@dataclass
class AblationResult:
    """An intervention on chosen heads, and the same intervention on random heads for comparison."""

    edit: Edit
    clean: Metrics
    found: Effect
    random: list[Effect]

    def verify_record(self) -> dict:
        """found vs random: drops, their spread, z-score, specificity, collateral, and how many targets."""
        drops = [e.concept_drop for e in self.random]
        specific = [e.specific_drop for e in self.random]
        mean, std = _mean_std(drops)
        specific_mean, specific_std = _mean_std(specific)
        return {
            "found_drop": self.found.concept_drop, "random_drop_mean": mean, "random_drop_std": std,
            "specificity": self.found.specific_drop, "z_score": _z(self.found.concept_drop, mean, std),
            "collateral_loss_change": self.found.loss_change,
            "random_specificity_mean": specific_mean, "random_specificity_std": specific_std,
            "specificity_z_score": _z(self.found.specific_drop, specific_mean, specific_std),
            "random_loss_change_mean": _mean_std([e.loss_change for e in self.random])[0],
            "found_mass_change": self.found.mass_change,
            "heads": [f"{layer}.{head}" for layer, head in self.found.heads], "mode": str(self.edit),
            "repeats": len(self.random), "concept_targets": self.clean.concept_targets,
            "other_targets": self.clean.other_targets, "clean_loss": self.clean.loss,
        }


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _z(value: float, mean: float | None, std: float | None) -> float | None:
    """None where the random spread is zero or unknown: no finite z-score exists (and JSON has no inf)."""
    if mean is None or not std:
        return None
    return (value - mean) / std


@torch.no_grad()
def ablate(model: Model, heads: Sequence[Head], concept_ids: Sequence[int], windows: Tensor, edit: Edit,
           repeats: int = 0, seed: int = 0, on_pass: Callable[[int, int], None] | None = None) -> AblationResult:
    """Apply `edit` to `heads`, then to `repeats` draws of as many random other heads; measure each pass.

    Random heads are drawn from the heads not chosen, so the baseline says what editing *other* heads does.
    Means for mode 'mean' come from the unmodified pass over the same windows.
    """
    if not heads:
        raise AttentionLensError("no heads to intervene on; give `heads` like 12.3,14.0")
    passes = 2 + repeats
    with HeadMeans(model) as recorder:
        clean = measure(model, windows, concept_ids)
    means = recorder.means
    if on_pass:
        on_pass(1, passes)

    def effect(chosen: list[Head]) -> Effect:
        with HeadIntervention(model, chosen, edit, means):
            metrics = measure(model, windows, concept_ids)
        return Effect(heads=chosen, metrics=metrics,
                      concept_drop=clean.concept_logprob - metrics.concept_logprob,
                      other_drop=clean.other_logprob - metrics.other_logprob,
                      mass_change=metrics.concept_mass / clean.concept_mass - 1 if clean.concept_mass else 0.0,
                      loss_change=metrics.loss - clean.loss)

    found = effect(list(heads))
    if on_pass:
        on_pass(2, passes)
    pool = [(layer, head) for layer in range(model.n_layers) for head in range(model.n_heads)
            if (layer, head) not in set(heads)]
    if repeats and len(pool) < len(heads):
        raise AttentionLensError(f"the model has too few other heads for a random baseline of {len(heads)} heads")
    rng = random.Random(seed)
    drawn = []
    for repeat in range(repeats):
        drawn.append(effect(sorted(rng.sample(pool, len(heads)))))
        if on_pass:
            on_pass(3 + repeat, passes)
    return AblationResult(edit=edit, clean=clean, found=found, random=drawn)


@torch.no_grad()
def greedy(model: Model, prompt: str, max_new_tokens: int = 30) -> str:
    """Greedy continuation of `prompt` under whatever hooks are active (no cache: hooks see every position)."""
    ids = model.encode(prompt)
    eos = getattr(model.tokenizer, "eos_token_id", None)
    for _ in range(max_new_tokens):
        next_id = model.hf(input_ids=ids, use_cache=False).logits[0, -1].argmax()
        if eos is not None and int(next_id) == eos:
            break
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return model.tokenizer.decode(ids[0, model.encode(prompt).shape[1]:].tolist())


def generate(model: Model, prompt: str, heads: Sequence[Head], edit: Edit,
             max_new_tokens: int = 30) -> tuple[str, str]:
    """(unmodified, intervened) greedy continuations of `prompt`, so a person can see what the heads do."""
    if edit.mode == "mean":
        raise AttentionLensError("generate needs no corpus, so it has no head means: use `mode` zero or scale=X")
    plain = greedy(model, prompt, max_new_tokens)
    with HeadIntervention(model, heads, edit):
        edited = greedy(model, prompt, max_new_tokens)
    return plain, edited

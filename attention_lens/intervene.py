"""Interventions on heads: zero, mean-replace, resample or scale chosen heads' z_h in the forward pass; measure it.

The edit happens where the lens reads: a forward pre-hook on the attention output projection rewrites the
chosen heads' slices of its input, the concatenated z. Under Gemma-2/3's post-attention norm that input is
z *before* the norm, so the norm's per-position scale is recomputed from the edited block output: removing
a head also rescales what the other heads of its layer write (the model's own arithmetic, not an artefact).

Each kind of intervention is a class in INTERVENTIONS; `Intervention.parse('scale=-1')` picks one by its name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar, Iterable, Sequence

import torch
from torch import Tensor

from .errors import AttentionLensError
from .models import Model

MAX_SCALE = 1e6
"""Largest |factor| a scale edit may multiply a head's output by (fp32 overflows not far beyond)."""

Head = tuple[int, int]
"""(layer, head)."""


@dataclass(frozen=True)
class Intervention(ABC):
    """What happens to a chosen head's z_h. Subclasses: Zero, Mean, Resample, Scale (the registry INTERVENTIONS)."""

    name: ClassVar[str]
    usage: ClassVar[str]
    needs_corpus: ClassVar[bool] = False
    """Whether it draws on measured windows (so `generate`, which has none, cannot use it)."""
    needs_means: ClassVar[bool] = False
    """Whether `prepared` needs every head's mean output over the measured windows (HeadMeans)."""

    @classmethod
    def from_value(cls, value: str) -> "Intervention":
        """The intervention from the text after '=' ('' when there is none)."""
        if value:
            raise AttentionLensError(f"`mode` {cls.name} takes no value; use {cls.usage}")
        return cls()

    @staticmethod
    def parse(text: str) -> "Intervention":
        """'zero', 'mean', 'resample' or 'scale=X' (X may be negative: -1 flips what the head writes)."""
        name, _, value = text.strip().partition("=")
        kind = INTERVENTIONS.get(name.strip())
        if kind is None:
            raise AttentionLensError(f"`mode` {text!r}: use " + ", ".join(k.usage for k in INTERVENTIONS.values())
                                     + " (e.g. scale=-1, scale=5)")
        return kind.from_value(value.strip())

    def prepared(self, model: Model, heads: Sequence[Head], windows: Tensor | None, means: Tensor | None,
                 batch_size: int = 4) -> "Intervention":
        """This intervention with what it needs from the unmodified model on `windows` (a copy; self if nothing)."""
        return self

    @abstractmethod
    def new_z(self, z: Tensor, layer: int, head: int, rows: slice) -> Tensor:
        """The head's replacement z_h (batch, pos, d_head) for the windows `rows` of the measured set."""

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Zero(Intervention):
    """The head writes nothing."""

    name: ClassVar[str] = "zero"
    usage: ClassVar[str] = "zero"

    def new_z(self, z, layer, head, rows):
        return torch.zeros_like(z)


@dataclass(frozen=True)
class Mean(Intervention):
    """The head writes its mean z_h over the measured windows (what it says on average, not on this input)."""

    name: ClassVar[str] = "mean"
    usage: ClassVar[str] = "mean"
    needs_corpus: ClassVar[bool] = True
    needs_means: ClassVar[bool] = True
    means: Tensor | None = field(default=None, compare=False, repr=False)
    """(layer, head, d_head): raw projection inputs, from `HeadMeans`."""

    def prepared(self, model, heads, windows, means, batch_size=4):
        if means is None:
            raise AttentionLensError("mean ablation needs the heads' mean outputs over a corpus (HeadMeans)")
        return replace(self, means=means)

    def new_z(self, z, layer, head, rows):
        if self.means is None:
            raise AttentionLensError("mean ablation needs the heads' mean outputs over a corpus (HeadMeans)")
        return self.means[layer, head].to(z.dtype).expand_as(z)


@dataclass(frozen=True)
class Resample(Intervention):
    """The head writes what it wrote on another measured window (window i gets window i + 1's z_h, cyclically):
    a plausible output that carries no information about this input."""

    name: ClassVar[str] = "resample"
    usage: ClassVar[str] = "resample"
    needs_corpus: ClassVar[bool] = True
    donors: dict = field(default_factory=dict, compare=False, repr=False)
    """(layer, head) -> (window, pos, d_head): the donor z_h for each measured window, in measured order."""

    def prepared(self, model, heads, windows, means, batch_size=4):
        if windows is None or windows.shape[0] < 2:
            raise AttentionLensError("resample needs at least two measured windows to take a head's output from "
                                     "another one; use zero, mean or scale=X here")
        taken: dict[Head, list[Tensor]] = {head: [] for head in heads}

        def record(layer: int):
            def hook(module, args):  # the raw projection input, as the edit hook sees it
                z = args[0].unflatten(-1, (model.n_heads, model.d_head))  # (batch, pos, head, d_head)
                for pair in taken:
                    if pair[0] == layer:
                        taken[pair].append(z[:, :, pair[1]].detach().cpu())
            return hook

        handles = [model.out_proj(layer).register_forward_pre_hook(record(layer))
                   for layer in sorted({layer for layer, _ in heads})]
        try:
            with torch.no_grad():
                for start in range(0, windows.shape[0], batch_size):
                    model.hf(input_ids=windows[start:start + batch_size].to(model.device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        donors = {pair: torch.cat(parts).roll(-1, dims=0) for pair, parts in taken.items()}
        return replace(self, donors=donors)

    def new_z(self, z, layer, head, rows):
        donor = self.donors.get((layer, head))
        if donor is None:
            raise AttentionLensError("resample needs the measured windows; it has no donor outputs for this head")
        return donor[rows].to(z.device, z.dtype)


@dataclass(frozen=True)
class Scale(Intervention):
    """The head's output times `factor`: -1 inverts it, 0 removes it, > 1 amplifies (steers toward) it."""

    name: ClassVar[str] = "scale"
    usage: ClassVar[str] = "scale=X"
    factor: float = 1.0

    @classmethod
    def from_value(cls, value):
        return cls(factor=_factor(cls.name, value))

    def new_z(self, z, layer, head, rows):
        return z * self.factor

    def __str__(self) -> str:
        return f"scale={self.factor:g}"


@dataclass(frozen=True)
class Amplify(Intervention):
    """The head's output moved `factor` times as far from its mean: z̄ + factor (z - z̄). Where `scale` multiplies
    all of z_h, this multiplies only what the head writes on this input beyond what it writes on every input: 0 is
    mean ablation, 1 leaves the head alone, > 1 steers toward what it carries here, and the constant part of its
    output, which later layers are tuned to, stays as it is."""

    name: ClassVar[str] = "amplify"
    usage: ClassVar[str] = "amplify=X"
    needs_corpus: ClassVar[bool] = True
    needs_means: ClassVar[bool] = True
    factor: float = 1.0
    means: Tensor | None = field(default=None, compare=False, repr=False)
    """(layer, head, d_head): raw projection inputs, from `HeadMeans`."""

    @classmethod
    def from_value(cls, value):
        return cls(factor=_factor(cls.name, value))

    def prepared(self, model, heads, windows, means, batch_size=4):
        if means is None:
            raise AttentionLensError("amplify needs the heads' mean outputs over a corpus (HeadMeans)")
        return replace(self, means=means)

    def new_z(self, z, layer, head, rows):
        if self.means is None:
            raise AttentionLensError("amplify needs the heads' mean outputs over a corpus (HeadMeans)")
        mean = self.means[layer, head].to(z.dtype)
        return mean + self.factor * (z - mean)

    def __str__(self) -> str:
        return f"amplify={self.factor:g}"


def _factor(name: str, value: str) -> float:
    """The number after `name`=, checked: finite and at most MAX_SCALE in size."""
    try:
        factor = float(value)
    except ValueError:
        raise AttentionLensError(f"`mode` {name}={value}: give a number, e.g. {name}=-1 or {name}=5") from None
    if not (math.isfinite(factor) and abs(factor) <= MAX_SCALE):
        raise AttentionLensError(f"{name}={value}: the factor must be a finite number from "
                                 f"-{MAX_SCALE:g} to {MAX_SCALE:g}")
    return factor


INTERVENTIONS: dict[str, type[Intervention]] = {cls.name: cls for cls in (Zero, Mean, Resample, Scale, Amplify)}
"""Every kind of intervention by the name `--mode` takes."""


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

    The edit must be `prepared` where it needs data (Mean, Resample). Forward passes are counted in windows, so an
    edit that depends on the window (Resample) sees which rows of the measured set each batch holds.
    """

    def __init__(self, model: Model, heads: Iterable[Head], edit: Intervention):
        self.model, self.edit = model, edit
        self.by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            self.by_layer.setdefault(layer, []).append(head)
        self.rows = slice(0, 0)
        self._handles: list = []

    def __enter__(self) -> "HeadIntervention":
        self._handles.append(self.model.hf.register_forward_pre_hook(self._count, with_kwargs=True))
        for layer, heads in self.by_layer.items():
            self._handles.append(self.model.out_proj(layer).register_forward_pre_hook(self._hook(layer, heads)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _count(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        windows = 1 if input_ids is None else input_ids.shape[0]
        self.rows = slice(self.rows.stop, self.rows.stop + windows)

    def _hook(self, layer: int, heads: list[int]):
        model, edit = self.model, self.edit

        def hook(module, args):
            z = args[0].unflatten(-1, (model.n_heads, model.d_head)).clone()  # (batch, pos, head, d_head)
            for head in heads:
                z[..., head, :] = edit.new_z(z[..., head, :], layer, head, self.rows)
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


def generate(model: Model, prompt: str, heads: Sequence[Head], edit: Intervention,
             max_new_tokens: int = 30) -> tuple[str, str]:
    """(unmodified, intervened) greedy continuations of `prompt`, so a person can see what the heads do."""
    if edit.needs_corpus:
        raise AttentionLensError(f"generate needs no corpus, so it has nothing for {edit} to draw on: "
                                 "use `mode` zero or scale=X")
    plain = greedy(model, prompt, max_new_tokens)
    with HeadIntervention(model, heads, edit):
        edited = greedy(model, prompt, max_new_tokens)
    return plain, edited

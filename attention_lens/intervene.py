"""Interventions on heads: zero, mean-replace, resample, scale or amplify chosen heads' z_h in the forward pass.

The edit happens where the lens reads: a forward pre-hook on the attention output projection rewrites the
chosen heads' slices of its input, the concatenated z. Under Gemma-2/3's post-attention norm that input is
z *before* the norm, so the norm's per-position scale is recomputed from the edited block output: removing
a head also rescales what the other heads of its layer write (the model's own arithmetic, not an artefact).

Each kind of intervention is a class in INTERVENTIONS; `Intervention.parse('scale=-1')` picks one by its name.
What an intervention does to a concept is measured in concept_metrics.py.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import ClassVar, Iterable, Sequence

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
        return replace(self, means=_required_means(self, means))

    def new_z(self, z, layer, head, rows):
        return _required_means(self, self.means)[layer, head].to(z.dtype).expand_as(z)


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
        return replace(self, means=_required_means(self, means))

    def new_z(self, z, layer, head, rows):
        mean = _required_means(self, self.means)[layer, head].to(z.dtype)
        return mean + self.factor * (z - mean)

    def __str__(self) -> str:
        return f"amplify={self.factor:g}"


def _required_means(intervention: Intervention, means: Tensor | None) -> Tensor:
    """`means`, or one clear error where an intervention that replaces heads by their means was given none."""
    if means is None:
        raise AttentionLensError(f"{intervention.name} needs the heads' mean outputs over a corpus (HeadMeans)")
    return means


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

"""Typed per-head results: what decode, eval, specialize and search say about each head, and their JSON.

`to_json()` of each record gives exactly the keys the `--json` documents, the results files and the `/api/*`
answers have always had: they are contracts with programs. The faces (cli/render.py, notebook.py, report/, web/)
read these records; the analysis modules build them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenScore:
    """One of a head's top-k tokens on a prompt."""

    token: str
    id: int
    logit: float
    """The lens's logit; under the effect reading, the predicted logit change (= `change`)."""
    prob: float | None
    """The lens's probability; None under the effect reading (a change has no probability)."""
    promoted: float | None = None
    """Promoted reading: the lens's log-probability minus the prior's, log(q / prior), nats."""
    share: float | None = None
    """Promoted reading: the token's share of KL(lens || prior), q log(q / prior) (what it was ranked by)."""
    change: float | None = None
    """Effect reading: E_h = read(z_h) - read(z̄_h) for this token (what it was ranked by)."""

    def to_json(self) -> dict:
        record = {"token": self.token, "id": self.id, "logit": self.logit, "prob": self.prob}
        if self.promoted is not None:
            record["promoted"] = self.promoted
        if self.share is not None:
            record["share"] = self.share
        if self.change is not None:
            record["change"] = self.change
        return record

    def shown(self) -> str:
        """Its number as a table cell shows it: probability (raw), nats over the prior (promoted), or the predicted
        logit change (effect)."""
        if self.promoted is not None:
            return f"{self.promoted:+.1f}"
        if self.change is not None:
            return f"{self.change:+.2f}"
        return f"{self.prob:.0%}"


UNREAD_SHARE = 0.05
"""An effect reading that predicted less than this share of its head's measured effect on held-back training
windows is marked as not reading the head (decode, the report, the explorer): on SmolLM2 the largest-effect heads,
in layers 0-3 and 9-12, stay near 0 with every reading of z_h tried, linear or not (bench/RESULTS.md, "True
readings")."""


@dataclass
class HeadTop:
    """A head's top-k tokens at one position of a prompt (decode)."""

    layer: int
    head: int
    position: int
    top: list[TokenScore]
    """Best first."""
    held_back_recovered: float | None = None
    """Effect reading of an effect lens with a held-back check (fitted in the KL's metric, or trained): the share of
    the head's measured effect it predicted on held-back training windows (readings.held_back_shares); None
    otherwise, and then not in the JSON."""

    @property
    def unread(self) -> bool:
        """The effect reading predicted under UNREAD_SHARE of the head's measured effect on held-back text."""
        return self.held_back_recovered is not None and self.held_back_recovered < UNREAD_SHARE

    def to_json(self) -> dict:
        record = {"layer": self.layer, "head": self.head, "position": self.position,
                  "top": [entry.to_json() for entry in self.top]}
        if self.held_back_recovered is not None:
            record["held_back_recovered"] = self.held_back_recovered
        return record


@dataclass
class TopToken:
    """The token a head's lens most often ranks first over the scored positions, and the share it does so."""

    id: int
    token: str
    share: float | None

    def to_json(self) -> dict:
        return {"id": self.id, "token": self.token, "share": self.share}


@dataclass
class BaselineComparison:
    """A baseline's KL for one head, the head's gain over it (baseline KL - lens KL), their 95% intervals, and
    whether the whole interval of the gain clears the margin."""

    kl: float | None
    kl_low: float | None
    kl_high: float | None
    gain: float | None
    gain_low: float | None
    gain_high: float | None
    beats: bool

    def to_json(self) -> dict:
        return {"kl": self.kl, "kl_low": self.kl_low, "kl_high": self.kl_high, "gain": self.gain,
                "gain_low": self.gain_low, "gain_high": self.gain_high, "beats": self.beats}


@dataclass
class HeadScore:
    """One head's held-out fidelity (eval): nats and fractions over the scored non-sink positions."""

    layer: int
    head: int
    kl: float | None
    """Mean KL(model || lens), nats."""
    kl_low: float | None
    kl_high: float | None
    top1: float | None
    """Fraction of positions where the lens's top token is the model's."""
    top10: float | None
    """Mean overlap of the lens's and the model's top-10 tokens."""
    cross_entropy: float | None
    """Lens cross-entropy of the actual next token, nats."""
    entropy: float | None
    """Entropy of the lens's distribution, nats."""
    top_token: TopToken
    baselines: dict[str, BaselineComparison] = field(default_factory=dict)
    """Baseline name (logit, dla, uniform, constant) -> the comparison."""
    sink: dict[str, float | None] = field(default_factory=dict)
    """The same scores at the attention-sink positions, scored apart."""

    def to_json(self) -> dict:
        return {"layer": self.layer, "head": self.head, "kl": self.kl, "kl_low": self.kl_low,
                "kl_high": self.kl_high, "top1": self.top1, "top10": self.top10,
                "cross_entropy": self.cross_entropy, "entropy": self.entropy, "top_token": self.top_token.to_json(),
                "baselines": {name: b.to_json() for name, b in self.baselines.items()}, "sink": dict(self.sink)}


@dataclass
class PromotedToken:
    """A token a head promotes (specialize): how many scored positions it was the head's most promoted one."""

    id: int
    token: str
    count: int
    share: float
    token_class: str
    """Its class (token_classes.py): what descriptions are built from."""

    def to_json(self) -> dict:
        return {"id": self.id, "token": self.token, "count": self.count, "share": self.share,
                "class": self.token_class}


@dataclass
class HeadProfile:
    """What one head writes over a corpus (specialize)."""

    layer: int
    head: int
    positions: int
    """Scored positions."""
    entropy_bits: float
    """Entropy of the histogram of its most promoted token, bits."""
    top_mass: float
    """Share of positions whose most promoted token is one of `promoted`."""
    promoted: list[PromotedToken]
    """Most promoted first."""
    classes: dict[str, float]
    """Token class -> share of positions, largest first."""
    description: str
    group: int | None = None
    """Index of its group of similar heads, if any."""

    def to_json(self) -> dict:
        return {"layer": self.layer, "head": self.head, "positions": self.positions,
                "entropy_bits": self.entropy_bits, "top_mass": self.top_mass,
                "promoted": [p.to_json() for p in self.promoted], "classes": dict(self.classes),
                "description": self.description, "group": self.group}


@dataclass
class ConceptToken:
    """One concept token's lift for a head (search): its lens log-prob minus the head's mean log-prob, nats."""

    token: str
    id: int
    lift: float

    def to_json(self) -> dict:
        return {"token": self.token, "id": self.id, "lift": self.lift}


@dataclass
class ConceptHead:
    """A head ranked by how much it promotes a concept (search)."""

    layer: int
    head: int
    score: float
    """What heads are ranked by: the method's score for the concept over its mean for random token sets."""
    top_tokens: list[ConceptToken]
    concept_score: float | None = None
    """The method's score for the concept itself (lift in nats; pursuit: explained share of variance)."""
    control_mean: float | None = None
    """The same score for frequency-matched random token sets of the concept's size: their mean..."""
    control_std: float | None = None
    """... and standard deviation."""
    control_z: float | None = None
    """score / control_std: how far above the random sets the concept is."""

    def to_json(self) -> dict:
        out = {"layer": self.layer, "head": self.head, "score": self.score,
               "top_tokens": [t.to_json() for t in self.top_tokens]}
        for key in ("concept_score", "control_mean", "control_std", "control_z"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

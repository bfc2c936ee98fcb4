"""What a decoded head shows: raw lens tokens, tokens promoted over the lens's prior, or its predicted effect.

- raw:      the lens's own top tokens (its log-probabilities).
- promoted: the tokens that make up most of the lens's difference from the best constant prediction (the model's
            mean next-token distribution over the training text), ranked by q log(q / prior), each shown with
            log(q / prior): what this head's reading adds to the prior. A predictive lens mostly predicts the prior
            (" the", ",", "."), so its raw tokens say little about the head.
- effect:   the predicted effect E_h = read(z_h) - read(z̄_h), z̄_h the head's mean over the training text: the
            logit change the reading says removing the head would cause (the effect lens is trained for it).

The corpus statistics these need (the mean distribution, the heads' means) are computed once per model and
corpus and cached in the attention-lens cache directory.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .data import DataConfig
from .effects import head_means
from .errors import AttentionLensError
from .lens import Lens
from .models import Model
from .sources import CACHE_DIR
from .storage import read_tensors, write_tensors
from .stream import HeadStream

READINGS = ("raw", "promoted", "effect")
READING_LABELS = {
    "raw": "raw: the lens's own top tokens and their probabilities",
    "promoted": "promoted: the tokens this head adds over the prior (ranked by q log(q/prior); value: log-prob minus "
                "the best constant's, nats)",
    "effect": "effect: the predicted logit change if the head were removed, read(z) - read(mean z)",
}
"""What each reading shows, in the words the report and the explorer label their token grids with."""


@dataclass
class ChosenReading:
    """A reading with the corpus statistics it needs: `decode(model, lens, text, **chosen.decode_args())`."""

    name: str
    prior: Tensor | None = None
    """(vocab,) the prior's log-probabilities (promoted)."""
    means: Tensor | None = None
    """(layer, head, d_head) the heads' mean z (effect)."""

    @property
    def label(self) -> str:
        return READING_LABELS[self.name]

    def decode_args(self) -> dict:
        return {"reading": self.name, "prior": self.prior, "means": self.means}

    def to_json(self) -> dict:
        return {"name": self.name, "label": self.label}


def choose_reading(model: Model, lens: Lens, name: str | None = None, data: str | None = None) -> ChosenReading:
    """`name` (default: the lens kind's) with its statistics on `data` (default: see prior_data), computed once
    per model and corpus and cached."""
    name = check_reading(name) if name is not None else default_reading(lens)
    if name == "promoted":
        return ChosenReading(name, prior=prior_log_probs(model, prior_data(lens, data)))
    if name == "effect":
        return ChosenReading(name, means=cached_head_means(model, prior_data(lens, data)))
    return ChosenReading(name)


def held_back_shares(lens: Lens) -> dict[tuple[int, int], float]:
    """(layer, head) -> the share of the head's measured effect (its KL, to second order) that an effect lens
    predicted on training windows held back from it: a trained lens's check (`held_back`, effect_lens.train_effect),
    else the KL-metric fit's own; empty for lenses fitted otherwise, which have no such check."""
    training = lens.config.training
    if "held_back" in training:
        by_head = training["held_back"].get("recovered_by_head") or {}
    else:
        by_head = (training.get("fit_choice") or {}).get("held_back_recovered_by_head") or {}
    return {tuple(int(part) for part in key.split(".")): float(value) for key, value in by_head.items()}


def default_reading(lens: Lens) -> str:
    """The lens kind's: promoted for trained predictive lenses, effect for effect lenses, raw for logit and dla."""
    return lens.kind_spec.default_reading


def check_reading(reading: str) -> str:
    if reading not in READINGS:
        raise AttentionLensError(f"unknown reading {reading!r}; use {', '.join(READINGS)}")
    return reading


def prior_data(lens: Lens, data: str | None = None) -> DataConfig:
    """The text behind a reading's corpus statistics: `data`, else the lens's training data (its training side),
    else sotu."""
    trained = lens.config.training.get("data") or {}
    if data is None:
        data = trained.get("data", "sotu")
    holdout = trained.get("holdout", DataConfig.holdout) if data == trained.get("data") else DataConfig.holdout
    return DataConfig(data=data, holdout=holdout, seq_len=trained.get("seq_len", DataConfig.seq_len))


@torch.no_grad()
def prior_log_probs(model: Model, data: DataConfig, tokens: int = 4096, seed: int = 0) -> Tensor:
    """(vocab,) log of the model's mean next-token distribution on the training side of `data`: the best constant
    prediction in KL. Cached per model and corpus."""
    def compute() -> dict[str, Tensor]:
        stream = HeadStream(model, data, split="train" if data.holdout > 0 else "all", seed=seed,
                            windows=math.ceil(tokens / data.seq_len))
        total = torch.zeros(model.vocab, dtype=torch.float64, device=model.device)
        seen = 0
        for batch in stream.batches():
            logits = model.hf(input_ids=batch.to(model.device), use_cache=False).logits
            total += torch.softmax(logits.float(), dim=-1).flatten(0, 1).sum(0).double()
            seen += batch.numel()
        return {"log_prior": (total / seen).log().float().cpu()}

    return _cached(model, "prior", data, tokens, seed, compute)["log_prior"].to(model.device)


def cached_head_means(model: Model, data: DataConfig, tokens: int = 8192, seed: int = 0) -> Tensor:
    """(layer, head, d_head) mean raw z_h on the training side of `data`, cached per model and corpus."""
    def compute() -> dict[str, Tensor]:
        return {"means": head_means(model, data, tokens, 4, seed).cpu()}

    return _cached(model, "means", data, tokens, seed, compute)["means"].to(model.device)


def _cached(model: Model, what: str, data: DataConfig, tokens: int, seed: int, compute) -> dict[str, Tensor]:
    fingerprint = model.fingerprint()
    key = json.dumps({"what": what, "w_u": fingerprint["w_u_sha256"], "w_o": fingerprint["w_o_sha256"],
                      "data": data.data, "holdout": data.holdout, "seq_len": data.seq_len, "tokens": tokens,
                      "seed": seed}, sort_keys=True)
    path = CACHE_DIR / "readings" / f"{what}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"
    if path.is_file():
        try:
            return read_tensors(path, "delete it to recompute")[0]
        except AttentionLensError:
            path.unlink(missing_ok=True)
    tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(path, tensors, {"key": key})
    return tensors

"""Verification of concept heads: intervene on them over enough held-out concept targets, against layer-matched
random heads, with a bootstrap interval, a sweep over how many heads, and steering (amplify the heads)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from .concept_metrics import Effect, Metrics, compare, effect
from .data import DataConfig
from .errors import AttentionLensError
from .intervene import Amplify, Head, Intervention, Scale
from .models import Model
from .replay_edits import MAX_TOKENS, Edit, cost as edit_cost, measure_edits
from .scoring import frequency_bins, token_counts
from .stream import HeadStream

MIN_TARGETS = 400
"""Concept target positions a verification measures on by default: below a few hundred, the spread of random
draws (~0.1 nats) swamps any real effect."""
MIN_REPEATS = 20
"""Fewest random draws a verification may use: the 95th percentile needs at least 20."""
STEER_ALPHA = 5.0
"""How much verification amplifies the found heads to steer toward the concept (Head Pursuit's alpha)."""
STEER_MODES = ("scale", "amplify")
"""How the found heads are amplified: scale (all of z_h times alpha, as Head Pursuit does) or amplify (only z_h's
departure from its mean: z̄ + alpha (z - z̄), leaving the constant part later layers are tuned to; intervene.Amplify)."""


def steering(mode: str, alpha: float) -> Intervention:
    """The intervention that steers by `alpha` in `mode` (STEER_MODES)."""
    if mode not in STEER_MODES:
        raise AttentionLensError(f"unknown steering mode {mode!r}; use {' or '.join(STEER_MODES)}")
    return Scale(factor=alpha) if mode == "scale" else Amplify(factor=alpha)


@dataclass
class HeldWindows:
    """Held-out windows in which a concept token is a true next token, drawn until there were enough targets."""

    windows: Tensor
    """(window, seq_len) token ids."""
    drawn: int
    """Windows read from the held-out stream (kept or not) to find them."""
    targets: int
    """Concept target positions in `windows`."""
    other_weights: Tensor | None = None
    """(vocab,) weights that match the other targets' token frequencies to the concept targets'
    (frequency_matched_weights); None: no frequency-matched control."""


def held_windows(model: Model, data: DataConfig, concept_ids: Sequence[int], min_targets: int = MIN_TARGETS,
                 seed: int = 0, tokens: int = 0) -> HeldWindows:
    """Held-out windows holding a concept target, drawn in the stream's order until they hold `min_targets`
    concept target positions (and `tokens` tokens); one clear error when the held-out text cannot supply them.

    Concept tokens are rare in running text: keeping only windows that hold one gives the measurement its
    targets for the fewest forward passes. Held-out documents (all documents when data.holdout is 0) keep the
    text the heads are verified on apart from the text they were found on.
    """
    stream = HeadStream(model, data, split="held" if data.holdout > 0 else "all", seed=seed)
    ids = torch.tensor(list(concept_ids))
    kept: list[Tensor] = []
    drawn = targets = 0
    for window in stream.windows():
        drawn += 1
        found = int(torch.isin(window[1:], ids).sum())
        if found:
            kept.append(window)
            targets += found
        if targets >= min_targets and len(kept) * data.seq_len >= tokens:
            windows = torch.stack(kept)
            weights = frequency_matched_weights(concept_ids, token_counts(model, data, seed=seed), windows)
            return HeldWindows(windows=windows, drawn=drawn, targets=targets, other_weights=weights)
    where = "held-out text" if data.holdout > 0 else "text"
    if targets >= min_targets:
        raise AttentionLensError(f"the {where} has only {len(kept)} windows of {data.seq_len} tokens holding a "
                                 f"concept target ({len(kept) * data.seq_len} tokens, {targets} targets); --tokens "
                                 f"asks for {tokens}: use more data, a larger --holdout or fewer --tokens")
    raise AttentionLensError(f"the {where} holds only {targets} concept target positions (in {drawn} windows of "
                             f"{data.seq_len} tokens); --min-targets asks for {min_targets}: use more data, a "
                             "larger --holdout, more common words, or a lower --min-targets")


def frequency_matched_weights(concept_ids: Sequence[int], counts: Tensor, windows: Tensor) -> Tensor:
    """(vocab,) float64 weights that make the other (non-concept) targets of `windows` as frequent as its concept
    targets: tokens fall in the power-of-two bins of their `counts` (training side) that the concept control's
    random sets use (scoring.frequency_bins); an other target in bin b weighs (concept targets in b) / (other
    targets in b), 0 where no concept target falls. Removing heads can hurt rare and common tokens unequally
    (SmolLM2's eight countries heads: 0.35 vs 0.27 nats), so a concept of rare words would otherwise look specific
    wherever heads hurt rare tokens more."""
    bins = frequency_bins(counts)  # (vocab,)
    targets = windows[:, 1:].flatten().long()
    is_concept = torch.isin(targets, torch.tensor(list(concept_ids), dtype=torch.long))
    size = int(bins.max()) + 1
    n_concept = torch.bincount(bins[targets[is_concept]], minlength=size).double()
    n_other = torch.bincount(bins[targets[~is_concept]], minlength=size).double()
    per_bin = torch.where(n_other > 0, n_concept / n_other.clamp(min=1), torch.zeros_like(n_concept))
    weights = per_bin[bins]
    weights[list(concept_ids)] = 0.0
    return weights


def random_heads(model: Model, heads: Sequence[Head], rng: random.Random, layer_matched: bool = True) -> list[Head]:
    """As many random heads as `heads`, none of them; layer-matched: the same count in each layer."""
    chosen = set(heads)
    if not layer_matched:
        pool = [(layer, head) for layer in range(model.n_layers) for head in range(model.n_heads)
                if (layer, head) not in chosen]
        return sorted(rng.sample(pool, len(chosen)))
    drawn: list[Head] = []
    for layer in sorted({layer for layer, _ in chosen}):
        count = sum(1 for found_layer, _ in chosen if found_layer == layer)
        pool = [(layer, head) for head in range(model.n_heads) if (layer, head) not in chosen]
        drawn.extend(rng.sample(pool, count))
    return sorted(drawn)


def check_random_pool(model: Model, heads: Sequence[Head], layer_matched: bool) -> None:
    """One clear error where no random draw of the same shape as `heads` exists."""
    chosen = set(heads)
    if not layer_matched:
        if model.n_layers * model.n_heads - len(chosen) < len(chosen):
            raise AttentionLensError(f"the model has too few other heads for a random baseline of {len(chosen)} "
                                     "heads; choose fewer heads")
        return
    for layer in sorted({layer for layer, _ in chosen}):
        count = sum(1 for found_layer, _ in chosen if found_layer == layer)
        if model.n_heads - count < count:
            raise AttentionLensError(f"layer {layer} has {count} of its {model.n_heads} heads chosen and too few "
                                     "others for a layer-matched random baseline; choose fewer heads or turn "
                                     "layer matching off (--no-layer-matched)")


@dataclass
class AblationResult:
    """An intervention on chosen heads, and the same intervention on random heads for comparison."""

    edit: Intervention
    clean: Metrics
    found: Effect
    random: list[Effect]
    layer_matched: bool = True
    interval: tuple[float, float] | None = None
    """95% bootstrap interval (over windows) of the found heads' specific drop."""
    matched_interval: tuple[float, float] | None = None
    """The same for the frequency-matched specific drop (None without the frequency-matched control)."""
    held: HeldWindows | None = field(default=None, repr=False)
    steer: dict | None = None
    """The same heads amplified (a sweep with alpha): the concept's mass change and the loss change."""

    def verify_record(self) -> dict:
        """found vs random: drops, their spread, z-score, percentile, specificity with its interval, collateral,
        and how many targets (and windows) the measurement had."""
        drops = [e.concept_drop for e in self.random]
        specific = [e.specific_drop for e in self.random]
        mean, std = _mean_std(drops)
        specific_mean, specific_std = _mean_std(specific)
        record = {
            "k": len(self.found.heads),
            "found_drop": self.found.concept_drop, "random_drop_mean": mean, "random_drop_std": std,
            "specificity": self.found.specific_drop, "z_score": _z(self.found.concept_drop, mean, std),
            "percentile": _percentile(self.found.concept_drop, drops),
            "collateral_loss_change": self.found.loss_change,
            "random_specificity_mean": specific_mean, "random_specificity_std": specific_std,
            "specificity_z_score": _z(self.found.specific_drop, specific_mean, specific_std),
            "specificity_percentile": _percentile(self.found.specific_drop, specific),
            "specificity_interval": None if self.interval is None else list(self.interval),
            "random_loss_change_mean": _mean_std([e.loss_change for e in self.random])[0],
            "found_mass_change": self.found.mass_change,
            "heads": [f"{layer}.{head}" for layer, head in self.found.heads], "mode": str(self.edit),
            "repeats": len(self.random), "layer_matched": self.layer_matched,
            "concept_targets": self.clean.concept_targets, "other_targets": self.clean.other_targets,
            "clean_loss": self.clean.loss,
        }
        if self.found.matched_drop is not None:
            record.update(self._matched_record())
        if self.steer is not None:
            record["steer"] = self.steer
        if self.held is not None:
            record["windows"] = int(self.held.windows.shape[0])
            record["windows_drawn"] = self.held.drawn
        return record

    def _matched_record(self) -> dict:
        """The specificity keys again, with the other targets weighted to the concept targets' frequencies."""
        specific = [e.matched_specific_drop for e in self.random if e.matched_specific_drop is not None]
        mean, std = _mean_std(specific)
        weights = self.held.other_weights if self.held is not None else None
        return {"matched_specificity": self.found.matched_specific_drop, "matched_other_drop": self.found.matched_drop,
                "random_matched_specificity_mean": mean, "random_matched_specificity_std": std,
                "matched_specificity_z_score": _z(self.found.matched_specific_drop, mean, std),
                "matched_specificity_percentile": _percentile(self.found.matched_specific_drop, specific),
                "matched_specificity_interval": None if self.matched_interval is None else list(self.matched_interval),
                "matched_other_targets": None if weights is None else self._weighted_targets(weights)}

    def _weighted_targets(self, weights: Tensor) -> int:
        """Other targets that carry weight in the frequency-matched control."""
        targets = self.held.windows[:, 1:].flatten().long()
        return int((weights[targets] > 0).sum())


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


def _percentile(value: float, draws: Sequence[float]) -> float | None:
    """The empirical percentile of `value` among `draws` (ties count half): 100 = above every draw."""
    if not draws:
        return None
    below = sum(1.0 if d < value else 0.5 if d == value else 0.0 for d in draws)
    return 100.0 * below / len(draws)


def bootstrap_specific_drop(clean: Metrics, edited: Metrics, replicates: int = 1000, seed: int = 0,
                            level: float = 0.95, matched: bool = False) -> tuple[float, float] | None:
    """A percentile interval of the specific drop (concept drop minus other drop; `matched`: minus the
    frequency-matched other drop), resampling whole windows: positions within a window are not independent,
    windows are."""
    if clean.per_window is None or edited.per_window is None or clean.per_window.shape[0] < 2 or replicates < 1:
        return None
    if matched and (clean.per_window.shape[1] < 6 or edited.per_window.shape[1] < 6):
        return None
    other = slice(4, 6) if matched else slice(2, 4)
    clean_sums, edited_sums = (torch.cat([m.per_window[:, :2], m.per_window[:, other]], 1) for m in (clean, edited))
    generator = torch.Generator().manual_seed(seed)
    n = clean_sums.shape[0]
    picks = torch.randint(0, n, (replicates, n), generator=generator)  # (replicate, window)
    a, b = clean_sums[picks].sum(1), edited_sums[picks].sum(1)  # (replicate, 4)
    keep = (a[:, 1] > 0) & (a[:, 3] > 0)
    a, b = a[keep], b[keep]
    if not len(a):
        return None
    specific = (a[:, 0] - b[:, 0]) / a[:, 1] - (a[:, 2] - b[:, 2]) / a[:, 3]
    low, high = torch.quantile(specific, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=specific.dtype))
    return float(low), float(high)


def random_draws(model: Model, heads: Sequence[Head], repeats: int, seed: int = 0,
                 layer_matched: bool = True) -> list[list[Head]]:
    """`repeats` draws of as many random other heads as `heads` (a fresh Random(seed) for each set of heads)."""
    if not repeats:
        return []
    check_random_pool(model, heads, layer_matched)
    rng = random.Random(seed)
    return [random_heads(model, heads, rng, layer_matched) for _ in range(repeats)]


@dataclass
class SweepPlan:
    """Every intervention a sweep measures: for each k, the top k heads then their random draws; then steering
    each k's heads."""

    ks: list[int]
    found: list[list[Head]]
    drawn: list[list[list[Head]]]
    edits: list[Edit]
    steer_alpha: float | None

    def cost(self, model: Model) -> float:
        """Forward-equivalents the sweep runs over its windows (one full forward pass over them: 1)."""
        return edit_cost(model, self.edits)


def plan_sweep(model: Model, ranked: Sequence[Head], ks: Sequence[int], edit: Intervention, repeats: int = 0,
               seed: int = 0, layer_matched: bool = True, alpha: float | None = None,
               steer_mode: str = "scale") -> SweepPlan:
    """What `sweep` will measure (its random draws included), without measuring it."""
    found, drawn, edits = [], [], []
    for k in ks:
        heads = list(ranked[:k])
        if not heads:
            raise AttentionLensError("no heads to intervene on; give `heads` like 12.3,14.0")
        found.append(heads)
        drawn.append(random_draws(model, heads, repeats, seed, layer_matched))
        edits.extend(Edit(tuple(chosen), edit) for chosen in [heads, *drawn[-1]])
    if alpha is not None:  # every k: one head can steer cleanly where eight break the model
        edits.extend(Edit(tuple(heads), steering(steer_mode, alpha)) for heads in found)
    return SweepPlan(ks=list(ks), found=found, drawn=drawn, edits=edits, steer_alpha=alpha)


@torch.no_grad()
def sweep(model: Model, ranked: Sequence[Head], ks: Sequence[int], concept_ids: Sequence[int],
          windows: Tensor | HeldWindows, edit: Intervention, repeats: int = 0, seed: int = 0,
          layer_matched: bool = True, bootstrap: int = 1000, alpha: float | None = None,
          on_windows: Callable[[int], None] | None = None,
          max_tokens: int = MAX_TOKENS, steer_mode: str = "scale") -> tuple[list[AblationResult], dict | None]:
    """For every k in `ks`: apply `edit` to the top k of `ranked`, then to `repeats` draws of as many random other
    heads (layer-matched: the same count in each layer); bootstrap the found heads' specific drop over windows.
    With `alpha`, also amplify each k's heads by alpha (steering, in each result's `steer`; `steer_mode`: see
    STEER_MODES). Returns one result per k and the largest k's steering record (None without alpha).

    Random heads are drawn from the heads not chosen, so the baseline says what editing *other* heads does.
    Means for mode 'mean' come from the unmodified model on the same windows. Everything is measured at once
    (replay_edits): one clean pass, and each intervention replays only the blocks from its earliest edited one.
    """
    held = windows if isinstance(windows, HeldWindows) else None
    tokens = held.windows if held is not None else windows
    plan = plan_sweep(model, ranked, ks, edit, repeats, seed, layer_matched, alpha, steer_mode)
    clean, measured = measure_edits(model, tokens, concept_ids, plan.edits, max_tokens=max_tokens,
                                    on_windows=on_windows, other_weights=held.other_weights if held else None)
    results, at = [], 0
    for found, drawn in zip(plan.found, plan.drawn):
        effects = [compare(heads, metrics, clean) for heads, metrics in zip([found, *drawn], measured[at:])]
        at += len(effects)
        interval = bootstrap_specific_drop(clean, effects[0].metrics, bootstrap, seed)
        matched = bootstrap_specific_drop(clean, effects[0].metrics, bootstrap, seed, matched=True)
        results.append(AblationResult(edit=edit, clean=clean, found=effects[0], random=effects[1:],
                                      layer_matched=layer_matched, interval=interval, matched_interval=matched,
                                      held=held))
    if alpha is None:
        return results, None
    for result, steered, metrics in zip(results, plan.edits[at:], measured[at:]):  # the edits measured, as recorded
        result.steer = _steer_record(steered.intervention, compare(steered.heads, metrics, clean), clean)
    return results, results[list(plan.ks).index(max(plan.ks))].steer


@torch.no_grad()
def ablate(model: Model, heads: Sequence[Head], concept_ids: Sequence[int], windows: Tensor | HeldWindows,
           edit: Intervention, repeats: int = 0, seed: int = 0, layer_matched: bool = True,
           bootstrap: int = 1000, on_windows: Callable[[int], None] | None = None) -> AblationResult:
    """Apply `edit` to `heads`, then to `repeats` draws of as many random other heads (see `sweep`, with k all
    of `heads`)."""
    if not heads:
        raise AttentionLensError("no heads to intervene on; give `heads` like 12.3,14.0")
    results, _ = sweep(model, heads, [len(heads)], concept_ids, windows, edit, repeats, seed, layer_matched,
                       bootstrap, on_windows=on_windows)
    return results[0]


def _steer_record(edit: Intervention, steered: Effect, clean: Metrics) -> dict:
    """edit: the Scale or Amplify that steered."""
    return {"alpha": edit.factor, "edit": str(edit), "heads": [f"{layer}.{head}" for layer, head in steered.heads],
            "clean_concept_mass": clean.concept_mass, "concept_mass": steered.metrics.concept_mass,
            "mass_change": steered.mass_change, "concept_logprob_change": -steered.concept_drop,
            "loss_change": steered.loss_change}


@torch.no_grad()
def steer(model: Model, heads: Sequence[Head], concept_ids: Sequence[int], windows: Tensor, clean: Metrics,
          alpha: float = STEER_ALPHA, mode: str = "scale", means: Tensor | None = None) -> dict:
    """Amplify `heads` by `alpha` (`mode`: STEER_MODES; amplify needs the heads' `means`, HeadMeans): how much the
    concept's probability mass rises, at what overall loss change."""
    edit = steering(mode, alpha)
    return _steer_record(edit, effect(model, heads, edit, windows, concept_ids, clean, means), clean)


@torch.no_grad()
def verify_ranking(model: Model, ranked: Sequence[Head], ks: Sequence[int], concept_ids: Sequence[int],
                   held: HeldWindows, edit: Intervention, repeats: int = MIN_REPEATS, seed: int = 0,
                   layer_matched: bool = True, bootstrap: int = 1000, alpha: float | None = STEER_ALPHA,
                   on_windows: Callable[[int], None] | None = None,
                   steer_mode: str = "scale") -> tuple[list[dict], dict | None]:
    """Verify the top k of `ranked` for every k in `ks` (`sweep`); steer with each k's heads.

    Returns one verify record per k (in the order of `ks`, each with its `steer`) and the largest k's steering
    record (None when alpha is None).
    """
    results, steered = sweep(model, ranked, ks, concept_ids, held, edit, repeats, seed, layer_matched, bootstrap,
                             alpha, on_windows, steer_mode=steer_mode)
    return [result.verify_record() for result in results], steered

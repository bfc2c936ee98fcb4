"""Ways to rank heads for a concept, one interface (`search --method`), each with its concept control: the same
score for frequency-matched random token sets of the concept's size, so a head counts only where it is far above.

- `pursuit`: simultaneous orthogonal matching pursuit of each head's centred outputs over the concept's rows of
  the unembedding (as in Head Pursuit, Basile et al. 2025), scored by the share of the head's variance explained.
- `attribution`: how much removing each head lowers log p of the concept where it is the true next token, to first
  order (attribution.py), over the same for frequency-matched random token sets: causal, and about the model's
  predictions of the concept rather than what a head writes everywhere.
- `effect`: the measured mean log-prob change of the concept tokens at every position when the head is removed.
- `lens`, `logit`, `dla`: a lens's lift of the concept (its log-prob minus the mean log-prob of a vocabulary token,
  averaged over positions), taken over the lift of the random sets: the lens's prior for tokens that common.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from .attribution import attributed_drops
from .concepts import Concept, search
from .data import DataConfig
from .effects import EffectsConfig, EffectTotals, measured_batches
from .errors import AttentionLensError
from .lens import Lens
from .models import Model
from .results import ConceptHead, ConceptToken
from .stream import HeadStream

CONTROL_SETS = 20
"""Frequency-matched random token sets each head's concept score is compared with."""
COUNT_TOKENS = 65_536
"""Tokens of the scoring side whose counts decide which tokens are 'as frequent' as a concept token."""
ATTRIBUTION_TARGETS = 256
"""Concept target positions (training side) the attribution method averages each head's drop over."""
ATTRIBUTION_CONTROL_TARGETS = 64
"""Target positions per random token set for the attribution method's control (its spread over sets shows how
noisy this is, and the control's z accounts for it)."""
PURSUIT_STEPS = 4
"""Atoms pursuit selects per head (fewer where the concept has fewer tokens): a sparse reading, as in Head Pursuit."""


@dataclass
class MethodResult:
    """Every head's score for a concept under one method, with the same score for random token sets."""

    method: str
    concept: Concept
    layers: list[int]
    heads: list[int]
    concept_score: Tensor
    """(layer, head): the method's score for the concept."""
    control: Tensor
    """(layer, head, set): the same score for each frequency-matched random token set."""
    token_scores: Tensor
    """(layer, head, concept token): what each concept token adds (lift, or pursuit's explained share)."""
    tokens: int

    @property
    def scores(self) -> Tensor:
        """(layer, head): the concept's score over the random sets' mean, what heads are ranked by."""
        return self.concept_score - self.control.mean(-1)

    @property
    def control_z(self) -> Tensor:
        """(layer, head): how many of the random sets' standard deviations the concept is above their mean."""
        return self.scores / self.control.std(-1).clamp_min(1e-12)

    def ranked(self) -> list[tuple[int, int]]:
        order = self.scores.flatten().argsort(descending=True, stable=True).tolist()
        return [(self.layers[i // len(self.heads)], self.heads[i % len(self.heads)]) for i in order]

    def records(self, top: int, tokenizer, tokens_per_head: int = 5) -> list[ConceptHead]:
        out = []
        for layer, head in self.ranked()[:top]:
            i, j = self.layers.index(layer), self.heads.index(head)
            detail = self.token_scores[i, j]
            best = detail.argsort(descending=True)[:tokens_per_head].tolist()
            tokens = [ConceptToken(token=tokenizer.decode([self.concept.ids[t]]), id=self.concept.ids[t],
                                   lift=round(float(detail[t]), 4)) for t in best]
            out.append(ConceptHead(layer=layer, head=head, score=round(float(self.scores[i, j]), 4),
                                   top_tokens=tokens, concept_score=round(float(self.concept_score[i, j]), 4),
                                   control_mean=round(float(self.control[i, j].mean()), 4),
                                   control_std=round(float(self.control[i, j].std()), 4),
                                   control_z=round(float(self.control_z[i, j]), 2)))
        return out


def token_counts(model: Model, data: DataConfig, tokens: int = COUNT_TOKENS, seed: int = 0) -> Tensor:
    """How often each vocabulary token occurs in the first `tokens` tokens of the training side (vocab,)."""
    counts = torch.zeros(model.vocab, dtype=torch.long)
    seen = 0
    for window in HeadStream(model, data, split="train", seed=seed).windows():
        counts += torch.bincount(window.clamp(0, model.vocab - 1), minlength=model.vocab)
        seen += window.numel()
        if seen >= tokens:
            break
    return counts


def frequency_bins(counts: Tensor) -> Tensor:
    """(vocab,) each token's power-of-two count bin: tokens in one bin are 'as frequent' as each other."""
    return torch.floor(torch.log2(counts.double() + 1)).long()


def control_sets(concept_ids: Sequence[int], counts: Tensor, sets: int = CONTROL_SETS, seed: int = 0) -> list[list[int]]:
    """`sets` random token sets as large as the concept, each token as frequent as the concept token it stands
    for (the same power-of-two count bin, widened to neighbouring bins where a bin runs out); no concept token."""
    bins = frequency_bins(counts)
    concept = set(concept_ids)
    by_bin: dict[int, list[int]] = {}
    for token, b in enumerate(bins.tolist()):
        if token not in concept:
            by_bin.setdefault(b, []).append(token)
    if sum(len(pool) for pool in by_bin.values()) < len(concept):
        raise AttentionLensError("the vocabulary is too small for random token sets as large as the concept")
    rng = random.Random(seed)
    out = []
    for _ in range(sets):
        chosen: list[int] = []
        for token in concept_ids:
            target, width = int(bins[token]), 0
            while True:
                pool = [t for b in range(target - width, target + width + 1) for t in by_bin.get(b, [])
                        if t not in chosen]
                if pool:
                    chosen.append(rng.choice(pool))
                    break
                width += 1
        out.append(chosen)
    return out


class Method(ABC):
    """A way to score heads for a concept. `score` returns the concept's and the control sets' scores."""

    name: ClassVar[str]
    needs_lens: ClassVar[bool] = False
    """Whether it reads heads through the lens given with --lens."""

    def lens(self, given: Lens, model: Model) -> Lens:
        """The lens the method reads through (the given one unless the method names its own kind)."""
        return given

    @abstractmethod
    def score(self, lens: Lens, concept: Concept, controls: list[list[int]], data: DataConfig, tokens: int,
              seed: int) -> MethodResult:
        """Scores of every lens head for `concept` and for each control token set."""


class LensLift(Method):
    """Lift of the concept under a lens, over the lift of frequency-matched random sets under the same lens."""

    name = "lens"
    needs_lens = True
    kind: ClassVar[str | None] = None

    def lens(self, given, model):
        return given if self.kind is None else Lens.from_model(model, self.kind)

    def score(self, lens, concept, controls, data, tokens, seed):
        union = list(dict.fromkeys([*concept.ids, *(t for s in controls for t in s)]))
        at = {token: i for i, token in enumerate(union)}
        lifted = search(lens, Concept(words=concept.words, ids=union), data, tokens=tokens, seed=seed)
        lift = lifted.token_lift  # (layer, head, union)
        concept_lift = lift[..., [at[t] for t in concept.ids]]
        control = torch.stack([lift[..., [at[t] for t in s]].mean(-1) for s in controls], -1)
        return MethodResult(method=self.name, concept=concept, layers=lifted.layers, heads=lifted.heads,
                            concept_score=concept_lift.mean(-1), control=control, token_scores=concept_lift,
                            tokens=lifted.tokens)


class LogitLift(LensLift):
    name = "logit"
    kind = "logit"


class DlaLift(LensLift):
    name = "dla"
    kind = "dla"


class Pursuit(Method):
    """Simultaneous orthogonal matching pursuit of each head's centred outputs over the concept's unembedding rows.

    Only each head's output covariance is needed: o_h = z_h W_O_h, so Cov(o_h) = W_O_hᵀ Cov(z_h) W_O_h with
    Cov(z_h) (d_head x d_head) accumulated over the corpus; pursuit then works on the atoms' Gram matrices alone.
    The score is the share of the head's output variance the selected atoms explain.
    """

    name = "pursuit"

    def score(self, lens, concept, controls, data, tokens, seed):
        model = lens.model
        layers = list(range(model.n_layers))
        sums = torch.zeros(model.n_layers, model.n_heads, model.d_head, dtype=torch.float64)
        outer = torch.zeros(model.n_layers, model.n_heads, model.d_head, model.d_head, dtype=torch.float64)
        seen = 0
        with torch.no_grad():
            for batch in HeadStream(model, data, layers, split="train", seed=seed):
                for i, _, z in batch.layers(layers):
                    z = z.flatten(0, 1).double().cpu()  # (token, head, d_head)
                    sums[i] += z.sum(0)
                    outer[i] += torch.einsum("thd,the->hde", z, z)
                seen += batch.tokens
                if seen >= tokens:
                    break
        mean = sums / seen
        covariance = outer / seen - mean[..., :, None] * mean[..., None, :]  # (layer, head, d_head, d_head)
        W_O = model.W_O.double().cpu()  # (layer, head, d_head, d_model)
        readout = (model.unembed.W_U * model.unembed.gamma).double().cpu()  # what the residual meets, (vocab, d_model)
        total = torch.einsum("lhde,lhdm,lhem->lh", covariance, W_O, W_O)  # trace of Cov(o_h)
        steps = min(PURSUIT_STEPS, len(concept.ids))

        def explained(ids: Sequence[int]) -> tuple[Tensor, Tensor]:
            atoms = readout[list(ids)]
            atoms = atoms / atoms.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (atom, d_model)
            projected = torch.einsum("lhdm,am->lhda", W_O, atoms)  # (layer, head, d_head, atom)
            M = torch.einsum("lhda,lhde,lheb->lhab", projected, covariance, projected)  # atoms' Gram under Cov(o_h)
            ratio, share = pursue(M.flatten(0, 1), atoms @ atoms.T, steps)
            scale = total.flatten().clamp_min(1e-30)
            return (ratio / scale).view(total.shape), (share / scale[:, None]).view(*total.shape, len(ids))

        concept_ratio, shares = explained(concept.ids)
        control = torch.stack([explained(s)[0] for s in controls], -1)
        return MethodResult(method=self.name, concept=concept, layers=layers, heads=list(range(model.n_heads)),
                            concept_score=concept_ratio.float(), control=control.float(),
                            token_scores=shares.float(), tokens=seen)


class MeasuredEffect(Method):
    """How much removing each head (zero ablation, the `effects` machinery) lowers the concept's log-probability,
    measured on the training side (the held-out side is where --verify checks the ranking)."""

    name = "effect"

    def score(self, lens, concept, controls, data, tokens, seed):
        model = lens.model
        layers = list(range(model.n_layers))
        config = EffectsConfig(tokens=tokens, seed=seed, mode="zero")
        totals = EffectTotals(model, layers, config)
        for batch in measured_batches(model, data, layers, config, split="train"):
            totals.add(batch)
        measured = totals.result({})
        change = measured.change.float().cpu()  # (layer, head, vocab): log P - log P_ablated
        concept_change = change[..., list(concept.ids)]
        control = torch.stack([change[..., list(s)].mean(-1) for s in controls], -1)
        return MethodResult(method=self.name, concept=concept, layers=layers, heads=list(range(model.n_heads)),
                            concept_score=concept_change.mean(-1), control=control, token_scores=concept_change,
                            tokens=totals.count)


class Attribution(Method):
    """First-order drop of log p(concept target) when the head is zero-ablated, at the training side's concept
    targets (attribution.py), against the same drop at the targets of frequency-matched random token sets.

    Verification measures the drop at held-out concept targets, so this ranks heads by what is verified; being a
    first-order estimate, it can misjudge heads whose removal changes the output a lot (verification catches that).
    `tokens` does not bound it: it reads windows until it has ATTRIBUTION_TARGETS concept targets and
    ATTRIBUTION_CONTROL_TARGETS targets of each random set, running a pass only on windows that hold one.
    """

    name = "attribution"

    def score(self, lens, concept, controls, data, tokens, seed):
        model = lens.model
        groups = [[token] for token in concept.ids] + [list(s) for s in controls]
        pools = [0] * len(concept.ids) + list(range(1, len(controls) + 1))
        need = [ATTRIBUTION_TARGETS] + [ATTRIBUTION_CONTROL_TARGETS] * len(controls)
        drops = attributed_drops(model, data, groups, pools, need, seed=seed)
        concept_targets = int(drops.targets[:len(concept.ids)].sum())
        if concept_targets == 0:
            raise AttentionLensError("the training text holds no position where a concept token is the next token; "
                                     "use more data or more common words")
        present = [i for i in range(len(controls)) if drops.targets[len(concept.ids) + i] > 0]
        if len(present) < 2:
            raise AttentionLensError("fewer than two random token sets occur in the training text, too few for a "
                                     "control; use more data")
        mean = drops.mean().float()  # (group, layer, head)
        concept_score = (drops.drop[:len(concept.ids)].sum(0) / concept_targets).float()
        control = torch.stack([mean[len(concept.ids) + i] for i in present], -1)
        token_scores = mean[:len(concept.ids)].nan_to_num(0.0).permute(1, 2, 0)  # (layer, head, concept token)
        return MethodResult(method=self.name, concept=concept, layers=list(range(model.n_layers)),
                            heads=list(range(model.n_heads)), concept_score=concept_score, control=control,
                            token_scores=token_scores, tokens=drops.windows * data.seq_len)


def pursue(M: Tensor, G: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """SOMP on covariances: for each of n signal sets (covariance C), M[n] = Aᵀ C A over unit atoms A, G = AᵀA.

    Each step picks the atom most correlated with what the selected atoms leave unexplained (summed over the
    signals: aᵀ(I - P) C (I - P) a), then the explained variance is tr(C P) = tr(G_SS⁻¹ M_SS).
    Returns the explained variance (n,) and each atom's added share (n, atom; 0 where not selected).
    """
    n, atoms = M.shape[0], M.shape[-1]
    explained = torch.zeros(n, dtype=M.dtype)
    share = torch.zeros(n, atoms, dtype=M.dtype)
    for row in range(n):
        chosen: list[int] = []
        before = 0.0
        for _ in range(steps):
            m = M[row]
            if chosen:
                weights = torch.linalg.pinv(G[chosen][:, chosen]) @ G[chosen]  # (chosen, atom)
                left = (m.diagonal() - 2 * (m[:, chosen] * weights.T).sum(1)
                        + ((weights.T @ m[chosen][:, chosen]) * weights.T).sum(1))
            else:
                left = m.diagonal().clone()
            left[chosen] = -float("inf")
            chosen.append(int(left.argmax()))
            now = float(torch.trace(torch.linalg.pinv(G[chosen][:, chosen]) @ M[row][chosen][:, chosen]))
            share[row, chosen[-1]] = now - before
            before = now
        explained[row] = before
    return explained, share


METHODS: dict[str, Method] = {method.name: method for method in (LensLift(), LogitLift(), DlaLift(), Pursuit(),
                                                                  MeasuredEffect(), Attribution())}
"""Every scoring method by the name `search --method` takes."""


def score_heads(method: Method, lens: Lens, concept: Concept, data: DataConfig, tokens: int = 2048, seed: int = 0,
                sets: int = CONTROL_SETS) -> MethodResult:
    """Score every head for `concept` under `method`, with `sets` frequency-matched random token sets as control."""
    controls = control_sets(concept.ids, token_counts(lens.model, data, max(tokens, COUNT_TOKENS), seed), sets, seed)
    return method.score(method.lens(lens, lens.model), concept, controls, data, tokens, seed)

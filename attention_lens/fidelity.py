"""Per-head fidelity scores of a lens, block by block, and their streamed sums with a Poisson bootstrap."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .lens import Lens
from .models import Model

TOP_K = 10
HEAD_SCORES = ("kl", "top1", "top10", "cross_entropy", "entropy", "logit", "dla")
"""Scored per (token, head): the lens's KL and agreement scores, then the per-head baselines' KL."""
TOKEN_SCORES = ("uniform", "constant", "model_cross_entropy", "model_entropy")
"""Scored per token, the same for every head: the head-free baselines' KL and the model's own numbers."""
BOOTSTRAPPED = ("kl", "logit", "dla", "uniform", "constant")
HEAD_BASELINES = ("logit", "dla")
"""The per-head baselines: lenses of these kinds, scored next to every lens (a lens of one of them reuses its
scores)."""
GROUPS = ("main", "sink")



@dataclass
class Targets:
    """What a batch of tokens (tokens = batch * pos) is scored against, all fp32."""

    p: Tensor
    """The model's next-token distribution (tokens, vocab)."""
    neg_entropy: Tensor
    """sum p log p (tokens,)."""
    top: Tensor
    """The model's top-k token ids (tokens, k), its top-1 first."""
    next_token: Tensor
    """The actual next token (tokens,); -1 at a window's last position, which has none."""
    final_scale: Tensor
    """sigma of the final residual (tokens,), for DLA."""
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def p_chunks(self, dtype: torch.dtype, chunks: list[slice]) -> list[Tensor]:
        """p in `dtype`, one contiguous (tokens, chunk) block per vocabulary chunk: converted and laid out once per
        batch for every layer's tiles (a strided chunk of p made each product with it 2x slower)."""
        key = ("chunks", dtype, tuple((c.start, c.stop) for c in chunks))
        if key not in self._derived:
            self._derived[key] = [self.p[:, chunk].to(dtype).contiguous() for chunk in chunks]
        return self._derived[key]

    def p_readout(self, unembed) -> Tensor:
        """p @ W_U diag(gamma), (tokens, d_model) in fp32: the readout averaged under the model's distribution,
        formed once per batch; the baselines' cross terms of every layer come from it."""
        if "readout" not in self._derived:
            self._derived["readout"] = self.p @ unembed.readout_matrix(torch.float32)
        return self._derived["readout"]

    @classmethod
    def build(cls, model: Model, input_ids: Tensor, logits: Tensor, final_residual: Tensor) -> "Targets":
        log_p = torch.log_softmax(logits.flatten(0, 1).float(), dim=-1)  # (tokens, vocab)
        p = log_p.exp()
        next_token = torch.full_like(input_ids, -1)
        next_token[:, :-1] = input_ids[:, 1:]
        return cls(p=p, neg_entropy=(p * log_p).sum(-1), top=log_p.topk(min(TOP_K, model.vocab), dim=-1).indices,
                   next_token=next_token.flatten(), final_scale=model.unembed.scale(final_residual.flatten(0, 1)))


def score_layer(lens: Lens, baseline: Lens, layer: int, z: Tensor, targets: Targets, block_rows: int) -> dict[str, Tensor]:
    """HEAD_SCORES (tokens, lens head) and the lens's top-1 ids for one layer, in vocabulary-sized blocks.

    z: (tokens, head, d_head) of all the layer's heads; `baseline` is a logit lens over the same heads,
    whose product z_aug @ F_h^T (z_aug = [z_h, 1]) also serves DLA: the two differ only by a per-row
    divisor. Logits come from the lenses' factored form ((z_aug / divisor) @ F_h^T + constant), which
    costs d_head x vocab per head-token instead of d_model x vocab, laid out (head, rows, vocab) so each
    head is one plain matmul. Only one block of vocabulary-sized logits per lens exists at a time.
    """
    heads = lens.config.heads
    z_aug = lens.augmented(z)  # (tokens, head, d_head + 1)
    base_factors, base_constant = baseline.vocab_factors(layer)  # (head, vocab, d_head + 1), (vocab,)
    base_factors = base_factors.transpose(1, 2)  # (head, d_head + 1, vocab)
    # A logit or dla lens is one of the per-head baselines computed anyway: its scores reuse their logits.
    is_baseline = lens.kind in HEAD_BASELINES
    own_factors, own_constant = (None, None) if is_baseline else lens.vocab_factors(layer)
    own_factors = None if own_factors is None else own_factors.transpose(1, 2)
    block = max(1, block_rows // len(heads))
    parts: dict[str, list[Tensor]] = defaultdict(list)
    for start in range(0, z.shape[0], block):
        rows = slice(start, start + block)
        shared = torch.bmm(z_aug[rows].transpose(0, 1), base_factors)  # (head, rows, vocab): W_U (gamma * C o_h)
        logit = _finish(shared / baseline.divisor(z[rows], layer).T[..., None], base_constant, lens, cap=True)
        dla = shared.div_(targets.final_scale[None, rows, None])  # attribution: no constant, no cap
        baselines = {"logit": logit, "dla": dla}  # HEAD_BASELINES
        divisor = None if is_baseline else lens.divisor(z[rows], layer, targets.final_scale[rows])
        own = baselines[lens.kind] if is_baseline else factored_logits(lens, z_aug[rows], divisor, own_factors,
                                                                       own_constant)
        scores = _lens_scores(own, targets, rows)
        for name, value in scores.items():
            parts[name].append(value)
        for name, logits in baselines.items():
            parts[name].append(scores["kl"] if name == lens.kind else _kl(logits, targets, rows))
    return {name: torch.cat(values) for name, values in parts.items()}


def factored_logits(lens: Lens, z_aug: Tensor, divisor: Tensor, factors: Tensor, constant: Tensor | None) -> Tensor:
    """(head, rows, vocab) logits of `lens` from its factored form, for z_aug (rows, head, d_head + 1) = [z_h, 1]
    and factors (head, d_head + 1, vocab). The divisor goes on the d_head-sized input, not the vocabulary-sized
    output; the soft-cap applies where the lens ends in the model's readout (logit, affine)."""
    scaled = (z_aug / divisor[..., None]).transpose(0, 1)  # (head, rows, d_head + 1)
    return _finish(torch.bmm(scaled, factors), constant, lens, cap=lens.kind_spec.model_readout)


def _finish(logits: Tensor, constant: Tensor | None, lens: Lens, cap: bool) -> Tensor:
    """Add the per-vocab constant (norm bias and b_U through W_U), then soft-cap, as the model's readout does."""
    if constant is not None:
        logits = logits + constant
    return lens.model.unembed.cap(logits) if cap else logits


def _kl(logits: Tensor, targets: Targets, rows: slice) -> Tensor:
    """KL(P_model || softmax(logits)) = sum p log p - sum p * logits + logsumexp(logits), using sum p = 1."""
    cross = vocab_dot(logits, targets.p[rows]).T
    return targets.neg_entropy[rows, None] - cross + torch.logsumexp(logits, dim=-1).T


def vocab_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a_v b_v over the vocabulary, (head, rows), for a (head, rows, vocab) and b (rows, vocab) or the shape of
    a, in fp32. One product over all 49,152 tokens (an einsum) adds each tiny tail term p_v l_v to a running sum ~12
    that swallows it: on SmolLM2 it came out ~2e-4 low relatively every time (KL 0.003 nats high against fp64).
    Summed in blocks of at most 512 and then over the blocks it holds ~1e-5 at the einsum's speed; a vocabulary
    that no block size splits evenly is summed elementwise (exact to ~1e-6, ~2.6x slower)."""
    block = _sum_block(a.shape[-1])
    if block is None:
        return (a * b).sum(-1)
    pattern = "hrcv,rcv->hrc" if b.dim() == a.dim() - 1 else "hrcv,hrcv->hrc"
    return torch.einsum(pattern, a.unflatten(-1, (-1, block)), b.unflatten(-1, (-1, block))).sum(-1)


def _sum_block(vocab: int) -> int | None:
    """The largest divisor of `vocab` from 128 to 512 (SmolLM2, Gemma-3: 512; Llama-3: 501; Qwen2: 128), or None."""
    return next((size for size in range(512, 127, -1) if vocab % size == 0), None)


def _lens_scores(logits: Tensor, targets: Targets, rows: slice) -> dict[str, Tensor]:
    """The lens's own scores from (head, rows, vocab) logits, each (rows, head); no log-softmax is formed."""
    model_top = targets.top[rows]  # (rows, k)
    top = logits.topk(model_top.shape[-1], dim=-1)  # (head, rows, k)
    q = torch.softmax(logits, dim=-1)  # the lens's distribution
    # logsumexp from the softmax at the arg-max (q there is >= 1/vocab, so its log is accurate): no extra pass.
    log_sum_exp = top.values[..., 0] - torch.log(q.gather(-1, top.indices[..., :1]).squeeze(-1))  # (head, rows)
    entropy = log_sum_exp - vocab_dot(q, logits)
    lens_top = top.indices.transpose(0, 1)  # (rows, head, k)
    next_token = targets.next_token[rows]
    picked = logits.gather(-1, next_token.clamp(min=0)[None, :, None].expand(logits.shape[0], -1, 1)).squeeze(-1)
    return {
        "kl": targets.neg_entropy[rows, None] - vocab_dot(logits, targets.p[rows]).T + log_sum_exp.T,
        "top1": (lens_top[..., 0] == model_top[:, None, 0]).float(),
        "top10": (lens_top[..., :, None] == model_top[:, None, None, :]).any(-1).float().mean(-1),
        "cross_entropy": torch.where(next_token[:, None] >= 0, (log_sum_exp - picked).T, 0.0),
        "entropy": entropy.T,
        "top_id": lens_top[..., 0],
    }


class FidelityTotals:
    """Running sums of every score per (layer, head), for ordinary and attention-sink positions.

    The 95% intervals come from a Poisson bootstrap over windows: each replicate weighs each window by a
    Poisson(1) draw, which resamples windows with replacement in the limit and needs no stored windows,
    so memory stays flat however many tokens are scored.
    """

    def __init__(self, n_layers: int, n_heads: int, vocab: int, replicates: int, seed: int):
        shape = (n_layers, n_heads)
        self.sums = {group: {name: torch.zeros(shape, dtype=torch.float64) for name in HEAD_SCORES}
                     for group in GROUPS}
        for group in GROUPS:
            self.sums[group].update({name: torch.zeros((), dtype=torch.float64) for name in TOKEN_SCORES})
        self.count = {group: 0.0 for group in GROUPS}
        self.next_count = {group: 0.0 for group in GROUPS}
        self.top_ids = torch.zeros(n_layers * n_heads, vocab, dtype=torch.int32)
        """How often each token is the lens's top-1, per head, at ordinary positions."""
        self.replicates = {name: torch.zeros((replicates, *shape), dtype=torch.float64) for name in BOOTSTRAPPED}
        self.replicate_count = torch.zeros(replicates, 1, 1, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, head_scores: dict[str, Tensor], token_scores: dict[str, Tensor], sink: Tensor, has_next: Tensor) -> None:
        """head_scores (batch, pos, layer, head); token_scores and the masks sink, has_next (batch, pos)."""
        for group, mask in (("main", ~sink), ("sink", sink)):
            mask = mask.double()
            with_next = mask * has_next.double()
            windows = {}
            for name, value in head_scores.items():
                if name != "top_id":
                    weights = with_next if name == "cross_entropy" else mask
                    windows[name] = torch.einsum("bp,bplh->blh", weights, value.double())  # (batch, layer, head)
            for name, value in token_scores.items():
                weights = with_next if name == "model_cross_entropy" else mask
                windows[name] = (weights * value.double()).sum(-1)  # (batch,)
            for name, value in windows.items():
                self.sums[group][name] += value.sum(0)
            self.count[group] += mask.sum().item()
            self.next_count[group] += with_next.sum().item()
            if group == "main":
                self._add_replicates(windows, mask.sum(-1))
                top_id = head_scores["top_id"][~sink].flatten(1).T.cpu()  # (layer * head, main tokens)
                self.top_ids.scatter_add_(1, top_id, torch.ones_like(top_id, dtype=self.top_ids.dtype))

    def _add_replicates(self, windows: dict[str, Tensor], count: Tensor) -> None:
        replicates = self.replicate_count.shape[0]
        weights = torch.poisson(torch.ones(replicates, count.shape[0], dtype=torch.float64), generator=self.generator)
        self.replicate_count += (weights @ count.cpu())[:, None, None]
        for name in BOOTSTRAPPED:
            window = windows[name].cpu()
            if window.dim() == 1:
                self.replicates[name] += (weights @ window)[:, None, None]
            else:
                self.replicates[name] += torch.einsum("rb,blh->rlh", weights, window)

    def mean(self, group: str, name: str) -> Tensor:
        """Mean of a score over the group's tokens (nan where it has none): (layer, head) or ()."""
        count = self.next_count[group] if "cross_entropy" in name else self.count[group]
        return self.sums[group][name] / count if count else self.sums[group][name] * math.nan

    def interval(self, name: str, minus: str | None = None) -> tuple[Tensor, Tensor]:
        """95% bootstrap interval of the mean of `name` (minus the mean of `minus`): two (layer, head)."""
        keep = self.replicate_count[:, 0, 0] > 0  # a replicate that drew no window has no mean
        values = self.replicates[name][keep]
        if minus is not None:
            values = values - self.replicates[minus][keep]
        means = values / self.replicate_count[keep]
        if means.shape[0] == 0:
            nan = torch.full(means.shape[1:], math.nan, dtype=torch.float64)
            return nan, nan
        bounds = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)
        return bounds[0], bounds[1]

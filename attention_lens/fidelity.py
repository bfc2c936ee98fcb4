"""Per-head fidelity scores of a lens, block by block, and their streamed sums with a Poisson bootstrap."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from .lens import Lens
from .models import Model
from .objective import DEFAULT_BLOCK_ROWS, _autocast, _chunks

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
SCORE_TILE_ROWS = 4 * DEFAULT_BLOCK_ROWS
"""Head-token rows per tile when scoring (e.g. 512 tokens x 9 heads). Scoring runs ~12 small ops per vocabulary
chunk and view, each with a fixed cost (waking the second thread took ~7 ms per op on a busy 2-core machine); tiles
4x the trainer's spread it: one SmolLM2 layer of 1,024 tokens scored in 15.2 s instead of 28.8 s there."""


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


def score_layer_tiled(lens: Lens, baseline: Lens, layer: int, z: Tensor, targets: Targets,
                      block_rows: int = SCORE_TILE_ROWS, dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
    """`score_layer`'s scores from cache-sized (head, rows, vocabulary chunk) tiles in `dtype`, summed in fp32.

    The trainer's tiled path, for scoring: the lens, the logit lens and DLA are three factored views of the same
    z (the last two share the baseline's factors and differ only in divisor and constant), each streamed through
    an online logsumexp and cross term, so no vocabulary-sized row of any of them is ever whole. The lens's view
    also keeps its entropy and, per chunk, its top-k candidates, merged at the end. In bf16, logits round to
    ~2^-8 relative before every sum (each sum accumulates in fp32): per-head KL means agree with `score_layer`'s
    fp32 to ~1e-3 nats on SmolLM2, and a rank can differ from fp32's only between logits within that rounding.
    Not for soft-capped readouts (the cap is not linear in the factors): `score_layer` serves those.
    """
    heads = lens.config.heads
    z_aug = lens.augmented(z)  # (tokens, head, d_head + 1)
    with _autocast(z.device, dtype):  # the vocab x d_model x d_head factor products run in `dtype` too
        own = _tile_factors(*lens.vocab_factors(layer), dtype)
        base = _tile_factors(*baseline.vocab_factors(layer), dtype)
    p_low = targets.p.to(dtype)
    rows_per_tile = max(1, block_rows // len(heads))
    parts: dict[str, list[Tensor]] = defaultdict(list)
    for start in range(0, z.shape[0], rows_per_tile):
        rows = slice(start, start + rows_per_tile)
        final_scale = targets.final_scale[rows]
        views = {
            "own": _scaled(z_aug[rows], lens.divisor(z[rows], layer, final_scale), dtype),
            "logit": _scaled(z_aug[rows], baseline.divisor(z[rows], layer), dtype),
            "dla": _scaled(z_aug[rows], final_scale[:, None].expand(-1, len(heads)), dtype),
        }
        stats = {name: _OnlineSoftmax(scaled.shape[:2], z.device, track=name == "own") for name, scaled in views.items()}
        for chunk in _chunks(lens.model.vocab, z.device):
            for name, scaled in views.items():
                factors, constant = own if name == "own" else base
                logits = torch.bmm(scaled, factors[:, :, chunk])  # (head, rows, chunk)
                if constant is not None and name != "dla":  # attribution adds no constant
                    logits += constant[chunk]
                stats[name].add(logits, p_low[rows, chunk], chunk.start)
        next_token = targets.next_token[rows]
        picked = _picked_logits(views["own"], *own, next_token)
        scores = stats["own"].scores(targets, rows, picked)
        scores["logit"] = stats["logit"].kl(targets, rows)
        scores["dla"] = stats["dla"].kl(targets, rows)
        for name, value in scores.items():
            parts[name].append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


def _tile_factors(factors: Tensor, constant: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Factors laid out (head, d_head + 1, vocab) in `dtype`, so each vocabulary chunk is a plain strided matrix."""
    return factors.detach().to(dtype).transpose(1, 2).contiguous(), None if constant is None else constant.to(dtype)


def _scaled(z_aug: Tensor, divisor: Tensor, dtype: torch.dtype) -> Tensor:
    """(head, rows, d_head + 1) = [z_h, 1] / divisor: the divisor goes on the small side of the product."""
    return (z_aug / divisor[..., None]).transpose(0, 1).to(dtype).contiguous()


def _picked_logits(scaled: Tensor, factors: Tensor, constant: Tensor | None, next_token: Tensor) -> Tensor:
    """The lens's logit of each row's next token (head, rows), from the factor columns of those tokens alone."""
    columns = factors[:, :, next_token.clamp(min=0)].transpose(1, 2)  # (head, rows, d_head + 1)
    picked = (scaled.float() * columns.float()).sum(-1)
    return picked if constant is None else picked + constant[next_token.clamp(min=0)].float()


class _OnlineSoftmax:
    """Running per-(head, row) statistics of logits seen one vocabulary chunk at a time, in fp32.

    max m, S = sum exp(l - m) and the cross term sum p * l give logsumexp and KL; with `track`, also
    W = sum exp(l - m) (l - m) (entropy = log S - W / S) and the chunk-wise top-k candidates.
    """

    def __init__(self, shape: tuple[int, int], device: torch.device, track: bool):
        self.top = torch.full(shape, -torch.inf, device=device)
        self.sum_exp = torch.zeros(shape, device=device)
        self.cross = torch.zeros(shape, device=device)
        self.track = track
        self.weighted = torch.zeros(shape, device=device)
        self.candidates: list[tuple[Tensor, Tensor]] = []

    def add(self, logits: Tensor, p: Tensor, offset: int) -> None:
        """logits (head, rows, chunk) in the tile dtype, p (rows, chunk); `logits` is overwritten."""
        self.cross += (logits * p).sum(-1).float()
        if self.track:
            values, ids = logits.topk(min(TOP_K, logits.shape[-1]), dim=-1)
            self.candidates.append((values, ids + offset))
        new_top = torch.maximum(self.top, logits.amax(-1).float())
        rescale = torch.exp(self.top - new_top)  # 0 on the first chunk (exp(-inf))
        shifted = logits.sub_(new_top.to(logits.dtype)[..., None])  # in place: the logits are not needed again
        terms = torch.exp(shifted)
        chunk_sum = terms.sum(-1).float()
        if self.track:
            # sum e (l - m_new) = rescale * (W + (m_old - m_new) S) for what came before, plus this chunk.
            gap = torch.where(torch.isfinite(self.top), self.top - new_top, 0.0)
            self.weighted = rescale * (self.weighted + gap * self.sum_exp) + (terms * shifted).sum(-1).float()
        self.sum_exp = self.sum_exp * rescale + chunk_sum
        self.top = new_top

    def log_sum_exp(self) -> Tensor:
        return self.top + torch.log(self.sum_exp)  # (head, rows)

    def kl(self, targets: Targets, rows: slice) -> Tensor:
        """KL(P_model || softmax(logits)) (rows, head) = sum p log p - sum p * logits + logsumexp."""
        return (targets.neg_entropy[rows, None].T - self.cross + self.log_sum_exp()).T

    def scores(self, targets: Targets, rows: slice, picked: Tensor) -> dict[str, Tensor]:
        """The lens's own scores, as `_lens_scores` gives them: each (rows, head)."""
        values = torch.cat([v for v, _ in self.candidates], dim=-1)
        ids = torch.cat([i for _, i in self.candidates], dim=-1)
        model_top = targets.top[rows]  # (rows, k)
        lens_top = ids.gather(-1, values.topk(model_top.shape[-1], dim=-1).indices).transpose(0, 1)  # (rows, head, k)
        next_token = targets.next_token[rows]
        log_sum_exp = self.log_sum_exp()
        return {
            "kl": self.kl(targets, rows),
            "top1": (lens_top[..., 0] == model_top[:, None, 0]).float(),
            "top10": (lens_top[..., :, None] == model_top[:, None, None, :]).any(-1).float().mean(-1),
            "cross_entropy": torch.where(next_token[:, None] >= 0, (log_sum_exp - picked).T, 0.0),
            "entropy": (torch.log(self.sum_exp) - self.weighted / self.sum_exp).T,
            "top_id": lens_top[..., 0],
        }


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
    cross = torch.einsum("hrv,rv->rh", logits, targets.p[rows])
    return targets.neg_entropy[rows, None] - cross + torch.logsumexp(logits, dim=-1).T


def _lens_scores(logits: Tensor, targets: Targets, rows: slice) -> dict[str, Tensor]:
    """The lens's own scores from (head, rows, vocab) logits, each (rows, head); no log-softmax is formed."""
    model_top = targets.top[rows]  # (rows, k)
    top = logits.topk(model_top.shape[-1], dim=-1)  # (head, rows, k)
    q = torch.softmax(logits, dim=-1)  # the lens's distribution
    # logsumexp from the softmax at the arg-max (q there is >= 1/vocab, so its log is accurate): no extra pass.
    log_sum_exp = top.values[..., 0] - torch.log(q.gather(-1, top.indices[..., :1]).squeeze(-1))  # (head, rows)
    entropy = log_sum_exp - torch.einsum("hrv,hrv->hr", q, logits)
    lens_top = top.indices.transpose(0, 1)  # (rows, head, k)
    next_token = targets.next_token[rows]
    picked = logits.gather(-1, next_token.clamp(min=0)[None, :, None].expand(logits.shape[0], -1, 1)).squeeze(-1)
    return {
        "kl": targets.neg_entropy[rows, None] - torch.einsum("hrv,rv->rh", logits, targets.p[rows]) + log_sum_exp.T,
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

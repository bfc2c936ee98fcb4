"""The default scorer of `eval`: `fidelity.score_layer`'s per-head scores from cache-sized (head, rows, vocabulary
chunk) tiles, each view an online logsumexp with its running shift inside its product (`Sweep`)."""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch
from torch import Tensor

from .fidelity import Targets
from .lens import Lens
from .objective import DEFAULT_BLOCK_ROWS, VOCAB_CHUNK, _autocast, _chunks
from .sweep import GROUP, LOG2E, ScaledViews, Sweep, extended_factors

SCORE_TILE_ROWS = DEFAULT_BLOCK_ROWS
"""Head-token rows per tile when scoring (e.g. 256 tokens x 9 heads): the bf16 products need a few hundred rows per
head to run near the GEMM rate (64 rows ran at a quarter of it on 2 cores), and the tile must stay cache-sized."""


def score_layer_tiled(lens: Lens, baseline: Lens, layer: int, z: Tensor, targets: Targets,
                      block_rows: int = SCORE_TILE_ROWS, dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
    """`score_layer`'s scores from cache-sized (head, rows, vocabulary chunk) tiles, summed in fp32.

    The lens, the logit lens and DLA are three factored views of the same z (the last two share the baseline's
    factors and differ only in scale, and for some models a constant: one product serves both, `_baseline_sweep`).
    Each view streams through an online
    logsumexp whose shift sits inside the product (`Sweep`), so a chunk costs one product and one fused pass;
    no vocabulary-sized row of any view is ever whole. Products run in `dtype` (bf16) with fp32 sums. The
    baselines are far from the model by design (KL ~3-80 nats) and take their cross terms exactly in fp32 from
    factors averaged under p (`expected_factors`), which touches no vocabulary per head. The lens's view is judged
    by margins of ~0.01 nats, which the rounding of its factors alone would eat (up to 0.01 on a fitted SmolLM2
    lens: fixed per token, it does not average out over positions); it is taken back to first order
    (`_rounding_correction`) on the tokens that carry its mass: the lens's top candidates and the model's top-k,
    whose logits are computed exactly in fp32 anyway (for the top-k and the cross-entropy). The lens's view also
    keeps its entropy and the maxima of strided token groups; its top-k is rescored on the tokens of the groups
    with the largest maxima. Not for soft-capped readouts (the cap is not linear in the factors): `score_layer`
    serves them.
    """
    heads = lens.config.heads
    z_aug = lens.augmented(z)  # (tokens, head, d_head + 1)
    with _autocast(z.device, torch.float32):  # exact: the candidates' logits, the correction's reference
        own_factors, own_constant = lens.vocab_factors(layer)
    with _autocast(z.device, dtype):  # the vocab x d_model x d_head factor products run in `dtype` too
        base_factors, base_constant = baseline.vocab_factors(layer)
    groups = _Groups(lens.model.vocab, z.device)
    own = extended_factors(own_factors, own_constant, dtype, groups.chunks)
    base = extended_factors(base_factors, base_constant, dtype, groups.chunks)
    own_rows = _ExactRows(own_factors, own_constant, dtype)
    rows_per_tile = max(1, block_rows // len(heads))
    parts: dict[str, list[Tensor]] = defaultdict(list)
    for start in range(0, z.shape[0], rows_per_tile):
        rows = slice(start, start + rows_per_tile)
        final_scale = targets.final_scale[rows]
        logit_divisor = baseline.divisor(z[rows], layer)  # (rows, head)
        scaled = {
            "own": _scaled(z_aug[rows], lens.divisor(z[rows], layer, final_scale)),
            "logit": _scaled(z_aug[rows], logit_divisor),
            "dla": _scaled(z_aug[rows], final_scale[:, None].expand(-1, len(heads))),
        }
        p = [block[rows] for block in targets.p_chunks(dtype, groups.chunks)]
        own_sweep = Sweep(scaled["own"], own_constant is not None, own, dtype, groups, p=p)
        base_sweep = _baseline_sweep(scaled, logit_divisor, final_scale, base_constant is not None, base, dtype)
        for index in range(len(groups.chunks)):
            own_sweep.add(index)
            base_sweep.add(index)
        base_lse = base_sweep.log_sum_exp()  # (logit, DLA), each (head, rows)
        cross = _baseline_cross_terms(baseline, layer, scaled, targets, rows)
        neg_entropy = targets.neg_entropy[rows]
        candidates = groups.candidates(own_sweep.maxima(), scaled["own"], own_rows, targets.top.shape[-1])
        model_top = targets.top[rows][None].expand(len(heads), -1, -1)  # (head, rows, k)
        model_top_logits = own_rows.logits(model_top, scaled["own"])
        picked = own_rows.logits(targets.next_token[rows].clamp(min=0)[None, :, None].expand(len(heads), -1, 1),
                                 scaled["own"]).exact[..., 0]
        corrected = _rounding_correction(own_sweep, neg_entropy, targets.p[rows], dtype, candidates, model_top,
                                         model_top_logits)
        scores = _own_scores(corrected, targets, rows, picked, candidates.top(targets.top.shape[-1]))
        scores["logit"] = (neg_entropy - cross["logit"] + base_lse[0]).T
        scores["dla"] = (neg_entropy - cross["dla"] + base_lse[1]).T
        for name, value in scores.items():
            parts[name].append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


def _scaled(z_aug: Tensor, divisor: Tensor) -> Tensor:
    """(head, rows, d_head + 1) = [z_h, 1] / divisor in fp32: the divisor goes on the small side of the product."""
    return (z_aug / divisor[..., None]).transpose(0, 1)


class _ConcatenatedViews:
    """The logit lens and DLA as one `Sweep` over their rows stacked, where the logit lens adds a constant (norm bias
    and b_U through W_U) that DLA, an attribution, does not: their logits are then not one another scaled."""

    def __init__(self, sweep: Sweep, rows: int):
        self.sweep, self.rows = sweep, rows

    def add(self, chunk: int) -> None:
        self.sweep.add(chunk)

    def log_sum_exp(self) -> Tensor:
        lse = self.sweep.log_sum_exp()
        return torch.stack([lse[:, :self.rows], lse[:, self.rows:]])


def _baseline_sweep(scaled: dict[str, Tensor], logit_divisor: Tensor, final_scale: Tensor, has_constant: bool,
                    factors: list[Tensor], dtype: torch.dtype) -> ScaledViews | _ConcatenatedViews:
    """The logit lens's and DLA's online logsumexps over the baseline's factors, from their `scaled` rows (divisors
    logit_divisor (rows, head) and final_scale (rows,)): one product at the larger of their scales where they differ
    by scale alone, their rows stacked otherwise."""
    if has_constant:
        rows = scaled["logit"].shape[1]
        return _ConcatenatedViews(Sweep(torch.cat([scaled["logit"], scaled["dla"]], dim=1), True, factors, dtype,
                                        constant_rows=rows), rows)
    logit_scale = 1 / logit_divisor.T  # (head, rows)
    dla_scale = (1 / final_scale)[None].expand_as(logit_scale)
    larger = torch.maximum(logit_scale, dla_scale)
    ratios = torch.stack([logit_scale / larger, dla_scale / larger])  # (view, head, rows), the larger view's 1
    larger_rows = torch.where((logit_scale >= dla_scale)[..., None], scaled["logit"], scaled["dla"])
    return ScaledViews(larger_rows, ratios, factors, dtype)


def _baseline_cross_terms(baseline: Lens, layer: int, scaled: dict[str, Tensor], targets: Targets,
                          rows: slice) -> dict[str, Tensor]:
    """sum_v p_v l_v of the logit lens and DLA, (head, rows), exactly in fp32 from their shared factors averaged
    under p; DLA, an attribution, adds no constant."""
    p, p_readout = targets.p[rows], targets.p_readout(baseline.model.unembed)[rows]
    mean, constant = baseline.kind_spec.expected_factors(baseline, layer, p, p_readout)
    logit = (scaled["logit"] * mean).sum(-1)
    return {"logit": logit if constant is None else logit + constant, "dla": (scaled["dla"] * mean).sum(-1)}


class _Groups:
    """The vocabulary chunks, and a partition of each chunk into groups whose maxima a sweep keeps.

    A chunk of n * GROUP tokens holds n groups of GROUP tokens at stride n (token j, j + n, j + 2n, ...): their
    maxima are one element-wise max over GROUP contiguous slices, a pass that vectorizes, where a max over
    consecutive tokens reduces short rows. A short chunk's leftover tokens are groups of one. The true top-k lies in
    the k groups with the largest maxima, so the top-k is rescored on those candidates alone.
    """

    def __init__(self, vocab: int, device: torch.device):
        self.vocab = vocab
        self.chunks = _chunks(vocab, device, SCORE_VOCAB_CHUNK)
        starts, strides, sizes = [], [], []
        for chunk in self.chunks:
            length = chunk.stop - chunk.start
            n = length // GROUP
            starts += [chunk.start + j for j in range(n)] + list(range(chunk.start + n * GROUP, chunk.stop))
            strides += [n] * n + [1] * (length - n * GROUP)
            sizes += [GROUP] * n + [1] * (length - n * GROUP)
        self.start, self.stride, self.size = (torch.tensor(v, device=device) for v in (starts, strides, sizes))

    def candidates(self, maxima: Tensor, scaled: Tensor, rows: _ExactRows, k: int) -> _Candidates:
        """The tokens of the k + 2 groups with the largest `maxima` (head, rows, groups) and their logits: the top-k
        lies among them (two spare groups: a group whose maximum rounds just below the k-th group's is still
        rescored)."""
        chosen = maxima.topk(min(k + 2, maxima.shape[-1]), dim=-1).indices  # (head, rows, k + 2)
        offsets = torch.arange(GROUP, device=chosen.device)
        ids = (self.start[chosen][..., None] + self.stride[chosen][..., None] * offsets).flatten(-2)
        valid = (offsets < self.size[chosen][..., None]).flatten(-2)
        ids = ids.masked_fill(~valid, 0)
        return _Candidates(ids, valid, rows.logits(ids, scaled))


SCORE_VOCAB_CHUNK = VOCAB_CHUNK
"""Vocabulary entries per scoring tile: with SCORE_TILE_ROWS, a (head, rows, chunk) tile of bf16 logits stays
cache-sized (~5 MB); products whose output is 4x that ran at half the rate on 2 cores."""
CANDIDATE_ROWS = 64
"""Rows per block when the lens's candidates' logits are taken (bounds that block's memory)."""


class TokenLogits(NamedTuple):
    """A view's logits of chosen tokens, (head, rows, n) in natural units."""

    exact: Tensor
    """from the fp32 factors and coefficients"""
    rounded: Tensor
    """as the sweep's `dtype` product takes them: factors, coefficients and constant rounded, sums in fp32"""


class _ExactRows:
    """The lens's factors as (head * vocab, d_head + 1) fp32 rows, for the logits of a few tokens per head-row."""

    def __init__(self, factors: Tensor, constant: Tensor | None, dtype: torch.dtype):
        self.vocab = factors.shape[1]
        self.rows = factors.detach().flatten(0, 1).contiguous()
        self.constant = None if constant is None else constant.detach().float()
        self.dtype = dtype

    def logits(self, ids: Tensor, scaled: Tensor) -> TokenLogits:
        """ids (head, rows, n); scaled (head, rows, d_head + 1) = [z_h, 1] / divisor in fp32."""
        # Row of (head h, token v): h * vocab + v.
        flat_ids = ids + torch.arange(ids.shape[0], device=ids.device)[:, None, None] * self.vocab
        coefficients = (scaled * LOG2E).to(self.dtype).float()  # base 2, rounded as the sweep's coefficients
        exact, rounded = torch.empty(ids.shape, device=ids.device), torch.empty(ids.shape, device=ids.device)
        for start in range(0, ids.shape[1], CANDIDATE_ROWS):  # (head, rows, n, d_head + 1) a block at a time
            block = slice(start, start + CANDIDATE_ROWS)
            block_ids = flat_ids[:, block]
            columns = self.rows.index_select(0, block_ids.flatten()).view(*block_ids.shape, -1)
            exact[:, block] = (columns @ scaled[:, block, :, None]).squeeze(-1)
            rounded[:, block] = (columns.to(self.dtype).float() @ coefficients[:, block, :, None]).squeeze(-1)
        if self.constant is not None:
            constant = self.constant[ids]
            exact += constant
            rounded += (constant * LOG2E).to(self.dtype).float()
        return TokenLogits(exact, rounded / LOG2E)


class _Candidates(NamedTuple):
    """Tokens per head-row that may hold the lens's top-k (`_Groups.candidates`)."""

    ids: Tensor
    """(head, rows, n); 0 where not a token"""
    valid: Tensor
    """(head, rows, n): a token (a short chunk's leftover groups pad)"""
    logits: TokenLogits

    def top(self, k: int) -> Tensor:
        """The top-k ids (head, rows, k), largest exact logit first."""
        ranked = self.logits.exact.masked_fill(~self.valid, -torch.inf).topk(min(k, self.ids.shape[-1]), dim=-1)
        return self.ids.gather(-1, ranked.indices)


def _rounding_correction(sweep: Sweep, neg_entropy: Tensor, p: Tensor, p_dtype: torch.dtype, candidates: _Candidates,
                         model_top: Tensor, model_top_logits: TokenLogits) -> dict[str, Tensor]:
    """The lens view's KL, logsumexp and entropy, (head, rows), with the rounding of its logits taken out to first
    order on the lens's candidates and the model's top-k (model_top, (head, rows, k); those among the candidates
    are counted once).

    With rounded logits l~ = l + e: KL~ = KL + sum (q - p) e, logsumexp~ = logsumexp + sum q e and
    entropy~ = entropy - sum q e (l - mean_q l), to first order (e ~ 1e-2 here, the second order ~1e-4 q). The
    sweep's cross term also took p rounded to `p_dtype` (p~): KL~ gains sum (p - p~) l~, taken back on the same
    tokens. The tokens left out carry little mass and rounding errors of either sign, which average out.
    p: the rows' model probabilities (rows, vocab) in fp32.
    """
    log_sum_exp, entropy = sweep.log_sum_exp(), sweep.entropy()
    repeated = ((model_top[..., :, None] == candidates.ids[..., None, :]) & candidates.valid[..., None, :]).any(-1)
    counted = torch.cat([candidates.valid, ~repeated], dim=-1)
    ids = torch.cat([candidates.ids, model_top], dim=-1)
    rounded = torch.cat([candidates.logits.rounded, model_top_logits.rounded], dim=-1)
    error = torch.where(counted, rounded - torch.cat([candidates.logits.exact, model_top_logits.exact], dim=-1), 0.0)
    q = torch.where(counted, torch.exp(rounded - log_sum_exp[..., None]), 0.0)  # the view's q, as its sums hold it
    p_at = torch.where(counted, p[torch.arange(p.shape[0], device=p.device)[None, :, None], ids], 0.0)
    p_rounded = p_at.to(p_dtype).float()  # the sweep's cross term takes p in its product's dtype
    mean = log_sum_exp - entropy  # sum q l
    return {
        "kl": sweep.kl(neg_entropy) + ((p_at - q) * error + (p_rounded - p_at) * rounded).sum(-1),
        "log_sum_exp": log_sum_exp - (q * error).sum(-1),
        "entropy": entropy + (q * error * (rounded - mean[..., None])).sum(-1),
    }


def _own_scores(corrected: dict[str, Tensor], targets: Targets, rows: slice, picked: Tensor,
                top_ids: Tensor) -> dict[str, Tensor]:
    """The lens's own scores, as `_lens_scores` gives them: each (rows, head)."""
    model_top = targets.top[rows]  # (rows, k)
    lens_top = top_ids.transpose(0, 1)  # (rows, head, k)
    next_token = targets.next_token[rows]
    return {
        "kl": corrected["kl"].T,
        "top1": (lens_top[..., 0] == model_top[:, None, 0]).float(),
        "top10": (lens_top[..., :, None] == model_top[:, None, None, :]).any(-1).float().mean(-1),
        "cross_entropy": torch.where(next_token[:, None] >= 0, (corrected["log_sum_exp"] - picked).T, 0.0),
        "entropy": corrected["entropy"].T,
        "top_id": lens_top[..., 0],
    }

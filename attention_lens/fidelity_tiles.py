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
from .fused import table_logits
from .sweep import GROUP, LOG2E, ScaledViews, Sweep, extended_factors, scratch

SCORE_TILE_ROWS = DEFAULT_BLOCK_ROWS
"""Head-token rows per tile when scoring (e.g. 256 tokens x 9 heads): the bf16 products need a few hundred rows per
head to run near the GEMM rate (64 rows ran at a quarter of it on 2 cores), and the tile must stay cache-sized."""


def score_layer_tiled(lens: Lens, baseline: Lens, layer: int, z: Tensor, targets: Targets,
                      block_rows: int = SCORE_TILE_ROWS, dtype: torch.dtype = torch.bfloat16,
                      workspace: dict[tuple, Tensor] | None = None) -> dict[str, Tensor]:
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

    workspace: scratch tables and tiles kept for the next call (the next layer, the next batch): a fresh multi-MB
    block costs a page fault per 4 kB, which on this class of machine cost as much as the work done in it.
    """
    workspace = {} if workspace is None else workspace
    heads = lens.config.heads
    z_aug = lens.augmented(z)  # (tokens, head, d_head + 1)
    with _autocast(z.device, torch.float32):  # exact: the candidates' logits, the correction's reference
        own_factors, own_constant = lens.vocab_factors(layer)
    with _autocast(z.device, dtype):  # the vocab x d_model x d_head factor products run in `dtype` too
        base_factors, base_constant = baseline.vocab_factors(layer)
    groups = _Groups(lens.model.vocab, z.device)
    own = extended_factors(own_factors, own_constant, dtype, groups.chunks)
    base = extended_factors(base_factors, base_constant, dtype, groups.chunks)
    own_rows = _ExactRows(own_factors, own_constant, dtype, groups, workspace)
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
        own_sweep = Sweep(scaled["own"], own_constant is not None, own, dtype, groups, p=p, buffers=workspace)
        base_sweep = _baseline_sweep(scaled, logit_divisor, final_scale, base_constant is not None, base, dtype,
                                     workspace)
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
                    factors: list[Tensor], dtype: torch.dtype,
                    buffers: dict[tuple, Tensor] | None = None) -> ScaledViews | _ConcatenatedViews:
    """The logit lens's and DLA's online logsumexps over the baseline's factors, from their `scaled` rows (divisors
    logit_divisor (rows, head) and final_scale (rows,)): one product at the larger of their scales where they differ
    by scale alone, their rows stacked otherwise."""
    if has_constant:
        rows = scaled["logit"].shape[1]
        return _ConcatenatedViews(Sweep(torch.cat([scaled["logit"], scaled["dla"]], dim=1), True, factors, dtype,
                                        constant_rows=rows, buffers=buffers), rows)
    logit_scale = 1 / logit_divisor.T  # (head, rows)
    dla_scale = (1 / final_scale)[None].expand_as(logit_scale)
    larger = torch.maximum(logit_scale, dla_scale)
    ratios = torch.stack([logit_scale / larger, dla_scale / larger])  # (view, head, rows), the larger view's 1
    larger_rows = torch.where((logit_scale >= dla_scale)[..., None], scaled["logit"], scaled["dla"])
    return ScaledViews(larger_rows, ratios, factors, dtype, buffers)


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
        starts, strides, sizes, self.offsets = [], [], [], []
        for chunk in self.chunks:
            self.offsets.append(len(starts))
            length = chunk.stop - chunk.start
            n = length // GROUP
            starts += [chunk.start + j for j in range(n)] + list(range(chunk.start + n * GROUP, chunk.stop))
            strides += [n] * n + [1] * (length - n * GROUP)
            sizes += [GROUP] * n + [1] * (length - n * GROUP)
        self.count = len(starts)
        self.start, self.stride, self.size = (torch.tensor(v, device=device) for v in (starts, strides, sizes))
        offsets = torch.arange(GROUP, device=device)
        self.valid = offsets < self.size[:, None]  # (groups, GROUP)
        # Each group's token ids, (groups, GROUP); a leftover group of one repeats its token (not a member: `valid`).
        self.members = torch.where(self.valid, self.start[:, None] + self.stride[:, None] * offsets,
                                   self.start[:, None])
        # Each token's place in the group-major order (group g, member m at g * GROUP + m), `_ExactRows`'s.
        order, valid = self.members.flatten(), self.valid.flatten()
        self.position = torch.empty(vocab, dtype=torch.long, device=device)
        self.position[order[valid]] = torch.arange(order.numel(), device=device)[valid]

    def candidates(self, maxima: Tensor, scaled: Tensor, rows: _ExactRows, k: int) -> _Candidates:
        """The tokens of the k + 2 groups with the largest `maxima` (head, rows, groups) and their logits: the top-k
        lies among them (two spare groups: a group whose maximum rounds just below the k-th group's is still
        rescored)."""
        chosen = maxima.topk(min(k + 2, maxima.shape[-1]), dim=-1).indices  # (head, rows, k + 2)
        valid = self.valid[chosen].flatten(-2)
        ids = self.members[chosen].flatten(-2).masked_fill(~valid, 0)
        return _Candidates(ids, valid, rows.group_logits(chosen, ids, scaled))


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
    """The lens's factors per head and token, exact (fp32) and as the sweep's `dtype` products round them, in two
    tables laid out group by group (`_Groups.members`): the candidates of a head-row are whole groups, so their
    logits, exact and rounded, come from gathers of contiguous rows and one fused pass."""

    def __init__(self, factors: Tensor, constant: Tensor | None, dtype: torch.dtype, groups: _Groups,
                 workspace: dict[tuple, Tensor]):
        """factors (head, vocab, d_head + 1) fp32; workspace: where the tables and gather buffers are kept for the
        next layer (`score_layer_tiled`'s)."""
        heads, vocab, width = factors.shape
        rows = scratch(workspace, "factor rows", (heads * vocab, width), torch.float32, factors.device)
        rows.view(heads, vocab, width).copy_(factors.detach())  # one transposing copy, then whole rows move
        order = (groups.members.flatten() + torch.arange(heads, device=factors.device)[:, None] * vocab).flatten()
        exact = scratch(workspace, "exact table", (order.numel(), width), torch.float32, factors.device)
        # (head, groups * GROUP, width), and its copy as the sweep's extended factors round it
        self.exact = torch.index_select(rows, 0, order, out=exact).view(heads, -1, width)
        self.rounded = scratch(workspace, "rounded table", self.exact.shape, dtype, factors.device).copy_(self.exact)
        self.groups = groups
        self.constant = None if constant is None else constant.detach().float()
        self.dtype = dtype
        self.buffers = workspace

    def logits(self, ids: Tensor, scaled: Tensor) -> TokenLogits:
        """Of tokens ids (head, rows, n); scaled (head, rows, d_head + 1) = [z_h, 1] / divisor in fp32."""
        flat = self.groups.position[ids] + self._head_offsets(ids, self.groups.count * GROUP)
        return self._logits(flat, 1, scaled, ids)

    def group_logits(self, chosen: Tensor, ids: Tensor, scaled: Tensor) -> TokenLogits:
        """Of every member of groups chosen (head, rows, n), whose ids (head, rows, n * GROUP) `_Groups.candidates`
        lists (0 where not a member)."""
        return self._logits(chosen + self._head_offsets(chosen, self.groups.count), GROUP, scaled, ids)

    @staticmethod
    def _head_offsets(ids: Tensor, per_head: int) -> Tensor:
        return torch.arange(ids.shape[0], device=ids.device)[:, None, None] * per_head

    def _logits(self, flat: Tensor, members: int, scaled: Tensor, ids: Tensor) -> TokenLogits:
        """Table rows `flat` (head, rows, n), each `members` tokens: the exact and rounded logits of their
        n * members tokens, a block of rows at a time (bounds the gathered block's memory), gathered into reused
        buffers (a fresh multi-MB block per gather cost more than the gather) and summed in one fused pass."""
        heads, rows, n = flat.shape
        exact = torch.empty(heads, rows, n * members, device=flat.device)
        rounded = torch.empty_like(exact)
        # The rounded logits' coefficients in base 2, rounded as the sweep's are.
        coefficients = scaled[:, :, None], (scaled * LOG2E).to(self.dtype).float()[:, :, None]
        for start in range(0, rows, CANDIDATE_ROWS):
            block = slice(start, start + CANDIDATE_ROWS)
            indices = flat[:, block].flatten()
            gathered = [self._gather(table, indices, members) for table in (self.exact, self.rounded)]
            exact[:, block], rounded[:, block] = table_logits(
                *(block_rows.view(heads, -1, n * members, self.exact.shape[-1]) for block_rows in gathered),
                coefficients[0][:, block], coefficients[1][:, block])
        if self.constant is not None:
            constant = self.constant[ids]
            exact += constant
            rounded += (constant * LOG2E).to(self.dtype).float()
        return TokenLogits(exact, rounded / LOG2E)

    def _gather(self, table: Tensor, indices: Tensor, members: int) -> Tensor:
        """Rows `indices` of `table` (head, groups * GROUP, width) seen as runs of `members` tokens."""
        runs = table.view(-1, members * table.shape[-1])
        out = scratch(self.buffers, "gathered", (indices.numel(), runs.shape[-1]), runs.dtype, runs.device)
        return torch.index_select(runs, 0, indices, out=out)


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

"""The default scorer of `eval`: `fidelity.score_layer`'s per-head scores from cache-sized (head, rows, vocabulary
chunk) tiles, each view an online logsumexp with its running shift inside its product (`Sweep`)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from .fidelity import Targets
from .lens import Lens
from .objective import DEFAULT_BLOCK_ROWS, VOCAB_CHUNK, _autocast, _chunks
from .sweep import GROUP, LOG2E, Sweep, extended_factors

SCORE_TILE_ROWS = DEFAULT_BLOCK_ROWS
"""Head-token rows per tile when scoring (e.g. 256 tokens x 9 heads): the bf16 products need a few hundred rows per
head to run near the GEMM rate (64 rows ran at a quarter of it on 2 cores), and the tile must stay cache-sized."""


def score_layer_tiled(lens: Lens, baseline: Lens, layer: int, z: Tensor, targets: Targets,
                      block_rows: int = SCORE_TILE_ROWS, dtype: torch.dtype = torch.bfloat16,
                      lens_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """`score_layer`'s scores from cache-sized (head, rows, vocabulary chunk) tiles, summed in fp32.

    The lens, the logit lens and DLA are three factored views of the same z (the last two share the baseline's
    factors and differ only in divisor and constant; they run as one product). Each view streams through an online
    logsumexp whose shift sits inside the product (`Sweep`), so a chunk costs one product and one fused pass;
    no vocabulary-sized row of any view is ever whole. The lens's view runs in `lens_dtype` (fp32), its cross term
    sum_v p_v l_v from the same logits as its logsumexp: with its factors rounded to bf16 its per-head KL on a fitted
    SmolLM2 lens strayed up to 0.009 nats from fp32, which is the margin a head is judged by (the rounding of the
    factors, fixed per token, does not average out over positions). Carrying each factor and coefficient as a bf16
    pair (hi + lo, three products) held it to 0.003 but ran no faster than fp32 on an AMX machine (2.2 ms per tile
    and chunk, both). The baselines run in `dtype` (bf16); they are far from the model by design (KL ~3-80 nats)
    and take their cross terms exactly in fp32 from factors averaged under p (`expected_factors`), which touches no
    vocabulary per head. The lens's view also keeps its entropy and the maxima of strided token groups; its top-k
    is rescored on the tokens of the groups with the largest maxima. Not for soft-capped readouts (the cap is not
    linear in the factors): `score_layer` serves them.
    """
    heads = lens.config.heads
    z_aug = lens.augmented(z)  # (tokens, head, d_head + 1)
    with _autocast(z.device, lens_dtype):
        own_factors, own_constant = lens.vocab_factors(layer)
    with _autocast(z.device, dtype):  # the vocab x d_model x d_head factor products run in `dtype` too
        base_factors, base_constant = baseline.vocab_factors(layer)
    groups = _Groups(lens.model.vocab, z.device)
    own = extended_factors(own_factors, own_constant, lens_dtype, groups.chunks)
    base = extended_factors(base_factors, base_constant, dtype, groups.chunks)
    own_rows = own_factors.flatten(0, 1).contiguous()  # (head * vocab, d_head + 1): rows top-k candidates gather
    rows_per_tile = max(1, block_rows // len(heads))
    parts: dict[str, list[Tensor]] = defaultdict(list)
    for start in range(0, z.shape[0], rows_per_tile):
        rows = slice(start, start + rows_per_tile)
        final_scale = targets.final_scale[rows]
        scaled = {
            "own": _scaled(z_aug[rows], lens.divisor(z[rows], layer, final_scale)),
            "logit": _scaled(z_aug[rows], baseline.divisor(z[rows], layer)),
            "dla": _scaled(z_aug[rows], final_scale[:, None].expand(-1, len(heads))),
        }
        n_rows = scaled["own"].shape[1]
        p = [block[rows] for block in targets.p_chunks(lens_dtype, groups.chunks)]
        own_sweep = Sweep(scaled["own"], own_constant is not None, own, lens_dtype, groups, p=p)
        # logit then DLA rows, one product: DLA is an attribution and adds no constant.
        base_sweep = Sweep(torch.cat([scaled["logit"], scaled["dla"]], dim=1), base_constant is not None, base,
                            dtype, constant_rows=n_rows)
        for index in range(len(groups.chunks)):
            own_sweep.add(index)
            base_sweep.add(index)
        base_lse = base_sweep.log_sum_exp()
        cross = _baseline_cross_terms(baseline, layer, scaled, targets, rows)
        neg_entropy = targets.neg_entropy[rows]
        next_token = targets.next_token[rows]
        picked = _picked_logits(scaled["own"], own_factors, own_constant, next_token)
        top_ids = groups.top_ids(own_sweep.maxima(), scaled["own"], own_rows, own_constant, targets.top.shape[-1])
        scores = _own_scores(own_sweep, targets, rows, picked, top_ids)
        scores["logit"] = (neg_entropy - cross["logit"] + base_lse[:, :n_rows]).T
        scores["dla"] = (neg_entropy - cross["dla"] + base_lse[:, n_rows:]).T
        for name, value in scores.items():
            parts[name].append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


def _scaled(z_aug: Tensor, divisor: Tensor) -> Tensor:
    """(head, rows, d_head + 1) = [z_h, 1] / divisor in fp32: the divisor goes on the small side of the product."""
    return (z_aug / divisor[..., None]).transpose(0, 1)


def _baseline_cross_terms(baseline: Lens, layer: int, scaled: dict[str, Tensor], targets: Targets,
                          rows: slice) -> dict[str, Tensor]:
    """sum_v p_v l_v of the logit lens and DLA, (head, rows), exactly in fp32 from their shared factors averaged
    under p; DLA, an attribution, adds no constant."""
    p, p_readout = targets.p[rows], targets.p_readout(baseline.model.unembed)[rows]
    mean, constant = baseline.kind_spec.expected_factors(baseline, layer, p, p_readout)
    logit = (scaled["logit"] * mean).sum(-1)
    return {"logit": logit if constant is None else logit + constant, "dla": (scaled["dla"] * mean).sum(-1)}


def _picked_logits(scaled: Tensor, factors: Tensor, constant: Tensor | None, next_token: Tensor) -> Tensor:
    """The lens's logit of each row's next token (head, rows), from the factor columns of those tokens alone."""
    columns = factors[:, next_token.clamp(min=0)]  # (head, rows, d_head + 1)
    picked = (scaled * columns.float()).sum(-1)
    return picked if constant is None else picked + constant[next_token.clamp(min=0)].float()


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

    def top_ids(self, maxima: Tensor, scaled: Tensor, rows_of: Tensor, constant: Tensor | None, k: int) -> Tensor:
        """The top-k token ids (head, rows, k), largest first, of the view with group `maxima` (head, rows, groups):
        the logits of the tokens of the k + 2 groups with the largest maxima (two spare: a group whose maximum
        rounds just below the k-th group's is still rescored). rows_of: (head * vocab, d_head + 1) factors, in the
        sweep's dtype: candidates are ranked by the same rounding as the sweep's logits."""
        chosen = maxima.topk(min(k + 2, maxima.shape[-1]), dim=-1).indices  # (head, rows, k + 2)
        offsets = torch.arange(GROUP, device=chosen.device)
        ids = (self.start[chosen][..., None] + self.stride[chosen][..., None] * offsets).flatten(-2)
        valid = (offsets < self.size[chosen][..., None]).flatten(-2)
        ids = ids.masked_fill(~valid, 0)
        logits = torch.empty(ids.shape, device=ids.device)
        # Row of (head h, token v) in rows_of: h * vocab + v.
        flat_ids = ids + torch.arange(ids.shape[0], device=ids.device)[:, None, None] * self.vocab
        for start in range(0, ids.shape[1], CANDIDATE_ROWS):  # (head, rows, candidates, d_head + 1) a block at a time
            block = slice(start, start + CANDIDATE_ROWS)
            block_ids = flat_ids[:, block]
            columns = rows_of.index_select(0, block_ids.flatten()).view(*block_ids.shape, -1)
            logits[:, block] = (columns @ scaled[:, block, :, None].to(columns.dtype)).squeeze(-1).float()
        if constant is not None:
            logits = logits + constant[ids].float()
        logits = logits.masked_fill(~valid, -torch.inf)
        return ids.gather(-1, logits.topk(min(k, self.vocab), dim=-1).indices)


SCORE_VOCAB_CHUNK = VOCAB_CHUNK
"""Vocabulary entries per scoring tile: with SCORE_TILE_ROWS, a (head, rows, chunk) tile of bf16 logits stays
cache-sized (~5 MB); products whose output is 4x that ran at half the rate on 2 cores."""
CANDIDATE_ROWS = 64
"""Rows per block when the lens's top-k candidates are rescored (bounds that block's memory)."""
def _own_scores(sweep: "Sweep", targets: Targets, rows: slice, picked: Tensor, top_ids: Tensor) -> dict[str, Tensor]:
    """The lens's own scores, as `_lens_scores` gives them: each (rows, head)."""
    model_top = targets.top[rows]  # (rows, k)
    lens_top = top_ids.transpose(0, 1)  # (rows, head, k)
    next_token = targets.next_token[rows]
    log_sum_exp = sweep.log_sum_exp()
    return {
        "kl": sweep.kl(targets.neg_entropy[rows]).T,
        "top1": (lens_top[..., 0] == model_top[:, None, 0]).float(),
        "top10": (lens_top[..., :, None] == model_top[:, None, None, :]).any(-1).float().mean(-1),
        "cross_entropy": torch.where(next_token[:, None] >= 0, (log_sum_exp - picked).T, 0.0),
        "entropy": sweep.entropy().T,
        "top_id": lens_top[..., 0],
    }

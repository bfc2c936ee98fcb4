"""Top-k tokens of y @ W_U^T + b over the whole vocabulary, fast: a bf16 screen, an exact fp32 recheck.

Decoding every head at every position is one (rows x d_model) @ (d_model x vocab) product: in fp32 it is
the slowest part of `decode` (~1.5 s for 270 heads x 20 tokens on 2 cores), in bf16 about 3x faster. A
bf16 product alone would misrank close tokens, so the screen only proposes candidates:

1. rows are processed in tiles small enough that a tile's (rows, vocab) logits stay in cache;
2. the top-m (m > k) bf16 logits of each row are the candidates; their logits are recomputed in fp32;
3. a rigorous bound on the bf16 error certifies, per row, that no token outside the candidates can beat
   the k-th exact logit. A row that fails (a near-flat top, e.g. a head that writes little) is rechecked with
   more candidates, and if it fails again, computed in fp32.

So the returned ids and logits are those of the fp32 computation (up to fp32 rounding and ties). The
log-normalizer uses the exact logits of the candidates and the bf16 ones of the rest, so probabilities carry
the bf16 error of the non-candidate mass: within 1.1% (relative) of fp32 on every head and position of a
SmolLM2 prompt, whose logits reach ~200, where bf16's spacing is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .fused import group_maxima, group_members

CANDIDATES = 64
"""Candidates per row that the bf16 screen passes to the fp32 recheck (at least k + 8)."""
WIDE_CANDIDATES = 256
"""Candidates for rows whose top-k the first CANDIDATES could not certify."""
GROUP = 8
"""Tokens per group whose bf16 maximum the screen takes first: the top-m tokens lie in the m groups with the largest
maxima, so the full-width top-k runs over vocab / GROUP maxima and then over those groups' m * GROUP tokens."""
SUM_ROWS = 16
"""Rows per block of the log-normalizer's fp32 log-softmax (16 x 49,152 fp32: 3 MB, in cache)."""
TILE_ROWS = 128
"""Rows per tile: 128 x 49,152 bf16 logits (12 MB) stay in the last-level cache for the top-k and exp passes
(measured on SmolLM2, 2 cores: 64 rows 0.91 s, 96 0.82 s, 128 0.80 s, 192 1.03 s, 256 1.23 s for 270 heads x 20 tokens)."""


@dataclass
class VocabTopK:
    logits: Tensor
    """(rows, k) fp32 logits, descending."""
    ids: Tensor
    """(rows, k) token ids."""
    log_normalizer: Tensor
    """(rows,) logsumexp of each row's logits over the vocabulary."""

    def probs(self) -> Tensor:
        return (self.logits - self.log_normalizer[:, None]).exp()

    @classmethod
    def of_logits(cls, logits: Tensor, k: int) -> VocabTopK:
        """From every logit of each row, (rows, vocab)."""
        top_logits, top_ids = logits.topk(k, dim=-1)
        return cls(top_logits, top_ids, torch.logsumexp(logits, dim=-1))


@torch.no_grad()
def vocab_topk(y: Tensor, W_U: Tensor, bias: Tensor | None, k: int, exact: bool = False,
               screen: Screen | None = None) -> VocabTopK:
    """Top-k of y @ W_U^T (+ bias) per row: y (rows, d_model), W_U (vocab, d_model), bias (vocab,) or None.

    `screen`: Screen(W_U, bias) built once by a caller that decodes repeatedly (its bf16 copy and norms of
    W_U cost ~30 ms for SmolLM2)."""
    y = y.float()
    m = max(k + 8, CANDIDATES)
    if exact or m >= W_U.shape[0] or y.device.type != "cpu":
        # GPUs run the fp32 product fast enough, and there a tile loop costs more than it saves.
        return _exact(y, W_U.float(), bias, k)
    screen = screen or Screen(W_U, bias)
    parts = [screen.tile(y[start : start + TILE_ROWS], k, m) for start in range(0, y.shape[0], TILE_ROWS)]
    return VocabTopK(*(torch.cat(column) for column in zip(*parts)))


def _exact(y: Tensor, W_U: Tensor, bias: Tensor | None, k: int) -> VocabTopK:
    logits = y @ W_U.T
    if bias is not None:
        logits += bias
    return VocabTopK.of_logits(logits, k)


class Screen:
    """W_U in bf16 plus what the error bound needs about it."""

    def __init__(self, W_U: Tensor, bias: Tensor | None):
        self.W_U = W_U.float()
        self.W_U_bf16 = W_U.to(torch.bfloat16)
        self.bias = None if bias is None else bias.float()
        self.bias_bf16 = None if bias is None else bias.to(torch.bfloat16)
        # |bf16(y) . bf16(w) - y . w| <= (2^-8 + (d + 1) 2^-23) sum_j |y_j w_j| <= that * |y| max_v |w_v|
        # (each operand rounds to 2^-9 relative, the fp32 accumulation adds d * 2^-24).
        d_model = W_U.shape[1]
        self.product_error = (2.0**-8 + (d_model + 1) * 2.0**-23) * float(self.W_U.norm(dim=1).max())
        self.bias_max = 0.0 if bias is None else float(bias.abs().max())

    def bound(self, y_norm: Tensor, value: Tensor) -> Tensor:
        """Largest |bf16 logit - exact logit| of a bf16 logit equal to `value` in a row of norm y_norm."""
        if self.bias_bf16 is None:  # one rounding, of the product: 2^-9 of the exact value <= 2^-9 (1 + 2^-8) |value|
            return self.product_error * y_norm + 2.0**-9 * (1 + 2.0**-8) * value.abs()
        # The product, the bias and their sum each round once; 2^-8 covers the product's and the sum's roundings.
        return self.product_error * y_norm + 2.0**-8 * (1 + 2.0**-8) * (value.abs() + self.bias_max)

    def tile(self, y: Tensor, k: int, m: int) -> tuple[Tensor, Tensor, Tensor]:
        screened = y.to(torch.bfloat16) @ self.W_U_bf16.T  # (rows, vocab) bf16
        if self.bias_bf16 is not None:
            screened += self.bias_bf16
        candidates, exact, certified = self._recheck(y, screened, k, m)
        top_logits, top_ids = exact[:, :k].clone(), candidates[:, :k].clone()
        if not bool(certified.all()):  # a flat top (e.g. a head that writes little): more candidates
            redo = (~certified).nonzero().squeeze(1)
            wide_candidates, wide_exact, certified[redo] = self._recheck(y[redo], screened[redo], k, WIDE_CANDIDATES)
            top_logits[redo], top_ids[redo] = wide_exact[:, :k], wide_candidates[:, :k]
        log_normalizer = self._log_normalizer_(screened, candidates, exact)
        if not bool(certified.all()):  # still flat: fp32 for those rows
            redo = (~certified).nonzero().squeeze(1)
            fallback = _exact(y[redo], self.W_U, self.bias, k)
            top_logits[redo], top_ids[redo], log_normalizer[redo] = fallback.logits, fallback.ids, fallback.log_normalizer
        return top_logits, top_ids, log_normalizer

    def _recheck(self, y: Tensor, screened: Tensor, k: int, m: int) -> tuple[Tensor, Tensor, Tensor]:
        """The top-m bf16 candidates (rows, m) and their exact logits, sorted by the exact logit; and per row
        whether their top k is certainly the true top-k."""
        m = min(m, screened.shape[1])
        screened_top, candidates = _screen_top(screened, m)  # (rows, m)
        exact = torch.einsum("rd,rmd->rm", y, self.W_U[candidates])  # the candidates, in fp32
        if self.bias is not None:
            exact += self.bias[candidates]
        exact, order = exact.sort(dim=-1, descending=True)
        candidates = candidates.gather(1, order)
        # Every non-candidate's bf16 logit is <= the smallest candidate's, so its exact logit is at most that
        # plus the bound (value + bound grows with value); the k-th exact logit must clear it.
        weakest = screened_top[:, -1].float()
        certified = exact[:, k - 1] >= weakest + self.bound(y.norm(dim=-1), weakest)
        if m == screened.shape[1]:
            certified[:] = True  # every token was rechecked
        return candidates, exact, certified

    @staticmethod
    def _log_normalizer_(screened: Tensor, candidates: Tensor, exact: Tensor) -> Tensor:
        """logsumexp over the vocabulary: exact logits for the candidates, bf16 ones for the rest, each term
        exponentiated in fp32."""
        shift = exact[:, :1]  # the largest exact logit; bf16 ones exceed it by at most the bound
        # All terms minus the candidates' (cheaper than masking them out); the cancellation error is ~1e-6 of the
        # total (_log_sum_exp's own), far below the bf16 terms' error.
        everything = torch.exp(_log_sum_exp(screened) - shift.squeeze(1))
        rest = everything - torch.exp(screened.gather(1, candidates).float() - shift).sum(-1)
        return shift.squeeze(1) + torch.log(rest.clamp_(min=0) + torch.exp(exact - shift).sum(-1))


def _log_sum_exp(values: Tensor) -> Tensor:
    """logsumexp per row, in fp32, of (rows, vocab) bf16 values: ATen's fused log-softmax kernel (max, exponentials
    and their sum in one vectorized pass) over blocks of SUM_ROWS rows whose fp32 output stays in cache, read back
    as x_0 - log_softmax(x)_0. Per 128-row SmolLM2 tile ~2.7 ms against ~9 ms (2-core AMD EPYC) for a copy, exp, sum
    pass through a cached fp32 block, all in fp32 (error ~1e-6 against float64)."""
    out = torch.empty(values.shape[0], device=values.device)
    for start in range(0, values.shape[0], SUM_ROWS):
        block = values[start : start + SUM_ROWS]
        out[start : start + SUM_ROWS] = block[:, 0].float() - torch.log_softmax(block, -1, dtype=torch.float32)[:, 0]
    return out


def _screen_top(screened: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The m largest screened logits of each row (rows, m), descending, and their token ids: from the m groups
    with the largest maxima (`fused.group_maxima`; each holds at least one of those m), then a top-m over their
    tokens. On SmolLM2 (270 heads x 20 tokens) the top-k took 81 ms this way, 226 ms as one top-m per row."""
    vocab = screened.shape[1]
    if vocab < 4 * GROUP * m:  # a short row: one top-m costs no more
        return screened.topk(m, dim=-1)
    groups = group_maxima(screened, GROUP).topk(m, dim=-1, sorted=False).indices
    ids, valid = group_members(groups, vocab, GROUP)
    values, order = screened.gather(1, ids).masked_fill(~valid, -torch.inf).topk(m, dim=-1)
    return values, ids.gather(1, order)

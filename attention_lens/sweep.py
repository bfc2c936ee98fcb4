"""An online logsumexp over vocabulary chunks whose running shift sits inside the product (`Sweep`): what the tiled
scorer of `eval` (fidelity_tiles) and the trainer's blocks (objective) stream every view of a lens through."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .fused import chunk_statistics, group_maxima, view_sums

GROUP = 8
"""Tokens per group whose maximum a sweep keeps when asked (the strided groups of `fidelity_tiles._Groups`)."""
REBASE_ABOVE = 60.0
"""A sweep moves its shift once its running sum of exp(l - shift) passes exp(60): sums stay far from overflow."""
LOG2E = 1 / math.log(2)


def extended_factors(factors: Tensor, constant: Tensor | None, dtype: torch.dtype,
                     chunks: list[slice]) -> list[Tensor]:
    """Per vocabulary chunk, a contiguous (head, d_head + 3, chunk) block in `dtype`: the factors, then the
    constant times log2(e) (zeros if none), then a row of ones, so [z_h, 1] log2(e) / divisor, a constant weight (1
    or 0, exact in any dtype) and -shift multiply all three in one product. Contiguous blocks, once per layer: a
    strided chunk would be copied by every product of every tile."""
    heads, _, rank = factors.shape
    factors_t = factors.detach().transpose(1, 2)  # (head, d_head + 1, vocab)
    blocks = []
    for chunk in chunks:  # chunk by chunk: a whole extended copy first would double the peak for a moment
        block = torch.ones(heads, rank + 2, chunk.stop - chunk.start, dtype=dtype, device=factors.device)
        block[:, :rank] = factors_t[:, :, chunk]
        block[:, rank] = 0 if constant is None else (constant[chunk].float() * LOG2E).to(dtype)
        blocks.append(block)
    return blocks


class Sweep:
    """One view's online logsumexp over vocabulary chunks, with the running shift inside the product.

    The coefficients are [[z_h, 1] / divisor, constant weight, -shift] against the extended factors, so a chunk's
    product already holds l - shift: a chunk costs a product and one pass that takes every sum at once
    (`fused.chunk_statistics`, one compiled kernel for large tiles), with no max and no subtraction pass. The sweep
    works in base 2 (the coefficients carry log2(e), the product gives (l - shift) log2(e)), because exp2 runs
    faster than exp here. The first chunk sets the shift to its maximum, so the largest term seen is never
    below 1. Later chunks may exceed it: 2^y is finite up to y = 128 (bf16 and fp32 share that range), and the shift
    moves by log2 S (a rescale of the sums, no pass) once S passes exp(REBASE_ABOVE). A chunk that overflows anyway
    is taken again with the shift moved to its maximum. Sums accumulate in fp32; the shift is kept at a value
    `dtype` holds exactly, so what the product subtracts is what logsumexp adds back. With `groups`, the sweep also
    keeps W = sum 2^y y (entropy = ln 2 (log2 S - W / S)) and the group maxima of `fidelity_tiles._Groups`.

    Given p, the sweep also takes the cross term C = sum_v p_v y_v from the same rounded product, so
    KL = sum p log p - C ln 2 + ln S (sum p = 1) carries the rounding of the logits in both of its terms, which
    cancel where the view is close to the model. A shift move by `step` lowers C by step times the p-mass seen.
    """

    def __init__(self, scaled: Tensor, has_constant: bool, factors: list[Tensor], dtype: torch.dtype,
                 groups: Any = None, constant_rows: int | None = None, p: list[Tensor] | None = None,
                 buffers: dict[tuple, Tensor] | None = None):
        """scaled: (head, rows, d_head + 1) [z_h, 1] / divisor in fp32; factors: per chunk (head, d_head + 3, chunk)
        in `dtype`; groups: a `fidelity_tiles._Groups` to keep group maxima and the entropy's sum (typed loosely:
        fidelity_tiles imports this module); p: per chunk, the rows' (rows, chunk) model probabilities, for the
        cross term; buffers: scratch tiles to reuse (`_reused_tile`), shareable with later sweeps and other views."""
        heads, rows, _ = scaled.shape
        constant_weight = torch.zeros(heads, rows, 1, device=scaled.device)
        if has_constant:
            constant_weight[:, :constant_rows] = 1.0  # rows past `constant_rows` (DLA's) add no constant
        shift = torch.zeros(heads, rows, 1, device=scaled.device)
        self.coefficients = torch.cat([scaled * LOG2E, constant_weight, shift], dim=-1).to(dtype)
        self.p = p
        self.cross = torch.zeros(heads, rows, device=scaled.device)
        self.p_seen = torch.zeros(rows, device=scaled.device)
        self.factors = factors  # per chunk, (head, d_head + 3, chunk)
        self.shift = torch.zeros(heads, rows, device=scaled.device)  # in log2 units
        self.sum_exp = torch.zeros(heads, rows, device=scaled.device)
        self.weighted = torch.zeros(heads, rows, device=scaled.device)
        self.groups = groups
        self.group_maxima: Tensor | None = None  # (head, rows, groups), filled chunk by chunk
        self.started = False
        self.buffers = {} if buffers is None else buffers

    def buffer(self, name: str, like: Tensor, chunk: int) -> Tensor:
        """A (head, rows, chunk) tile shaped as `like`, reused for every chunk of that width (`_reused_tile`)."""
        return _reused_tile(self.buffers, name, like, self.factors[chunk].shape[-1])

    def add(self, chunk: int) -> None:
        """Take in vocabulary chunk number `chunk`."""
        # (head, rows, chunk): (l - shift) log2(e)
        shifted = torch.bmm(self.coefficients, self.factors[chunk], out=self.buffer("product", self.coefficients, chunk))
        if not self.started:  # the first chunk's maximum: the largest term is 2^0 from here on
            top = (group_maxima(shifted, GROUP) if self.groups is not None else shifted).amax(-1).float()
            self._move_shift(top, shifted)
            self.started = True
        p = None if self.p is None else self.p[chunk]
        group = 0 if self.groups is None else GROUP
        statistics = chunk_statistics(shifted, p, group)
        overflow = ~torch.isfinite(statistics.sum_exp)
        if overflow.any():  # a logit far above the shift: move it there and take the chunk again
            self._move_shift(torch.where(overflow, shifted.amax(-1).float(), 0.0), shifted)
            statistics = chunk_statistics(shifted, p, group)
        if self.groups is not None:
            self._keep_maxima(chunk, statistics.maxima)
            self.weighted += statistics.weighted
        if p is not None:
            self.cross += statistics.cross
            self.p_seen += statistics.p_mass
        self.sum_exp += statistics.sum_exp
        large = self.sum_exp > math.exp(REBASE_ABOVE)
        if large.any():
            self._move_shift(torch.where(large, torch.log2(self.sum_exp), 0.0))

    def _move_shift(self, step: Tensor, shifted: Tensor | None = None) -> None:
        """Raise the shift by ~`step` (head, rows): rescale the sums, the coefficients and this chunk's values."""
        new_shift, step = _move_product_shift(self.coefficients, self.shift, step, shifted)
        # sum 2^(y - step) = 2^-step S; sum 2^(y - step)(y - step) = 2^-step (W - step S). Nothing seen yet: 1.
        rescale = torch.where(self.sum_exp > 0, torch.exp2(-step), 1.0)
        self.weighted = rescale * (self.weighted - step * self.sum_exp)
        self.sum_exp = rescale * self.sum_exp
        self.cross = self.cross - step * self.p_seen
        self.shift = new_shift

    def _keep_maxima(self, chunk: int, maxima: Tensor) -> None:
        """The chunk's group maxima (head, rows, its groups), against the shift they were taken at, written in place
        into the sweep's (head, rows, groups) maxima: a list concatenated at the end cost a pass and a fresh
        tile-sized block per tile."""
        if self.group_maxima is None:
            self.group_maxima = _reused_tile(self.buffers, "maxima", self.shift, self.groups.count)
        start = self.groups.offsets[chunk]
        torch.add(maxima, self.shift[..., None], out=self.group_maxima[..., start:start + maxima.shape[-1]])

    def maxima(self) -> Tensor:
        return self.group_maxima  # (head, rows, groups)

    def log_sum_exp(self) -> Tensor:
        """Natural logsumexp of the view's logits, (head, rows)."""
        return (self.shift + torch.log2(self.sum_exp)) / LOG2E

    def kl(self, neg_entropy: Tensor) -> Tensor:
        """KL(P_model || softmax(logits)) = sum p log p - sum p l + logsumexp(l), (head, rows), given sum p log p
        per row (rows,); needs p. sum p l = (C + shift sum p) ln 2 with the p-mass seen, so a p whose sum is not
        exactly 1 (a bf16 copy: off by ~1e-3) costs its own rounding, not that times the shift."""
        p_shift = self.shift * (1 - self.p_seen)
        return neg_entropy + (torch.log2(self.sum_exp) - self.cross + p_shift) / LOG2E

    def entropy(self) -> Tensor:
        return (torch.log2(self.sum_exp) - self.weighted / self.sum_exp) / LOG2E


class ScaledViews:
    """Several views of one product that differ only by a positive scale per row, each with its online logsumexp.

    The logit lens and DLA are W_U (gamma * W_O z_h) over two divisors: one product at the larger scale serves
    both. With y the product's base-2 logits less its shift s, view j's are ratio_j y less the shift ratio_j s
    (ratio_j = its scale / the larger, in (0, 1]), so a chunk costs one product and one pass that takes every
    view's sum of 2^(ratio_j y) (`fused.view_sums`); a ratio below 1 also shrinks the product's rounding for that
    view. The shift follows `Sweep`'s rules: the first chunk's maximum, a chunk taken again with the shift at its
    maximum where a sum overflows, and a move once a sum passes exp(REBASE_ABOVE), by the smallest
    log2(S_j) / ratio_j: every view's largest term then stays within [2^-log2(vocab), 1] of its sum. No constant.
    """

    def __init__(self, scaled: Tensor, ratios: Tensor, factors: list[Tensor], dtype: torch.dtype,
                 buffers: dict[tuple, Tensor] | None = None):
        """scaled: (head, rows, d_head + 1) [z_h, 1] times the larger scale, fp32; ratios: (views, head, rows);
        factors: `extended_factors` of a view without a constant, per chunk; buffers: as `Sweep`'s."""
        heads, rows, _ = scaled.shape
        no_constant = torch.zeros(heads, rows, 1, device=scaled.device)
        self.coefficients = torch.cat([scaled * LOG2E, no_constant, no_constant], dim=-1).to(dtype)
        self.ratios = ratios
        self.factors = factors
        self.shift = torch.zeros(heads, rows, device=scaled.device)  # the product's, in log2 units
        self.sum_exp = torch.zeros_like(ratios)
        self.started = False
        self.buffers = {} if buffers is None else buffers

    def add(self, chunk: int) -> None:
        """Take in vocabulary chunk number `chunk`."""
        tile = _reused_tile(self.buffers, "product", self.coefficients, self.factors[chunk].shape[-1])
        shifted = torch.bmm(self.coefficients, self.factors[chunk], out=tile)
        if not self.started:
            self._move_shift(shifted.amax(-1).float(), shifted)
            self.started = True
        sums = view_sums(shifted, self.ratios)
        overflow = ~torch.isfinite(sums).all(0)
        if overflow.any():
            self._move_shift(torch.where(overflow, shifted.amax(-1).float(), 0.0), shifted)
            sums = view_sums(shifted, self.ratios)
        self.sum_exp += sums
        large = (self.sum_exp > math.exp(REBASE_ABOVE)).any(0)
        if large.any():
            step = torch.where(self.sum_exp > 0, torch.log2(self.sum_exp) / self.ratios, torch.inf).amin(0)
            self._move_shift(torch.where(large, step, 0.0))

    def _move_shift(self, step: Tensor, shifted: Tensor | None = None) -> None:
        """Raise the product's shift by ~`step` (head, rows): rescale every view's sum and this chunk's values."""
        self.shift, step = _move_product_shift(self.coefficients, self.shift, step, shifted)
        self.sum_exp = torch.where(self.sum_exp > 0, self.sum_exp * torch.exp2(-step * self.ratios), 0.0)

    def log_sum_exp(self) -> Tensor:
        """Natural logsumexp of each view's logits, (views, head, rows)."""
        return (self.ratios * self.shift + torch.log2(self.sum_exp)) / LOG2E


def _reused_tile(buffers: dict[tuple, Tensor], name: str, like: Tensor, width: int) -> Tensor:
    """A (head, rows, width) tile shaped and typed as `like`, kept in `buffers` for the next chunk, tile or view of
    that shape: allocating a fresh multi-MB tile per chunk cost as much as the product that fills it (fresh pages,
    cold cache). A tile is scratch: whoever takes it is done with it before the next asks for it."""
    return scratch(buffers, name, (*like.shape[:2], width), like.dtype, like.device)


def scratch(workspace: dict[tuple, Tensor], name: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> Tensor:
    """An uninitialised tensor kept in `workspace` under its name, shape and dtype, for the next call that asks."""
    key = (name, *shape, dtype)
    if key not in workspace:
        workspace[key] = torch.empty(shape, dtype=dtype, device=device)
    return workspace[key]


def _move_product_shift(coefficients: Tensor, shift: Tensor, step: Tensor,
                        shifted: Tensor | None) -> tuple[Tensor, Tensor]:
    """Raise a product's shift (head, rows) by ~`step`, to a value the coefficients' dtype holds exactly (so what
    the product subtracts is what logsumexp adds back): writes it into the coefficients' last column, subtracts the
    step from the chunk's `shifted` values if given, and returns the new shift and the step taken."""
    new_shift = (shift + step).to(coefficients.dtype).float()
    step = new_shift - shift
    if shifted is not None:
        # A step the chunk's dtype holds (the first chunk's: its own maximum) subtracts without a conversion; any
        # other is taken in fp32 and rounded once.
        low = step.to(shifted.dtype)
        shifted.sub_((low if torch.equal(low.float(), step) else step)[..., None])
    coefficients[..., -1] = (-new_shift).to(coefficients.dtype)
    return new_shift, step

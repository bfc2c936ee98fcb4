"""One pass over a tile of shifted logits for everything a sweep sums from it, compiled into one fused kernel
(torch.compile / Inductor) where the tile is large enough to pay for it, and the same math eagerly elsewhere.

Eagerly, each statistic of a (head, rows, chunk) tile of base-2 logits y is its own pass over memory: 2^y, its sum,
2^y y and its sum, p y and its sum, the group maxima. On SmolLM2's eval those passes cost more than the product that
makes the tile; fused, the tile is read once and the sums accumulate in fp32 in registers.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)

COMPILE_MIN_ELEMENTS = 1 << 20
"""Tiles of at least this many elements (SmolLM2's eval tile: 9 heads x 256 rows x 1,024 tokens) use the compiled
kernel. Compiling costs seconds once per process (less from Inductor's on-disk cache), which small tiles, as in
tiny test models, never earn back."""
DISABLE_VARIABLE = "ATTENTION_LENS_NO_COMPILE"
"""Set to 1 to keep every tile eager (e.g. where a C++ compiler is missing and the fallback's warning is unwanted)."""


class ChunkStatistics(NamedTuple):
    """Sums over a chunk of base-2 logits y, each (head, rows) in fp32; None where not asked for."""

    sum_exp: Tensor
    """sum 2^y"""
    weighted: Tensor | None
    """sum 2^y y (entropy), with groups"""
    cross: Tensor | None
    """sum p y (the KL's cross term), with p"""
    maxima: Tensor | None
    """(head, rows, groups) the maxima of strided token groups (`fidelity_tiles._Groups`), with groups"""
    p_mass: Tensor | None = None
    """sum p (rows,), with p: the p-mass a shift move rescales the cross term by"""


def _statistics(shifted: Tensor, p: Tensor | None, group: int) -> ChunkStatistics:
    """The math, once: what the compiled kernel fuses and the eager path runs as is. group = 0: no entropy and no
    group maxima. Terms are taken in fp32 from the tile's values, whatever its dtype."""
    y = shifted.float()
    terms = torch.exp2(y)
    cross, p_mass = (None, None) if p is None else ((y * p.float()).sum(-1), p.float().sum(-1))
    if not group:
        return ChunkStatistics(terms.sum(-1), None, cross, None, p_mass)
    return ChunkStatistics(terms.sum(-1), (terms * y).sum(-1), cross, group_maxima(shifted, group), p_mass)


def group_maxima(shifted: Tensor, group: int) -> Tensor:
    """(head, rows, chunk) -> (head, rows, groups): n groups of `group` tokens at stride n (token j, j + n, ...), one
    element-wise max over `group` contiguous slices, then a short chunk's leftover tokens as groups of one."""
    n = shifted.shape[-1] // group
    strided = shifted[..., :n * group].unflatten(-1, (group, n)).amax(-2)
    return strided if n * group == shifted.shape[-1] else torch.cat([strided, shifted[..., n * group:]], -1)


def group_members(groups: Tensor, length: int, group: int) -> tuple[Tensor, Tensor]:
    """Token ids (..., count * group) of `group_maxima`'s groups `groups` (..., count) over a row of `length`, and
    whether each is a token (a leftover group of one pads with id 0, marked False)."""
    n = length // group
    offsets = torch.arange(group, device=groups.device)
    strided = groups[..., None] < n
    ids = torch.where(strided, groups[..., None] + n * offsets, n * group + (groups[..., None] - n))
    valid = strided | (offsets == 0)
    return ids.masked_fill(~valid, 0).flatten(-2), valid.flatten(-2)


class GradientTerms(NamedTuple):
    """What the trainer's second pass takes from a chunk of base-2 logits y = (l - shift) log2(e)."""

    residual: Tensor
    """q - p = 2^y rescale - p, (head, rows, chunk) in the tile's dtype: dKL/dlogits, for the factors' gradient"""
    residual_y: Tensor
    """sum (q - p) y, (head, rows) fp32"""
    residual_sum: Tensor
    """sum (q - p), (head, rows) fp32"""
    residual_constant: Tensor | None
    """sum (q - p) c with the chunk's constant c (log2(e) units as the factors carry it), or None"""


def _gradient_terms(shifted: Tensor, p: Tensor, rescale: Tensor, constant: Tensor | None) -> GradientTerms:
    """rescale (head, rows) = 2^-log2(S), so 2^y rescale = q; sums from the fp32 residual, before it rounds."""
    y = shifted.float()
    residual = torch.exp2(y) * rescale[..., None] - p.float()
    weighted = None if constant is None else (residual * constant.float()).sum(-1)
    return GradientTerms(residual.to(shifted.dtype), (residual * y).sum(-1), residual.sum(-1), weighted)


_compiled: dict = {}
_compile_failed = False


def _fused(function, tile: Tensor, *args):
    """`function(tile, *args)`, compiled into one kernel when the tile is large enough (COMPILE_MIN_ELEMENTS).

    If compiling fails (no C++ compiler, an unsupported platform), one warning is logged and every later tile runs
    eagerly: the numbers are the same math, only slower.
    """
    global _compile_failed
    if tile.numel() < COMPILE_MIN_ELEMENTS or _compile_failed or os.environ.get(DISABLE_VARIABLE) == "1":
        return function(tile, *args)
    try:
        with warnings.catch_warnings():  # Inductor warns of torch internals (deprecations): nothing a user can act on
            warnings.simplefilter("ignore")
            if function not in _compiled:
                _compiled[function] = torch.compile(function, dynamic=None)  # static for the first shape, then dynamic
            return _compiled[function](tile, *args)
    except Exception as error:  # noqa: BLE001 -- any compiler failure: the eager math gives the same numbers
        _compile_failed = True
        log.warning("compiling a fused kernel failed (%s: %s); running eagerly, which is slower",
                    type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return function(tile, *args)


def chunk_statistics(shifted: Tensor, p: Tensor | None = None, group: int = 0) -> ChunkStatistics:
    """`_statistics` of a (head, rows, chunk) tile, fused into one compiled kernel for large tiles."""
    return _fused(_statistics, shifted, p, group)


def gradient_terms(shifted: Tensor, p: Tensor, rescale: Tensor, constant: Tensor | None = None) -> GradientTerms:
    """`_gradient_terms` of a (head, rows, chunk) tile, fused into one compiled kernel for large tiles: the trainer's
    second pass reads the chunk once and writes q - p once (eagerly: five passes)."""
    return _fused(_gradient_terms, shifted, p, rescale, constant)


def _view_sums(shifted: Tensor, ratios: Tensor) -> Tensor:
    """(views, head, rows): sum 2^(ratio y) over a (head, rows, chunk) tile y, for each view's (views, head, rows)
    ratio (`sweep.ScaledViews`)."""
    return torch.exp2(shifted.float()[None] * ratios[..., None]).sum(-1)


def view_sums(shifted: Tensor, ratios: Tensor) -> Tensor:
    """`_view_sums` of a (head, rows, chunk) tile, fused into one compiled kernel for large tiles."""
    return _fused(_view_sums, shifted, ratios)


def _table_logits(exact_rows: Tensor, rounded_rows: Tensor, exact: Tensor, rounded: Tensor) -> tuple[Tensor, Tensor]:
    """exact_rows (head, rows, n, width) fp32 and rounded_rows (same, any dtype): per token, its factors and their
    rounded copy; exact and rounded (head, rows, 1, width) fp32 coefficients -> each (head, rows, n): the two dot
    products, in fp32."""
    return (exact_rows * exact).sum(-1), (rounded_rows.float() * rounded).sum(-1)


def table_logits(exact_rows: Tensor, rounded_rows: Tensor, exact: Tensor, rounded: Tensor) -> tuple[Tensor, Tensor]:
    """`_table_logits`, fused into one compiled pass for large blocks: eagerly each product is a block-sized
    temporary (`fidelity_tiles._ExactRows`)."""
    return _fused(_table_logits, exact_rows, rounded_rows, exact, rounded)

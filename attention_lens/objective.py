"""Per-head KL(P_model || P_lens), computed in blocks so (tokens x heads x vocab) never exists at once."""

from __future__ import annotations

import torch
from torch import Tensor

from .fused import gradient_terms
from .lens import Lens
from .sweep import LOG2E, Sweep, extended_factors

# Tiles of (head, rows, vocab chunk) logits small enough to stay in cache (~2.4 M bf16 values, ~5 MB). Every pass
# over the logits (the fused statistics, q - p, the gradient's product) then reads cache, not memory: measured ~2x
# faster than (head, rows, full vocab) blocks on 2 cores (bench/RESULTS.md). The same tile shape as eval's
# (fidelity_tiles): on a 2-core AMX Xeon, SmolLM2 steps of 512 tokens took 0.75 s per layer in 1,152-row x
# 2,048-token tiles, 0.68 s in 1,152 x 1,024 and 0.60 s in 2,304 x 1,024 (the products of 256 rows per head run
# at ~1.6x the rate of 128).
DEFAULT_BLOCK_ROWS = 2304
"""Head-token rows per tile (e.g. 256 tokens x 9 heads)."""
VOCAB_CHUNK = 1024
"""Vocabulary entries per tile."""


def target_distribution(model_logits: Tensor) -> tuple[Tensor, Tensor]:
    """The model's next-token distribution p (tokens, vocab) and sum p log p (tokens,), in fp32."""
    log_p = torch.log_softmax(model_logits.float(), dim=-1)
    p = log_p.exp()
    return p, (p * log_p).sum(-1)


def head_kl(
    lens: Lens,
    z: Tensor,
    layer: int,
    p: Tensor,
    neg_entropy: Tensor,
    final_scale: Tensor | None = None,
    backward_scale: float | None = None,
    dtype: torch.dtype = torch.float32,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> Tensor:
    """KL(P_model || P_lens) of every lens head at every token: (tokens, lens head), detached.

    z: (tokens, head, d_head) of all the layer's heads; p: (tokens, vocab). With `backward_scale`,
    gradients of backward_scale * sum(KL) flow into the lens. Logits come from the lens's factored form
    ([z, 1] @ F^T / divisor + constant), block by block; the gradient of F is accumulated over blocks
    and pushed into the lens parameters once, so F's vocab x d_model x d_head product is paid once.
    KL = sum p log p - sum p * logits + logsumexp(logits), using sum p = 1.
    """
    train = backward_scale is not None
    with torch.set_grad_enabled(train), _autocast(z.device, dtype):
        # In bf16 runs the vocab x d_model x d_head product (and its backward) runs in bf16 too: ~4x the fp32 rate.
        factors, constant = lens.vocab_factors(layer)  # (head, vocab, d_head + 1), (vocab,)
    if lens.kind_spec.model_readout and lens.model.unembed.softcap is not None:
        return _capped_head_kl(lens, z, layer, p, neg_entropy, factors, constant, backward_scale, dtype, block_rows)
    z_aug = lens.augmented(z)  # (tokens, head, d_head + 1)
    chunks = _chunks(factors.shape[1], z.device)
    # Cast once per layer, one contiguous (head, d_head + 3, chunk) block per chunk (sweep.extended_factors): a
    # strided chunk would be copied by every product.
    extended = extended_factors(factors, constant, dtype, chunks)
    grad_t = (torch.zeros(factors.shape[0], factors.shape[2], factors.shape[1], device=z.device)
              if train and factors.requires_grad else None)  # (head, d_head + 1, vocab)
    rows_per_tile = max(1, block_rows // len(lens.config.heads))
    out = []
    for start in range(0, z.shape[0], rows_per_tile):
        rows = slice(start, start + rows_per_tile)
        scale = None if final_scale is None else final_scale[rows]
        with torch.set_grad_enabled(train):
            divisor = lens.divisor(z[rows], layer, scale)  # (rows, head); a graph into affine parameters
        kl, spread = _tiled_kl(z_aug[rows], divisor.detach(), extended, chunks, constant, p[rows], neg_entropy[rows],
                               grad_t, backward_scale)
        if train and divisor.requires_grad:
            # d(scale * KL) / d divisor = -scale * sum_v (q - p)(logits - constant) / divisor
            divisor.backward(-backward_scale * spread / divisor.detach())
        out.append(kl)
    if grad_t is not None:
        factors.backward(grad_t.transpose(1, 2))  # the vocab x d_model x d_head product, back-propagated once per layer
    return torch.cat(out)


@torch.no_grad()
def _tiled_kl(z_aug: Tensor, divisor: Tensor, extended: list[Tensor], chunks: list[slice], constant: Tensor | None,
              p: Tensor, neg_entropy: Tensor, grad_t: Tensor | None,
              scale: float | None) -> tuple[Tensor, Tensor | None]:
    """KL (rows, head) of one block of rows, over the vocabulary in cache-sized chunks; optionally its gradient.

    z_aug (rows, head, d_head + 1), divisor (rows, head), extended: per chunk the (head, d_head + 3, chunk) factors
    of `sweep.extended_factors`, p (rows, vocab). Pass 1 streams the chunks through a `Sweep`: each product already
    holds (l - shift) log2(e), and one fused pass per chunk takes sum 2^y and the cross term sum p y. Pass 2
    (training only) recomputes each chunk against the final shift, and one fused pass (`fused.gradient_terms`)
    forms q - p = 2^y / S - p, which adds scale * (z / divisor)^T (q - p) into grad_t (the factors' gradient,
    transposed), and its sums for sum_v (q - p)(logits - constant), which the divisor's gradient needs.

    The products and the q - p tile are in the factors' dtype (bf16 in bf16 runs: half the bytes, ~4x the GEMM
    rate); every sum is taken in fp32 from each element inside the fused kernels, and chunks add up in fp32. p is
    rounded to that dtype too: `Sweep.kl` counts the p-mass it saw, so its rounding costs no more than its own size.
    """
    low = extended[0].dtype
    scaled = (z_aug / divisor[..., None]).transpose(0, 1)  # (head, rows, d_head + 1) fp32
    p_low = p.to(low)
    p_chunks = [p_low[:, chunk] for chunk in chunks]
    sweep = Sweep(scaled, constant is not None, extended, low, p=p_chunks)
    for index in range(len(chunks)):
        sweep.add(index)
    kl = sweep.kl(neg_entropy).T  # (rows, head)
    if grad_t is None and scale is None:
        return kl, None
    rescale = 1 / sweep.sum_exp  # q = 2^y / S, y against the final shift
    spread = torch.zeros_like(sweep.sum_exp)
    scaled_t = scaled.transpose(1, 2).to(low).contiguous()  # (head, d_head + 1, rows): small, and bmm wants it plain
    for index, chunk in enumerate(chunks):
        product = sweep.buffer("product", sweep.coefficients, index)  # pass 1's tile, free again
        shifted = torch.bmm(sweep.coefficients, extended[index], out=product)
        # The chunk's constant as the product saw it: extended_factors' row d_head + 1 (constant log2(e), every head).
        terms = gradient_terms(shifted, p_chunks[index], rescale, None if constant is None else extended[index][0, -2])
        # logits - constant = (y + shift) ln 2 - constant
        spread += (terms.residual_y + sweep.shift * terms.residual_sum) / LOG2E
        if terms.residual_constant is not None:
            spread -= terms.residual_constant / LOG2E
        if grad_t is not None:
            grad_t[:, :, chunk].add_(torch.bmm(scaled_t, terms.residual), alpha=scale)  # bf16 into fp32 in one call
    return kl, spread.T


def _chunks(vocab: int, device: torch.device, size: int | None = None) -> list[slice]:
    """Cache-sized vocabulary chunks on CPUs (VOCAB_CHUNK entries unless `size` says); one chunk on GPUs, where
    each extra kernel launch costs more than the memory traffic it saves."""
    size = vocab if device.type == "cuda" else size or VOCAB_CHUNK
    return [slice(start, min(start + size, vocab)) for start in range(0, vocab, size)]


def _capped_head_kl(lens, z, layer, p, neg_entropy, factors, constant, backward_scale, dtype, block_rows) -> Tensor:
    """Soft-capped models (Gemma-2): plain autograd through cap * tanh(logits / cap), block by block."""
    train = backward_scale is not None
    factors_leaf = factors.detach().requires_grad_(train)
    z_aug = lens.augmented(z).to(dtype)
    rows_per_block = max(1, block_rows // len(lens.config.heads))
    out = []
    with torch.set_grad_enabled(train):
        factors_cast = factors_leaf.to(dtype)
        for start in range(0, z.shape[0], rows_per_block):
            rows = slice(start, start + rows_per_block)
            divisor = lens.divisor(z[rows], layer)
            logits = torch.einsum("bhd,hvd->bhv", z_aug[rows], factors_cast).float() / divisor[..., None]
            if constant is not None:
                logits = logits + constant
            logits = lens.model.unembed.cap(logits)
            kl = neg_entropy[rows, None] - torch.einsum("bhv,bv->bh", logits, p[rows]) + torch.logsumexp(logits, -1)
            if train:
                (kl.sum() * backward_scale).backward()
            out.append(kl.detach())
    if train and factors.requires_grad:
        factors.backward(factors_leaf.grad)
    return torch.cat(out)


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

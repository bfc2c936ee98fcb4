"""Per-head KL(P_model || P_lens), computed in blocks so (tokens x heads x vocab) never exists at once."""

from __future__ import annotations

import torch
from torch import Tensor

from .lens import Lens

# Tiles of (head, rows, vocab chunk) logits small enough to stay in cache (~2.4 M floats, ~9 MB: L3 here).
# Every pass over the logits (softmax, cross term, gradient) then reads cache, not memory: measured ~2x faster
# than (head, rows, full vocab) blocks on 2 cores (bench/RESULTS.md).
DEFAULT_BLOCK_ROWS = 1152
"""Head-token rows per tile (e.g. 128 tokens x 9 heads)."""
VOCAB_CHUNK = 2048
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
    # Cast once per layer, and laid out (head, d_head + 1, vocab) so each chunk is a plain strided matrix for
    # bmm (a transposed (head, chunk, d_head + 1) slice made bmm copy it: ~1.8x slower per chunk).
    factors_t = factors.detach().to(dtype).transpose(1, 2).contiguous()  # a no-op for the lens's own layout
    grad_t = torch.zeros(factors_t.shape, device=z.device) if train and factors.requires_grad else None
    rows_per_tile = max(1, block_rows // len(lens.config.heads))
    out = []
    for start in range(0, z.shape[0], rows_per_tile):
        rows = slice(start, start + rows_per_tile)
        scale = None if final_scale is None else final_scale[rows]
        with torch.set_grad_enabled(train):
            divisor = lens.divisor(z[rows], layer, scale)  # (rows, head); a graph into affine parameters
        kl, spread = _tiled_kl(z_aug[rows], divisor.detach(), factors_t, constant, p[rows], neg_entropy[rows],
                               grad_t, backward_scale)
        if train and divisor.requires_grad:
            # d(scale * KL) / d divisor = -scale * sum_v (q - p)(logits - constant) / divisor
            divisor.backward(-backward_scale * spread / divisor.detach())
        out.append(kl)
    if grad_t is not None:
        factors.backward(grad_t.transpose(1, 2))  # the vocab x d_model x d_head product, back-propagated once per layer
    return torch.cat(out)


@torch.no_grad()
def _tiled_kl(z_aug: Tensor, divisor: Tensor, factors_t: Tensor, constant: Tensor | None, p: Tensor,
              neg_entropy: Tensor, grad_t: Tensor | None, scale: float | None) -> tuple[Tensor, Tensor | None]:
    """KL (rows, head) of one block of rows, over the vocabulary in cache-sized chunks; optionally its gradient.

    z_aug (rows, head, d_head + 1), divisor (rows, head), factors_t (head, d_head + 1, vocab), p (rows, vocab).
    Pass 1 keeps a running max and sum of exponentials per row (an online logsumexp) and the cross term
    sum p * logits; pass 2 (training only) recomputes each chunk, forms q - p with the now-known logsumexp,
    and adds scale * (z / divisor)^T (q - p) into grad_t, the factors' gradient transposed. Returns also
    sum_v (q - p) * (logits - constant), which the divisor's gradient needs.

    The logits stay in the factors' dtype: in bf16 runs every pass over them (max, exp, q - p) reads half the
    bytes and bf16 exp runs ~2x faster than fp32 on CPUs. Each chunk's sums accumulate in fp32 inside the kernel
    and round once (sum(dtype=float32) would first copy the chunk to fp32: 2.6x slower); chunks add up in fp32.
    Exponents are shifted by the running max, itself one of the logits, so the shift is exact in bf16; each
    row's scale exp(max - logsumexp) is computed in fp32 and applied in bf16 (q off by at most 2^-9 relative;
    an fp32 factor made that pass 4x slower).
    """
    low = factors_t.dtype
    scaled = (z_aug / divisor[..., None]).transpose(0, 1).to(low)  # (head, rows, d_head + 1)
    heads, rows, vocab = scaled.shape[0], scaled.shape[1], factors_t.shape[2]
    p_low = p.to(low)
    constant_low = None if constant is None else constant.to(low)
    top = torch.full((heads, rows), -torch.inf, device=p.device)
    sum_exp = torch.zeros(heads, rows, device=p.device)
    cross = torch.zeros(heads, rows, device=p.device)
    for chunk in _chunks(vocab, p.device):
        logits = torch.bmm(scaled, factors_t[:, :, chunk])  # (head, rows, chunk), low
        if constant_low is not None:
            logits += constant_low[chunk]
        cross += (logits * p_low[:, chunk]).sum(-1).float()
        new_top = torch.maximum(top, logits.amax(-1).float())
        terms = logits.sub_(new_top.to(low)[..., None]).exp_()  # in place: logits are not needed again
        sum_exp = sum_exp * torch.exp(top - new_top) + terms.sum(-1).float()
        top = new_top
    log_sum_exp = top + torch.log(sum_exp)
    kl = (neg_entropy - cross + log_sum_exp).T  # (rows, head)
    if grad_t is None and scale is None:
        return kl, None
    shift = top.to(low)[..., None]  # exact: top is one of the low-precision logits
    rescale = torch.exp(top - log_sum_exp).to(low)[..., None]  # q = exp(logits - top) * exp(top - lse)
    spread = torch.zeros(heads, rows, device=p.device)
    scaled_t = scaled.transpose(1, 2).contiguous()  # (head, d_head + 1, rows): small, and bmm wants it plain
    for chunk in _chunks(vocab, p.device):
        raw = torch.bmm(scaled, factors_t[:, :, chunk])  # logits - constant
        logits = raw if constant_low is None else raw + constant_low[chunk]
        residual = torch.sub(logits, shift).exp_().mul_(rescale).sub_(p_low[:, chunk])  # q - p: dKL/dlogits
        spread += (residual * raw).sum(-1).float()
        if grad_t is not None:
            grad_t[:, :, chunk].add_(torch.bmm(scaled_t, residual), alpha=scale)  # bf16 into fp32 in one call
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

"""Per-head KL(P_model || P_lens), computed in blocks so (tokens x heads x vocab) never exists at once."""

from __future__ import annotations

import torch
from torch import Tensor

from .lens import Lens

# Head-token rows per vocabulary-sized block: big enough for efficient matmuls, small enough
# (~200 MB of fp32 logits on a 49k vocabulary) to keep the peak memory flat.
DEFAULT_BLOCK_ROWS = 1024


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
    with torch.set_grad_enabled(train):
        factors, constant = lens.vocab_factors(layer)  # (head, vocab, d_head + 1), (vocab,)
    factors_leaf = factors.detach().requires_grad_(train)
    ones = torch.ones(*z.shape[:-2], len(lens.config.heads), 1, device=z.device)
    z_aug = torch.cat([z[..., lens.config.heads, :], ones], dim=-1).to(dtype)  # (tokens, head, d_head + 1)
    tokens = z.shape[0]
    block = max(1, block_rows // len(lens.config.heads))
    out = []
    capped = lens.kind in ("logit", "affine") and lens.model.unembed.softcap is not None
    with torch.set_grad_enabled(train):
        factors_cast = factors_leaf.to(dtype)  # cast once per layer, not per block
        for start in range(0, tokens, block):
            rows = slice(start, start + block)
            scale = None if final_scale is None else final_scale[rows]
            divisor = lens.divisor(z[rows], layer, scale)  # (block, head)
            if capped:
                kl = _capped_block_kl(lens, z_aug[rows], factors_cast, divisor, constant, p[rows], neg_entropy[rows])
            else:
                kl = _BlockKL.apply(z_aug[rows], divisor, factors_cast, constant, p[rows], neg_entropy[rows])
            if train:
                (kl.sum() * backward_scale).backward()
            out.append(kl.detach())
    if train and factors.requires_grad:
        factors.backward(factors_leaf.grad)
    return torch.cat(out)


class _BlockKL(torch.autograd.Function):
    """KL of one block of factored logits, with a hand-written backward that reuses the softmax.

    Logits are laid out (head, block, vocab) so each head is one plain matmul, and the divisor is applied
    to the d_head-sized input rather than to the vocab-sized output. Forward keeps only the lens's softmax
    q (reused in place for the gradient); backward needs no exp: dKL/dlogits = q - p.
    """

    @staticmethod
    def forward(ctx, z_aug, divisor, factors, constant, p, neg_entropy):
        # z_aug (block, head, d_head + 1), divisor (block, head), factors (head, vocab, d_head + 1), p (block, vocab)
        z_scaled = (z_aug / divisor[..., None]).transpose(0, 1).to(factors.dtype)  # (head, block, d_head + 1)
        logits = torch.bmm(z_scaled, factors.transpose(1, 2)).float()  # (head, block, vocab)
        if constant is not None:
            logits.add_(constant)
        cross = torch.einsum("hbv,bv->bh", logits, p)  # sum_v p * logits
        if not any(ctx.needs_input_grad):  # evaluation: no softmax to keep
            return neg_entropy[:, None] - cross + torch.logsumexp(logits, dim=-1).T
        top, where = logits.max(dim=-1)
        q = torch.softmax(logits, dim=-1)
        # logsumexp from the softmax at the arg-max (q there is >= 1/vocab, so the log is accurate).
        log_sum_exp = (top - torch.log(q.gather(-1, where[..., None]).squeeze(-1))).T  # (block, head)
        spread = None  # sum_v (q - p) * (logits - constant): only the divisor's gradient needs it
        if ctx.needs_input_grad[1]:
            spread = torch.einsum("hbv,hbv->bh", q, logits) - cross
            if constant is not None:
                spread = spread - (torch.einsum("hbv,v->bh", q, constant) - (p @ constant)[:, None])
        ctx.save_for_backward(z_scaled, divisor, q, p, spread)
        return neg_entropy[:, None] - cross + log_sum_exp

    @staticmethod
    def backward(ctx, grad):
        z_scaled, divisor, q, p, spread = ctx.saved_tensors
        # logits = (z / divisor) F^T + constant and dKL/dlogits = q - p, so
        #   dF = sum_b (q - p) grad (z / divisor),  d divisor = -grad sum_v (q - p)(logits - constant) / divisor.
        d_logits = q.sub_(p).to(z_scaled.dtype)  # (head, block, vocab); p broadcasts over heads
        weighted = z_scaled * grad.T[..., None].to(z_scaled.dtype)
        d_factors = torch.bmm(d_logits.transpose(1, 2), weighted)  # (head, vocab, d_head + 1)
        d_divisor = -grad * spread / divisor if ctx.needs_input_grad[1] else None
        return None, d_divisor, d_factors, None, None, None


def _capped_block_kl(lens, z_aug, factors, divisor, constant, p, neg_entropy) -> Tensor:
    """Soft-capped models (Gemma-2): plain autograd through cap * tanh(logits / cap)."""
    logits = torch.einsum("bhd,hvd->bhv", z_aug, factors).float() / divisor[..., None]
    if constant is not None:
        logits = logits + constant
    logits = lens.model.unembed.cap(logits)
    return neg_entropy[:, None] - torch.einsum("bhv,bv->bh", logits, p) + torch.logsumexp(logits, dim=-1)

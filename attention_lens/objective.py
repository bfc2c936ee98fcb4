"""Per-head KL(P_model || P_lens), computed in blocks so (tokens x heads x vocab) never exists at once."""

from __future__ import annotations

import contextlib

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

    z: (tokens, head, d_head); p: (tokens, vocab). With `backward_scale`, gradients of
    backward_scale * sum(KL) flow into the lens block by block, so nothing vocab-sized is kept.
    KL = sum p log p - sum p * logits + logsumexp(logits), using sum p = 1.
    """
    tokens = z.shape[0]
    block = max(1, block_rows // len(lens.config.heads))
    out = []
    for start in range(0, tokens, block):
        rows = slice(start, start + block)
        scale = None if final_scale is None else final_scale[rows]
        with _autocast(z.device, dtype), torch.set_grad_enabled(backward_scale is not None):
            logits = lens.logits(z[rows], layer, scale).float()  # (block, lens head, vocab)
            kl = neg_entropy[rows, None] - torch.einsum("bhv,bv->bh", logits, p[rows])
            kl = kl + torch.logsumexp(logits, dim=-1)
        if backward_scale is not None:
            (kl.sum() * backward_scale).backward()
        out.append(kl.detach())
    return torch.cat(out)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

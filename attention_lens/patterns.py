"""Attention patterns: every head's attention weights over the prompt, for showing where a head looks."""

from __future__ import annotations

import torch
from torch import Tensor

from .models import Model


@torch.no_grad()
def attention_patterns(model: Model, input_ids: Tensor) -> Tensor:
    """Attention weights (layer, head, query pos, key pos) for one prompt (batch of 1), fp32 on the CPU.

    Fused kernels (sdpa, flash) never materialize the weights, so the model runs this one pass with
    eager attention and goes back to its own implementation afterwards, even if the pass fails.
    """
    hf = model.hf
    previous = hf.config._attn_implementation
    if previous != "eager":
        hf.set_attn_implementation("eager")
    try:
        attentions = hf(input_ids=input_ids, output_attentions=True, use_cache=False).attentions
    finally:
        if previous != "eager":
            hf.set_attn_implementation(previous)
    return torch.stack([a[0].float().cpu() for a in attentions])  # (layer, head, pos, pos)

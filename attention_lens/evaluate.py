"""Held-out fidelity of a lens: per-head KL(P_model || P_lens), streamed over held-out windows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .data import DataConfig, batches, load_documents, split_by_document, token_windows
from .errors import AttentionLensError
from .heads import run_with_heads
from .lens import Lens
from .objective import head_kl, target_distribution


@dataclass
class HeadKL:
    kl: Tensor
    """Mean KL per (lens layer, lens head), nats, fp32."""
    tokens: int

    @property
    def mean(self) -> float:
        return self.kl.mean().item()


@torch.no_grad()
def heldout_kl(lens: Lens, data: DataConfig, tokens: int = 2048, batch_size: int = 4, seed: int = 0) -> HeadKL:
    """Mean per-head KL on the by-document held-out split of `data` (fp32; memory flat in `tokens`)."""
    model = lens.model
    _, held = split_by_document(load_documents(data.data, data.skip_bad_lines), data.holdout)
    if not held:
        raise AttentionLensError("no held-out documents to evaluate on; use --holdout > 0")
    windows = token_windows(held, model.tokenizer, data.seq_len, seed)
    total = torch.zeros(len(lens.config.layers), len(lens.config.heads), device=model.device)
    seen = 0
    for batch in batches(windows, batch_size):
        if seen >= tokens:
            break
        logits, capture = run_with_heads(model, batch.to(model.device), lens.config.layers,
                                         final_residual=lens.kind == "dla")
        p, neg_entropy = target_distribution(logits.flatten(0, 1))
        final_scale = None
        if capture.final_residual is not None:
            final_scale = model.unembed.scale(capture.final_residual.flatten(0, 1))
        for i, layer in enumerate(lens.config.layers):
            z = capture.heads.pop(layer).z.flatten(0, 1)
            total[i] += head_kl(lens, z, layer, p, neg_entropy, final_scale).sum(0)
        seen += batch.numel()
    if seen == 0:
        raise AttentionLensError(f"the held-out split is smaller than one window of {data.seq_len} tokens")
    return HeadKL(kl=total / seen, tokens=seen)

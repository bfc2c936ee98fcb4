"""Attribution patching: a first-order estimate, for every head at once, of how much removing it lowers the
log-probability of chosen next tokens where they are the true next token.

Zero-ablating head h changes J = sum_t log p(target_t) by J(z) - J(z with z_h = 0) ~ sum_pos grad_{z_h(pos)} J . z_h(pos)
(mean ablation: . (z_h - mean z_h)). The gradient reaches z_h through every later layer, so the estimate holds the
head's direct and indirect effects, to first order. Measuring it exactly costs a replay per head (~n_heads (n_layers
- L) / n_layers forward passes per window, effects.py); this costs one forward and one backward per window and group
of targets, which is what lets a concept search rank every head on hundreds of concept targets. The ranking it gives
is a hypothesis: verify.py checks it with real interventions on held-out text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .data import DataConfig
from .errors import AttentionLensError
from .models import Model
from .stream import HeadStream


@dataclass
class AttributedDrops:
    """Summed first-order drops of log p(target) over each group's target positions."""

    drop: Tensor
    """(group, layer, head) float64: sum over the group's targets of the estimated drop when the head is removed."""
    targets: Tensor
    """(group,) long: target positions counted for each group."""
    windows: int
    """Windows that held a wanted target (each one forward pass)."""
    read: int
    """Windows read from the stream to find them."""

    def mean(self) -> Tensor:
        """(group, layer, head): mean drop per target; NaN for a group without targets."""
        return self.drop / self.targets.double()[:, None, None]


def attributed_drops(model: Model, data: DataConfig, groups: Sequence[Sequence[int]], pools: Sequence[int],
                     need: Sequence[int], means: Tensor | None = None, seed: int = 0,
                     split: str = "train") -> AttributedDrops:
    """For each group of token ids, the estimated drop of log p(target) at the positions where a token of the group
    is the true next token, for every head, on windows of `split` read in the stream's order.

    Groups share target budgets through `pools`: group g is measured while the targets counted for all groups of
    pool pools[g] are fewer than need[pools[g]] (a concept's tokens can be one pool and still get a drop each).
    Reading stops when every pool has its targets or the text ends. `means` (layer, head, d_head) estimates mean
    ablation instead of zero ablation.
    """
    if len(groups) != len(pools) or any(not 0 <= p < len(need) for p in pools):
        raise AttentionLensError("every group needs a pool index into `need`")
    ids = [torch.tensor(sorted(set(group)), dtype=torch.long) for group in groups]
    drop = torch.zeros(len(groups), model.n_layers, model.n_heads, dtype=torch.float64)
    targets = torch.zeros(len(groups), dtype=torch.long)
    pooled = torch.zeros(len(need), dtype=torch.long)
    wanted = torch.tensor(list(need), dtype=torch.long)
    windows = read = 0
    for window in HeadStream(model, data, split=split, seed=seed).windows():
        if bool((pooled >= wanted).all()):
            break
        read += 1
        following = window[1:]  # position p predicts window[p + 1]
        positions = {}
        for g, group in enumerate(ids):
            if pooled[pools[g]] < wanted[pools[g]]:
                where = torch.isin(following, group).nonzero().flatten()
                if where.numel():
                    positions[g] = where
        if not positions:
            continue
        windows += 1
        for g, dropped in _window_drops(model, window, positions, means).items():
            drop[g] += dropped
            targets[g] += positions[g].numel()
            pooled[pools[g]] += positions[g].numel()
    return AttributedDrops(drop=drop, targets=targets, windows=windows, read=read)


def _window_drops(model: Model, window: Tensor, positions: dict[int, Tensor],
                  means: Tensor | None) -> dict[int, Tensor]:
    """One forward pass over `window` up to its last wanted target, then one backward per group:
    {group: (layer, head) summed first-order drop over the group's positions}."""
    cut = int(max(int(p.max()) for p in positions.values())) + 1  # later positions cannot affect these logits
    input_ids = window[:cut].unsqueeze(0).to(model.device)  # (1, pos)
    raw_z: list[Tensor] = []
    probes: list[Tensor] = []

    def probe(module, args):
        # z + 0 with the zero as a leaf: its gradient is dJ/dz through every later layer, which a detached z
        # (a leaf in place of z) would lose wherever a later head reads this one's output.
        z = args[0]
        zero = torch.zeros_like(z, requires_grad=True)
        raw_z.append(z.detach())
        probes.append(zero)
        return (z + zero, *args[1:])

    handles = [model.out_proj(layer).register_forward_pre_hook(probe) for layer in range(model.n_layers)]
    try:
        with torch.enable_grad():
            final = model.hf.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[0]  # (pos, d_model)
            rows = torch.cat(list(positions.values()))
            unique, inverse = rows.unique(return_inverse=True)
            logits = model.unembed.logits(_at_least_fp32(final[unique.to(final.device)]))  # (row, vocab)
            chosen = input_ids.new_tensor(window[unique + 1].tolist())
            target_log_p = torch.log_softmax(logits, -1).gather(-1, chosen[:, None])[:, 0]  # (row,)
            out, start = {}, 0
            groups = list(positions)
            for i, g in enumerate(groups):
                count = positions[g].numel()
                J = target_log_p[inverse[start:start + count]].sum()
                start += count
                grads = torch.autograd.grad(J, probes, retain_graph=i < len(groups) - 1)
                out[g] = _drop_per_head(model, raw_z, grads, means)
    finally:
        for handle in handles:
            handle.remove()
    return out


def _drop_per_head(model: Model, raw_z: list[Tensor], grads: Sequence[Tensor], means: Tensor | None) -> Tensor:
    """(layer, head): sum over positions of grad . (z - replacement), the first-order drop of J."""
    out = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    if len(raw_z) != model.n_layers:
        raise AttentionLensError(f"the forward pass reached {len(raw_z)} of {model.n_layers} output projections")
    for layer, (z, grad) in enumerate(zip(raw_z, grads)):
        z = z.double().unflatten(-1, (model.n_heads, model.d_head))  # (1, pos, head, d_head)
        if means is not None:
            z = z - means[layer].to(z.device, z.dtype)
        grad = grad.double().unflatten(-1, (model.n_heads, model.d_head))
        out[layer] = (grad * z).sum((0, 1, 3)).cpu()
    return out


def _at_least_fp32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()

"""Many interventions measured at once, as verification needs them (found heads, random draws, a k sweep,
steering): one clean pass per batch of windows keeps the residual entering each intervention's earliest edited
block; each intervention then replays only the blocks from there (replay.py), several side by side along the
batch. The numbers are those of one full forward pass per intervention (`concept_metrics.effect`), up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .concept_metrics import Metrics, target_sums
from .intervene import Head, HeadMeans, Intervention
from .models import Model
from .replay import clean_residuals, replay

MAX_TOKENS = 16_384
"""Tokens one replay runs at once (interventions x windows x pos): bounds the activations a replay holds."""
READOUT_ROWS = 1024
"""Positions unembedded at once: a (rows, vocab) fp32 block of logits."""


@dataclass(frozen=True)
class Edit:
    """One intervention on a set of heads."""

    heads: tuple[Head, ...]
    intervention: Intervention

    @property
    def first_layer(self) -> int:
        """The earliest edited block: blocks before it compute the clean residual, so a replay starts here."""
        return min(layer for layer, _ in self.heads)


@torch.no_grad()
def measure_edits(model: Model, windows: Tensor, concept_ids: Sequence[int], edits: Sequence[Edit],
                  batch_size: int = 4, max_tokens: int = MAX_TOKENS,
                  on_windows: Callable[[int], None] | None = None,
                  other_weights: Tensor | None = None) -> tuple[Metrics, list[Metrics]]:
    """The unmodified model's metrics on `windows` (window, pos) and each edit's, in the order of `edits`; with
    `other_weights` (verify.frequency_matched_weights), their frequency-matched log p too.

    An edit that needs the heads' means (Mean) gets them from the unmodified model on the same `windows`, as
    `concept_metrics.effect` is given them; one that draws on other windows (Resample) is prepared once for the heads
    of every edit that uses it. `on_windows(n)` is called after each batch of n windows.
    """
    prepared = _prepare(model, windows, edits, batch_size)
    ids = torch.tensor(list(concept_ids), device=model.device)
    starts = sorted({edit.first_layer for edit in edits})
    clean_sums: list[Tensor] = []
    sums: list[list[Tensor]] = [[] for _ in edits]
    clean_mass, masses = 0.0, [0.0] * len(edits)
    for begin in range(0, windows.shape[0], batch_size):
        batch = windows[begin:begin + batch_size].to(model.device)  # (batch, pos)
        rows = slice(begin, begin + batch.shape[0])
        final, residual = clean_residuals(model, batch, starts)
        per_window, mass = _scores(model, final[None], batch, ids, other_weights)
        clean_sums.append(per_window[0])
        clean_mass += float(mass[0])
        per_replay = max(1, max_tokens // batch.numel())
        for start in starts:
            group = [i for i, edit in enumerate(edits) if edit.first_layer == start]
            for at in range(0, len(group), per_replay):
                chunk = group[at:at + per_replay]
                layers = _layer_edits(model, [prepared[i] for i in chunk], batch.shape[0], rows)
                final = replay(model, start, residual[start], batch, len(chunk), layers)
                per_window, mass = _scores(model, final, batch, ids, other_weights)  # (copy, batch, 4|6), (copy,)
                for copy, i in enumerate(chunk):
                    sums[i].append(per_window[copy])
                    masses[i] += float(mass[copy])
        if on_windows:
            on_windows(batch.shape[0])
    clean = Metrics.from_sums(torch.cat(clean_sums), clean_mass)
    return clean, [Metrics.from_sums(torch.cat(parts), mass) for parts, mass in zip(sums, masses)]


def _prepare(model: Model, windows: Tensor, edits: Sequence[Edit], batch_size: int) -> list[Edit]:
    """Each edit with its intervention prepared; each distinct intervention once, for all the heads it edits."""
    means = None
    if any(edit.intervention.needs_means for edit in edits):
        with HeadMeans(model) as recorder:
            for start in range(0, windows.shape[0], batch_size):
                model.hf.base_model(input_ids=windows[start:start + batch_size].to(model.device), use_cache=False)
        means = recorder.means
    heads: dict[Intervention, list[Head]] = {}
    for edit in edits:
        union = heads.setdefault(edit.intervention, [])
        union.extend(head for head in edit.heads if head not in union)
    ready = {intervention: intervention.prepared(model, union, windows, means, batch_size)
             for intervention, union in heads.items()}
    return [Edit(edit.heads, ready[edit.intervention]) for edit in edits]


def _layer_edits(model: Model, edits: Sequence[Edit], windows: int, rows: slice) -> dict[int, Callable]:
    """For a replay of len(edits) copies of a batch: per edited layer, what rewrites z so that copy c gets
    edits[c] (its heads' z_h replaced by the intervention's new_z, as HeadIntervention does)."""
    by_layer: dict[int, list[tuple[int, int, Intervention]]] = {}
    for copy, edit in enumerate(edits):
        for layer, head in edit.heads:
            by_layer.setdefault(layer, []).append((copy, head, edit.intervention))

    def rewrite(layer: int):
        def apply(z: Tensor) -> None:
            z = z.view(len(edits), windows, *z.shape[1:])  # (copy, batch, pos, head, d_head)
            for copy, head, intervention in by_layer[layer]:
                z[copy, :, :, head] = intervention.new_z(z[copy, :, :, head], layer, head, rows)
        return apply

    return {layer: rewrite(layer) for layer in by_layer}


def _scores(model: Model, final: Tensor, input_ids: Tensor, ids: Tensor,
            other_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per copy and window, the sums `Metrics.per_window` holds, and per copy the concept's summed probability
    mass: final (copy, batch, pos, d_model) final-normed, input_ids (batch, pos).

    Every position but the last has a target, and the loss needs log p(target) = logit - logsumexp(logits) at each:
    the full row of logits is made (READOUT_ROWS at a time), but no log-softmax over the vocabulary is kept.
    """
    unembed = model.unembed
    copies, windows, length, _ = final.shape
    hidden = final[:, :, :-1].reshape(-1, final.shape[-1])  # (copy * batch * (pos - 1), d_model)
    targets = input_ids[:, 1:].repeat(copies, 1).flatten()  # the same targets for every copy
    target_log_p, mass = [], []
    for start in range(0, hidden.shape[0], READOUT_ROWS):
        logits = hidden[start:start + READOUT_ROWS].float() @ unembed.W_U.T  # (rows, vocab)
        if unembed.b_U is not None:
            logits = logits + unembed.b_U
        logits = unembed.cap(logits)
        norm = torch.logsumexp(logits, dim=-1)
        target_log_p.append(logits.gather(-1, targets[start:start + READOUT_ROWS, None])[:, 0] - norm)
        mass.append((torch.logsumexp(logits[:, ids], dim=-1) - norm).exp())
    target_log_p = torch.cat(target_log_p).double().view(copies, windows, length - 1)
    per_window = target_sums(target_log_p, input_ids[:, 1:], ids, other_weights)  # (copy, batch, 4 or 6)
    return per_window.cpu(), torch.cat(mass).view(copies, -1).sum(-1).cpu()


def cost(model: Model, edits: Sequence[Edit]) -> float:
    """Forward-equivalents `measure_edits` runs: full passes (every block and the unembedding) over the windows,
    counted by weights multiplied per token; a replay from block L costs blocks L.. and the unembedding."""
    blocks = [sum(p.numel() for p in block.parameters()) for block in model.layers]
    readout = model.unembed.W_U.numel()
    full = sum(blocks) + readout
    passes = 1.0 + sum(1 for _ in {e.intervention for e in edits if e.intervention.needs_corpus})
    return passes + sum((sum(blocks[edit.first_layer:]) + readout) / full for edit in edits)

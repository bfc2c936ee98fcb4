"""What each head writes over a corpus: its promoted tokens, how concentrated they are, which heads agree."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

from .data import DataConfig
from .errors import AttentionLensError
from .evaluate import scored_split, sink_mask
from .fidelity import factored_logits
from .lens import Lens
from .results import HeadProfile, PromotedToken
from .stream import HeadStream
from .token_classes import describe, token_class

MOST_SPECIALIZED = 10
"""Heads named in the summary, lowest promoted-token entropy first."""


@dataclass
class SpecializeConfig:
    """How head specialization is measured."""

    tokens: int = 2048
    """Held-out tokens to read the heads on (whole windows)."""
    batch_size: int = 4
    """Windows per forward pass."""
    seed: int = 0
    """Seeds the document order."""
    top: int = 20
    """Promoted tokens per head that form its set (for the mass in its top and for similarity)."""
    group_similarity: float = 0.25
    """Average Jaccard of promoted sets at which heads join one group."""
    block_rows: int = 512
    """Head-token rows per vocabulary-sized block (memory vs. speed)."""


@dataclass
class Specialization:
    """Per-head records, groups of similar heads, per-layer trends; `to_json()` is the --json document.

    In a notebook: a grid of each head's most promoted token, coloured by the mass of its top tokens.
    """

    summary: dict
    heads: list[HeadProfile]
    groups: list[dict]
    layers: list[dict]
    setup: dict = field(default_factory=dict)

    def to_json(self, layers: bool = True) -> dict:
        document = {"summary": self.summary, "heads": [record.to_json() for record in self.heads],
                    "groups": self.groups, **self.setup}
        if layers:
            document["layers"] = self.layers
        return document

    def head(self, layer: int, head: int) -> HeadProfile:
        for record in self.heads:
            if (record.layer, record.head) == (layer, head):
                return record
        raise KeyError((layer, head))

    def to_records(self) -> list[dict]:
        """One row per (layer, head, promoted token), the head's own numbers repeated on each."""
        rows = []
        for r in self.heads:
            shared = {"layer": r.layer, "head": r.head, "description": r.description, "group": r.group,
                      "entropy_bits": r.entropy_bits, "top_mass": r.top_mass}
            rows += [{**shared, "rank": rank, **p.to_json()} for rank, p in enumerate(r.promoted)]
        return rows



@torch.no_grad()
def specialize(
    lens: Lens,
    data: DataConfig,
    config: SpecializeConfig = SpecializeConfig(),
    on_progress: Callable[[int, int], None] | None = None,
) -> Specialization:
    """Count, per head, the token it promotes most at each held-out position, relative to the lens's average.

    Two passes over the same windows: the first estimates the lens's average prediction over all heads
    and positions, the second counts argmax_v (q_head(v) - q_average(v)), so tokens that every head
    predicts (' the', ',') do not dominate every head. Memory is flat in `config.tokens`.
    """
    if min(config.tokens, config.batch_size, config.top, config.block_rows) < 1:
        raise AttentionLensError("`tokens`, `batch_size` and `top` must be at least 1")
    if data.seq_len < 2:
        raise AttentionLensError(f"`seq_len` must be at least 2; got {data.seq_len}")
    if not 0 <= config.group_similarity <= 1:
        raise AttentionLensError(f"`group_similarity` is a Jaccard index in [0, 1]; got {config.group_similarity}")
    model = lens.model
    _, held = scored_split(lens, data)
    n_windows = math.ceil(config.tokens / data.seq_len)
    planned = 2 * n_windows * data.seq_len

    def passes(done: int) -> Iterator[tuple[int, Tensor]]:
        """One pass over the same windows; progress counts both passes."""
        def report(seen: int) -> None:
            if on_progress is not None:
                on_progress(done + seen, planned)

        stream = HeadStream(model, data, lens.config.layers, documents=held, seed=config.seed,
                            batch_size=config.batch_size, windows=n_windows,
                            final_residual=lens.kind_spec.needs_final_residual)
        return _lens_distributions(lens, stream, config, report)

    average = torch.zeros(model.vocab, dtype=torch.float64, device=model.device)
    predictions = 0
    for _, q in passes(0):
        average += q.sum((0, 1)).double()
        predictions += q.shape[0] * q.shape[1]
    if predictions == 0:
        raise AttentionLensError(f"the held-out split has no scorable position in windows of {data.seq_len} tokens; "
                                 "use shorter windows (`seq_len`) or more text")
    average = (average / predictions).float()
    counts = torch.zeros(len(lens.config.layers), len(lens.config.heads), model.vocab, dtype=torch.int32)
    for i, q in passes(planned // 2):
        promoted = (q - average).argmax(-1).cpu()  # (head, rows)
        counts[i].scatter_add_(1, promoted, torch.ones_like(promoted, dtype=counts.dtype))
    heads = _head_records(lens, counts, config.top)
    similarity = jaccard([set(promoted_ids(h)) for h in heads])
    groups = _groups(heads, similarity, config.group_similarity)
    layers = _layer_trends(heads, similarity)
    setup = {"lens": lens.kind, "model": model.name, "data": data.data, "holdout": data.holdout,
             "seq_len": data.seq_len, "tokens": planned // 2, "seed": config.seed, "top": config.top}
    return Specialization(summary=_summary(heads, groups), heads=heads, groups=groups, layers=layers, setup=setup)


def _lens_distributions(
    lens: Lens, stream: HeadStream, config: SpecializeConfig, on_tokens: Callable[[int], None]
) -> Iterator[tuple[int, Tensor]]:
    """(lens layer index, q (lens head, rows, vocab)) for every non-sink position, one block at a time.

    Logits come from the lens's factored form (d_head x vocab per head-token, not d_model x vocab).
    """
    model = lens.model
    heads = lens.config.heads
    block = max(1, config.block_rows // len(heads))
    seen = 0
    for batch in stream:
        keep = ~sink_mask(batch.input_ids, model.tokenizer).flatten()  # attention sinks are not what a head writes
        scale = batch.final_scale(keep)
        for i, layer, z in batch.layers(lens.config.layers):
            z = z.flatten(0, 1)[keep]  # (rows, head, d_head)
            z_aug = lens.augmented(z)  # (rows, head, d_head + 1)
            factors, constant = lens.vocab_factors(layer)  # (head, vocab, d_head + 1), (vocab,)
            factors = factors.transpose(1, 2)
            for start in range(0, z.shape[0], block):
                rows = slice(start, start + block)
                divisor = lens.divisor(z[rows], layer, None if scale is None else scale[rows])
                yield i, torch.softmax(factored_logits(lens, z_aug[rows], divisor, factors, constant), dim=-1)
        seen += batch.tokens
        on_tokens(seen)


def _head_records(lens: Lens, counts: Tensor, top: int) -> list[HeadProfile]:
    """Per head: promoted tokens with counts, entropy of that histogram (bits), mass in its top, description."""
    model = lens.model
    classes: dict[int, str] = {}
    records = []
    for i, layer in enumerate(lens.config.layers):
        for j, head in enumerate(lens.config.heads):
            histogram = counts[i, j]
            total = int(histogram.sum())
            ids = histogram.nonzero().flatten()
            shares = histogram[ids].double() / total
            entropy = float(-(shares * shares.log2()).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0
            order = ids[histogram[ids].argsort(descending=True, stable=True)].tolist()
            for token_id in ids.tolist():
                if token_id not in classes:
                    classes[token_id] = token_class(model.token_text(token_id))
            class_shares: dict[str, float] = {}
            for token_id in ids.tolist():
                class_shares[classes[token_id]] = class_shares.get(classes[token_id], 0.0) + int(histogram[token_id]) / total
            promoted = [PromotedToken(id=t, token=model.token_text(t), count=int(histogram[t]),
                                      share=round(int(histogram[t]) / total, 6), token_class=classes[t])
                        for t in order[:top]]
            records.append(HeadProfile(
                layer=layer, head=head, positions=total,
                entropy_bits=round(entropy, 6),
                top_mass=round(sum(p.count for p in promoted) / max(1, total), 6),
                promoted=promoted,
                classes={name: round(share, 6) for name, share in sorted(class_shares.items(), key=lambda x: -x[1])},
                description=describe(class_shares, promoted[0].token, promoted[0].share) if promoted else "nothing",
            ))
    return records


def promoted_ids(record: HeadProfile) -> list[int]:
    """The ids of a head's promoted tokens (its top `top`), most promoted first: what heads are grouped by."""
    return [p.id for p in record.promoted]


def jaccard(sets: list[set]) -> Tensor:
    """Pairwise |A & B| / |A | B| of the heads' promoted sets: (n, n), 1 on the diagonal."""
    n = len(sets)
    similarity = torch.eye(n, dtype=torch.float64)
    for a in range(n):
        for b in range(a + 1, n):
            union = len(sets[a] | sets[b])
            similarity[a, b] = similarity[b, a] = len(sets[a] & sets[b]) / union if union else 0.0
    return similarity


def average_linkage(similarity: Tensor, threshold: float) -> list[list[int]]:
    """Agglomerative clustering: merge the two most similar groups (mean pairwise similarity) while >= threshold.

    Average linkage, unlike single linkage, does not chain dissimilar heads together through intermediaries.
    """
    n = similarity.shape[0]
    between = similarity.clone().fill_diagonal_(-math.inf)
    members = [[i] for i in range(n)]
    while n > 1:
        best = int(between.argmax())
        a, b = divmod(best, n)
        if between[a, b] < threshold:
            break
        size_a, size_b = len(members[a]), len(members[b])
        merged = (size_a * between[a] + size_b * between[b]) / (size_a + size_b)
        between[a], between[:, a] = merged, merged
        between[b], between[:, b] = -math.inf, -math.inf
        between[a, a] = -math.inf
        members[a] += members[b]
        members[b] = []
    return [sorted(group) for group in members if group]


def _groups(heads: list[HeadProfile], similarity: Tensor, threshold: float) -> list[dict]:
    """Groups of two or more heads with similar promoted sets, largest first; marks each head's group."""
    clusters = sorted((c for c in average_linkage(similarity, threshold) if len(c) > 1), key=lambda c: (-len(c), c))
    groups = []
    for number, members in enumerate(clusters):
        votes: dict[int, int] = {}
        for index in members:
            heads[index].group = number
            for token_id in promoted_ids(heads[index]):
                votes[token_id] = votes.get(token_id, 0) + 1
        shared = sorted((t for t, v in votes.items() if 2 * v > len(members)), key=lambda t: -votes[t])
        names = {p.id: p.token for index in members for p in heads[index].promoted}
        pairs = similarity[members][:, members]
        groups.append({
            "id": number,
            "heads": [{"layer": heads[i].layer, "head": heads[i].head} for i in members],
            "similarity": round(float((pairs.sum() - len(members)) / (len(members) * (len(members) - 1))), 6),
            "shared_tokens": [names[t] for t in shared[:10]],
        })
    return groups


def _layer_trends(heads: list[HeadProfile], similarity: Tensor) -> list[dict]:
    """Specialization against depth: per layer, mean concentration, share of described heads, agreement."""
    trends = []
    for layer in sorted({h.layer for h in heads}):
        index = [i for i, h in enumerate(heads) if h.layer == layer]
        members = [heads[i] for i in index]
        pairs = similarity[index][:, index]
        within = float((pairs.sum() - len(index)) / (len(index) * (len(index) - 1))) if len(index) > 1 else None
        trends.append({
            "layer": layer,
            "heads": len(members),
            "entropy_bits_mean": round(sum(h.entropy_bits for h in members) / len(members), 6),
            "top_mass_mean": round(sum(h.top_mass for h in members) / len(members), 6),
            "described": round(sum(not h.description.startswith("mixed") for h in members) / len(members), 6),
            "jaccard_within": None if within is None else round(within, 6),
        })
    return trends


def _summary(heads: list[HeadProfile], groups: list[dict]) -> dict:
    ranked = sorted(heads, key=lambda h: (h.entropy_bits, -h.top_mass))
    return {
        "heads": len(heads),
        "positions": heads[0].positions if heads else 0,
        "entropy_bits_mean": round(sum(h.entropy_bits for h in heads) / len(heads), 6),
        "top_mass_mean": round(sum(h.top_mass for h in heads) / len(heads), 6),
        "groups": len(groups),
        "grouped_heads": sum(len(g["heads"]) for g in groups),
        "most_specialized": [{"layer": h.layer, "head": h.head, "entropy_bits": h.entropy_bits,
                              "top_mass": h.top_mass, "description": h.description,
                              "tokens": [p.token for p in h.promoted[:5]]} for h in ranked[:MOST_SPECIALIZED]],
    }

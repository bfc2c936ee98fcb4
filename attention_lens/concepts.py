"""Concepts: a set of words -> token ids, and a search for the heads whose lenses promote them over a corpus."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .data import DataConfig
from .errors import AttentionLensError
from .heads import run_with_heads
from .lens import Lens
from .objective import DEFAULT_BLOCK_ROWS
from .results import ConceptHead, ConceptToken
from .stream import HeadStream


@dataclass
class Concept:
    """A concept as the token ids that stand for it, with a record of how the words became tokens."""

    words: list[str]
    ids: list[int]
    """Token ids, unique, in the order the words gave them."""
    truncated: list[str] = field(default_factory=list)
    """Words with no single-token form, kept as their first token ('Kalashnikov -> ·Kal')."""
    dropped: list[str] = field(default_factory=list)
    """Words that gave no usable token (empty, or only whitespace/punctuation)."""

    def to_json(self, tokenizer) -> dict:
        return {"words": self.words, "ids": self.ids, "tokens": [tokenizer.decode([i]) for i in self.ids],
                "truncated": self.truncated, "dropped": self.dropped}


def read_concept_words(text: str) -> list[str]:
    """Words of `text`, a comma list ('war, battle') or the path of a file of words (commas or lines, # comments)."""
    path = Path(text).expanduser()
    if "," not in text and path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        text = ",".join(line.split("#", 1)[0] for line in lines)
    elif "," not in text and _looks_like_a_path(text):  # searching the path's characters helps no one
        raise AttentionLensError(f"concept file {text} does not exist; give a file of words or a comma list like "
                                 f"'war, battle' (to search for {text!r} itself, end it with a comma)")
    words = list(dict.fromkeys(w.strip() for w in text.split(",") if w.strip()))
    if not words:
        raise AttentionLensError("the concept has no words; give a comma list like 'war, battle' or a file of words")
    return words


def _looks_like_a_path(text: str) -> bool:
    text = text.strip()
    return "/" in text or "\\" in text or text.startswith("~") or Path(text).suffix.lower() in (".txt", ".csv", ".tsv",
                                                                                                ".list", ".words")


def make_concept(tokenizer, words: Sequence[str]) -> Concept:
    """Token ids for `words`: the single-token forms of each word as it appears in running text.

    In running text a word follows a space, so ' war' and ' War' are its forms; the bare 'war' is as often a
    piece of another word ('s|war|m'), so it is used only when no spaced form is a single token. A word with
    no single-token form at all is represented by the first token of ' word' and listed in `truncated`.
    """
    concept = Concept(words=list(words), ids=[])
    for word in words:
        ids, note = _word_ids(tokenizer, word)
        if not ids:
            concept.dropped.append(word)
        if note:
            concept.truncated.append(note)
        concept.ids.extend(i for i in ids if i not in concept.ids)
    if not concept.ids:
        raise AttentionLensError(f"no word of the concept ({', '.join(words)}) gives a usable token; use other words")
    return concept


def _word_ids(tokenizer, word: str) -> tuple[list[int], str | None]:
    capital = word[:1].upper() + word[1:]
    spaced = list(dict.fromkeys([" " + word, " " + capital]))
    bare = list(dict.fromkeys([word, capital]))
    for forms in (spaced, bare):
        singles = [ids[0] for ids in (_encode(tokenizer, f) for f in forms) if len(ids) == 1]
        if singles:
            return singles, None
    first = _encode(tokenizer, " " + word)[:1]
    text = tokenizer.decode(first) if first else ""
    if not any(c.isalnum() for c in text):
        return [], None
    return first, f"{word} -> {text}"


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class SearchResult:
    """How much every lens head promotes a concept, averaged over the corpus positions seen; a grid in notebooks."""

    concept: Concept
    kind: str
    layers: list[int]
    heads: list[int]
    token_lift: Tensor
    """Mean lift per (lens layer, lens head, concept token), nats: log p(token) minus the head's mean log p."""
    tokens: int

    @property
    def scores(self) -> Tensor:
        """(lens layer, lens head): the lift averaged over the concept's tokens."""
        return self.token_lift.mean(-1)

    def ranked(self) -> list[tuple[int, int]]:
        """(layer, head) pairs, best score first."""
        order = self.scores.flatten().argsort(descending=True, stable=True).tolist()
        return [(self.layers[i // len(self.heads)], self.heads[i % len(self.heads)]) for i in order]

    def to_records(self) -> list[dict]:
        """One row per (layer, head, concept token id): its lift, and the head's score and rank."""
        rank = {head: i for i, head in enumerate(self.ranked())}
        return [{"layer": layer, "head": head, "score": float(self.scores[i, j]), "rank": rank[layer, head],
                 "id": token_id, "lift": float(self.token_lift[i, j, t])}
                for i, layer in enumerate(self.layers) for j, head in enumerate(self.heads)
                for t, token_id in enumerate(self.concept.ids)]

    def records(self, top: int, tokenizer, tokens_per_head: int = 5) -> list[ConceptHead]:
        """The best `top` heads, each with its `tokens_per_head` most lifted concept tokens."""
        out = []
        for layer, head in self.ranked()[:top]:
            lift = self.token_lift[self.layers.index(layer), self.heads.index(head)]
            best = lift.argsort(descending=True)[:tokens_per_head].tolist()
            tokens = [ConceptToken(token=tokenizer.decode([self.concept.ids[i]]), id=self.concept.ids[i],
                                   lift=round(float(lift[i]), 4)) for i in best]
            out.append(ConceptHead(layer=layer, head=head, score=round(float(lift.mean()), 4), top_tokens=tokens))
        return out


@torch.no_grad()
def search(lens: Lens, concept: Concept, data: DataConfig, tokens: int = 2048, batch_size: int = 4,
           seed: int = 0, block_rows: int = DEFAULT_BLOCK_ROWS) -> SearchResult:
    """Score every lens head by how much it promotes `concept` on the training side of `data`.

    A head's lift for a concept token at a position is its lens log-probability of the token minus the mean
    log-probability the same lens gives a vocabulary token there: the log-sum-exp cancels, so only the concept
    columns and the vocabulary mean of the lens logits are needed, never (tokens x heads x vocab).
    """
    model = lens.model
    stream = HeadStream(model, data, lens.config.layers, split="train", seed=seed, batch_size=batch_size,
                        final_residual=lens.kind_spec.needs_final_residual)
    ids = torch.tensor(concept.ids, device=model.device)
    total = torch.zeros(len(lens.config.layers), len(lens.config.heads), len(ids), device=model.device)
    seen = 0
    for batch in stream:
        final_scale = batch.final_scale()  # (token,) or None
        for i, layer, z in batch.layers(lens.config.layers):
            logits = concept_logits(lens, z.flatten(0, 1), layer, ids, final_scale, block_rows)  # (token, head, concept + 1)
            total[i] += (logits[..., :-1] - logits[..., -1:]).sum(0)
        seen += batch.tokens
        if seen >= tokens:
            break
    return SearchResult(concept=concept, kind=lens.kind, layers=list(lens.config.layers),
                        heads=list(lens.config.heads), token_lift=(total / seen).cpu(), tokens=seen)


def concept_logits(lens: Lens, z: Tensor, layer: int, ids: Tensor, final_scale: Tensor | None = None,
                   block_rows: int = DEFAULT_BLOCK_ROWS) -> Tensor:
    """Lens logits of the tokens `ids`, then the mean lens logit over the vocabulary: (token, head, len(ids) + 1).

    z: (token, head, d_head). Where the lens ends in the model's unembedding (logit, dla, affine) both are
    linear in W_U's rows, so the vocabulary mean is one extra row (the mean row of W_U) and nothing
    vocabulary-sized is made. The full lens and soft-capped models need every logit: made in token blocks.
    """
    unembed = lens.model.unembed
    if not lens.kind_spec.to_unembedding or unembed.softcap is not None:
        block = max(1, block_rows // len(lens.config.heads))
        out = []
        for start in range(0, z.shape[0], block):
            scale = None if final_scale is None else final_scale[start:start + block]
            logits = lens.logits(z[start:start + block], layer, scale).float()  # (block, head, vocab)
            out.append(torch.cat([logits[..., ids], logits.mean(-1, keepdim=True)], dim=-1))
        return torch.cat(out)
    W_U = torch.cat([unembed.W_U[ids], unembed.W_U.mean(0, keepdim=True)])  # (concept + 1, d_model)
    y = lens.unembed_input(lens.hidden(z, layer).float(), final_scale)  # (token, head, d_model): what meets W_U
    if not lens.kind_spec.model_readout:
        return y @ W_U.T  # as Lens.readout: a linear attribution, no bias
    b_U = None if unembed.b_U is None else torch.cat([unembed.b_U[ids], unembed.b_U.mean(0, keepdim=True)])
    return dataclasses.replace(unembed, W_U=W_U, b_U=b_U).logits(y)


@torch.no_grad()
def prompt_lift(lens: Lens, concept: Concept, input_ids: Tensor) -> Tensor:
    """Per-head lift of the concept on one prompt (lens layer, lens head): the explorer's concept box.

    The same score as `search`, averaged over the prompt's positions instead of a corpus.
    """
    model = lens.model
    _, capture = run_with_heads(model, input_ids, lens.config.layers, final_residual=lens.kind_spec.needs_final_residual)
    scale = capture.final_scale()
    ids = torch.tensor(concept.ids, device=model.device)
    lifts = []
    for layer in lens.config.layers:
        logits = concept_logits(lens, capture.heads.pop(layer).z[0], layer, ids, scale)  # (pos, head, concept + 1)
        lifts.append((logits[..., :-1].mean(-1) - logits[..., -1]).mean(0))
    return torch.stack(lifts)

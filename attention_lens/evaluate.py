"""Held-out fidelity of a lens per head, against the logit, DLA, uniform and constant baselines, streamed."""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .data import DataConfig, Document, load_documents, split_by_document
from .errors import AttentionLensError
from .fidelity import HEAD_SCORES, FidelityTotals, Targets, score_layer
from .fidelity_tiles import score_layer_tiled
from .lens import Lens
from .models import Model
from .objective import head_kl, target_distribution
from .results import BaselineComparison, HeadScore, TopToken
from .stream import HeadBatch, HeadStream

BASELINES = ("logit", "dla", "uniform", "constant")
REPORTED_HEADS = 5
"""Best and worst heads named in the summary."""


@dataclass
class EvalConfig:
    """How a lens is scored."""

    tokens: int = 2048
    """Held-out tokens to score (whole windows)."""
    batch_size: int = 16
    """Windows per forward pass. Each batch builds every layer's vocabulary-sized lens factors once (~2 TFLOP for
    all SmolLM2 heads), so larger batches spread that cost over more tokens."""
    seed: int = 0
    """Seeds the document order and the bootstrap: the same seed gives the same numbers."""
    margin: float = 0.05
    """Nats by which a head must beat a baseline, with the whole 95% interval of its gain above it."""
    bootstrap: int = 200
    """Bootstrap replicates (Poisson weights per window) behind the 95% intervals."""
    constant_data: str | None = None
    """Corpus for the constant baseline (default: the lens's training data, else the scored corpus)."""
    constant_tokens: int = 8192
    """Tokens averaged into the constant baseline, from the training side of the split only."""
    block_rows: int = 512
    """Head-token rows per vocabulary-sized block of the exact path (memory vs. speed)."""
    exact: bool = False
    """Score in fp32 with whole vocabulary rows. By default logits are formed in bf16 tiles with fp32 sums
    (~8x faster on CPUs; per-head KL within ~1e-3 nats of fp32 on SmolLM2)."""


@dataclass
class Evaluation:
    """Per-head records and their summary; `to_json()` is the --json document; a KL grid in notebooks."""

    summary: dict
    heads: list[HeadScore]
    setup: dict = field(default_factory=dict)
    """What was scored: lens, model, data, split, tokens, constant baseline, seed."""

    def to_json(self) -> dict:
        return {"summary": self.summary, "heads": [record.to_json() for record in self.heads], **self.setup}

    def head(self, layer: int, head: int) -> HeadScore:
        for record in self.heads:
            if (record.layer, record.head) == (layer, head):
                return record
        raise KeyError((layer, head))

    def to_records(self) -> list[dict]:
        """One row per head: its scores, top token, and each baseline's KL, gain and whether it is beaten."""
        rows = []
        for r in self.heads:
            row = {k: v for k, v in r.to_json().items() if not isinstance(v, dict)}
            row.update(top_token=r.top_token.token, top_token_share=r.top_token.share)
            for name, baseline in r.baselines.items():
                row.update({f"{name}_kl": baseline.kl, f"{name}_gain": baseline.gain, f"beats_{name}": baseline.beats})
            rows.append(row)
        return rows



@torch.no_grad()
def evaluate(
    lens: Lens,
    data: DataConfig,
    config: EvalConfig = EvalConfig(),
    on_progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Score every lens head on the held-out split of `data` (fp32; memory flat in `config.tokens`).

    `on_progress(tokens_done, tokens_planned)` is called after each batch.
    """
    _check(config, data)
    model = lens.model
    train_documents, held_documents = scored_split(lens, data)
    log_constant, constant_setup = constant_distribution(lens, data, train_documents, config)
    stream = HeadStream(model, data, lens.config.layers, documents=held_documents, seed=config.seed,
                        batch_size=config.batch_size, windows=math.ceil(config.tokens / data.seq_len),
                        final_residual=True)
    totals = FidelityTotals(len(lens.config.layers), len(lens.config.heads), model.vocab, config.bootstrap,
                            config.seed)
    baseline = Lens.from_model(model, "logit", lens.config.layers, lens.config.heads)  # its F_h serves dla too
    planned, seen = math.ceil(config.tokens / data.seq_len) * data.seq_len, 0
    scorer = _layer_scorer(model, config)
    for batch in stream:
        _score_batch(lens, baseline, batch, log_constant, totals, scorer)
        seen += batch.tokens
        if on_progress is not None:
            on_progress(seen, planned)
    heads = head_records(lens, totals, config.margin)
    setup = {"lens": lens.kind, "model": model.name, "data": data.data, "holdout": data.holdout,
             "seq_len": data.seq_len, "tokens": seen, "seed": config.seed, "margin": config.margin,
             "bootstrap": config.bootstrap, "constant": constant_setup,
             "precision": "fp32" if config.exact or model.unembed.softcap is not None else "bf16 tiles, fp32 sums",
             "sink_positions": "position 0 of each window and end/begin-of-text tokens"}
    return Evaluation(summary=summarize(heads, totals), heads=heads, setup=setup)


def _check(config: EvalConfig, data: DataConfig) -> None:
    if data.seq_len < 2:
        raise AttentionLensError(f"`seq_len` must be at least 2 (a position and its next token); got {data.seq_len}")
    if min(config.tokens, config.batch_size, config.constant_tokens, config.block_rows) < 1:
        raise AttentionLensError("`tokens`, `batch_size` and `constant_tokens` must be at least 1")
    if config.bootstrap < 2:
        raise AttentionLensError(f"`bootstrap` must be at least 2 replicates; got {config.bootstrap}")
    if not config.margin >= 0:
        raise AttentionLensError(f"`margin` must be >= 0 nats; got {config.margin}")


def _layer_scorer(model: Model, config: EvalConfig) -> Callable:
    """fp32 whole-row scoring when asked for, or where a soft-cap makes the logits non-linear in the factors;
    bf16 tiles with fp32 sums otherwise, every layer of every batch in one workspace of scratch tiles."""
    if config.exact or model.unembed.softcap is not None:
        return lambda lens, baseline, layer, z, targets: score_layer(lens, baseline, layer, z, targets,
                                                                     config.block_rows)
    return functools.partial(score_layer_tiled, workspace={})


def _score_batch(lens: Lens, baseline: Lens, batch: HeadBatch, log_constant: Tensor, totals: FidelityTotals,
                 scorer: Callable) -> None:
    """Every lens layer of one forward pass, in blocks; adds the batch to `totals`."""
    model = lens.model
    input_ids, logits = batch.input_ids, batch.logits
    targets = Targets.build(model, input_ids, logits, batch.capture.final_residual)
    per_layer = [scorer(lens, baseline, layer, z.flatten(0, 1), targets)
                 for _, layer, z in batch.layers(lens.config.layers)]
    head_scores = {name: torch.stack([scores[name] for scores in per_layer], dim=1).unflatten(0, input_ids.shape)
                   for name in (*HEAD_SCORES, "top_id")}  # each (batch, pos, layer, head)
    model_cross_entropy = torch.log_softmax(logits.float(), dim=-1).flatten(0, 1).gather(
        -1, targets.next_token.clamp(min=0)[:, None]).squeeze(-1).neg()
    token_scores = {
        "uniform": targets.neg_entropy + math.log(model.vocab),
        "constant": targets.neg_entropy - targets.p @ log_constant,
        "model_cross_entropy": model_cross_entropy,
        "model_entropy": -targets.neg_entropy,
    }
    token_scores = {name: value.view(input_ids.shape) for name, value in token_scores.items()}
    has_next = targets.next_token.view(input_ids.shape) >= 0
    totals.add(head_scores, token_scores, sink_mask(input_ids, model.tokenizer), has_next)


def sink_mask(input_ids: Tensor, tokenizer) -> Tensor:
    """(batch, pos) True at attention-sink positions, scored apart: each window's first position (no context
    but itself) and end/begin-of-text tokens, where models park attention and predict a new document."""
    sink = torch.zeros_like(input_ids, dtype=torch.bool)
    sink[:, 0] = True
    for special in {getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "bos_token_id", None)} - {None}:
        sink |= input_ids == special
    return sink


# ----- which text -----------------------------------------------------------------------------------


def scored_split(lens: Lens, data: DataConfig) -> tuple[list[Document], list[Document]]:
    """(training side, held-out side) of `data`; refuses a split that would score text the lens trained on."""
    trained = lens.config.training.get("data") or {}
    if _same_source(trained.get("data"), data.data) and data.holdout > trained.get("holdout", data.holdout):
        raise AttentionLensError(
            f"`holdout` {data.holdout} would score documents this lens was trained on (it held out "
            f"{trained['holdout']}); use `holdout` {trained['holdout']} or less"
        )
    train_documents, held_documents = split_by_document(load_documents(data.data, data.skip_bad_lines), data.holdout)
    if not held_documents:
        raise AttentionLensError("no held-out documents to score; use `holdout` > 0")
    return train_documents, held_documents


def default_holdout(lens: Lens) -> float:
    """The fraction the lens was trained with held out (so scoring sees exactly the text it never saw), else 0.1."""
    return (lens.config.training.get("data") or {}).get("holdout", DataConfig.holdout)


def constant_distribution(
    lens: Lens, data: DataConfig, train_documents: list[Document], config: EvalConfig
) -> tuple[Tensor, dict]:
    """log of the model's mean next-token distribution (vocab,), never estimated on scored text.

    Source: --constant-data, else the lens's training data, else the scored corpus; its training side
    when it is a corpus that is also scored or trained on, all of it otherwise.
    """
    trained = lens.config.training.get("data") or {}
    source = config.constant_data or trained.get("data") or data.data
    if _same_source(source, data.data):
        documents = train_documents
    elif _same_source(source, trained.get("data")):
        documents = split_by_document(load_documents(source, data.skip_bad_lines), trained.get("holdout", 0.0))[0]
    else:
        documents = load_documents(source, data.skip_bad_lines)
    model = lens.model
    stream = HeadStream(model, data, documents=documents, seed=config.seed, batch_size=config.batch_size,
                        windows=math.ceil(config.constant_tokens / data.seq_len),
                        what=f"constant baseline's text ({source})")  # no layers: the model's logits only
    total = torch.zeros(model.vocab, dtype=torch.float64, device=model.device)
    seen = 0
    for batch in stream:
        total += torch.softmax(batch.logits.float(), dim=-1).flatten(0, 1).sum(0).double()
        seen += batch.tokens
    return (total / seen).log().float(), {"data": source, "tokens": seen}


def _same_source(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    if a == b:
        return True
    return Path(a).expanduser().exists() and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


# ----- records and summary ----------------------------------------------------------------------------


def head_records(lens: Lens, totals: FidelityTotals, margin: float) -> list[HeadScore]:
    """One record per (layer, head): the lens's scores, its interval, each baseline and whether it beats it."""
    scores = ("kl", "top1", "top10", "cross_entropy", "entropy")
    main = {name: totals.mean("main", name) for name in (*scores, *BASELINES)}  # (layer, head) or () per name
    sink = {name: totals.mean("sink", name) for name in (*scores, *BASELINES)}
    low, high = totals.interval("kl")
    intervals = {name: (*totals.interval(name), *totals.interval(name, minus="kl")) for name in BASELINES}
    records = []
    for i, layer in enumerate(lens.config.layers):
        for j, head in enumerate(lens.config.heads):
            top_counts = totals.top_ids[i * len(lens.config.heads) + j]
            top_id = int(top_counts.argmax())
            record = HeadScore(
                layer=layer, head=head,
                kl=_round(main["kl"][i, j]), kl_low=_round(low[i, j]), kl_high=_round(high[i, j]),
                **{name: _round(main[name][i, j]) for name in scores[1:]},
                top_token=TopToken(id=top_id, token=lens.model.token_text(top_id),
                                   share=_round(top_counts[top_id] / max(1, int(top_counts.sum())))),
                sink={name: _round(_at(sink[name], i, j)) for name in scores}
                     | {f"{name}_kl": _round(_at(sink[name], i, j)) for name in BASELINES},
            )
            for name, (base_low, base_high, gain_low, gain_high) in intervals.items():
                base = _at(main[name], i, j)
                record.baselines[name] = BaselineComparison(
                    kl=_round(base), kl_low=_round(base_low[i, j]), kl_high=_round(base_high[i, j]),
                    gain=_round(base - main["kl"][i, j]), gain_low=_round(gain_low[i, j]),
                    gain_high=_round(gain_high[i, j]), beats=bool(gain_low[i, j] > margin),
                )
            records.append(record)
    return records


def _at(value: Tensor, i: int, j: int) -> Tensor:
    """A per-head score at (i, j), or a head-free one (uniform, constant) as it is."""
    return value if value.dim() == 0 else value[i, j]


def summarize(heads: list[HeadScore], totals: FidelityTotals) -> dict:
    """Means and medians over heads, best and worst heads, and the fraction beating each baseline."""
    kl = [h.kl for h in heads if h.kl is not None]
    ranked = sorted((h for h in heads if h.kl is not None), key=lambda h: h.kl)
    named = [{"layer": h.layer, "head": h.head, "kl": h.kl, "top_token": h.top_token.token} for h in ranked]
    summary = {
        "heads": len(heads),
        "tokens": int(totals.count["main"]),
        "sink_tokens": int(totals.count["sink"]),
        "kl_mean": _mean(kl), "kl_median": _round(statistics.median(kl)) if kl else None,
        **{f"{name}_mean": _mean([getattr(h, name) for h in heads])
           for name in ("top1", "top10", "cross_entropy", "entropy")},
    }
    for name in BASELINES:
        summary[f"{name}_kl_mean"] = _mean([h.baselines[name].kl for h in heads])
        summary[f"frac_beats_{name}"] = _round(sum(h.baselines[name].beats for h in heads) / len(heads))
    summary.update({
        "sink_kl_mean": _mean([h.sink["kl"] for h in heads]),
        "sink_top1_mean": _mean([h.sink["top1"] for h in heads]),
        "model_cross_entropy": _round(totals.mean("main", "model_cross_entropy")),
        "model_entropy": _round(totals.mean("main", "model_entropy")),
        "best": named[:REPORTED_HEADS],
        "worst": named[::-1][:REPORTED_HEADS],
    })
    return summary


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None]
    return _round(sum(finite) / len(finite)) if finite else None


def _round(value) -> float | None:
    """JSON-ready float (6 decimals); None for nan, e.g. a score over no tokens."""
    value = float(value)
    return None if math.isnan(value) else round(value, 6)


# ----- the training loop's quick check ------------------------------------------------------------------


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
    """Mean per-head KL on the by-document held-out split of `data`, all positions: training's quick check."""
    model: Model = lens.model
    stream = HeadStream(model, data, lens.config.layers, split="held", seed=seed, batch_size=batch_size,
                        final_residual=lens.kind_spec.needs_final_residual)
    if not stream.documents:
        raise AttentionLensError("no held-out documents to evaluate on; use `holdout` > 0")
    total = torch.zeros(len(lens.config.layers), len(lens.config.heads), device=model.device)
    seen = 0
    for batch in stream:
        p, neg_entropy = target_distribution(batch.logits.flatten(0, 1))
        final_scale = batch.final_scale()
        for i, layer, z in batch.layers(lens.config.layers):
            total[i] += head_kl(lens, z.flatten(0, 1), layer, p, neg_entropy, final_scale).sum(0)
        seen += batch.tokens
        if seen >= tokens:
            break
    return HeadKL(kl=total / seen, tokens=seen)

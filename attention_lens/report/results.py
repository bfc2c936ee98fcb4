"""Per-head results files (from `eval`, `specialize`, ...) read defensively into one table for display.

The producers of these files evolve independently, so nothing here insists on a key beyond a
`heads` list of records with integer `layer` and `head`. Every finite number in a record becomes a
metric that can be drawn as a heatmap; lists of tokens become the head's "promoted tokens" shown on
hover; short strings (a specialization description) are shown as notes. Nested objects of numbers are flattened to dotted names (`{"baselines": {"logit": 5.1}}` ->
`baselines.logit`). Keys used by name:
- `kl` (or `kl.mean`; KL(P_model || P_lens), nats): the default heatmap;
- with the logit lens's KL under `kl_logit`, `logit`, `baselines.logit` or `baselines.logit.kl` (eval's key; or their `.mean`): derived
  `kl_gain_vs_logit` = logit-lens KL - lens KL (> 0: the lens is closer to the model on that head);
- `promoted`, `top_tokens`, `tokens` (in that order of preference): the hover tokens;
- `effect` (`eval --effects`): the head's measured effect size and the share of it the lens's reading recovers,
  with their intervals, gathered per head into `effects`.

An `effects --json` document (`read_results(..., effects=path)`) adds each head's measured effect size
(`effect_kl` and its interval) and the tokens its removal lowers and raises most: the head's true reading.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import strict_json
from ..errors import AttentionLensError

TOKEN_KEYS = ("promoted", "top_tokens", "tokens")
LENS_KL_KEYS = ("kl", "kl.mean")
LOGIT_KL_KEYS = ("kl_logit", "logit", "baselines.logit", "baselines.logit.kl", "kl_logit.mean", "logit.mean",
                 "baselines.logit.mean")
GAIN_KEY = "kl_gain_vs_logit"
MAX_NOTE_CHARS = 200
EFFECT_KEYS = ("effect_kl", "effect_kl_low", "effect_kl_high", "recovered", "recovered_low", "recovered_high",
               "corr", "top10_agreement", "ceiling_recovered")
"""The numbers of an `eval --effects` head record's `effect` (and of an `effects --json` head) shown per head."""
EFFECT_TOKENS = 10
"""Tokens kept per head of each of `raises` and `lowers` (an `effects --json` file)."""


@dataclass
class HeadResults:
    """Per-(layer, head) numbers, tokens and notes merged from one or more results files."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """metric name -> {"layer,head": value}."""
    tokens: dict[str, list[str]] = field(default_factory=dict)
    """"layer,head" -> promoted tokens, best first."""
    notes: dict[str, dict[str, str]] = field(default_factory=dict)
    """"layer,head" -> {field: short text}."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Scalar summary entries of the files, for a table."""
    sources: list[str] = field(default_factory=list)
    effects: dict[str, dict[str, Any]] = field(default_factory=dict)
    """"layer,head" -> the head's measured effect: any of EFFECT_KEYS (numbers), `dla_recovered`, and `raises` /
    `lowers` ([{"token", "change"}, ...], from an `effects --json` file)."""

    def default_metric(self) -> str | None:
        return next((key for key in LENS_KL_KEYS if key in self.metrics), next(iter(self.metrics), None))

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "default_metric": self.default_metric(), "tokens": self.tokens,
                "notes": self.notes, "summary": self.summary, "sources": self.sources, "effects": self.effects}


def read_results(paths: list[Path], n_layers: int, n_heads: int, effects: Path | None = None) -> HeadResults:
    """Merge results files (later files win on a shared key), then an `effects --json` file; checks every head
    exists in the model."""
    results = HeadResults()
    for path in paths:
        document = _load(path, "eval")
        results.sources.append(Path(path).name)
        summary = document.get("summary")
        if isinstance(summary, dict):
            results.summary.update({k: v for k, v in summary.items() if _is_scalar(v)})
        for record in document["heads"]:
            key = _head_key(record, path, n_layers, n_heads)
            _add_record(results, key, record)
            _add_eval_effect(results, key, record, path)
    if effects is not None:
        _add_effects(results, effects, n_layers, n_heads)
    _derive_gain(results)
    return results


def _load(path: Path, command: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise AttentionLensError(f"results file {path} does not exist; run `attention-lens {command} --out {path}` "
                                 "first")
    try:
        document = strict_json.loads(path.read_bytes(), str(path))
    except (ValueError, RecursionError) as error:  # bad JSON or bad UTF-8
        raise AttentionLensError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("heads"), list):
        raise AttentionLensError(f"{path} must be a JSON object with a 'heads' list (as `{command} --json` writes)")
    return document


def _add_eval_effect(results: HeadResults, key: str, record: dict, path: Path) -> None:
    """An `eval --effects` record's `effect`: its numbers, and dla's `recovered` for comparison."""
    effect = record.get("effect")
    if effect is None:
        return
    if not isinstance(effect, dict):
        raise AttentionLensError(f"{path}: head {key.replace(',', '.')} has an 'effect' that is not an object "
                                 "(`eval --effects --json` writes one per head)")
    found = {name: float(effect[name]) for name in EFFECT_KEYS if _is_number(effect.get(name))}
    baselines = effect.get("baselines")
    dla = baselines.get("dla") if isinstance(baselines, dict) else None
    if isinstance(dla, dict) and _is_number(dla.get("recovered")):
        found["dla_recovered"] = float(dla["recovered"])
    if found:
        results.effects.setdefault(key, {}).update(found)


def _add_effects(results: HeadResults, path: Path, n_layers: int, n_heads: int) -> None:
    """An `effects --json` document: each head's `effect_kl` (a heatmap metric too) with its interval, and the
    tokens removing it lowers and raises most."""
    document = _load(path, "effects")
    results.sources.append(Path(path).name)
    summary = document.get("summary")
    if isinstance(summary, dict):
        results.summary.update({f"effects.{k}": v for k, v in summary.items() if _is_scalar(v)})
    for record in document["heads"]:
        key = _head_key(record, path, n_layers, n_heads)
        if "effect_kl" not in record or not (record["effect_kl"] is None or _is_number(record["effect_kl"])):
            raise AttentionLensError(f"{path}: head {key.replace(',', '.')} has no numeric 'effect_kl'; give the "
                                     "file `attention-lens effects --out FILE` writes")
        found: dict[str, Any] = {name: float(record[name]) for name in EFFECT_KEYS[:3] if _is_number(record.get(name))}
        for side in ("raises", "lowers"):
            tokens = _changes(record.get(side, []), path, key, side)
            if tokens:
                found[side] = tokens
        if found:
            results.effects.setdefault(key, {}).update(found)
        if "effect_kl" in found:
            results.metrics.setdefault("effect_kl", {})[key] = found["effect_kl"]


def _changes(value: Any, path: Path, key: str, side: str) -> list[dict]:
    """[{"token": str, "change": number, ...}, ...] -> the first EFFECT_TOKENS as {"token", "change"}."""
    if not isinstance(value, list) or not all(
            isinstance(item, dict) and isinstance(item.get("token"), str) and _is_number(item.get("change"))
            for item in value):
        raise AttentionLensError(f"{path}: head {key.replace(',', '.')}'s '{side}' must be a list of "
                                 "{\"token\", \"change\"} objects, as `effects --json` writes")
    return [{"token": item["token"], "change": float(item["change"])} for item in value[:EFFECT_TOKENS]]


def _head_key(record: Any, path: Path, n_layers: int, n_heads: int) -> str:
    if not isinstance(record, dict):
        raise AttentionLensError(f"{path}: every entry of 'heads' must be an object with 'layer' and 'head'")
    layer, head = record.get("layer"), record.get("head")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (layer, head)):
        raise AttentionLensError(f"{path}: a head record lacks integer 'layer' and 'head': {str(record)[:80]}")
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise AttentionLensError(
            f"{path} has head {layer}.{head} but the model has {n_layers} layers x {n_heads} heads; "
            "give results made for this model"
        )
    return f"{layer},{head}"


def _add_record(results: HeadResults, key: str, record: dict) -> None:
    _add_values(results, key, {k: v for k, v in record.items() if k not in ("layer", "head")})
    for name in TOKEN_KEYS:
        tokens = _token_list(record.get(name))
        if tokens:
            results.tokens[key] = tokens[:10]
            return


def _add_values(results: HeadResults, key: str, values: dict, prefix: str = "") -> None:
    """Numbers become metrics and short strings notes; nested objects (two levels) get dotted names."""
    for name, value in values.items():
        if _is_number(value):
            results.metrics.setdefault(prefix + name, {})[key] = float(value)
        elif isinstance(value, str) and value:
            results.notes.setdefault(key, {})[prefix + name] = value[:MAX_NOTE_CHARS]
        elif isinstance(value, dict) and prefix.count(".") < 2:
            _add_values(results, key, value, f"{prefix}{name}.")


def _derive_gain(results: HeadResults) -> None:
    kl = next((results.metrics[k] for k in LENS_KL_KEYS if k in results.metrics), None)
    logit = next((results.metrics[k] for k in LOGIT_KL_KEYS if k in results.metrics), None)
    if kl and logit and GAIN_KEY not in results.metrics:
        results.metrics[GAIN_KEY] = {key: logit[key] - kl[key] for key in kl if key in logit}


def _token_list(value: Any) -> list[str]:
    """["the", ...] or [{"token": "the", ...}, ...] -> ["the", ...]; anything else -> []."""
    if not isinstance(value, list):
        return []
    tokens = []
    for item in value:
        if isinstance(item, dict):
            item = item.get("token")
        if not isinstance(item, str):
            return []
        tokens.append(item)
    return tokens


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_scalar(value: Any) -> bool:
    return _is_number(value) or isinstance(value, (str, bool))

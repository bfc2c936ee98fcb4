"""The HTML report: one self-contained file (no network) with heatmaps, a prompt's token grid and the lens's identity.

Drawing code is shared with the web explorer (`attention_lens/web/static/`), inlined here so the
file opens offline from anywhere. Data travels as one JSON block; the page draws it with small
hand-written SVG/JS, which keeps a SmolLM2 report in the hundreds of kilobytes.
"""

from __future__ import annotations

import dataclasses
import html
import re
from importlib import resources
from pathlib import Path

from .. import strict_json
from .._version import __version__
from ..decode import DecodeResult, decode
from ..lens import Lens
from ..models import Model
from ..readings import ChosenReading
from ..results import UNREAD_SHARE
from ..storage import atomic_write
from .results import HeadResults, read_results

__all__ = ["HeadResults", "build_report", "compact_decode", "read_results", "write_report"]

SHARED_ASSETS = ("lens.css", "grid.js")


def build_report(model: Model, lens: Lens, prompt: str | None = None, results: HeadResults | None = None,
                 k: int = 5, reading: ChosenReading | None = None) -> str:
    """The report's HTML text; `prompt` adds the per-position token grid (under `reading`, default raw), `results`
    the fidelity heatmaps and, where the files have them, each head's measured effect."""
    reading = reading or ChosenReading("raw")
    grid = None
    if prompt:
        grid = compact_decode(decode(model, lens, prompt, k=k, position="all", **reading.decode_args()))
    data = {
        "reading": reading.to_json(),
        "version": __version__,
        "lens": dataclasses.asdict(lens.config),
        "model": model.fingerprint(),
        "n_layers": model.n_layers,
        "n_heads": model.n_heads,
        "results": results.to_json() if results is not None else None,
        "prompt": grid,
    }
    title = f"attention-lens report: {lens.kind} lens on {model.name or model.model_type}"
    return _fill_template(title, data, reading.label)


def write_report(path: str | Path, html_text: str) -> Path:
    """Write the HTML atomically: an interrupted write leaves the old file (or none), never half a page."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda target: Path(target).write_text(html_text, encoding="utf-8"))
    return path


def compact_decode(result: DecodeResult) -> dict:
    """A decode result with each token string stored once: cells "pos,layer,head" -> [[id, prob], ...] (raw
    reading), [[id, prob, promoted], ...] (promoted) or [[id, null, change], ...] (effect)."""
    strings: dict[int, str] = {}
    cells: dict[str, list] = {}
    for record in result.heads:
        top = []
        for entry in record.top:
            strings[entry.id] = entry.token
            row = [entry.id, None if entry.prob is None else round(entry.prob, 4)]
            score = entry.promoted if entry.promoted is not None else entry.change
            top.append(row if score is None else [*row, round(score, 4)])
        cells[f"{record.position},{record.layer},{record.head}"] = top
    return {
        "reading": result.reading,
        "text": result.text,
        "tokens": result.tokens,
        "positions": result.positions,
        "layers": sorted({r.layer for r in result.heads}),
        "heads": sorted({r.head for r in result.heads}),
        "strings": {str(i): s for i, s in strings.items()},
        "cells": cells,
        "unread": [f"{layer},{head}" for layer, head in result.unread_heads()],
        "unread_below": UNREAD_SHARE,
    }


def _asset(package: str, name: str) -> str:
    return resources.files(package).joinpath(name).read_text(encoding="utf-8")


def _fill_template(title: str, data: dict, reading: str = "") -> str:
    # Read through the top package: importing attention_lens.web would pull in the server (the web extra), which a
    # report does not need.
    shared = [_asset("attention_lens", f"web/static/{name}") for name in SHARED_ASSETS]
    # "</script>" or "<!--" inside the data block would end it early, and a prompt is user text.
    # Strict: the page reads it with JSON.parse, which a bare NaN would break.
    payload = strict_json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    values = {"title": html.escape(title), "reading": html.escape(reading), "style": shared[0], "data": payload,
              "script": shared[1] + "\n" + _asset(__name__, "report.js")}
    # One pass, so a placeholder-like string inside the prompt or the scripts is never substituted.
    return re.sub(r"\{\{(title|reading|style|data|script)\}\}", lambda m: values[m.group(1)],
                  _asset(__name__, "template.html"))

"""JSON in and out of the process, strictly: no NaN or Infinity tokens either way (they are not JSON)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import AttentionLensError
from .storage import atomic_write


def dumps(document: Any, indent: int | None = None, **options: Any) -> str:
    """`document` as strict JSON; a non-finite number in it is an error naming where it is, not a bare `NaN`.
    `options` go to json.dumps (separators, ensure_ascii)."""
    try:
        return json.dumps(document, allow_nan=False, indent=indent, **options)
    except ValueError:
        where, value = _first_non_finite(document) or ("?", float("nan"))
        raise AttentionLensError(
            f"the result is not finite ({where} is {value}); nothing was written: the computation overflowed "
            "or diverged, check the numbers given (scales, ridge, learning rate) and the input"
        ) from None


def write(path: str | Path, document: Any, indent: int | None = 1) -> None:
    """Write `document` to `path` atomically (temp file + rename), after checking it is strict JSON."""
    text = dumps(document, indent=indent) + "\n"
    atomic_write(Path(path), lambda target: Path(target).write_text(text, encoding="utf-8"))


def loads(text: str | bytes, where: str) -> Any:
    """Parse JSON that must be strict: `NaN`, `Infinity` and numbers that overflow a float are refused."""

    def refuse(token: str):
        raise AttentionLensError(f"{where} holds {token}, which is not a JSON number; give a finite number")

    def parse_float(token: str) -> float:
        value = float(token)
        if not math.isfinite(value):
            refuse(token if len(token) < 40 else token[:37] + "...")
        return value

    return json.loads(text, parse_constant=refuse, parse_float=parse_float)


def _first_non_finite(value: Any, where: str = "") -> tuple[str, float] | None:
    if isinstance(value, float) and not math.isfinite(value):
        return where or "the value", value
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _first_non_finite(item, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))
        if found:
            return found
    return None

"""Every number the CLI takes is checked where its option is declared: finite and within bounds, before any work.

`typer.Option(..., callback=within(1, 10**12))` refuses NaN, ±inf and anything out of range with one line naming
the option. The bounds are generous but finite: a number no run could use (a batch of 10**18 windows) is a
mistake, and is better refused at once than by an out-of-memory kill an hour later.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import typer

from ..errors import AttentionLensError
from ..intervene import MAX_SCALE

__all__ = ["MAX_BATCH", "MAX_K", "MAX_NEW_TOKENS", "MAX_REPEATS", "MAX_SCALE", "MAX_SEED", "MAX_SEQ_LEN", "MAX_TOKENS",
           "within"]

MAX_TOKENS = 10**12
"""Most tokens any budget may ask for (a trillion: far beyond any corpus here)."""
MAX_BATCH = 65_536
"""Most windows in one forward pass."""
MAX_SEQ_LEN = 1_048_576
"""Longest window, in tokens."""
MAX_K = 1000
"""Most top-k tokens per head (and never more than the vocabulary)."""
MAX_SEED = 2**32 - 1
"""Seeds are 32-bit: numpy and the data order take no more."""
MAX_REPEATS = 10_000
"""Most random draws or bootstrap replicates."""
MAX_NEW_TOKENS = 4096
"""Most tokens `generate` continues a prompt by."""


def within(low: float, high: float, *, above: bool = False, below: bool = False,
           meaning: str = "") -> Callable[..., Any]:
    """A typer callback: the option's value must be a finite number in [low, high]; `above` excludes low,
    `below` excludes high; `meaning` ("a Jaccard index") is said in the error.

    None (an optional option left out) passes; a list option has each of its values checked.
    """

    def check(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        for number in value if isinstance(value, (list, tuple)) else [value]:
            if number is not None:
                _check(_flag(param) + (f" ({meaning})" if meaning else ""), number, low, high, above, below)
        return value

    check.bounds = (low, high, above, below)  # type: ignore[attr-defined]  # read by the tests that enumerate options
    return check


def _check(flag: str, number: float, low: float, high: float, above: bool, below: bool) -> None:
    if isinstance(number, float) and not math.isfinite(number):  # ints are finite (and may exceed a float)
        raise AttentionLensError(f"{flag} must be a finite number; got {number}")
    too_low = number <= low if above else number < low
    too_high = number >= high if below else number > high
    if too_low or too_high:
        lower = f"above {_show(low)}" if above else f"at least {_show(low)}"
        upper = f"below {_show(high)}" if below else f"at most {_show(high)}"
        raise AttentionLensError(f"{flag} must be {lower} and {upper}; got {_show(number)}")


def _flag(param: typer.CallbackParam) -> str:
    long = [opt for opt in param.opts if opt.startswith("--")]
    return max(long, key=len) if long else (param.opts[0] if param.opts else param.name or "the value")


def _show(number: float) -> str:
    if isinstance(number, int) and abs(number) >= 10**6 and str(number).rstrip("0") == "1":
        return f"10**{len(str(number)) - 1}"
    return f"{number:g}" if isinstance(number, float) else str(number)

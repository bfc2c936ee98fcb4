"""Options that several commands take, declared once: `model: ModelName = DEFAULT_MODEL` in a command's signature.

Each takes its flag from the parameter's name (`seq_len` -> `--seq-len`, booleans get `--no-` too), so a command
names the parameter as the alias does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from typer.models import OptionInfo

from ..kinds import kind_names
from ..readings import READINGS, check_reading
from .numbers import MAX_SCALE, MAX_SEQ_LEN, MAX_TOKENS, within


class KindsOption(OptionInfo):
    """An option whose help names the registered lens kinds: written by `describe()` each time the command is built
    (every run, --help, docs/cli.md), not frozen when this module is imported, so a kind registered later is listed
    while it is registered, and only then."""

    def __init__(self, describe: Callable[[], str], **option) -> None:
        vars(self).update(vars(typer.Option(**option)))  # every setting as typer.Option makes it (defaults, decls)
        self.describe = describe

    @property
    def help(self) -> str:
        return self.describe()

    @help.setter
    def help(self, value: str | None) -> None:
        pass  # OptionInfo.__init__ sets it; the text is always describe()'s


ModelName = Annotated[str, typer.Option(
    help="Registered name (smollm2-135m, gemma3-270m), local HF directory, .gguf file or Hugging Face Hub id.")]
"""The model a command runs on (default `DEFAULT_MODEL`)."""
LensModel = Annotated[Optional[str], typer.Option(help="Model (default: the lens's own, or smollm2-135m).")]
"""The model of a command that takes a lens: optional, a lens directory knows its model."""
LensSpec = Annotated[str, KindsOption(
    lambda: f"{', '.join(kind_names(trainable=False))}, a lens directory, or a Hugging Face Hub id of one.")]
Revision = Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit) of a Hub id --model.")]
DeviceMap = Annotated[Optional[str], typer.Option(
    help="Spread the model over devices (accelerate): auto, balanced, sequential, or JSON {module: device}.")]
TrainKind = Annotated[Optional[str], KindsOption(
    lambda: f"Lens kind: {' or '.join(kind_names(trainable=True))} (default affine; effect with --objective effect).")]
Data = Annotated[str, typer.Option(help="sotu, shakespeare, a .txt/.jsonl file or a directory of .txt files.")]
SeqLen = Annotated[int, typer.Option(help="Tokens per window.", callback=within(2, MAX_SEQ_LEN))]
Device = Annotated[str, typer.Option(help="cpu, cuda or auto.")]
SkipBadLines = Annotated[bool, typer.Option(help="Skip malformed .jsonl lines instead of failing.")]
Layers = Annotated[Optional[str], typer.Option(help="Layers, e.g. 20-29 or 3,7 (default: all).")]
Heads = Annotated[Optional[str], typer.Option(help="Heads in each layer, e.g. 0-3 (default: all).")]
HeadList = Annotated[str, typer.Option(help="Heads as LAYER.HEAD, e.g. 12.3,14.0.")]
Concept = Annotated[str, typer.Option(help="Words/phrases of the concept: a comma list ('war, battle') or a file.")]
Overwrite = Annotated[bool, typer.Option(help="Replace a lens already in --out.")]
OverwriteFile = Annotated[bool, typer.Option(help="Replace the --out file if it exists (by default an existing file "
                                             "is refused).")]
EvalTokens = Annotated[int, typer.Option(help="Held-out tokens to score the lens on at the end (0: skip).",
                                         callback=within(0, MAX_TOKENS))]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON document with the results.")]
"""`--json` (not `--as-json`, the parameter's name): stdout holds one JSON document, progress and logs go to stderr;
a command's docstring outlines its document."""
ResultsOut = Annotated[Optional[Path], typer.Option(help="Also write the JSON results to this file.")]
ResultFiles = Annotated[Optional[list[Path]], typer.Option(
    "--eval", help="Per-head results JSON (eval, specialize); repeatable.")]
Scale = Annotated[Optional[float], typer.Option(help="Shorthand for --mode scale=X; X > 1 steers toward the heads.",
                                                callback=within(-MAX_SCALE, MAX_SCALE))]

Reading = Annotated[Optional[str], typer.Option(
    help="raw (the lens's tokens), promoted (the tokens it adds over the prior, ranked by q log(q/prior): the "
         "default for trained predictive lenses) or effect (the predicted effect of removing the head: the default for effect lenses).",
    callback=lambda value: value if value is None else check_reading(value), metavar="|".join(READINGS))]
"""Which reading a command shows (readings.py); None: the lens kind's default. Checked before any work."""
PriorData = Annotated[Optional[str], typer.Option(
    help="Corpus of the prior (promoted) and of the heads' means (effect); default: the lens's training data, "
         "else sotu. Cached.")]

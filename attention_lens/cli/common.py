"""What the commands share: the stderr console, JSON output, index parsing and the --lens/--model pairing."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from .. import strict_json
from ..data import DataConfig
from ..errors import AttentionLensError
from ..evaluate import default_holdout
from ..hub import resolve
from ..lens import Lens
from ..kinds import REGISTRY
from ..lens_config import read_config
from ..models import DEFAULT_MODEL, Model, load_model

err = Console(stderr=True)
"""Progress, logs and warnings: stderr, so stdout holds only results (one JSON document under --json)."""


SETTING = re.compile(r"`([a-z][a-z0-9_]*)`")
"""How library errors name a setting (`seq_len`); on the command line it is a flag (--seq-len)."""


def as_flags(message: str) -> str:
    """A library error message in the CLI's words: each `setting` becomes its --flag."""
    return SETTING.sub(lambda match: "--" + match[1].replace("_", "-"), message)


def emit_json(document: dict) -> None:
    """The one JSON document of --json, strict: a NaN or Infinity in it is an error, never a bare `NaN` token."""
    sys.stdout.write(strict_json.dumps(document) + "\n")


def finish_results(document: dict, out: Path | None, as_json: bool) -> None:
    """--out gets the JSON document whatever the output mode (written atomically); --json puts it on stdout."""
    text = strict_json.dumps(document)  # a non-finite result fails here, before anything is written
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        strict_json.write(out, document)
        err.print(f"wrote {out}")
    if as_json:
        sys.stdout.write(text + "\n")


def check_output(out: Path, overwrite: bool, directory: bool = False) -> None:
    """The one rule for every command that writes, applied before any work: an existing --out is replaced only
    with --overwrite (a lens directory: see `existing_run`), a file is not a directory nor the other way round,
    and the place it goes must be writable (tried, not guessed from permission bits)."""
    if out.exists():
        if directory and not out.is_dir():
            raise AttentionLensError(f"--out {out} is a file; give a directory for the lens")
        if not directory and out.is_dir():
            raise AttentionLensError(f"--out {out} is a directory; give a file name")
        if not directory and not overwrite:
            raise AttentionLensError(f"--out {out} already exists; pass --overwrite to replace it, or choose another name")
    place = out if out.is_dir() else out.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise AttentionLensError(f"--out {out}: {place} is a file, so nothing can be written under it; choose another path")
    try:
        handle, probe = tempfile.mkstemp(dir=place, prefix=".attention-lens-probe.")
    except OSError as error:
        raise AttentionLensError(f"--out {out}: cannot write in {place} ({error.strerror}); choose a writable "
                                 "directory") from None
    os.close(handle)
    os.unlink(probe)


def parse_indices(text: str | None, count: int, what: str) -> list[int] | None:
    """'20-29', '3,7', '0-2,5' or 'all' -> sorted indices; None for all."""
    if text is None or text == "all":
        return None
    indices: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            start, stop = int(low), int(high) if high else int(low)
            if stop < start:
                raise AttentionLensError(f"--{what}s {text!r}: the range {part.strip()} is reversed; write {stop}-{start}")
            indices.update(range(start, stop + 1))
    except ValueError:
        raise AttentionLensError(f"--{what}s {text!r}: use a range like 20-29, a list like 3,7, or all") from None
    bad = sorted(i for i in indices if not 0 <= i < count)
    if bad or not indices:
        raise AttentionLensError(f"--{what}s {text!r} is out of range: the model has {count} {what}s (0-{count - 1})")
    return sorted(indices)


def lens_and_model(lens: str, model: str | None, device: str, revision: str | None = None,
                   device_map: str | None = None) -> tuple[Lens, Model]:
    """--lens logit|dla|DIR|Hub id with an optional --model (a lens directory knows its model and revision)."""
    kind = REGISTRY.get(lens)
    if kind is not None and not kind.trainable:
        loaded = load_model(model or DEFAULT_MODEL, device=device, revision=revision, device_map=device_map)
        return Lens.from_model(loaded, lens), loaded
    if kind is not None:
        raise AttentionLensError(f"--lens {lens} needs training; give a lens directory made by `attention-lens train`")
    directory = resolve(lens)  # a Hub id is fetched (or read from the Hub cache) here
    made_for = read_config(directory).model
    source = model or made_for.get("name")
    if not source:
        raise AttentionLensError(f"{lens} does not say which model it was made from; pass --model")
    if model is None and revision is None:
        revision = made_for.get("revision")
    loaded = load_model(source, device=device, revision=revision, device_map=device_map)
    return Lens.load(directory, loaded), loaded


def scored_data(lens: Lens, data: str, seq_len: int, holdout: float | None, skip_bad_lines: bool) -> DataConfig:
    """The held-out text eval and specialize score on: by default the lens's own split, so no head is scored on
    text it was trained on."""
    return DataConfig(data=data, seq_len=seq_len, skip_bad_lines=skip_bad_lines,
                      holdout=default_holdout(lens) if holdout is None else holdout)

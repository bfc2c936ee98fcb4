"""`attention-lens report | serve`: show the heads, in one HTML file or in the local web explorer."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import AttentionLensError
from typing import Annotated, Optional

from ..models import Model
from ..readings import choose_reading
from ..report import build_report, read_results, write_report
from .common import check_output, emit_json, err, lens_and_model
from .numbers import MAX_K, MAX_SEQ_LEN, within
from .options import (AsJson, Device, DeviceMap, LensModel, LensSpec, OverwriteFile, PriorData, Reading, ResultFiles,
                      Revision)

REPORT_PROMPT = "The capital of France is Paris, and the capital of Italy is"
EffectsFile = Annotated[Optional[Path], typer.Option(
    "--effects", help="Measured head effects (`effects --json` / --out): each head's effect size and the tokens "
    "its removal lowers and raises most.")]


def report(
    out: Path = typer.Option(..., help="HTML file to write (one self-contained file; opens offline)."),
    lens: LensSpec = "logit",
    model: LensModel = None,
    eval_files: ResultFiles = None,
    effects: EffectsFile = None,
    prompt: str = typer.Option(REPORT_PROMPT, help="Prompt whose per-position token grid is shown ('' for none)."),
    k: int = typer.Option(5, "-k", "--k", help="Top-k tokens per head kept for the prompt.", callback=within(1, MAX_K)),
    reading: Reading = None,
    prior_data: PriorData = None,
    overwrite: OverwriteFile = False,
    device: Device = "cpu",
    revision: Revision = None,
    device_map: DeviceMap = None,
    as_json: AsJson = False,
) -> None:
    """Write an HTML report: per-head heatmaps, a prompt's token grid (click a head), the lens's identity.

    --json describes the written file."""
    check_output(out, overwrite)
    lens_obj, loaded = lens_and_model(lens, model, device, revision, device_map)
    results = _read_results(eval_files, effects, loaded)
    chosen = choose_reading(loaded, lens_obj, reading, prior_data) if prompt else None
    path = write_report(out, build_report(loaded, lens_obj, prompt or None, results, k=k, reading=chosen))
    summary = {"out": str(path), "bytes": path.stat().st_size, "results": [str(p) for p in eval_files or []],
               "effects": None if effects is None else str(effects), "prompt": prompt or None,
               "reading": None if chosen is None else chosen.name}
    if as_json:
        emit_json(summary)
        return
    err.print(f"wrote {path} ({summary['bytes'] / 1024:.0f} KiB)")


def serve(
    lens: LensSpec = "logit",
    model: LensModel = None,
    eval_files: ResultFiles = None,
    effects: EffectsFile = None,
    reading: Reading = None,
    prior_data: PriorData = None,
    host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but localhost exposes the model."),
    port: int = typer.Option(8765, help="Port to listen on.", callback=within(0, 65535)),
    max_tokens: int = typer.Option(128, help="Longest prompt (in tokens) a request may send.",
                                   callback=within(1, MAX_SEQ_LEN)),
    max_connections: int = typer.Option(32, help="Most connections served at once; more get 503 until some finish.",
                                        callback=within(1, 4096)),
    request_timeout: float = typer.Option(10.0, help="Seconds a client may take to send its request headers, and "
                                          "again its body (then 408).", callback=within(0, 3600, above=True)),
    device: Device = "cpu",
    revision: Revision = None,
    device_map: DeviceMap = None,
) -> None:
    """Serve the web explorer: type a prompt, see every head's tokens, click a head for top-k and attention."""
    try:
        from ..web import LOCAL_HOSTS, Limits, bind, create_app, run_server
    except ImportError as error:
        raise AttentionLensError(f"serve needs the web extra ({error.name} is missing): "
                                 "pip install 'attention-lens[web]'") from None
    sock = bind(host, port)  # before the model loads, so a busy port fails at once
    with sock:
        lens_obj, loaded = lens_and_model(lens, model, device, revision, device_map)
        results = _read_results(eval_files, effects, loaded)
        limits = Limits(max_tokens=max_tokens, request_timeout=request_timeout, max_connections=max_connections)
        app_ = create_app(loaded, lens_obj, results, limits, choose_reading(loaded, lens_obj, reading, prior_data),
                          prior_data)
        if host not in LOCAL_HOSTS:
            err.print(f"warning: listening on {host}: anyone who can reach this machine can run the model")
        err.print(f"attention-lens explorer on http://{host}:{sock.getsockname()[1]}/ (Ctrl-C to stop)")
        run_server(app_, sock)


def _read_results(eval_files: list[Path] | None, effects: Path | None, model: Model):
    if not eval_files and effects is None:
        return None
    return read_results(eval_files or [], model.n_layers, model.n_heads, effects)

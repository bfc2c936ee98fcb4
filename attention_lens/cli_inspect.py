"""`attention-lens eval | specialize | report | serve`: score and describe heads over a corpus, and show them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .cli import _emit_json, _lens_and_model, app, err
from .data import DataConfig
from .errors import AttentionLensError
from .models import Model


@app.command("eval")
def eval_(
    lens: str = typer.Option("logit", help="logit, dla, or a lens directory."),
    model: Optional[str] = typer.Option(None, help="Model (default: the lens's own, or smollm2-135m)."),
    data: str = typer.Option("sotu", help="sotu, shakespeare, a .txt/.jsonl file or a directory of .txt files."),
    tokens: int = typer.Option(2048, help="Held-out tokens to score (whole windows)."),
    seq_len: int = typer.Option(128, help="Tokens per window."),
    batch_size: int = typer.Option(4, help="Windows per forward pass."),
    holdout: Optional[float] = typer.Option(None, help="Fraction of documents held out (default: the lens's own, else 0.1)."),
    margin: float = typer.Option(0.05, help="Nats a head must beat a baseline by, its whole 95% interval above it."),
    seed: int = typer.Option(0, help="Seed of the document order and the bootstrap."),
    bootstrap: int = typer.Option(200, help="Bootstrap replicates behind the 95% intervals."),
    constant_data: Optional[str] = typer.Option(None, help="Corpus for the constant baseline (default: the lens's training data)."),
    constant_tokens: int = typer.Option(8192, help="Tokens averaged into the constant baseline (training side only)."),
    skip_bad_lines: bool = typer.Option(False, help="Skip malformed .jsonl lines instead of failing."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    out: Optional[Path] = typer.Option(None, help="Also write the JSON results to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document: {summary, heads: [...]}."),
) -> None:
    """Score every head's lens on held-out text against the logit, dla, uniform and constant baselines."""
    from .evaluate import EvalConfig, evaluate
    from .render import TokenBar, eval_tables

    lens_obj, _ = _lens_and_model(lens, model, device)
    data_config = _scored_data(lens_obj, data, seq_len, holdout, skip_bad_lines)
    config = EvalConfig(tokens=tokens, batch_size=batch_size, seed=seed, margin=margin, bootstrap=bootstrap,
                        constant_data=constant_data, constant_tokens=constant_tokens)
    with TokenBar(err, "eval") as bar:
        result = evaluate(lens_obj, data_config, config, on_progress=bar.update)
    _finish_results(result.to_json(), out, as_json)
    if not as_json:
        console = Console()
        for table in eval_tables(result):
            console.print(table)


@app.command()
def specialize(
    lens: str = typer.Option("logit", help="logit, dla, or a lens directory."),
    model: Optional[str] = typer.Option(None, help="Model (default: the lens's own, or smollm2-135m)."),
    data: str = typer.Option("sotu", help="sotu, shakespeare, a .txt/.jsonl file or a directory of .txt files."),
    tokens: int = typer.Option(2048, help="Held-out tokens to read the heads on (whole windows)."),
    seq_len: int = typer.Option(128, help="Tokens per window."),
    batch_size: int = typer.Option(4, help="Windows per forward pass."),
    holdout: Optional[float] = typer.Option(None, help="Fraction of documents held out (default: the lens's own, else 0.1)."),
    seed: int = typer.Option(0, help="Seed of the document order."),
    top: int = typer.Option(20, help="Promoted tokens per head kept for its concentration and similarity."),
    group_similarity: float = typer.Option(0.25, help="Average Jaccard of promoted sets at which heads are grouped."),
    compare_layers: bool = typer.Option(False, help="Show how specialization changes with depth."),
    skip_bad_lines: bool = typer.Option(False, help="Skip malformed .jsonl lines instead of failing."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    out: Optional[Path] = typer.Option(None, help="Also write the JSON results to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document: {summary, heads, groups}."),
) -> None:
    """What each head writes over a corpus: promoted tokens, concentration, description, groups of heads."""
    from .render import TokenBar, specialize_tables
    from .specialize import SpecializeConfig, specialize as specialize_heads

    lens_obj, _ = _lens_and_model(lens, model, device)
    data_config = _scored_data(lens_obj, data, seq_len, holdout, skip_bad_lines)
    config = SpecializeConfig(tokens=tokens, batch_size=batch_size, seed=seed, top=top,
                              group_similarity=group_similarity)
    with TokenBar(err, "specialize") as bar:
        result = specialize_heads(lens_obj, data_config, config, on_progress=bar.update)
    _finish_results(result.to_json(layers=compare_layers), out, as_json)
    if not as_json:
        console = Console()
        for table in specialize_tables(result, compare_layers):
            console.print(table)


def _scored_data(lens, data: str, seq_len: int, holdout: float | None, skip_bad_lines: bool) -> DataConfig:
    """The held-out text eval and specialize score on: by default the lens's own split, so no head is scored on
    text it was trained on."""
    from .evaluate import default_holdout

    return DataConfig(data=data, seq_len=seq_len, skip_bad_lines=skip_bad_lines,
                      holdout=default_holdout(lens) if holdout is None else holdout)


def _finish_results(document: dict, out: Path | None, as_json: bool) -> None:
    """--out gets the JSON document whatever the output mode; --json puts it on stdout."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(document, indent=1) + "\n")
        err.print(f"wrote {out}")
    if as_json:
        _emit_json(document)


REPORT_PROMPT = "The capital of France is Paris, and the capital of Italy is"


@app.command()
def report(
    out: Path = typer.Option(..., help="HTML file to write (one self-contained file; opens offline)."),
    lens: str = typer.Option("logit", help="logit, dla, or a lens directory."),
    model: Optional[str] = typer.Option(None, help="Model (default: the lens's own, or smollm2-135m)."),
    eval_files: Optional[list[Path]] = typer.Option(None, "--eval", help="Per-head results JSON (eval, specialize); repeatable."),
    prompt: str = typer.Option(REPORT_PROMPT, help="Prompt whose per-position token grid is shown ('' for none)."),
    k: int = typer.Option(5, "-k", "--k", help="Top-k tokens per head kept for the prompt."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document describing the written file."),
) -> None:
    """Write an HTML report: per-head heatmaps, a prompt's token grid (click a head), the lens's identity."""
    from .report import build_report, write_report

    lens_obj, loaded = _lens_and_model(lens, model, device)
    results = _read_results(eval_files, loaded)
    path = write_report(out, build_report(loaded, lens_obj, prompt or None, results, k=k))
    summary = {"out": str(path), "bytes": path.stat().st_size, "results": [str(p) for p in eval_files or []],
               "prompt": prompt or None}
    if as_json:
        _emit_json(summary)
        return
    err.print(f"wrote {path} ({summary['bytes'] / 1024:.0f} KiB)")


@app.command()
def serve(
    lens: str = typer.Option("logit", help="logit, dla, or a lens directory."),
    model: Optional[str] = typer.Option(None, help="Model (default: the lens's own, or smollm2-135m)."),
    eval_files: Optional[list[Path]] = typer.Option(None, "--eval", help="Per-head results JSON (eval, specialize); repeatable."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but localhost exposes the model."),
    port: int = typer.Option(8765, help="Port to listen on."),
    max_tokens: int = typer.Option(128, help="Longest prompt (in tokens) a request may send."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
) -> None:
    """Serve the web explorer: type a prompt, see every head's tokens, click a head for top-k and attention."""
    try:
        from .web import LOCAL_HOSTS, Limits, bind, create_app, run_server
    except ImportError as error:
        raise AttentionLensError(f"serve needs the web extra ({error.name} is missing): "
                                 "pip install 'attention-lens[web]'") from None
    sock = bind(host, port)  # before the model loads, so a busy port fails at once
    with sock:
        lens_obj, loaded = _lens_and_model(lens, model, device)
        app_ = create_app(loaded, lens_obj, _read_results(eval_files, loaded), Limits(max_tokens=max_tokens))
        if host not in LOCAL_HOSTS:
            err.print(f"warning: listening on {host}: anyone who can reach this machine can run the model")
        err.print(f"attention-lens explorer on http://{host}:{sock.getsockname()[1]}/ (Ctrl-C to stop)")
        run_server(app_, sock)


def _read_results(eval_files: list[Path] | None, model: Model):
    from .report import read_results

    return read_results(eval_files, model.n_layers, model.n_heads) if eval_files else None

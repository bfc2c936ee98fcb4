"""The `attention-lens` command line: one small function per subcommand, the work lives in the library."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ._version import __version__
from .checkpoint import CHECKPOINT_DIR
from .data import DataConfig
from .decode import decode as decode_prompt
from .distributed import close, finish, init_world, rank_device
from .errors import AttentionLensError
from .evaluate import heldout_kl
from .fit import FitConfig, fit as fit_lens
from .lens import KINDS, Lens, read_config
from .models import DEFAULT_MODEL, Model, load_model
from .train import TrainConfig, existing_run, train as train_lens

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Per-head attention lenses for HuggingFace causal LMs.")
err = Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. User mistakes print one line, never a traceback."""
    _quiet_libraries()
    try:
        app(args=argv, prog_name="attention-lens", standalone_mode=False)
    except AttentionLensError as error:
        print(f"error: {error}", file=sys.stderr)  # plain: one line, however wide the terminal
        return 2
    except OSError as error:  # disk full, permission denied, --out is a file: the user's to fix, in one line
        where = f" ({error.filename})" if error.filename else ""
        print(f"error: {error.strerror or error}{where}; check the path, its permissions and free disk space",
              file=sys.stderr)
        return 2
    except typer.Exit as exit_:
        return exit_.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted")
        return 130
    except typer.TyperException as error:  # usage errors: typer's own (vendored) click exceptions
        error.show(file=sys.stderr)
        return error.exit_code
    return 0


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


def parse_indices(text: str | None, count: int, what: str) -> list[int] | None:
    """'20-29', '3,7', '0-2,5' or 'all' -> sorted indices; None for all."""
    if text is None or text == "all":
        return None
    indices: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            start, stop = int(low), int(high) if high else int(low)
            indices.update(range(start, stop + 1))
    except ValueError:
        raise AttentionLensError(f"--{what}s {text!r}: use a range like 20-29, a list like 3,7, or all") from None
    bad = sorted(i for i in indices if not 0 <= i < count)
    if bad or not indices:
        raise AttentionLensError(f"--{what}s {text!r} is out of range: the model has {count} {what}s (0-{count - 1})")
    return sorted(indices)


def _emit_json(document: dict) -> None:
    sys.stdout.write(json.dumps(document) + "\n")


@app.command()
def train(
    out: Path = typer.Option(..., help="Lens directory to write (config.json, lens.safetensors, checkpoints/)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Registered name (smollm2-135m, gemma3-270m) or local HF directory."),
    data: str = typer.Option("sotu", help="sotu, shakespeare, a .txt/.jsonl file or a directory of .txt files."),
    kind: str = typer.Option("affine", help="Lens kind: affine or full."),
    layers: Optional[str] = typer.Option(None, help="Layers, e.g. 20-29 or 3,7 (default: all)."),
    heads: Optional[str] = typer.Option(None, help="Heads in each layer, e.g. 0-3 (default: all)."),
    tokens: int = typer.Option(20_000, help="Token budget; at least one step runs."),
    seq_len: int = typer.Option(128, help="Tokens per window."),
    batch_size: int = typer.Option(4, help="Windows per step, over all processes (global): under torchrun each "
                                   "rank trains on batch-size / world-size of them; --tokens is global too."),
    lr: float = typer.Option(1e-3, help="Learning rate."),
    optimizer: str = typer.Option("adam", help="adam or sgd."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16 (autocast for vocabulary-sized matmuls)."),
    seed: int = typer.Option(0, help="Seed of the data order."),
    holdout: float = typer.Option(0.1, help="Fraction of documents held out (never trained on)."),
    checkpoint_every: int = typer.Option(50, help="Steps between checkpoints."),
    eval_tokens: int = typer.Option(2048, help="Held-out tokens to score the lens on at the end (0: skip)."),
    objective: str = typer.Option("per-head", help="per-head (each head's own KL, every position) or paper "
                                  "(the original: heads' logits summed, last position only)."),
    shard_heads: bool = typer.Option(False, help="Under torchrun: each process owns the lenses of some layers; "
                                     "head outputs are exchanged all-to-all (for lenses too big for one device)."),
    init: Optional[Path] = typer.Option(None, help="Start from this lens directory (e.g. made by `fit`) instead of the untrained lens."),
    resume: bool = typer.Option(False, help="Continue the run checkpointed in --out."),
    overwrite: bool = typer.Option(False, help="Replace a lens already in --out."),
    skip_bad_lines: bool = typer.Option(False, help="Skip malformed .jsonl lines instead of failing."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document with the results."),
) -> None:
    """Train per-head lenses against the model's own next-token distribution (KL)."""
    if existing_run(out) and not (resume or overwrite):
        raise AttentionLensError(f"{out} already holds a lens or checkpoint; pass --resume or --overwrite")
    if checkpoint_every < 1 or tokens < 1 or seq_len < 2 or batch_size < 1:
        raise AttentionLensError("--checkpoint-every, --tokens and --batch-size must be >= 1, --seq-len >= 2")
    if not 0 < lr <= 1e6:  # nan fails this too; torch would raise a traceback on nan or a float32 overflow
        raise AttentionLensError(f"--lr must be a positive number no larger than 1e6; got {lr}")
    data_config = DataConfig(data=data, seq_len=seq_len, holdout=holdout, skip_bad_lines=skip_bad_lines)
    config = TrainConfig(tokens=tokens, batch_size=batch_size, lr=lr, optimizer=optimizer, dtype=dtype,
                         seed=seed, checkpoint_every=checkpoint_every, objective=objective, shard_heads=shard_heads)
    world = init_world(device)
    try:
        loaded = load_model(model, device=rank_device(device, world))
        if init is not None:
            lens = Lens.load(init, loaded)
        else:
            lens = Lens.from_model(loaded, kind, parse_indices(layers, loaded.n_layers, "layer"),
                                   parse_indices(heads, loaded.n_heads, "head"))
        _train(world, lens, data_config, config, out, resume, overwrite, eval_tokens, as_json)
        finish(world)
    finally:
        close(world)


def _train(world, lens: Lens, data_config: DataConfig, config: TrainConfig, out: Path, resume: bool,
           overwrite: bool, eval_tokens: int, as_json: bool) -> None:
    if overwrite and not resume and world.is_main:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    started = time.perf_counter()
    with _StepBar(started) as bar:
        progress = train_lens(lens, data_config, config, out=out, resume=resume, world=world,
                              on_step=bar.update if world.is_main else None)
    if not world.is_main:
        return  # rank 0 saved the lens and reports
    seconds = time.perf_counter() - started
    result = {"out": str(out), "kind": lens.kind, "layers": lens.config.layers, "heads": lens.config.heads,
              "tokens": progress.tokens, "steps": progress.step, "seconds": round(seconds, 2),
              "tokens_per_second": round(progress.tokens / seconds, 2), "final_loss": progress.loss}
    if progress.tokens < config.tokens:
        err.print(f"warning: the data ran out: trained on {progress.tokens} tokens, not {config.tokens}")
    if eval_tokens > 0:
        result["heldout_kl"] = heldout_kl(lens, data_config, eval_tokens).mean
        baseline = Lens.from_model(lens.model, "logit", lens.config.layers, lens.config.heads)
        result["heldout_kl_logit"] = heldout_kl(baseline, data_config, eval_tokens).mean
    if as_json:
        _emit_json(result)
        return
    err.print(f"saved {lens.kind} lens for {len(lens.config.layers)} layers x {len(lens.config.heads)} heads to {out}")
    for key, value in result.items():
        print(f"{key:>20}: {value}")


@app.command()
def fit(
    out: Path = typer.Option(..., help="Lens directory to write (an affine lens: config.json, lens.safetensors)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Registered name (smollm2-135m, gemma3-270m) or local HF directory."),
    data: str = typer.Option("sotu", help="sotu, shakespeare, a .txt/.jsonl file or a directory of .txt files."),
    layers: Optional[str] = typer.Option(None, help="Layers, e.g. 20-29 or 3,7 (default: all)."),
    heads: Optional[str] = typer.Option(None, help="Heads in each layer, e.g. 0-3 (default: all)."),
    tokens: int = typer.Option(65_536, help="Token budget for the statistics."),
    ridge: float = typer.Option(1e-2, help="Ridge strength, relative to each head's mean z_h variance."),
    seq_len: int = typer.Option(128, help="Tokens per window."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    seed: int = typer.Option(0, help="Seed of the data order."),
    holdout: float = typer.Option(0.1, help="Fraction of documents held out (never fitted on)."),
    eval_tokens: int = typer.Option(2048, help="Held-out tokens to score the lens on at the end (0: skip)."),
    overwrite: bool = typer.Option(False, help="Replace a lens already in --out."),
    skip_bad_lines: bool = typer.Option(False, help="Skip malformed .jsonl lines instead of failing."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document with the results."),
) -> None:
    """Fit affine lenses in closed form (ridge regression per head); a starting point for `train --init`."""
    if existing_run(out) and not overwrite:
        raise AttentionLensError(f"{out} already holds a lens; pass --overwrite to replace it")
    if tokens < 1 or seq_len < 2 or batch_size < 1 or ridge < 0:
        raise AttentionLensError("--tokens and --batch-size must be >= 1, --seq-len >= 2, --ridge >= 0")
    loaded = load_model(model, device=device)
    lens = Lens.from_model(loaded, "affine", parse_indices(layers, loaded.n_layers, "layer"),
                           parse_indices(heads, loaded.n_heads, "head"))
    data_config = DataConfig(data=data, seq_len=seq_len, holdout=holdout, skip_bad_lines=skip_bad_lines)
    config = FitConfig(tokens=tokens, batch_size=batch_size, ridge=ridge, seed=seed)
    started = time.perf_counter()
    with Progress(TextColumn("[bold]fit"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err) as bar:
        task = bar.add_task("fit", total=tokens)
        report = fit_lens(lens, data_config, config, on_batch=lambda seen: bar.update(task, completed=seen))
    lens.config.training = {"method": "fit", "data": dataclasses.asdict(data_config), **dataclasses.asdict(config),
                            "tokens_seen": report.tokens, "constant_kl_train": report.constant_kl}
    lens.save(out)
    result = {"out": str(out), "layers": lens.config.layers, "heads": lens.config.heads, "tokens": report.tokens,
              "seconds": round(time.perf_counter() - started, 2), "constant_kl_train": report.constant_kl}
    if eval_tokens > 0:
        result["heldout_kl"] = heldout_kl(lens, data_config, eval_tokens).mean
    if as_json:
        _emit_json(result)
        return
    err.print(f"saved fitted affine lens for {len(lens.config.layers)} layers x {len(lens.config.heads)} heads to {out}")
    for key, value in result.items():
        print(f"{key:>20}: {value}")


class _StepBar:
    """A progress bar on stderr that appears with the first step, so set-up errors stay one line."""

    def __init__(self, started: float):
        self.started = started
        self.bar: Progress | None = None

    def update(self, report) -> None:
        if self.bar is None:
            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                                TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[rate]:.0f} tok/s"),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=err)
            self.bar.start()
            self.task = self.bar.add_task("train", total=report.steps, loss=report.loss, rate=0.0)
        rate = report.tokens / (time.perf_counter() - self.started)
        self.bar.update(self.task, completed=report.step, loss=report.loss, rate=rate)

    def __enter__(self) -> "_StepBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _lens_and_model(lens: str, model: str | None, device: str) -> tuple[Lens, Model]:
    """--lens logit|dla|DIR with an optional --model (a lens directory knows its model)."""
    if lens in ("logit", "dla"):
        loaded = load_model(model or DEFAULT_MODEL, device=device)
        return Lens.from_model(loaded, lens), loaded
    if lens in KINDS:
        raise AttentionLensError(f"--lens {lens} needs training; give a lens directory made by `attention-lens train`")
    source = model or read_config(Path(lens)).model.get("name")
    if not source:
        raise AttentionLensError(f"{lens} does not say which model it was made from; pass --model")
    loaded = load_model(source, device=device)
    return Lens.load(lens, loaded), loaded


@app.command()
def decode(
    text: str = typer.Argument(..., help="The prompt."),
    lens: str = typer.Option("logit", help="logit, dla, or a lens directory."),
    model: Optional[str] = typer.Option(None, help="Model (default: the lens's own, or smollm2-135m)."),
    k: int = typer.Option(10, "-k", "--k", help="Top-k tokens per head."),
    position: str = typer.Option("-1", help="Position to decode (0-based, negative from the end) or 'all'."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    exact: bool = typer.Option(False, help="Compute the readout in fp32 throughout (~2.5x slower on CPU). By "
                               "default a bf16 screen + fp32 recheck gives the same tokens and logits, and "
                               "probabilities within ~1% (relative)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document: {heads: [...]}."),
) -> None:
    """Show the tokens each head's lens reads from its output on a prompt."""
    lens_obj, loaded = _lens_and_model(lens, model, device)
    result = decode_prompt(loaded, lens_obj, text, k=k, position=position, exact=exact)
    if as_json:
        _emit_json(result.to_json())
        return
    console = Console()
    for pos in result.positions:
        console.print(_decode_table(result, pos))


def _decode_table(result, position: int) -> Table:
    records = [r for r in result.heads if r["position"] == position]
    heads = sorted({r["head"] for r in records})
    table = Table(title=f"{result.kind} lens, position {position} ({_visible(result.tokens[position])}): top token and its probability",
                  show_lines=False)
    table.add_column("layer", justify="right", no_wrap=True, min_width=5)
    for head in heads:
        table.add_column(f"H{head}", no_wrap=True, overflow="ellipsis", max_width=14)
    by_layer: dict[int, dict[int, dict]] = {}
    for r in records:
        by_layer.setdefault(r["layer"], {})[r["head"]] = r["top"][0]
    for layer, cells in sorted(by_layer.items()):
        table.add_row(str(layer), *(f"{_visible(cells[h]['token'])} {cells[h]['prob']:.0%}" for h in heads))
    return table


def _visible(token: str) -> str:
    """Spaces and newlines shown, so ' the' and 'the' differ on screen."""
    return token.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥") or "∅"


# Registered last: the inspection commands (eval, specialize, report, serve) and the concept commands
# (search, ablate, generate) live in their own modules.
from . import cli_inspect  # noqa: E402,F401
from . import cli_concepts  # noqa: E402,F401

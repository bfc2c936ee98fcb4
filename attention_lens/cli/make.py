"""`attention-lens train | fit`: make a lens, by KL training or by a closed-form fit."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..checkpoint import CHECKPOINT_DIR
from ..data import DataConfig
from ..distributed import close, finish, init_world, rank_device
from ..errors import AttentionLensError
from ..evaluate import heldout_kl
from ..fit import FitConfig, fit as fit_lens
from ..interrupts import Interrupted
from ..lens import Lens
from ..models import DEFAULT_MODEL, load_model
from ..train import TrainConfig, existing_run, train as train_lens
from .common import check_output, emit_json, err, parse_indices
from .numbers import MAX_BATCH, MAX_SEED, MAX_TOKENS, within
from .effects import train_effect_lens
from .options import (AsJson, Data, Device, DeviceMap, EvalTokens, Heads, Layers, ModelName, Overwrite, Revision,
                      SeqLen, SkipBadLines, TrainKind)
from .render import TokenBar


def train(
    ctx: typer.Context,
    out: Path = typer.Option(..., help="Lens directory to write (config.json, lens.safetensors, checkpoints/)."),
    model: ModelName = DEFAULT_MODEL,
    data: Data = "sotu",
    kind: TrainKind = None,
    layers: Layers = None,
    heads: Heads = None,
    tokens: int = typer.Option(20_000, help="Token budget; at least one step runs.", callback=within(1, MAX_TOKENS)),
    seq_len: SeqLen = 128,
    batch_size: int = typer.Option(4, help="Windows per step, over all processes (global): under torchrun each "
                                   "rank trains on batch-size / world-size of them; --tokens is global too.",
                                   callback=within(1, MAX_BATCH)),
    lr: float = typer.Option(1e-3, help="Learning rate.", callback=within(0, 1e6, above=True)),
    optimizer: str = typer.Option("adam", help="adam or sgd."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16 (autocast for vocabulary-sized matmuls)."),
    seed: int = typer.Option(0, help="Seed of the data order.", callback=within(0, MAX_SEED)),
    holdout: float = typer.Option(0.1, help="Fraction of documents held out (never trained on).",
                                  callback=within(0, 1, below=True)),
    checkpoint_every: int = typer.Option(50, help="Steps between checkpoints.", callback=within(1, 10**9)),
    eval_tokens: EvalTokens = 2048,
    objective: str = typer.Option("per-head", help="per-head (each head's own KL, every position), paper "
                                  "(the original: heads' logits summed, last position only), or effect (read what "
                                  "removing the head does to the output: an effect lens trained on measured effects)."),
    epochs: int = typer.Option(4, help="--objective effect: passes over the measured effects (they are reused).",
                               callback=within(0, 10**6)),
    effect_mode: str = typer.Option("mean", help="--objective effect: what replaces a head (mean, zero, resample)."),
    mean_tokens: int = typer.Option(8192, help="--objective effect: training tokens averaged into each head's mean.",
                                    callback=within(1, MAX_TOKENS)),
    fit_start: bool = typer.Option(True, help="--objective effect: start from the least-squares fit of the "
                                   "measured effects when it is better in KL than dla (--no-fit-start: from dla)."),
    fit_metric: str = typer.Option("kl", help="--objective effect: what the fit weighs. kl: each logit change by the "
                                   "model's probability of its token (the KL's second-order term), shrunk toward dla "
                                   "by a strength picked per head on held-back windows; logits: every token alike."),
    shard_heads: bool = typer.Option(False, help="Under torchrun: each process owns the lenses of some layers; "
                                     "head outputs are exchanged all-to-all (for lenses too big for one device)."),
    init: Optional[Path] = typer.Option(None, help="Start from this lens directory (e.g. made by `fit`) instead of the untrained lens."),
    resume: bool = typer.Option(False, help="Continue the run checkpointed in --out."),
    overwrite: Overwrite = False,
    skip_bad_lines: SkipBadLines = False,
    device: Device = "cpu",
    revision: Revision = None,
    device_map: DeviceMap = None,
    as_json: AsJson = False,
) -> None:
    """Train per-head lenses against the model's own next-token distribution (KL)."""
    if resume and overwrite:
        raise AttentionLensError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    if existing_run(out) and not (resume or overwrite):
        raise AttentionLensError(f"{out} already holds a lens or checkpoint; pass --resume or --overwrite")
    check_output(out, overwrite or resume, directory=True)
    data_config = DataConfig(data=data, seq_len=seq_len, holdout=holdout, skip_bad_lines=skip_bad_lines)
    if objective == "effect":
        train_effect_lens(out, model, kind, layers, heads, init, data_config, tokens, batch_size, lr, seed, epochs,
                          effect_mode, mean_tokens, fit_start, fit_metric, resume, overwrite, device, device_map, as_json)
        return
    kind = kind or "affine"
    config = TrainConfig(tokens=tokens, batch_size=batch_size, lr=lr, optimizer=optimizer, dtype=dtype,
                         seed=seed, checkpoint_every=checkpoint_every, objective=objective, shard_heads=shard_heads)
    world = init_world(device)
    try:
        loaded = load_model(model, device=rank_device(device, world), revision=revision,
                            device_map=device_map)
        if init is not None:
            lens = Lens.load(init, loaded)
            _check_init_agrees(ctx, init, lens, kind, layers, heads)
        else:
            # Sharded, each process builds only its own layers' slice; the whole lens exists once, at the end.
            lens = Lens.from_model(loaded, kind, parse_indices(layers, loaded.n_layers, "layer"),
                                   parse_indices(heads, loaded.n_heads, "head"),
                                   materialize=not (shard_heads and world.distributed))
        _train(world, lens, data_config, config, out, resume, overwrite, eval_tokens, as_json)
        finish(world)
    except Interrupted as stop:
        if (out / CHECKPOINT_DIR).is_dir() and any((out / CHECKPOINT_DIR).iterdir()):
            stop.hint = "resume with --resume"
        raise
    finally:
        close(world)


def _check_init_agrees(ctx: typer.Context, init: Path, lens: Lens, kind: str, layers: str | None,
                       heads: str | None) -> None:
    """--init fixes the lens's kind, layers and heads: the same options given otherwise are refused, never dropped."""
    model = lens.model
    asked = {"kind": kind if _given(ctx, "kind") else None, "layers": layers, "heads": heads}
    wanted = {"kind": kind,
              "layers": parse_indices(layers, model.n_layers, "layer") or list(range(model.n_layers)),
              "heads": parse_indices(heads, model.n_heads, "head") or list(range(model.n_heads))}
    fixed = {"kind": lens.kind, "layers": lens.config.layers, "heads": lens.config.heads}
    for name, text in asked.items():
        if text is not None and wanted[name] != fixed[name]:
            raise AttentionLensError(f"--{name} {text} conflicts with --init {init}, whose lens has {name} "
                                     f"{_compact(fixed[name])}; drop --{name} (the init lens fixes it) or make an "
                                     "init lens with the coverage you want")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user typed the option (its default is no request)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _compact(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


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
        emit_json(result)
        return
    err.print(f"saved {lens.kind} lens for {len(lens.config.layers)} layers x {len(lens.config.heads)} heads to {out}")
    for key, value in result.items():
        print(f"{key:>20}: {value}")


def fit(
    out: Path = typer.Option(..., help="Lens directory to write (an affine lens: config.json, lens.safetensors)."),
    model: ModelName = DEFAULT_MODEL,
    data: Data = "sotu",
    layers: Layers = None,
    heads: Heads = None,
    tokens: int = typer.Option(65_536, help="Token budget for the statistics.", callback=within(1, MAX_TOKENS)),
    ridge: float = typer.Option(1e-2, help="Ridge strength, relative to each head's mean z_h variance.",
                                callback=within(0, 1e6)),
    seq_len: SeqLen = 128,
    batch_size: int = typer.Option(8, help="Windows per forward pass.", callback=within(1, MAX_BATCH)),
    seed: int = typer.Option(0, help="Seed of the data order.", callback=within(0, MAX_SEED)),
    holdout: float = typer.Option(0.1, help="Fraction of documents held out (never fitted on).",
                                  callback=within(0, 1, below=True)),
    eval_tokens: EvalTokens = 2048,
    overwrite: Overwrite = False,
    skip_bad_lines: SkipBadLines = False,
    device: Device = "cpu",
    revision: Revision = None,
    device_map: DeviceMap = None,
    as_json: AsJson = False,
) -> None:
    """Fit affine lenses in closed form (ridge regression per head); a starting point for `train --init`."""
    if existing_run(out) and not overwrite:
        raise AttentionLensError(f"{out} already holds a lens; pass --overwrite to replace it")
    check_output(out, overwrite, directory=True)
    loaded = load_model(model, device=device, revision=revision, device_map=device_map)
    lens = Lens.from_model(loaded, "affine", parse_indices(layers, loaded.n_layers, "layer"),
                           parse_indices(heads, loaded.n_heads, "head"))
    data_config = DataConfig(data=data, seq_len=seq_len, holdout=holdout, skip_bad_lines=skip_bad_lines)
    config = FitConfig(tokens=tokens, batch_size=batch_size, ridge=ridge, seed=seed)
    started = time.perf_counter()
    with TokenBar(err, "fit") as bar:  # fit reads whole batches, so it may pass the budget: the bar says so
        report = fit_lens(lens, data_config, config, on_batch=lambda seen: bar.update(seen, tokens))
    lens.save(out)
    result = {"out": str(out), "layers": lens.config.layers, "heads": lens.config.heads, "tokens": report.tokens,
              "seconds": round(time.perf_counter() - started, 2), "constant_kl_train": report.constant_kl}
    if eval_tokens > 0:
        result["heldout_kl"] = heldout_kl(lens, data_config, eval_tokens).mean
    if as_json:
        emit_json(result)
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

"""`attention-lens effects` (what removing each head does to the output, measured) and the effect lens's training
(`train --objective effect`)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..allocator import reuse_large_blocks
from ..checkpoint import CHECKPOINT_DIR
from ..data import DataConfig
from ..effect_lens import EffectTrainConfig, check_train_config, train_effect
from ..effects import EffectsConfig, check_config, head_effects
from ..errors import AttentionLensError
from ..lens import Lens
from ..models import DEFAULT_MODEL, load_model
from ..notebook import visible
from .common import check_output, emit_json, err, finish_results, parse_indices
from .numbers import MAX_BATCH, MAX_K, MAX_REPEATS, MAX_SEED, MAX_TOKENS, within
from .options import (AsJson, Data, Device, DeviceMap, Layers, ModelName, OverwriteFile, ResultsOut, SeqLen,
                      SkipBadLines)
from .render import TokenBar

HEADS_SHOWN = 20
"""Heads with the largest effect listed in the table; --json and --out hold every head."""


def effects(
    model: ModelName = DEFAULT_MODEL,
    data: Data = "sotu",
    tokens: int = typer.Option(1024, help="Held-out tokens to measure on (whole windows).",
                               callback=within(1, MAX_TOKENS)),
    mode: str = typer.Option("mean", help="What replaces a head's output: mean (over the training split), zero, "
                             "or resample (its value at the same position of other text)."),
    layers: Layers = None,
    seq_len: SeqLen = 128,
    batch_size: int = typer.Option(4, help="Windows per clean pass (a layer's replay runs heads x windows).",
                                   callback=within(1, MAX_BATCH)),
    holdout: float = typer.Option(0.1, help="Fraction of documents held out and measured on (0: all of them).",
                                  callback=within(0, 1, below=True)),
    mean_tokens: int = typer.Option(8192, help="Training-split tokens averaged into each head's mean (mode mean).",
                                    callback=within(1, MAX_TOKENS)),
    top: int = typer.Option(10, help="Tokens per head listed as most raised and most lowered.",
                            callback=within(1, MAX_K)),
    seed: int = typer.Option(0, help="Seed of the document order, resampled windows and the bootstrap.",
                             callback=within(0, MAX_SEED)),
    bootstrap: int = typer.Option(200, help="Bootstrap replicates behind the 95% intervals.",
                                  callback=within(2, MAX_REPEATS)),
    dtype: str = typer.Option("bfloat16", help="Precision of the change's product with W_U (clean logits stay fp32)."),
    skip_bad_lines: SkipBadLines = False,
    device: Device = "cpu",
    device_map: DeviceMap = None,
    out: ResultsOut = None,
    overwrite: OverwriteFile = False,
    as_json: AsJson = False,
) -> None:
    """Measure each head's effect: the change of the next-token log-probabilities when it alone is replaced.

    --json: {summary, heads: [...]}."""
    if out is not None:
        check_output(out, overwrite)
    if seq_len < 2:
        raise AttentionLensError(f"--seq-len must be at least 2; got {seq_len}")
    config = EffectsConfig(tokens=tokens, batch_size=batch_size, mode=mode, mean_tokens=mean_tokens, seed=seed,
                           bootstrap=bootstrap, top=top, dtype=dtype)
    check_config(config)  # before the model loads: a bad flag costs nothing
    reuse_large_blocks()  # vocabulary-wide tiles, freed and allocated again: no page faults (allocator.py)
    loaded = load_model(model, device=device, device_map=device_map)
    chosen = parse_indices(layers, loaded.n_layers, "layer")
    data_config = DataConfig(data=data, seq_len=seq_len, holdout=holdout, skip_bad_lines=skip_bad_lines)
    with TokenBar(err, "effects") as bar:
        result = head_effects(loaded, data_config, config, chosen, on_progress=bar.update)
    finish_results(result.to_json(), out, as_json)
    if not as_json:
        Console().print(effects_table(result.to_json()))


def effects_table(document: dict) -> Table:
    """The heads with the largest measured effect: KL with its interval, the tokens they raise and lower."""
    s = document["summary"]
    table = Table(title=f"head effects ({document['mode']} ablation) on {document['data']}: {s['tokens']} "
                        f"positions; mean KL(P || P_ablated) {s['effect_kl_mean']} nats over {s['heads']} heads")
    for name in ("head", "effect KL", "95% interval", "raises", "lowers"):
        table.add_column(name, justify="right" if "KL" in name or "interval" in name else "left")
    for h in sorted(document["heads"], key=lambda h: -h["effect_kl"])[:HEADS_SHOWN]:
        table.add_row(f"L{h['layer']}.H{h['head']}", f"{h['effect_kl']:.4f}",
                      f"[{h['effect_kl_low']:.4f}, {h['effect_kl_high']:.4f}]",
                      " ".join(visible(e["token"]) for e in h["raises"][:4]),
                      " ".join(visible(e["token"]) for e in h["lowers"][:4]))
    table.caption = "raises: tokens whose log-probability falls most, on average, when the head is removed"
    return table


def train_effect_lens(out: Path, model: str, kind: str | None, layers: str | None, heads: str | None,
                      init: Path | None, data: DataConfig, tokens: int, batch_size: int, lr: float, seed: int,
                      epochs: int, mode: str, mean_tokens: int, fit_start: bool, fit_metric: str, resume: bool,
                      overwrite: bool, device: str, device_map: str | None, as_json: bool) -> None:
    """train --objective effect: measure effects on the training split, fit, train, save (no checkpoints: the
    measurement is kept in memory and one run trains on it)."""
    if kind not in (None, "effect"):
        raise AttentionLensError(f"--objective effect trains effect lenses; drop --kind {kind} or use --kind effect")
    if resume:
        raise AttentionLensError("--objective effect trains in one run (no checkpoints); rerun without --resume")
    if epochs < 0:
        raise AttentionLensError(f"--epochs must be >= 0; got {epochs}")
    config = EffectTrainConfig(effects=EffectsConfig(tokens=tokens, batch_size=batch_size, mode=mode, seed=seed,
                                                     mean_tokens=mean_tokens), epochs=epochs, lr=lr, fit=fit_start,
                               fit_metric=fit_metric)
    check_config(config.effects)
    check_train_config(config)
    reuse_large_blocks()  # vocabulary-wide tiles, freed and allocated again: no page faults (allocator.py)
    loaded = load_model(model, device=device, device_map=device_map)
    if init is not None:
        lens = Lens.load(init, loaded)
    else:
        lens = Lens.from_model(loaded, "effect", parse_indices(layers, loaded.n_layers, "layer"),
                               parse_indices(heads, loaded.n_heads, "head"))
    started = time.perf_counter()
    with TokenBar(err, "measure") as bar:
        record = train_effect(lens, data, config, on_progress=bar.update,  # progress goes to stderr, even with --json
                              on_step=lambda step, steps, loss: err.print(f"step {step}/{steps}: KL {loss:.6f}"),
                              on_note=err.print)
    if overwrite:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    lens.save(out)
    result = {"out": str(out), "kind": lens.kind, "layers": lens.config.layers, "heads": lens.config.heads,
              "tokens": record["tokens_seen"], "epochs": epochs, "seconds": round(time.perf_counter() - started, 2),
              "start": record["start"], "start_loss": record["start_loss"], "final_loss": record["final_loss"],
              "fit_choice": record["fit_choice"]}
    if "held_back" in record:  # a trained lens's check on the windows kept out of its fit and training
        held = record["held_back"]
        result["held_back"] = {key: held[key] for key in ("every", "windows", "positions", "recovered_median")}
    if as_json:
        emit_json(result)
        return
    err.print(f"saved effect lens for {len(lens.config.layers)} layers x {len(lens.config.heads)} heads to {out}")
    for key, value in result.items():
        print(f"{key:>20}: {value}")

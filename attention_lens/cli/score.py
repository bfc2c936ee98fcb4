"""`attention-lens eval | specialize`: score every head's lens on held-out text, and say what each head writes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..allocator import reuse_large_blocks
from ..effect_eval import EffectEvalConfig, effect_fidelity, merge_into
from ..effects import EffectsConfig, check_config
from ..errors import AttentionLensError
from ..evaluate import EvalConfig, evaluate
from ..lens import Lens
from .render import TokenBar, effect_table, eval_tables, specialize_tables
from ..specialize import SpecializeConfig, specialize as specialize_heads
from .common import check_output, err, finish_results, lens_and_model, scored_data
from .numbers import MAX_BATCH, MAX_K, MAX_REPEATS, MAX_SEED, MAX_TOKENS, within
from .options import (AsJson, Data, Device, DeviceMap, LensModel, LensSpec, OverwriteFile, ResultsOut, Revision, SeqLen,
                      SkipBadLines)


def eval_(
    lens: LensSpec = "logit",
    model: LensModel = None,
    data: Data = "sotu",
    tokens: int = typer.Option(2048, help="Held-out tokens to score (whole windows).", callback=within(1, MAX_TOKENS)),
    seq_len: SeqLen = 128,
    batch_size: int = typer.Option(16, help="Windows per forward pass (each builds every layer's lens factors once).",
                                   callback=within(1, MAX_BATCH)),
    holdout: Optional[float] = typer.Option(None, help="Fraction of documents held out (default: the lens's own, else 0.1).",
                                            callback=within(0, 1, below=True)),
    margin: float = typer.Option(0.05, help="Nats a head must beat a baseline by, its whole 95% interval above it.",
                                 callback=within(0, 1000)),
    seed: int = typer.Option(0, help="Seed of the document order and the bootstrap.", callback=within(0, MAX_SEED)),
    bootstrap: int = typer.Option(200, help="Bootstrap replicates behind the 95% intervals.",
                                  callback=within(2, MAX_REPEATS)),
    constant_data: Optional[str] = typer.Option(None, help="Corpus for the constant baseline (default: the lens's training data)."),
    constant_tokens: int = typer.Option(8192, help="Tokens averaged into the constant baseline (training side only).",
                                        callback=within(1, MAX_TOKENS)),
    skip_bad_lines: SkipBadLines = False,
    device: Device = "cpu",
    exact: bool = typer.Option(False, help="Score in fp32 with whole vocabulary rows (~8x slower on CPU). By default "
                               "logits are formed in bf16 tiles with fp32 sums."),
    revision: Revision = None,
    device_map: DeviceMap = None,
    effects: bool = typer.Option(False, "--effects", help="Also score how well each head's reading predicts what "
                                 "removing the head does (measured), against dla, logit, zero and the linear ceiling."),
    effect_mode: str = typer.Option("mean", help="With --effects: what replaces a head (mean, zero or resample)."),
    mean_tokens: int = typer.Option(8192, help="With --effects: training-split tokens averaged into each head's mean.",
                                    callback=within(1, MAX_TOKENS)),
    compare: Optional[list[Path]] = typer.Option(None, help="With --effects: another lens directory scored side by "
                                                 "side, named by its kind (e.g. a predictive affine lens); repeatable."),
    out: ResultsOut = None,
    overwrite: OverwriteFile = False,
    as_json: AsJson = False,
) -> None:
    """Score every head's lens on held-out text against the logit, dla, uniform and constant baselines.

    --json: {summary, heads: [...]}."""
    if out is not None:
        check_output(out, overwrite)
    effect_config = None
    reuse_large_blocks()  # vocabulary-wide tiles, freed and allocated again: no page faults (allocator.py)
    if effects:
        effect_config = EffectEvalConfig(EffectsConfig(tokens=tokens, batch_size=batch_size, mode=effect_mode,
                                                       mean_tokens=mean_tokens, seed=seed, bootstrap=bootstrap))
        check_config(effect_config.effects)
    elif compare:
        raise AttentionLensError("--compare scores lenses against measured effects; add --effects")
    lens_obj, loaded = lens_and_model(lens, model, device, revision, device_map)
    others: dict[str, Lens] = {}
    for directory in compare or []:
        other = Lens.load(directory, loaded)
        others[other.kind if other.kind not in others else f"{other.kind}-{len(others) + 1}"] = other
    data_config = scored_data(lens_obj, data, seq_len, holdout, skip_bad_lines)
    config = EvalConfig(tokens=tokens, batch_size=batch_size, seed=seed, margin=margin, bootstrap=bootstrap,
                        constant_data=constant_data, constant_tokens=constant_tokens, exact=exact)
    with TokenBar(err, "eval") as bar:
        result = evaluate(lens_obj, data_config, config, on_progress=bar.update)
    document = result.to_json()
    if effect_config is not None:
        with TokenBar(err, "effects measured") as bar:
            fidelity = effect_fidelity(lens_obj, data_config, effect_config, others, on_progress=bar.update,
                                       on_scored=bar.stage("effects scored"))
        document = merge_into(document, fidelity)
    finish_results(document, out, as_json)
    if not as_json:
        console = Console()
        for table in eval_tables(result):
            console.print(table)
        if effect_config is not None:
            console.print(effect_table(document))


def specialize(
    lens: LensSpec = "logit",
    model: LensModel = None,
    data: Data = "sotu",
    tokens: int = typer.Option(2048, help="Held-out tokens to read the heads on (whole windows).",
                               callback=within(1, MAX_TOKENS)),
    seq_len: SeqLen = 128,
    batch_size: int = typer.Option(4, help="Windows per forward pass.", callback=within(1, MAX_BATCH)),
    holdout: Optional[float] = typer.Option(None, help="Fraction of documents held out (default: the lens's own, else 0.1).",
                                            callback=within(0, 1, below=True)),
    seed: int = typer.Option(0, help="Seed of the document order.", callback=within(0, MAX_SEED)),
    top: int = typer.Option(20, help="Promoted tokens per head kept for its concentration and similarity.",
                            callback=within(1, MAX_K)),
    group_similarity: float = typer.Option(0.25, help="Average Jaccard of promoted sets at which heads are grouped.",
                                           callback=within(0, 1, meaning="a Jaccard index")),
    compare_layers: bool = typer.Option(False, help="Show how specialization changes with depth."),
    skip_bad_lines: SkipBadLines = False,
    device: Device = "cpu",
    revision: Revision = None,
    device_map: DeviceMap = None,
    out: ResultsOut = None,
    overwrite: OverwriteFile = False,
    as_json: AsJson = False,
) -> None:
    """What each head writes over a corpus: promoted tokens, concentration, description, groups of heads.

    --json: {summary, heads, groups}."""
    if out is not None:
        check_output(out, overwrite)
    lens_obj, _ = lens_and_model(lens, model, device, revision, device_map)
    data_config = scored_data(lens_obj, data, seq_len, holdout, skip_bad_lines)
    config = SpecializeConfig(tokens=tokens, batch_size=batch_size, seed=seed, top=top,
                              group_similarity=group_similarity)
    with TokenBar(err, "specialize") as bar:
        result = specialize_heads(lens_obj, data_config, config, on_progress=bar.update)
    finish_results(result.to_json(layers=compare_layers), out, as_json)
    if not as_json:
        console = Console()
        for table in specialize_tables(result, compare_layers):
            console.print(table)

"""`attention-lens search | ablate | generate`: find the heads that carry a concept and intervene on them."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..concepts import make_concept, read_concept_words, search as search_heads
from ..data import DataConfig
from ..errors import AttentionLensError
from ..intervene import Edit, ablate as ablate_heads, concept_windows, generate as generate_text, parse_heads
from ..models import DEFAULT_MODEL, Model, load_model
from ..notebook import visible
from .common import emit_json, err, lens_and_model
from .numbers import MAX_K, MAX_NEW_TOKENS, MAX_REPEATS, MAX_SEED, MAX_TOKENS, within
from .options import (Concept, Data, Device, DeviceMap, HeadList, LensModel, LensSpec, ModelName, Revision, Scale,
                      SeqLen)


def _edit(mode: str, scale: float | None) -> Edit:
    """--scale X is shorthand for --mode scale=X."""
    return Edit("scale", scale) if scale is not None else Edit.parse(mode)


def _pass_bar(what: str) -> Progress:
    return Progress(TextColumn(f"[bold]{what}"), BarColumn(), TextColumn("{task.completed}/{task.total} forward passes"),
                    TimeElapsedColumn(), console=err)


def _ablate_with_bar(loaded: Model, heads, concept, windows, edit: Edit, repeats: int, seed: int):
    with _pass_bar("ablate") as bar:
        task = bar.add_task("ablate", total=2 + repeats)
        return ablate_heads(loaded, heads, concept.ids, windows, edit, repeats=repeats, seed=seed,
                            on_pass=lambda done, total: bar.update(task, completed=done))


def _check_counts(**counts: int) -> None:
    for name, (value, least) in counts.items():
        if value < least:
            raise AttentionLensError(f"--{name.replace('_', '-')} must be at least {least}; got {value}")


def search(
    concept: Concept,
    lens: LensSpec = "logit",
    model: LensModel = None,
    data: Data = "sotu",
    tokens: int = typer.Option(2048, help="Tokens to score heads on (training side of the split); also --verify's.",
                               callback=within(1, MAX_TOKENS)),
    seq_len: SeqLen = 128,
    holdout: float = typer.Option(0.1, help="Fraction of documents held out: --verify measures on them.",
                                  callback=within(0, 1, below=True)),
    top: int = typer.Option(10, help="Heads to show.", callback=within(1, MAX_K)),
    verify: bool = typer.Option(False, help="Ablate the top 1% of heads; compare with random heads."),
    mode: str = typer.Option("zero", help="--verify's intervention: zero, mean or scale=X."),
    repeats: int = typer.Option(10, help="--verify's draws of random heads.", callback=within(0, MAX_REPEATS)),
    seed: int = typer.Option(0, help="Seed of the data order and the random heads.", callback=within(0, MAX_SEED)),
    device: Device = "cpu",
    revision: Revision = None,
    device_map: DeviceMap = None,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document: {concept, heads, verify}."),
) -> None:
    """Rank heads by how much their lens promotes a concept's tokens; --verify proves it by ablation."""
    _check_counts(tokens=(tokens, 1), top=(top, 1), repeats=(repeats, 2), seq_len=(seq_len, 2))
    edit = Edit.parse(mode)
    lens_obj, loaded = lens_and_model(lens, model, device, revision, device_map)
    found = make_concept(loaded.tokenizer, read_concept_words(concept))
    data_config = DataConfig(data=data, seq_len=seq_len, holdout=holdout)
    result = search_heads(lens_obj, found, data_config, tokens=tokens, seed=seed)
    document = {"concept": found.to_json(loaded.tokenizer), "lens": lens_obj.kind, "tokens": result.tokens,
                "heads": [record.to_json() for record in result.records(top, loaded.tokenizer)]}
    if verify:
        count = min(max(1, round(loaded.n_layers * loaded.n_heads / 100)), len(result.ranked()))
        windows = concept_windows(loaded, data_config, found.ids, tokens, seed)
        ablation = _ablate_with_bar(loaded, result.ranked()[:count], found, windows, edit, repeats, seed)
        document["verify"] = ablation.verify_record()
    if as_json:
        emit_json(document)
        return
    _print_concept(document["concept"])
    table = Table(title=f"{lens_obj.kind} lens: heads that promote the concept ({result.tokens} tokens)")
    for column in ("rank", "head", "score (nats)", "top concept tokens (lift, nats)"):
        table.add_column(column, justify="left" if column.startswith("top") else "right")
    for rank, record in enumerate(document["heads"], start=1):
        promoted = ", ".join(f"{visible(t['token'])} {t['lift']:.2f}" for t in record["top_tokens"])
        table.add_row(str(rank), f"{record['layer']}.{record['head']}", f"{record['score']:.3f}", promoted)
    Console().print(table)
    if verify:
        _print_record("verify", document["verify"])


def ablate(
    heads: HeadList,
    concept: Concept,
    model: ModelName = DEFAULT_MODEL,
    data: Data = "sotu",
    tokens: int = typer.Option(2048, help="Held-out tokens to measure on (windows holding a concept target).",
                               callback=within(1, MAX_TOKENS)),
    seq_len: SeqLen = 128,
    holdout: float = typer.Option(0.1, help="Fraction of documents held out; the measurement uses them.",
                                  callback=within(0, 1, below=True)),
    mode: str = typer.Option("zero", help="zero, mean (over the measured windows) or scale=X."),
    scale: Scale = None,
    baseline: str = typer.Option("none", help="none, or random: the same number of random other heads."),
    repeats: int = typer.Option(10, help="Random draws for --baseline random.", callback=within(0, MAX_REPEATS)),
    seed: int = typer.Option(0, help="Seed of the data order and the random heads.", callback=within(0, MAX_SEED)),
    device: Device = "cpu",
    revision: Revision = None,
    device_map: DeviceMap = None,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document: {clean, found, random, verify}."),
) -> None:
    """Intervene on heads' outputs; measure the concept's log-prob and mass, and the overall loss."""
    if baseline not in ("none", "random"):
        raise AttentionLensError(f"--baseline {baseline!r}: use none or random")
    repeats = repeats if baseline == "random" else 0
    _check_counts(tokens=(tokens, 1), seq_len=(seq_len, 2), repeats=(repeats, 2 if baseline == "random" else 0))
    edit = _edit(mode, scale)
    loaded = load_model(model, device=device, revision=revision, device_map=device_map)
    chosen = parse_heads(heads, loaded)
    found = make_concept(loaded.tokenizer, read_concept_words(concept))
    windows = concept_windows(loaded, DataConfig(data=data, seq_len=seq_len, holdout=holdout), found.ids, tokens, seed)
    result = _ablate_with_bar(loaded, chosen, found, windows, edit, repeats, seed)
    document = {"concept": found.to_json(loaded.tokenizer), "mode": str(edit), "tokens": int(windows.numel()),
                "clean": dataclasses.asdict(result.clean), "found": result.found.to_json(),
                "random": [effect.to_json() for effect in result.random]}
    if repeats:
        document["verify"] = result.verify_record()
    if as_json:
        emit_json(document)
        return
    _print_concept(document["concept"])
    _print_record(f"{str(edit)} on {heads}", document["found"])
    if repeats:
        _print_record(f"against {repeats} draws of random heads", document["verify"])


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt to continue.")],
    heads: HeadList,
    model: ModelName = DEFAULT_MODEL,
    mode: str = typer.Option("zero", help="zero or scale=X."),
    scale: Scale = None,
    max_new_tokens: int = typer.Option(30, help="Tokens to generate (greedy).", callback=within(1, MAX_NEW_TOKENS)),
    device: Device = "cpu",
    revision: Revision = None,
    device_map: DeviceMap = None,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document: {prompt, plain, intervened}."),
) -> None:
    """Greedy continuation of a prompt with and without an intervention on heads, side by side."""
    _check_counts(max_new_tokens=(max_new_tokens, 1))
    edit = _edit(mode, scale)
    loaded = load_model(model, device=device, revision=revision, device_map=device_map)
    chosen = parse_heads(heads, loaded)
    plain, edited = generate_text(loaded, prompt, chosen, edit, max_new_tokens)
    document = {"prompt": prompt, "heads": [f"{layer}.{head}" for layer, head in chosen], "mode": str(edit),
                "plain": plain, "intervened": edited}
    if as_json:
        emit_json(document)
        return
    table = Table(title=f"greedy continuation of {prompt!r}")
    table.add_column("model")
    table.add_column("continuation")
    table.add_row("unmodified", plain)
    table.add_row(f"{str(edit)} on {heads}", edited)
    Console().print(table)


def _print_concept(concept: dict) -> None:
    err.print(f"concept: {len(concept['ids'])} tokens: " + " ".join(visible(t) for t in concept["tokens"]))
    if concept["truncated"]:
        err.print("  no single token, first token kept: " + "; ".join(concept["truncated"]))
    if concept["dropped"]:
        err.print("  dropped (no usable token): " + ", ".join(concept["dropped"]))


def _print_record(title: str, record: dict) -> None:
    print(title)
    for key, value in record.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"{key:>26}: {shown}")

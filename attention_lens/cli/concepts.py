"""`attention-lens search | ablate | generate`: find the heads that carry a concept and intervene on them."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..concepts import make_concept, read_concept_words
from ..data import DataConfig
from ..errors import AttentionLensError
from ..intervene import Intervention, Scale, generate as generate_text, parse_heads
from ..models import DEFAULT_MODEL, Model, load_model
from ..notebook import visible
from ..scoring import CONTROL_SETS, METHODS, score_heads
from ..verify import MIN_REPEATS, MIN_TARGETS, STEER_ALPHA, STEER_MODES, held_windows, plan_sweep, sweep
from .common import emit_json, err, lens_and_model
from .render import print_whole
from .numbers import MAX_K, MAX_NEW_TOKENS, MAX_REPEATS, MAX_SCALE, MAX_SEED, MAX_TOKENS, within
from .options import (AsJson, Concept, Data, Device, DeviceMap, HeadList, LensModel, LensSpec, ModelName, Revision,
                      Scale as ScaleOption, SeqLen)

MinTargets = Annotated[int, typer.Option(help="Draw held-out windows until they hold this many concept target "
                                              "positions (refused when the text has fewer).",
                                         callback=within(1, MAX_TOKENS))]
LayerMatched = Annotated[bool, typer.Option(help="Draw random heads with the same count per layer as the chosen ones.")]
Bootstrap = Annotated[int, typer.Option(help="Bootstrap replicates (over windows) of the specific drop's 95% interval "
                                             "(0: none).", callback=within(0, MAX_REPEATS))]
Mode = Annotated[str, typer.Option(help="zero, mean (over the measured windows), resample (another window's output) "
                                        "or scale=X (-1 inverts, X > 1 amplifies).")]


def _edit(mode: str, scale: float | None) -> Intervention:
    """--scale X is shorthand for --mode scale=X."""
    return Scale(factor=scale) if scale is not None else Intervention.parse(mode)


def _window_bar(what: str) -> Progress:
    return Progress(TextColumn(f"[bold]{what}"), BarColumn(), TextColumn("{task.completed}/{task.total} windows"),
                    TimeElapsedColumn(), console=err)


def _measured_sweep(what: str, model: Model, ranked: list, ks: list[int], concept_ids: list[int], held, edit,
                    repeats: int, seed: int, layer_matched: bool, bootstrap: int, alpha: float | None,
                    steer_mode: str = "scale"):
    """`sweep` with a progress bar over the held-out windows, after saying how much it will run."""
    plan = plan_sweep(model, ranked, ks, edit, repeats, seed, layer_matched, alpha, steer_mode)
    err.print(f"{what}: {held.targets} concept targets in {held.windows.shape[0]} held-out windows "
              f"({held.drawn} drawn); {len(plan.edits)} interventions, {plan.cost(model):.1f} full forward passes' "
              f"worth over these windows (one pass each would be {1 + len(plan.edits)})")
    with _window_bar(what) as bar:
        task = bar.add_task(what, total=int(held.windows.shape[0]))
        return sweep(model, ranked, ks, concept_ids, held, edit, repeats, seed, layer_matched, bootstrap, alpha,
                     on_windows=lambda n: bar.update(task, advance=n), steer_mode=steer_mode)


def _check_counts(**counts: int) -> None:
    for name, (value, least) in counts.items():
        if value < least:
            raise AttentionLensError(f"--{name.replace('_', '-')} must be at least {least}; got {value}")


def parse_ks(text: str, available: int, where: str = "there are to rank") -> list[int]:
    """'1,3,8' -> [1, 3, 8]: head counts to verify, each from 1 to `available` (the heads ranked or given)."""
    ks = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise AttentionLensError(f"--k {text!r}: give head counts like 1,3,8 (whole numbers from 1)")
        if int(part) > available:
            raise AttentionLensError(f"--k {part} is more heads than the {available} {where}; "
                                     f"use at most {available}")
        ks.append(int(part))
    return sorted(set(ks))


def search(
    concept: Concept,
    lens: LensSpec = "logit",
    method: str = typer.Option("lens", help="How heads are scored: " + ", ".join(METHODS) + " (lens: the --lens's "
                                            "lift; pursuit: sparse pursuit of head outputs over the concept's "
                                            "unembedding rows; effect: measured change of the concept tokens' "
                                            "log-prob when the head is zeroed; attribution: first-order drop of "
                                            "log p at concept targets when it is zeroed), each over "
                                            "frequency-matched random token sets."),
    control_sets: int = typer.Option(CONTROL_SETS, help="Frequency-matched random token sets of the concept's size "
                                                        "every head's score is compared with.",
                                     callback=within(2, MAX_REPEATS)),
    model: LensModel = None,
    data: Data = "sotu",
    tokens: int = typer.Option(2048, help="Tokens to score heads on (training side of the split).",
                               callback=within(1, MAX_TOKENS)),
    seq_len: SeqLen = 128,
    holdout: float = typer.Option(0.1, help="Fraction of documents held out: --verify measures on them.",
                                  callback=within(0, 1, below=True)),
    top: int = typer.Option(10, help="Heads to show.", callback=within(1, MAX_K)),
    verify: bool = typer.Option(False, help="Intervene on the top heads over held-out text; compare with random "
                                            "heads; steer with them."),
    k: Optional[str] = typer.Option(None, help="--verify's head counts, e.g. 1,3,8: one verification per count "
                                               "(default: 1% of the heads)."),
    min_targets: MinTargets = MIN_TARGETS,
    mode: Mode = "zero",
    repeats: int = typer.Option(MIN_REPEATS, help="--verify's draws of random heads (20 or more for a percentile).",
                                callback=within(0, MAX_REPEATS)),
    layer_matched: LayerMatched = True,
    bootstrap: Bootstrap = 1000,
    steer: float = typer.Option(STEER_ALPHA, help="--verify amplifies each k's heads by this factor and reports "
                                                  "the concept's mass change and the loss change (0: skip).",
                                callback=within(-MAX_SCALE, MAX_SCALE)),
    steer_mode: str = typer.Option("scale", help="How --steer amplifies: scale (all of z_h times the factor, as Head "
                                                 "Pursuit) or amplify (only z_h's departure from its mean: the "
                                                 "constant part, which later layers are tuned to, stays)."),
    seed: int = typer.Option(0, help="Seed of the data order and the random heads.", callback=within(0, MAX_SEED)),
    device: Device = "cpu",
    revision: Revision = None,
    device_map: DeviceMap = None,
    as_json: AsJson = False,
) -> None:
    """Rank heads by how much they carry a concept (--method) over random token sets; --verify proves it by
    intervention.

    --json: {concept, heads, verify, k_sweep, steer}."""
    _check_counts(tokens=(tokens, 1), top=(top, 1), repeats=(repeats, 2), seq_len=(seq_len, 2))
    edit = Intervention.parse(mode)
    if steer_mode not in STEER_MODES:
        raise AttentionLensError(f"--steer-mode {steer_mode!r}: use {' or '.join(STEER_MODES)}")
    scorer = METHODS.get(method)
    if scorer is None:
        raise AttentionLensError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    lens_obj, loaded = lens_and_model(lens, model, device, revision, device_map)
    found = make_concept(loaded.tokenizer, read_concept_words(concept))
    data_config = DataConfig(data=data, seq_len=seq_len, holdout=holdout)
    reading = scorer.lens(lens_obj, loaded)
    available = (len(reading.config.layers) * len(reading.config.heads) if scorer.needs_lens
                 else loaded.n_layers * loaded.n_heads)
    ks = parse_ks(k, available) if k is not None else [max(1, round(loaded.n_layers * loaded.n_heads / 100))]
    ks = [min(count, available) for count in ks]
    with err.status(f"scoring every head for the concept ({scorer.name}, {control_sets} random token sets)"):
        result = score_heads(scorer, lens_obj, found, data_config, tokens=tokens, seed=seed, sets=control_sets)
    document = {"concept": found.to_json(loaded.tokenizer), "lens": reading.kind, "method": scorer.name,
                "control_sets": control_sets, "tokens": result.tokens,
                "heads": [record.to_json() for record in result.records(top, loaded.tokenizer)]}
    if verify:
        held = held_windows(loaded, data_config, found.ids, min_targets, seed)
        results, steered = _measured_sweep("verify", loaded, result.ranked(), ks, found.ids, held, edit, repeats,
                                           seed, layer_matched, bootstrap, steer or None, steer_mode)
        records = [measured.verify_record() for measured in results]
        document["verify"] = records[-1]
        document["k_sweep"] = records
        document["steer"] = steered
    if as_json:
        emit_json(document)
        return
    _print_concept(document["concept"])
    table = Table(title=f"{scorer.name}: heads that carry the concept ({result.tokens} tokens; score over "
                        f"{control_sets} frequency-matched random token sets)")
    for column in ("rank", "head", "score", "concept", "random sets", "z", "top concept tokens"):
        table.add_column(column, justify="left" if column.startswith("top") else "right")
    for rank, record in enumerate(document["heads"], start=1):
        promoted = ", ".join(f"{visible(t['token'])} {t['lift']:.2f}" for t in record["top_tokens"])
        table.add_row(str(rank), f"{record['layer']}.{record['head']}", f"{record['score']:.3f}",
                      f"{record['concept_score']:.3f}", f"{record['control_mean']:.3f} ± {record['control_std']:.3f}",
                      f"{record['control_z']:.1f}", promoted)
    Console().print(table)
    if verify:
        _print_sweep(document["k_sweep"])
        if document["steer"] is not None:
            _print_record(f"steer: {document['steer']['edit']} on the top {max(ks)} heads",
                          document["steer"])


def ablate(
    heads: HeadList,
    concept: Concept,
    model: ModelName = DEFAULT_MODEL,
    data: Data = "sotu",
    tokens: int = typer.Option(2048, help="Held-out tokens to measure on at least (windows holding a concept "
                                          "target).", callback=within(1, MAX_TOKENS)),
    min_targets: MinTargets = MIN_TARGETS,
    seq_len: SeqLen = 128,
    holdout: float = typer.Option(0.1, help="Fraction of documents held out; the measurement uses them.",
                                  callback=within(0, 1, below=True)),
    mode: Mode = "zero",
    scale: ScaleOption = None,
    baseline: str = typer.Option("none", help="none, or random: the same number of random other heads."),
    repeats: int = typer.Option(MIN_REPEATS, help="Random draws for --baseline random.",
                                callback=within(0, MAX_REPEATS)),
    layer_matched: LayerMatched = True,
    bootstrap: Bootstrap = 1000,
    k: Optional[str] = typer.Option(None, help="Head counts to measure, each the first k of --heads in the order "
                                               "given, e.g. 1,3,8: one record per count in k_sweep (default: all)."),
    seed: int = typer.Option(0, help="Seed of the data order and the random heads.", callback=within(0, MAX_SEED)),
    device: Device = "cpu",
    revision: Revision = None,
    device_map: DeviceMap = None,
    as_json: AsJson = False,
) -> None:
    """Intervene on heads' outputs; measure the concept's log-prob and mass, and the overall loss.

    --json: {clean, found, random, verify, k_sweep}; the first four for the largest k."""
    if baseline not in ("none", "random"):
        raise AttentionLensError(f"--baseline {baseline!r}: use none or random")
    repeats = repeats if baseline == "random" else 0
    _check_counts(tokens=(tokens, 1), seq_len=(seq_len, 2), repeats=(repeats, 2 if baseline == "random" else 0))
    edit = _edit(mode, scale)
    loaded = load_model(model, device=device, revision=revision, device_map=device_map)
    chosen = parse_heads(heads, loaded)
    found = make_concept(loaded.tokenizer, read_concept_words(concept))
    ks = parse_ks(k, len(chosen), "given with --heads") if k is not None else [len(chosen)]
    held = held_windows(loaded, DataConfig(data=data, seq_len=seq_len, holdout=holdout), found.ids, min_targets,
                        seed, tokens)
    results, _ = _measured_sweep("ablate", loaded, chosen, ks, found.ids, held, edit, repeats, seed, layer_matched,
                                 bootstrap, None)
    result = results[-1]
    document = {"concept": found.to_json(loaded.tokenizer), "mode": str(edit), "tokens": int(held.windows.numel()),
                "windows": int(held.windows.shape[0]), "windows_drawn": held.drawn,
                "clean": result.clean.to_json(), "found": result.found.to_json(),
                "random": [effect.to_json() for effect in result.random]}
    document["specificity_interval"] = None if result.interval is None else list(result.interval)
    if repeats:
        document["verify"] = result.verify_record()
    document["k_sweep"] = [measured.verify_record() for measured in results]
    if as_json:
        emit_json(document)
        return
    _print_concept(document["concept"])
    _print_record(f"{str(edit)} on {heads}", document["found"])
    if repeats:
        _print_record(f"against {repeats} {'layer-matched ' if layer_matched else ''}draws of random heads",
                      document["verify"])
    if len(ks) > 1:
        _print_sweep(document["k_sweep"])


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt to continue.")],
    heads: HeadList,
    model: ModelName = DEFAULT_MODEL,
    mode: str = typer.Option("zero", help="zero or scale=X (-1 inverts, X > 1 amplifies)."),
    scale: ScaleOption = None,
    max_new_tokens: int = typer.Option(30, help="Tokens to generate (greedy).", callback=within(1, MAX_NEW_TOKENS)),
    device: Device = "cpu",
    revision: Revision = None,
    device_map: DeviceMap = None,
    as_json: AsJson = False,
) -> None:
    """Greedy continuation of a prompt with and without an intervention on heads, side by side.

    --json: {prompt, plain, intervened}."""
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


def _print_sweep(records: list[dict]) -> None:
    table = Table(title="verify: the top k heads against random heads on held-out text")
    steered = any(record.get("steer") for record in records)
    matched = any(record.get("matched_specificity") is not None for record in records)
    for column in ("k", "concept drop", "random (mean ± std)", "z", "percentile", "specific drop [95%], z",
                   *(("frequency-matched specific drop [95%], z",) if matched else ()), "loss change", "targets",
                   *(("steered: mass / loss change",) if steered else ())):
        table.add_column(column, justify="right")
    for record in records:
        table.add_row(str(record["k"]), _number(record["found_drop"]),
                      f"{_number(record['random_drop_mean'])} ± {_number(record['random_drop_std'])}",
                      _number(record["z_score"], 1), _number(record["percentile"], 0), _specific_cell(record, ""),
                      *([_specific_cell(record, "matched_")] if matched else []),
                      _number(record["collateral_loss_change"]), str(record["concept_targets"]),
                      *([_steer_cell(record.get("steer"))] if steered else []))
    print_whole(table)


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _specific_cell(record: dict, prefix: str) -> str:
    """A specific drop with its interval and z: prefix "" (against all other targets) or "matched_" (against
    other targets as frequent as the concept's)."""
    interval = record.get(f"{prefix}specificity_interval")
    shown = _number(record.get(f"{prefix}specificity"))
    if interval is not None:
        shown += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return f"{shown}, z {_number(record.get(f'{prefix}specificity_z_score'), 1)}"


def _steer_cell(steer: dict | None) -> str:
    if not steer:
        return "-"
    return f"{steer['edit']}: {steer['mass_change']:+.1%} / {steer['loss_change']:+.3f}"

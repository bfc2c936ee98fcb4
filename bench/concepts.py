"""Concept heads that verify: every method x concept x k on SmolLM2 (issue 14's table), a row at a time.

python bench/concepts.py [--model smollm2-135m] [--methods attribution,pursuit,dla,logit] [--concepts war,numbers,...]
                         [--k 1,3,8] [--min-targets 400] [--repeats 20] [--tokens 2048]
                         [--out bench/results/concepts-smollm2-135m.json] [--estimate] [--json]

For each method and concept: heads scored on the training side (against frequency-matched random token sets),
then the top k zero-ablated on held-out windows holding at least --min-targets concept targets, against
--repeats layer-matched random draws: z and percentile of the concept drop, the specific drop (concept drop
minus drop on other targets) with its 95% bootstrap interval, its z and percentile, the collateral loss change,
and steering (each k's heads scaled x5, scale=5; bench/steer.py compares amplify=5): the concept's mass change
and the loss change. One row per k.
Goal (issue 14): z >= 3 and the 99th percentile for the specific drop with k <= 8, for 4 of 6 concepts.

Rows are appended to --out as each method x concept is measured (the file is rewritten whole each time, never
half-written); a rerun skips rows already there, so an interrupted table resumes where it stopped, and one
method or concept can be run at a time (--methods dla --concepts war). Rankings are kept in the file too. Where a
method's top k heads are the same set another method's row measured (for the same concept), that row is copied
(`same_heads_as`) instead of measured again: the random draws depend on the set of heads and the seed alone.
--estimate scores heads (minutes per method and concept), prints how many forward-equivalents
the verification will run (one forward-equivalent: the full model over one window of --seq-len tokens; counted
by weights multiplied per token, replays from block L count blocks L.. and the unembedding), and measures nothing.
Progress goes to stderr; --json prints the whole file's document to stdout at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import attention_lens as al
from attention_lens.concepts import make_concept
from attention_lens.data import DataConfig
from attention_lens.errors import AttentionLensError
from attention_lens.intervene import Zero
from attention_lens.scoring import METHODS, score_heads
from attention_lens.verify import MIN_REPEATS, MIN_TARGETS, STEER_ALPHA, held_windows, plan_sweep, sweep

CONCEPTS = {
    "war": "war, wars, battle, army, soldiers, troops, military, weapons, enemy, fight",
    "numbers": "one, two, three, four, five, six, seven, eight, nine, ten, hundred, thousand, million",
    "pronouns": "he, she, they, we, I, you, him, her, them, us",
    "countries": "America, China, Russia, Mexico, Iraq, Japan, Germany, France, Britain, Canada, Iran, Vietnam",
    "months": "January, February, March, April, May, June, July, August, September, October, November, December",
    "family": "mother, father, son, daughter, children, family, parents, wife, husband, brother, sister",
}
SEED = 0
BOOTSTRAP = 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="attribution,pursuit,dla,logit", help=f"of {', '.join(METHODS)}")
    parser.add_argument("--concepts", default=None,
                        help=f"of {', '.join(CONCEPTS)} or --concept's names (default: --concept's, else all)")
    parser.add_argument("--concept", action="append", default=[], metavar="NAME=WORDS",
                        help="define (or redefine) a concept: NAME=word, word, ...; measured unless --concepts "
                             "names others")
    parser.add_argument("--k", default="1,3,8")
    parser.add_argument("--min-targets", type=int, default=MIN_TARGETS)
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--data", default="sotu")
    parser.add_argument("--holdout", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=None,
                        help="rows file (default bench/results/concepts-MODEL.json)")
    parser.add_argument("--estimate", action="store_true", help="print the forward-equivalents; measure nothing")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except AttentionLensError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run(args) -> int:
    concepts = dict(CONCEPTS)
    for definition in args.concept:
        name, _, words = definition.partition("=")
        if not (name.strip() and words.strip()):
            raise AttentionLensError(f"--concept {definition!r}: use NAME=word, word, ...")
        concepts[name.strip()] = words
    if args.concepts is not None:
        names = [n.strip() for n in args.concepts.split(",") if n.strip()]
    else:
        names = [d.partition("=")[0].strip() for d in args.concept] or list(CONCEPTS)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [n for n in names if n not in concepts] + [m for m in methods if m not in METHODS]
    if unknown:
        raise AttentionLensError(f"unknown concept or method {', '.join(unknown)}: concepts are "
                                 f"{', '.join(concepts)}; methods {', '.join(METHODS)}")
    if args.min_targets < 1 or args.repeats < 0 or args.tokens < 1 or args.seq_len < 2:
        raise AttentionLensError("--min-targets and --tokens must be at least 1, --repeats at least 0, "
                                 "--seq-len at least 2")
    try:
        ks = sorted({int(k) for k in args.k.split(",")})
    except ValueError:
        raise AttentionLensError(f"--k {args.k!r}: give head counts like 1,3,8") from None
    if not ks or ks[0] < 1:
        raise AttentionLensError(f"--k {args.k!r}: give head counts like 1,3,8 (whole numbers from 1)")
    out = args.out or Path(__file__).parent / "results" / f"concepts-{Path(args.model).name}.json"
    settings = {"model": args.model, "data": args.data, "holdout": args.holdout, "seq_len": args.seq_len,
                "tokens": args.tokens, "min_targets": args.min_targets, "repeats": args.repeats, "mode": "zero",
                "layer_matched": True, "bootstrap": BOOTSTRAP, "steer_alpha": STEER_ALPHA, "seed": SEED}
    document = _load(out, settings)
    model = al.load_model(args.model)
    if ks[-1] > model.n_layers * model.n_heads:
        raise AttentionLensError(f"--k {ks[-1]} is more heads than the model's {model.n_layers * model.n_heads}")
    data = DataConfig(data=args.data, seq_len=args.seq_len, holdout=args.holdout)
    jobs = [(method, name) for name in names for method in methods]
    totals = {"before": 0.0, "after": 0.0}
    held_by_name = {}
    planned: dict = {}  # (words, k, set of heads) -> the method whose sweep --estimate counted
    for number, (method, name) in enumerate(jobs, start=1):
        words = ", ".join(w.strip() for w in concepts[name].split(",") if w.strip())
        done = {row["k"] for row in document["rows"]
                if (row["method"], row["concept"], row.get("words")) == (method, name, words)}
        missing = [k for k in ks if k not in done]
        where = f"[{number}/{len(jobs)}] {method} x {name}"
        if not missing or None in done:  # None: a refusal, measured once (settings and words are the same)
            say(f"{where}: already measured in {out}, skipped")
            continue
        if name not in held_by_name:
            try:
                concept = make_concept(model.tokenizer, words.split(", "))
                held_by_name[name] = concept, held_windows(model, data, concept.ids, args.min_targets, SEED)
            except AttentionLensError as error:  # e.g. too few concept targets in the held-out text
                held_by_name[name] = error
        if isinstance(held_by_name[name], AttentionLensError):
            _refuse(document, out, where, method, name, words, held_by_name[name], args.estimate)
            continue
        concept, held = held_by_name[name]
        ranked = _ranking(document, model, method, f"{name}: {words}", concept, data, args.tokens, where, out)
        windows = int(held.windows.shape[0])
        # One full forward pass per intervention, as before replay_edits: the clean pass, each k's found heads, its
        # draws and its steering.
        totals["before"] += (1 + len(missing) * (2 + args.repeats)) * windows
        for k in list(missing):  # the same heads another method found: the same measurement, draws included
            twin = _twin(document["rows"], planned if args.estimate else {}, words, k, ranked[:k])
            if twin is None:
                continue
            missing.remove(k)
            say(f"{where}: k {k}: the heads {twin} found; its row is this one's")
            if not args.estimate:
                document["rows"].append(_copy(document["rows"], twin, method, words, k, ranked[:k]))
                save(out, document)
        if not missing:
            say(f"{where}: nothing left to measure")
            continue
        try:
            plan = plan_sweep(model, ranked, missing, Zero(), args.repeats, SEED, True, STEER_ALPHA)
        except AttentionLensError as error:  # e.g. top heads crowding one layer: no layer-matched draw
            _refuse(document, out, where, method, name, words, error, args.estimate)
            continue
        for k in missing:
            planned[words, k, frozenset(ranked[:k])] = method
        before, after = (1 + len(plan.edits)) * windows, plan.cost(model) * windows
        totals["after"] += after
        say(f"{where}: k {','.join(map(str, plan.ks))}: {held.targets} targets in {windows} windows, "
             f"{len(plan.edits)} interventions: {after:,.0f} forward-equivalents (one full pass each: {before:,.0f})")
        if args.estimate:
            continue
        start = time.perf_counter()
        seen = [0]

        def progress(n: int) -> None:
            tenth = max(1, windows // 10)
            if (seen[0] + n) // tenth > seen[0] // tenth or seen[0] + n == windows:
                say(f"{where}: {seen[0] + n}/{windows} windows")
            seen[0] += n

        results, _ = sweep(model, ranked, plan.ks, concept.ids, held, Zero(), args.repeats, SEED, True,
                           BOOTSTRAP, plan.steer_alpha, on_windows=progress)
        for result in results:
            record = result.verify_record()
            document["rows"].append({"method": method, "concept": name, "words": words, **record,
                                     "steer_mass_change": record["steer"]["mass_change"],
                                     "steer_loss_change": record["steer"]["loss_change"],
                                     "sweep_ks": plan.ks, "sweep_forward_equivalents": after,
                                     "sweep_seconds": time.perf_counter() - start})
            say(_line(document["rows"][-1]))
        save(out, document)
    if args.estimate:
        say(f"total: {totals['after']:,.0f} forward-equivalents for what is left to measure "
             f"(one full forward pass per intervention: {totals['before']:,.0f})")
    if args.json:
        print(json.dumps(document, indent=1))
    return 0


def _twin(rows: list[dict], planned: dict, words: str, k: int, heads: list) -> str | None:
    """The method that measured (or in this run will measure) the same set of k heads for the same concept, with
    their steering (rows measured before every k was steered have it at the largest k only). Its row is exactly
    this one's: random draws depend on the set of heads and the seed alone, and the bootstrap on the seed and the
    measurements."""
    chosen = sorted(f"{layer}.{head}" for layer, head in heads)
    for row in rows:
        if ((row.get("words"), row["k"]) == (words, k) and "error" not in row and sorted(row["heads"]) == chosen
                and row["steer_mass_change"] is not None):
            return row["method"]
    return planned.get((words, k, frozenset(heads)))


def _copy(rows: list[dict], twin: str, method: str, words: str, k: int, heads: list) -> dict:
    row = next(row for row in rows if (row["method"], row.get("words"), row["k"]) == (twin, words, k))
    named = [f"{layer}.{head}" for layer, head in heads]  # this method's order; the set is the twin's
    copied = {**row, "method": method, "heads": named, "same_heads_as": twin,
              "sweep_ks": [], "sweep_forward_equivalents": 0.0, "sweep_seconds": 0.0}
    if "steer" in row:  # rows measured before every k was steered carry only steer_mass_change / _loss_change
        copied["steer"] = {**row["steer"], "heads": named}
    return copied


def _refuse(document: dict, out: Path, where: str, method: str, name: str, words: str, error: Exception,
            estimate: bool) -> None:
    """Say why a method x concept cannot be measured and, measuring, keep that as its row; the table goes on."""
    say(f"{where}: not measured: {error}")
    if not estimate:
        document["rows"].append({"method": method, "concept": name, "words": words, "k": None, "error": str(error)})
        save(out, document)


def _ranking(document: dict, model, method: str, name: str, concept, data, tokens: int, where: str,
             out: Path) -> list[tuple[int, int]]:
    """The method's ranking of heads for the concept (named with its words), scored once and kept in the file."""
    key = f"{method}/{name}"
    if key not in document["rankings"]:
        say(f"{where}: scoring heads on {tokens} training tokens")
        scored = score_heads(METHODS[method], al.Lens.from_model(model, "logit"), concept, data, tokens, SEED)
        document["rankings"][key] = [f"{layer}.{head}" for layer, head in scored.ranked()]
        save(out, document)
    return [tuple(int(part) for part in head.split(".")) for head in document["rankings"][key]]


def _load(out: Path, settings: dict) -> dict:
    if not out.exists():
        return {"settings": settings, "threads": torch.get_num_threads(), "rankings": {}, "rows": []}
    try:
        document = json.loads(out.read_text())
        kept = document["settings"]
        document["rankings"], document["rows"]
    except (ValueError, KeyError, TypeError):
        raise AttentionLensError(f"{out} is not a rows file of this bench; give another --out") from None
    if kept != settings:
        changed = ", ".join(f"{key} {kept.get(key)} -> {value}" for key, value in settings.items()
                            if kept.get(key) != value)
        raise AttentionLensError(f"{out} holds rows measured with other settings ({changed}); give another --out")
    return document


def save(out: Path, document: dict) -> None:
    """Write the whole document to a temporary file, then move it over `out`: never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(partial, out)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _line(row: dict) -> str:
    low, high = row["specificity_interval"] or (None, None)
    return (f"| {row['method']} | {row['concept']} | {row['k']} | {_number(row['z_score'], 1)} | "
            f"{_number(row['percentile'], 0)} | {_number(row['specificity'], 3)} [{_number(low, 3)}, {_number(high, 3)}] | "
            f"{_number(row['specificity_z_score'], 1)} | {_number(row['specificity_percentile'], 0)} | "
            f"{_number(row['collateral_loss_change'], 3)} | {row['concept_targets']} ({row['windows']} windows) | "
            f"{_number(row['steer_mass_change'])} / {_number(row['steer_loss_change'], 3)} |{_matched_cells(row)}")


def _matched_cells(row: dict) -> str:
    """Frequency-matched specificity (rows measured since it exists): drop [95%], z, percentile."""
    if row.get("matched_specificity") is None:
        return ""
    low, high = row["matched_specificity_interval"] or (None, None)
    return (f" {_number(row['matched_specificity'], 3)} [{_number(low, 3)}, {_number(high, 3)}] | "
            f"{_number(row['matched_specificity_z_score'], 1)} | {_number(row['matched_specificity_percentile'], 0)} |")


if __name__ == "__main__":
    sys.exit(main())

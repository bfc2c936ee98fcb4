"""Steering concept heads: amplify=α (only z_h's departure from its mean) against scale=α (all of z_h, Head Pursuit's).

python bench/steer.py [--concepts pronouns,numbers,war,countries] [--method attribution] [--k 1,3,8]
                      [--alphas 2,3,5] [--draws 4] [--draw-edits amplify] [--rankings bench/results/concepts-smollm2-135m.json]
                      [--out bench/results/steer-smollm2-135m.json] [--json]

The heads are a method's ranking kept by bench/concepts.py (--rankings), the windows the same held-out windows its
rows were verified on (same data, split, seed and --min-targets). For each concept and k, the top k heads are
amplified by every α and scaled by 5, and --draws layer-matched random draws of as many other heads get each of --draw-edits (amplify, scale) at
5 (the control: does amplifying any heads of those layers raise the concept?). Each measurement: the concept's
probability mass change (relative) and the loss change (nats) over the windows' scored positions. Issue 14's
steering goal: +25% mass at a loss change of at most 0.1 nats. One full row per concept is appended to --out as it
is measured; a rerun skips concepts already there. Progress on stderr; --json prints the document at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import attention_lens as al
from attention_lens.concept_metrics import compare
from attention_lens.concepts import make_concept
from attention_lens.data import DataConfig
from attention_lens.errors import AttentionLensError
from attention_lens.replay_edits import Edit, measure_edits
from attention_lens.verify import held_windows, random_heads, steering

from concepts import CONCEPTS, SEED, save, say

GOAL_MASS, GOAL_LOSS = 0.25, 0.1
"""Issue 14: amplified, the heads raise the concept's mass by at least 25% at a loss change of at most 0.1 nats."""
CONTROL_ALPHA = 5.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", default="pronouns,numbers,war,countries")
    parser.add_argument("--method", default="attribution")
    parser.add_argument("--k", default="1,3,8")
    parser.add_argument("--alphas", default="2,3,5")
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--draw-edits", default="amplify", help="amplify, scale or both (comma-separated)")
    here = Path(__file__).parent / "results"
    parser.add_argument("--rankings", type=Path, default=here / "concepts-smollm2-135m.json")
    parser.add_argument("--out", type=Path, default=here / "steer-smollm2-135m.json")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except AttentionLensError as error:
        say(f"error: {error}")
        return 2


def run(args) -> int:
    try:
        ks = [int(k) for k in args.k.split(",")]
        alphas = [float(a) for a in args.alphas.split(",")]
    except ValueError:
        raise AttentionLensError("--k and --alphas take comma-separated numbers, e.g. --k 1,3,8 --alphas 2,3,5") from None
    draw_edits = [e.strip() for e in args.draw_edits.split(",") if e.strip()]
    if not set(draw_edits) <= {"amplify", "scale"}:
        raise AttentionLensError(f"--draw-edits {args.draw_edits!r}: use amplify, scale or amplify,scale")
    if not args.rankings.exists():
        raise AttentionLensError(f"{args.rankings} does not exist; run bench/concepts.py first or give --rankings")
    source = json.loads(args.rankings.read_text())
    settings = source["settings"]
    document = json.loads(args.out.read_text()) if args.out.exists() else {
        "rankings_file": str(args.rankings), "settings": settings, "rows": []}
    model = al.load_model(settings["model"])
    data = DataConfig(data=settings["data"], seq_len=settings["seq_len"], holdout=settings["holdout"])
    for name in [n.strip() for n in args.concepts.split(",") if n.strip()]:
        if name not in CONCEPTS:
            raise AttentionLensError(f"unknown concept {name!r}; use {', '.join(CONCEPTS)}")
        if any(row["concept"] == name and row["method"] == args.method for row in document["rows"]):
            say(f"{args.method} x {name}: already in {args.out}, skipped")
            continue
        words = CONCEPTS[name]
        key = f"{args.method}/{name}: {words}"
        if key not in source["rankings"]:
            raise AttentionLensError(f"{args.rankings} has no {args.method} ranking for {name}; run bench/concepts.py")
        ranked = [tuple(int(part) for part in head.split(".")) for head in source["rankings"][key]]
        concept = make_concept(model.tokenizer, words.split(", "))
        held = held_windows(model, data, concept.ids, settings["min_targets"], settings["seed"])
        rng = random.Random(SEED)
        plan = []  # (k, what, alpha, heads)
        for k in ks:
            heads = ranked[:k]
            plan += [(k, "amplify", alpha, heads) for alpha in alphas] + [(k, "scale", CONTROL_ALPHA, heads)]
            for what in draw_edits:  # each edit its own draws, from one seeded generator
                plan += [(k, f"random {what}", CONTROL_ALPHA, random_heads(model, heads, rng)) for _ in range(args.draws)]
        edits = [Edit(tuple(heads), steering(what.removeprefix("random "), alpha)) for _, what, alpha, heads in plan]
        say(f"{args.method} x {name}: {held.targets} targets in {held.windows.shape[0]} windows, {len(edits)} edits")
        started = time.perf_counter()
        clean, measured = measure_edits(model, held.windows, concept.ids, edits)
        results = []
        for (k, what, alpha, heads), metrics in zip(plan, measured):
            effect = compare(heads, metrics, clean)
            results.append({"k": k, "edit": what, "alpha": alpha, "heads": [f"{l}.{h}" for l, h in heads],
                            "mass_change": effect.mass_change, "loss_change": effect.loss_change,
                            "meets_goal": effect.mass_change >= GOAL_MASS and effect.loss_change <= GOAL_LOSS})
            say(f"  k {k} {what}={alpha:g}: mass {effect.mass_change:+.1%}, loss {effect.loss_change:+.3f} nats")
        document["rows"].append({"method": args.method, "concept": name, "words": words, "targets": held.targets,
                                 "windows": int(held.windows.shape[0]), "clean_concept_mass": clean.concept_mass,
                                 "clean_loss": clean.loss, "seconds": time.perf_counter() - started,
                                 "results": results})
        save(args.out, document)
    if args.json:
        print(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

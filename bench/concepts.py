"""Concept heads that verify: every method x concept x k on SmolLM2 (issue 14's table).

python bench/concepts.py [--model smollm2-135m] [--methods pursuit,dla,logit] [--concepts war,numbers,...]
                         [--k 1,3,8] [--min-targets 400] [--repeats 20] [--tokens 2048] [--json]

For each method and concept: heads scored on the training side (against frequency-matched random token sets),
then the top k zero-ablated on held-out windows holding at least --min-targets concept targets, against
--repeats layer-matched random draws: z and percentile of the concept drop, the specific drop (concept drop
minus drop on other targets) with its 95% bootstrap interval, its z and percentile, the collateral loss change,
and steering (the largest k amplified x5): the concept's mass change and the loss change. One row per k.
Goal (issue 14): z >= 3 and the 99th percentile for the specific drop with k <= 8, for 4 of 6 concepts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import attention_lens as al
from attention_lens.concepts import make_concept
from attention_lens.data import DataConfig
from attention_lens.errors import AttentionLensError
from attention_lens.intervene import Zero
from attention_lens.scoring import METHODS, score_heads
from attention_lens.verify import held_windows, verify_ranking

CONCEPTS = {
    "war": "war, wars, battle, army, soldiers, troops, military, weapons, enemy, fight",
    "numbers": "one, two, three, four, five, six, seven, eight, nine, ten, hundred, thousand, million",
    "pronouns": "he, she, they, we, I, you, him, her, them, us",
    "countries": "America, China, Russia, Mexico, Iraq, Japan, Germany, France, Britain, Canada, Iran, Vietnam",
    "months": "January, February, March, April, May, June, July, August, September, October, November, December",
    "family": "mother, father, son, daughter, children, family, parents, wife, husband, brother, sister",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="pursuit,dla,logit")
    parser.add_argument("--concepts", default=",".join(CONCEPTS))
    parser.add_argument("--k", default="1,3,8")
    parser.add_argument("--min-targets", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    model = al.load_model(args.model)
    data = DataConfig(data="sotu", seq_len=args.seq_len, holdout=0.1)
    ks = sorted(int(k) for k in args.k.split(","))
    rows = []
    for name in args.concepts.split(","):
        concept = make_concept(model.tokenizer, [w.strip() for w in CONCEPTS[name].split(",")])
        held = held_windows(model, data, concept.ids, args.min_targets)
        for method in args.methods.split(","):
            start = time.perf_counter()
            scored = score_heads(METHODS[method], al.Lens.from_model(model, "logit"), concept, data, args.tokens)
            try:
                records, steer = verify_ranking(model, scored.ranked(), ks, concept.ids, held, Zero(), args.repeats)
            except AttentionLensError as error:  # e.g. top heads crowding one layer: no layer-matched draw
                print(f"| {method} | {name} | - | {error} |", file=sys.stderr, flush=True)
                rows.append({"method": method, "concept": name, "error": str(error)})
                continue
            for record in records:
                rows.append({"method": method, "concept": name, **record,
                             "steer_mass_change": steer["mass_change"] if record["k"] == max(ks) else None,
                             "steer_loss_change": steer["loss_change"] if record["k"] == max(ks) else None,
                             "seconds": time.perf_counter() - start})
                print(_line(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    return 0


def _line(row: dict) -> str:
    def number(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    low, high = row["specificity_interval"] or (None, None)
    return (f"| {row['method']} | {row['concept']} | {row['k']} | {number(row['z_score'], 1)} | "
            f"{number(row['percentile'], 0)} | {number(row['specificity'], 3)} [{number(low, 3)}, {number(high, 3)}] | "
            f"{number(row['specificity_z_score'], 1)} | {number(row['specificity_percentile'], 0)} | "
            f"{number(row['collateral_loss_change'], 3)} | {row['concept_targets']} ({row['windows']} windows) | "
            f"{number(row['steer_mass_change'])} / {number(row['steer_loss_change'], 3)} |")


if __name__ == "__main__":
    sys.exit(main())

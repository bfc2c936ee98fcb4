"""Controls for what per-head lens fidelity means, on SmolLM2 (issue: Evaluate).

python bench/controls.py [--layers 2,15,27] [--fit-tokens N] [--train-tokens N] [--eval-tokens N] [--json]

1. Random-attention control: the same fit, on a copy of the model whose attention weights in the lens's layers
   are re-drawn (same per-matrix std). A lens on such a head can only read what its input carries (the token's
   identity, position), so its "beats the constant" fraction says how much of the real result is not the head's
   own computation.
2. Paper objective: from the same fitted start, fine-tune with the original objective (heads' logits summed, last
   position only) and with ours (each head's own KL, every position), same tokens; score both per head.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

import attention_lens as al
from attention_lens.data import DataConfig
from attention_lens.evaluate import EvalConfig, evaluate
from attention_lens.fit import FitConfig, fit

DATA = DataConfig(data="sotu", seq_len=128, holdout=0.1)


def randomized_attention(model: al.Model, layers: list[int], seed: int) -> al.Model:
    """A copy of `model` whose q/k/v/o weights in `layers` are redrawn with each matrix's own std."""
    generator = torch.Generator().manual_seed(seed)
    hf = copy.deepcopy(model.hf)
    copied = al.load_model((hf, model.tokenizer))
    copied.name = f"{model.name}+random-attention{layers}"
    with torch.no_grad():
        for layer in layers:
            for name, parameter in copied.layers[layer].named_parameters():
                if "attn" in name and parameter.dim() == 2:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * parameter.std())
    copied._cache.clear()
    return copied


def scored(lens: al.Lens, eval_tokens: int) -> dict:
    result = evaluate(lens, DATA, EvalConfig(tokens=eval_tokens, constant_tokens=4096, bootstrap=100))
    s = result.summary
    keep = ("kl_mean", "kl_median", "constant_kl_mean", "logit_kl_mean", "frac_beats_constant", "frac_beats_logit",
            "frac_beats_dla", "top1_mean", "best")
    return {k: s.get(k) for k in keep}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", default="15")
    parser.add_argument("--fit-tokens", type=int, default=8192)
    parser.add_argument("--train-tokens", type=int, default=1024)
    parser.add_argument("--eval-tokens", type=int, default=512)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
    model = al.load_model("smollm2-135m")
    results: dict = {"layers": layers}

    log("fit on the real model ...")
    real = al.Lens.from_model(model, "affine", layers=layers)
    fit(real, DATA, FitConfig(tokens=args.fit_tokens))
    results["fit_real"] = scored(real, args.eval_tokens)

    log("fit on the model with re-drawn attention in those layers ...")
    control_model = randomized_attention(model, layers, seed=0)
    control = al.Lens.from_model(control_model, "affine", layers=layers)
    fit(control, DATA, FitConfig(tokens=args.fit_tokens))
    results["fit_random_attention"] = scored(control, args.eval_tokens)
    del control_model, control

    for objective in ("per-head", "paper"):
        log(f"fine-tune with the {objective} objective ...")
        lens = al.Lens.from_model(model, "affine", layers=layers)
        lens.load_state_dict(real.state_dict())
        al.train(lens, DATA, al.TrainConfig(tokens=args.train_tokens, objective=objective, dtype="bfloat16"))
        results[f"fit_then_{objective}"] = scored(lens, args.eval_tokens)

    if args.json:
        print(json.dumps(results))
    else:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

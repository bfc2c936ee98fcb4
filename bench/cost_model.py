"""Cost model: lens parameters, training memory and FLOP per token, for real models; prints markdown tables.

python bench/cost_model.py [--tokens-per-step T] [--budget TOKENS]

Counts (per head h, per token; V vocab, D d_model, d d_head, T tokens per step):
- naive lens training on o_h (the original):     4 D V          (forward + weight gradient)
- factored affine/logit/dla on z_h:              4 (d+1) V + 4 V D (d+1) / T   (F_h = W_U diag(g) M_h once per step)
- full lens on z_h:                              4 (d+1) V
- softmax: V exps per head-token (forward; the backward reuses it)
Memory: fp32 parameters + gradient + two Adam moments = 16 bytes per parameter.
"""

from __future__ import annotations

import argparse

from attention_lens.plan import ModelShape, costs as plan_costs

MODELS = {
    # name: (layers, heads, d_head, d_model, vocab, model parameters)
    "SmolLM2-135M": (30, 9, 64, 576, 49_152, 135e6),
    "Gemma-3-270M": (18, 4, 256, 640, 262_144, 268e6),
    "Llama-3-8B": (32, 32, 128, 4096, 128_256, 8.0e9),
    "Llama-3-70B": (80, 64, 128, 8192, 128_256, 70.6e9),
}
# Sustained throughputs used for the time column (measured or typical), FLOP/s and exps/s.
HARDWARE = {
    "2-core CPU (bf16, this machine)": (3.5e11, 5.8e8),
    "1x H100 (bf16, 40% of 990 TFLOP/s)": (4.0e14, 1.0e12),
    "8x H100": (3.2e15, 8.0e12),
}


def costs(name: str, tokens_per_step: int) -> dict:
    """The package's cost model (attention_lens.plan.costs, what `attention-lens plan` uses) for one table row,
    plus the naive lens on o_h it is compared with."""
    layers, heads, d_head, d_model, vocab, params = MODELS[name]
    shape = ModelShape(name, "", layers, heads, d_head, d_model, vocab, 0, int(params))
    n = layers * heads
    affine, full = (plan_costs(shape, kind, n, tokens_per_step) for kind in ("affine", "full"))
    return {
        "heads": n,
        "affine_params": affine.lens_parameters,
        "full_params": full.lens_parameters,
        "naive_flop": n * 4 * d_model * vocab,
        "factored_flop": affine.lens_flop,
        "full_flop": full.lens_flop,
        "exps": affine.exps,
        "model_flop": affine.model_flop,
    }


def human(x: float, unit: str = "") -> str:
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.1f} {suffix}{unit}"
    return f"{x:.0f} {unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens-per-step", type=int, default=2048)
    parser.add_argument("--budget", type=float, default=1e6, help="training tokens for the time column")
    args = parser.parse_args()
    print(f"Per token, all heads, {args.tokens_per_step} tokens per step:\n")
    print("| model | heads | affine params (train mem) | full params (train mem) | naive FLOP/token | "
          "factored affine FLOP/token | full on z_h FLOP/token | exps/token |")
    print("|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        c = costs(name, args.tokens_per_step)
        print(f"| {name} | {c['heads']} | {human(c['affine_params'])} ({human(16 * c['affine_params'], 'B')}) | "
              f"{human(c['full_params'])} ({human(16 * c['full_params'], 'B')}) | {human(c['naive_flop'])} | "
              f"{human(c['factored_flop'])} | {human(c['full_flop'])} | {human(c['exps'])} |")
    print(f"\nTime for {human(args.budget)} tokens of affine training, all heads (FLOP / throughput + exps / exp rate):\n")
    print("| model | " + " | ".join(HARDWARE) + " |")
    print("|---|" + "---|" * len(HARDWARE))
    for name in MODELS:
        c = costs(name, args.tokens_per_step)
        cells = []
        for flops, exps in HARDWARE.values():
            seconds = args.budget * ((c["factored_flop"] + c["model_flop"]) / flops + c["exps"] / exps)
            cells.append(f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

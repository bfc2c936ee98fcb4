"""Is what a head does readable from its output z_h at all? (issue 13, the largest-effect heads)

The effect lens is linear in z_h - z̄_h. On SmolLM2's 27 heads with the largest mean-ablation effect it stays at
dla's level on held-out text. This asks whether any reading of z_h could do better, or whether the effect depends
on more than z_h. On the same measured effects (training split to fit, held-out split to score), each reader
predicts the change of the logits d_h(p) at P's top tokens, and is scored by the share of the effect's KL it
explains to second order on held-out text (1 - sum_p ||B_p w_p - y_p||^2 / sum_p ||y_p||^2, the effect fit's own
metric: effect_fit.py):

- dla: the head's direct effect (w = W_O^T u, u = (z_h - z̄_h) / sigma_final);
- linear: the effect lens's KL-metric ridge fit toward dla, strength picked on held-back training windows;
- mlp: dla plus a one-hidden-layer network of u (f(u) - f(0), so no change predicts no effect): any smooth
  function of z_h, fitted the same way, stopped early on the held-back windows;
- mlp+token: the same network also given the embedding of the current token: not a reading of the head (it sees
  context the head does not write), a diagnostic of whether the effect depends on where the head writes;
- hindsight: the linear fit made on the held-out text itself (an overfit bound, not a reading).

    python bench/effect_readability.py --train-tokens 4096 --held-tokens 1024 --out bench/results/X.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import Tensor

import attention_lens as al
from attention_lens.data import DataConfig
from attention_lens.effect_fit import CHUNK, Problem, fit_maps, held_back_windows, kl_problem, miss_energy, solve
from attention_lens.effects import EffectsConfig, measured_batches
from attention_lens.lens import Lens

RESULTS = Path(__file__).parent / "results"
FIELDS = ("metric", "inputs", "targets", "windows")


def measured_problem(model, lens: Lens, data: DataConfig, tokens: int, split: str, seed: int,
                     top: int) -> tuple[Problem, Tensor]:
    """The KL-metric problem of `lens`'s layers on `tokens` tokens of `split`, and each scored position's token id."""
    config = EffectsConfig(tokens=tokens, batch_size=4, mode="mean", seed=seed)
    token_ids = []

    def batches():
        for batch in measured_batches(model, data, lens.config.layers, config, split=split,
                                      on_progress=lambda seen, planned: print(f"  {split}: {seen}/{planned}",
                                                                              flush=True)):
            token_ids.append(batch.input_ids.flatten()[batch.scored].cpu())
            yield batch

    problem = kl_problem(lens, batches(), top)
    return problem, torch.cat(token_ids)


def heads_only(problem: Problem, columns: list[int]) -> Problem:
    return Problem(problem.metric, problem.inputs[:, columns], problem.targets[..., columns], problem.windows)


def recovered(problem: Problem, written: Tensor) -> Tensor:
    """Per head, 1 - residual / measured energy, for predicted writes `written` (positions, head, d_model)."""
    miss = torch.zeros(written.shape[1])
    energy = problem.targets.pow(2).sum((0, 1))
    for start in range(0, problem.positions, CHUNK):
        rows = slice(start, start + CHUNK)
        miss += miss_energy(problem, rows, written[rows].transpose(1, 2))
    return 1 - miss / energy.clamp_min(1e-30)


def linear_writes(problem: Problem, maps: Tensor) -> Tensor:
    return torch.einsum("phd,hdm->phm", problem.inputs, maps)


class Network(torch.nn.Module):
    """Per head: dla plus f(u, c) - f(0, c), f one hidden layer of `width` ReLUs; c the current token's embedding
    (projected to 64 dims) when `context` is given, else nothing. The output layer starts at zero: at the start
    the network is dla."""

    def __init__(self, anchor: Tensor, scale: Tensor, out_scale: Tensor, width: int, context_dim: int = 0):
        super().__init__()
        heads, d_head, d_model = anchor.shape
        # anchor (head, d_head, d_model); scale (head, d_head) standardizes the input; out_scale (head,), the RMS of
        # dla's write, sets the output's: Adam's steps are then the same relative size for every head.
        self.anchor, self.scale, self.out_scale = anchor, scale, out_scale
        self.context_dim = context_dim
        inputs = d_head + (64 if context_dim else 0)
        if context_dim:
            self.project = torch.nn.Parameter(torch.randn(heads, context_dim, 64) / context_dim ** 0.5)
        self.w1 = torch.nn.Parameter(torch.randn(heads, inputs, width) / inputs ** 0.5)
        self.b1 = torch.nn.Parameter(torch.zeros(heads, width))
        self.w2 = torch.nn.Parameter(torch.zeros(heads, width, d_model))

    def forward(self, u: Tensor, context: Tensor | None) -> Tensor:
        """(positions, head, d_model) predicted change of the final-normed residual."""
        direct = torch.einsum("phd,hdm->phm", u, self.anchor)
        x = u / self.scale
        zero = torch.zeros_like(x)
        if self.context_dim:
            c = torch.einsum("pc,hce->phe", context, self.project)
            x, zero = torch.cat([x, c], -1), torch.cat([zero, c], -1)
        hidden = torch.relu(torch.einsum("phi,hiw->phw", x, self.w1) + self.b1)
        base = torch.relu(torch.einsum("phi,hiw->phw", zero, self.w1) + self.b1)
        extra = torch.einsum("phw,hwm->phm", hidden - base, self.w2) / self.w2.shape[1] ** 0.5
        return direct + extra * self.out_scale[:, None]


def train_network(network: Network, fit: Problem, check: Problem, fit_context: Tensor | None,
                  check_context: Tensor | None, epochs: int, lr: float, decay: float, seed: int) -> Network:
    """Adam on the per-head normalized residual energy, minibatches of 128 positions; per head, the state that
    did best on `check` is kept."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=decay)
    energy = fit.targets.pow(2).sum((0, 1)).clamp_min(1e-30) / fit.positions  # (head,) per position
    best = recovered(check, network(check.inputs, check_context).detach())
    best_state = {name: value.detach().clone() for name, value in network.named_parameters()}
    for epoch in range(epochs):
        order, total = torch.randperm(fit.positions, generator=generator), 0.0
        for start in range(0, fit.positions, 128):
            rows = order[start:start + 128]
            written = network(fit.inputs[rows], None if fit_context is None else fit_context[rows])
            predicted = torch.bmm(fit.metric[rows], written.transpose(1, 2))
            loss = ((predicted - fit.targets[rows]).pow(2).sum((0, 1)) / energy).sum() / len(rows)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(rows)
        with torch.no_grad():
            now = recovered(check, network(check.inputs, check_context))
        better = now > best
        best = torch.where(better, now, best)
        # Per head: keep the parameters of the heads that improved (every parameter's axis 0 is the head).
        with torch.no_grad():
            for name, value in network.named_parameters():
                best_state[name][better] = value[better]
        print(f"  epoch {epoch + 1}: training residual share {total / fit.positions / len(energy):.4f}, held-back "
              f"recovered median now {float(now.median()):.4f}, best {float(best.median()):.4f}", flush=True)
    with torch.no_grad():
        for name, value in network.named_parameters():
            value.copy_(best_state[name])
    return network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--effects", default=str(RESULTS / "effects-smollm2-sotu.json"),
                        help="an `attention-lens effects --json` record: the heads to study are its largest")
    parser.add_argument("--heads", type=int, default=27)
    parser.add_argument("--train-tokens", type=int, default=4096)
    parser.add_argument("--held-tokens", type=int, default=1024)
    parser.add_argument("--top", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the measured problems in this file and reuse them when it exists")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    records = json.loads(Path(args.effects).read_text())["heads"]
    chosen = sorted(records, key=lambda r: -r["effect_kl"])[:args.heads]
    layers = sorted({r["layer"] for r in chosen})
    model = al.load_model("smollm2-135m")
    lens = Lens.from_model(model, "effect", layers)
    columns = [layers.index(r["layer"]) * model.n_heads + r["head"] for r in chosen]
    data = DataConfig(data="sotu", seq_len=128, holdout=0.1)
    if args.cache is not None and args.cache.exists():
        saved = torch.load(args.cache)
        train, held = (Problem(*[saved[f"{split}_{field}"] for field in FIELDS]) for split in ("train", "held"))
        train_tokens, held_tokens = saved["train_tokens"], saved["held_tokens"]
    else:
        train, train_tokens = measured_problem(model, lens, data, args.train_tokens, "train", args.seed, args.top)
        held, held_tokens = measured_problem(model, lens, data, args.held_tokens, "held", args.seed, args.top)
        if args.cache is not None:
            torch.save({"train_tokens": train_tokens, "held_tokens": held_tokens,
                        **{f"{split}_{field}": getattr(problem, field) for split, problem in (("train", train),
                           ("held", held)) for field in FIELDS}}, args.cache)
    measured_at = time.perf_counter()
    train, held = heads_only(train, columns), heads_only(held, columns)
    anchor = torch.stack([model.W_O[r["layer"], r["head"]].float().cpu() for r in chosen])
    scores = {"zero": torch.zeros(len(chosen)), "dla": recovered(held, linear_writes(held, anchor))}
    maps, _, _ = fit_maps(train, anchor, note=print)  # the effect lens's own fit, as `train --objective effect`
    scores["linear"] = recovered(held, linear_writes(held, maps))
    check = held_back_windows(train.windows)  # the windows fit_maps held back: the networks stop early on them too
    fit, checked = train.take(~check), train.take(check)
    hindsight = solve(held, torch.full((len(chosen),), 1e-3), anchor)
    scores["hindsight"] = recovered(held, linear_writes(held, hindsight))
    scale = train.inputs.std(0).clamp_min(1e-6)  # (head, d_head)
    out_scale = linear_writes(train, anchor).pow(2).mean((0, 2)).sqrt().clamp_min(1e-12)  # (head,)
    embedding = model.hf.get_input_embeddings().weight.detach().float().cpu()
    for name, context in (("mlp", None), ("mlp+token", embedding)):
        print(f"{name}:", flush=True)
        network = Network(anchor, scale, out_scale, args.width, 0 if context is None else context.shape[1])
        pick = (lambda ids: None) if context is None else (lambda ids: context[ids])
        train_network(network, fit, checked, pick(train_tokens[~check]), pick(train_tokens[check]), args.epochs,
                      args.lr, 1e-4, args.seed)
        with torch.no_grad():
            scores[name] = recovered(held, network(held.inputs, pick(held_tokens)))
    heads = [{"layer": r["layer"], "head": r["head"], "effect_kl": r["effect_kl"],
              **{name: round(float(value[i]), 4) for name, value in scores.items()}} for i, r in enumerate(chosen)]
    medians = {name: round(float(value.median()), 4) for name, value in scores.items()}
    beats_dla = {name: round(float((value > scores["dla"]).float().mean()), 3) for name, value in scores.items()}
    document = {"heads_studied": len(chosen), "layers": layers, "train_positions": train.positions,
                "held_positions": held.positions, "top_tokens": args.top, "width": args.width,
                "epochs": args.epochs, "seed": args.seed, "median_recovered": medians,
                "fraction_above_dla": beats_dla, "measure_seconds": round(measured_at - started, 1),
                "seconds": round(time.perf_counter() - started, 1), "heads": heads}
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(json.dumps({k: v for k, v in document.items() if k != "heads"}, indent=1))


if __name__ == "__main__":
    main()

"""Benchmark: our trainer and fit against the original-style reference, on the same tokens, same process.

python bench/run.py [--quick] [--json]

Denominators are measured here (GEMM peak at 4096^2 and at the trainer's shapes, exp rate over
vocab-sized rows); speed is reported as ratios against the reference run in this process.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import attention_lens as al
from attention_lens.allocator import reuse_large_blocks
from attention_lens.data import DataConfig, batches, load_documents, split_by_document, token_windows
from attention_lens.evaluate import EvalConfig, _layer_scorer, _score_batch
from attention_lens.fidelity import FidelityTotals
from attention_lens.fit import FitConfig, fit
from attention_lens.heads import head_contributions, run_with_heads
from attention_lens.objective import DEFAULT_BLOCK_ROWS, VOCAB_CHUNK, _autocast, head_kl, target_distribution
from attention_lens.stream import forward as head_forward
from attention_lens.train import _step

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_LAYER = 15
BATCH, SEQ = 4, 128
DATA = DataConfig(data="sotu", seq_len=SEQ, holdout=0.1)


def seconds(fn, repeats: int = 1) -> float:
    fn()  # warm-up: first calls pay allocation and thread start-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


# ----- denominators --------------------------------------------------------------------------------
def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 3) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return 2 * m * k * n / seconds(lambda: a @ b, repeats)


def exp_rate(vocab: int, dtype: torch.dtype = torch.float32, rows: int = 64, repeats: int = 20) -> float:
    """exp elements/s over vocab-sized rows, in a cache-sized block (the best a fused kernel could do)."""
    x = torch.randn(rows, vocab, dtype=dtype)
    out = torch.empty_like(x)
    return rows * vocab / seconds(lambda: torch.exp(x, out=out), repeats)


# ----- the reference: the original Attention Lens training, one layer, loop over heads -------------
class Reference:
    """9 x Linear(d_model, vocab) lenses on o_h, initialised from W_U, fp32, full logits, Adam."""

    def __init__(self, model: al.Model, layer: int):
        self.model, self.layer = model, layer
        self.lenses = torch.nn.ModuleList()
        for _ in range(model.n_heads):
            linear = torch.nn.Linear(model.d_model, model.vocab)
            with torch.no_grad():
                linear.weight.copy_(model.unembed.W_U)
                linear.bias.zero_()
            self.lenses.append(linear)
        self.optimizer = torch.optim.Adam(self.lenses.parameters(), lr=1e-3)

    def head_outputs(self, batch):
        logits, capture = run_with_heads(self.model, batch, [self.layer])
        o = head_contributions(self.model, self.layer, capture.heads[self.layer]).flatten(0, 1)
        return torch.log_softmax(logits.float().flatten(0, 1), dim=-1), o  # (tokens, vocab), (tokens, head, d_model)

    def step(self, batch) -> float:
        log_p, o = self.head_outputs(batch)
        self.optimizer.zero_grad()
        total = 0.0
        for head, lens in enumerate(self.lenses):
            log_q = torch.log_softmax(lens(o[:, head]), dim=-1)
            loss = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
            loss.backward()
            total += loss.item()
        self.optimizer.step()
        return total / len(self.lenses)

    @torch.no_grad()
    def heldout_kl(self, held_batches) -> float:
        total, count = 0.0, 0
        for batch in held_batches:
            log_p, o = self.head_outputs(batch)
            for head, lens in enumerate(self.lenses):
                log_q = torch.log_softmax(lens(o[:, head]), dim=-1)
                total += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
                count += log_p.shape[0]
        return total / count


def train_batches(model, count: int, seed: int = 0):
    documents, _ = split_by_document(load_documents("sotu"), DATA.holdout)
    stream = batches(token_windows(documents, model.tokenizer, SEQ, seed), BATCH)
    return [next(stream) for _ in range(count)]


def held_batches(model, count: int):
    _, held = split_by_document(load_documents("sotu"), DATA.holdout)
    stream = batches(token_windows(held, model.tokenizer, SEQ, 0), BATCH)
    return [next(stream) for _ in range(count)]


# ----- ours ------------------------------------------------------------------------------------------
@dataclass
class Split:
    forward: float
    factors: float
    blocks: float
    optimizer: float


def step_split(lens: al.Lens, batch, dtype) -> Split:
    """Time the pieces of one training step separately (the same work _step does)."""
    started = time.perf_counter()
    logits, capture = run_with_heads(lens.model, batch, lens.config.layers)
    p, neg_entropy = target_distribution(logits.flatten(0, 1))
    forward = time.perf_counter() - started
    factors_time, blocks_time = 0.0, 0.0
    for layer in lens.config.layers:
        z = capture.heads.pop(layer).z.flatten(0, 1)
        t0 = time.perf_counter()
        with _autocast(z.device, dtype):  # as head_kl builds them
            factors, _ = lens.vocab_factors(layer)
        factors.float().sum().backward()  # the same product forward and backward, as in a step
        t1 = time.perf_counter()
        head_kl(lens, z, layer, p, neg_entropy, backward_scale=1.0 / z.shape[0], dtype=dtype)
        blocks_time += time.perf_counter() - t1
        factors_time += t1 - t0
    optimizer = torch.optim.Adam(lens.parameters(), lr=1e-3)
    optimizer_time = seconds(optimizer.step)
    # head_kl builds (and back-propagates) the factors itself: count that time once, under `factors`.
    return Split(forward, factors_time, blocks_time - factors_time, optimizer_time)


def step_flops(model: al.Model, heads: int, layers: int, tokens: int) -> dict:
    vocab, d_model, width = model.vocab, model.d_model, model.d_head + 1
    factors = 2 * 2 * vocab * d_model * width * heads * layers  # F = W_U diag(g) C M, forward + backward
    blocks = 3 * 2 * tokens * heads * layers * width * vocab  # logits in pass 1, again in pass 2, and dF
    forward = 2 * sum(p.numel() for p in model.hf.parameters()) * tokens
    return {"factors": factors, "blocks": blocks, "forward": forward, "exps": 2 * vocab * tokens * heads * layers}


def measure_ours(model, batch, dtype, layers) -> dict:
    lens = al.Lens.from_model(model, "affine", layers=layers)
    optimizer = torch.optim.Adam(lens.parameters(), lr=1e-3)
    _step(lens, optimizer, head_forward(model, batch, lens.config.layers), dtype, DEFAULT_BLOCK_ROWS, 0)  # warm-up
    started = time.perf_counter()
    _step(lens, optimizer, head_forward(model, batch, lens.config.layers), dtype, DEFAULT_BLOCK_ROWS, 1)  # forward included
    elapsed = time.perf_counter() - started
    head_tokens = batch.numel() * len(layers) * model.n_heads
    return {"seconds": elapsed, "head_tokens_per_s": head_tokens / elapsed, "lens": lens}


def tile_peaks(model, dtype, tokens: int) -> dict:
    """The rates the roofline divides by, at the shapes the step runs: quick enough to re-measure every round."""
    tile_rows, width = DEFAULT_BLOCK_ROWS // model.n_heads, model.d_head + 1
    return {
        "gemm_logits": gemm_rate(tile_rows, width, VOCAB_CHUNK, dtype, 50),  # a tile: (rows, d_head+1) x (d_head+1, chunk)
        "gemm_dfactors": gemm_rate(VOCAB_CHUNK, tile_rows, width, dtype, 50),  # its gradient: (chunk, rows) x (rows, d_head+1)
        "gemm_factors": gemm_rate(model.vocab, model.d_model, width, dtype, 3),  # W_U diag(g) x M_h
        # The model's forward pass is fp32: its MLP up-projection's shape stands for it.
        "gemm_forward_fp32": gemm_rate(tokens, model.d_model, model.hf.config.intermediate_size, torch.float32, 3),
        # The trainer's exps run in its dtype (bf16 exp is ~2x faster here): the ideal uses that rate.
        "exp_per_s": exp_rate(model.vocab, dtype),
    }


def paired_rounds(model, reference: "Reference", batches_, dtype, rounds: int) -> dict:
    """Reference step, our all-heads step and the roofline's rates, measured round by round, back to back.

    A 2-core machine shared with other work changes speed from one minute to the next (2-3x here under load):
    a ratio of two numbers taken minutes apart measures the load as much as the code. Each round's ratios use
    numbers taken within seconds of each other, and the median over rounds drops a round that a burst hit.
    """
    lens = al.Lens.from_model(model, "affine")
    optimizer = torch.optim.Adam(lens.parameters(), lr=1e-3)
    ours_batch = batches_[-1]
    _step(lens, optimizer, head_forward(model, ours_batch, lens.config.layers), dtype, DEFAULT_BLOCK_ROWS, 0)
    flops = step_flops(model, model.n_heads, model.n_layers, ours_batch.numel())
    head_tokens = ours_batch.numel() * model.n_layers * model.n_heads
    per_round = []
    for round_ in range(rounds):
        rates = tile_peaks(model, dtype, ours_batch.numel())
        started = time.perf_counter()
        reference.step(batches_[1 + round_])
        reference_seconds = time.perf_counter() - started
        started = time.perf_counter()
        _step(lens, optimizer, head_forward(model, ours_batch, lens.config.layers), dtype, DEFAULT_BLOCK_ROWS,
              round_ + 1)  # forward included
        ours_seconds = time.perf_counter() - started
        ideal = (flops["factors"] / rates["gemm_factors"]
                 + flops["blocks"] * (2 / 3 / rates["gemm_logits"] + 1 / 3 / rates["gemm_dfactors"])
                 + flops["forward"] / rates["gemm_forward_fp32"] + flops["exps"] / rates["exp_per_s"])
        reference_rate = BATCH * SEQ * model.n_heads / reference_seconds
        per_round.append({"reference_seconds": reference_seconds, "ours_seconds": ours_seconds,
                          "speedup": head_tokens / ours_seconds / reference_rate,
                          "roofline_fraction": ideal / ours_seconds, "rates": rates})
    median = lambda key: statistics.median(r[key] for r in per_round)  # noqa: E731
    return {"rounds": per_round, "speedup": median("speedup"), "roofline_fraction": median("roofline_fraction"),
            "reference_seconds": median("reference_seconds"), "ours_seconds": median("ours_seconds"),
            "lens": lens, "flops": flops}


def time_to_kl(model, target_kl: float, windows) -> dict:
    """Smallest fit budget (in windows) whose layer-15 lens reaches the reference's held-out KL; wall time
    including the data, the model's forward passes and the best-constant fit."""
    for count in windows:
        lens = al.Lens.from_model(model, "affine", layers=[REFERENCE_LAYER])
        tokens = count * (SEQ - FitConfig.skip_positions)  # the fit leaves each window's position 0 out
        started = time.perf_counter()
        fit(lens, DATA, FitConfig(tokens=tokens, batch_size=min(count, BATCH)))
        elapsed = time.perf_counter() - started
        kl = al.heldout_kl(lens, DATA, tokens=2 * BATCH * SEQ, batch_size=BATCH).mean
        if kl <= target_kl:
            return {"fit_tokens": tokens, "seconds": elapsed, "heldout_kl": kl}
    return {"fit_tokens": tokens, "seconds": elapsed, "heldout_kl": kl, "gap": kl - target_kl}


@torch.no_grad()  # as evaluate() runs: no graph through the lens's parameters
def eval_speed(model, batch, layers: list[int] | None = None) -> dict:
    """All heads of an affine lens scored on one batch, the default tiled path and the fp32 whole-row path, same
    batch, same process, interleaved so a change of machine load hits both; the fastest of two runs each.

    `eval` runs the model's forward pass once, builds the batch's targets once (the model's distribution, its
    top-k, p averaged through the readout) and then scores every layer, so its time is F + P + n_layers x S. Each
    path is timed scoring `layers` (default all) and scoring their first layer alone, in the same run: S is the
    difference per extra layer and P what is left of the one-layer time, so the all-heads figure counts the batch's
    work once (timing P + len(layers) x S and scaling it by n_layers / len(layers) charged P that many times; before
    2026-12-02 the forward pass was scaled too).
    """
    torch.manual_seed(0)
    layers = list(range(model.n_layers)) if layers is None else layers
    lenses = {count: al.Lens.from_model(model, "affine", layers[:count]) for count in (len(layers), 1)}
    for lens in lenses.values():
        torch.manual_seed(0)
        with torch.no_grad():
            for parameter in lens.parameters():
                parameter.normal_(std=0.003)  # scores depend on values, the work does not
    baseline = al.Lens.from_model(model, "logit")
    log_constant = torch.full((model.vocab,), -math.log(model.vocab))

    def run(exact: bool, lens) -> tuple[float, float]:
        """(forward seconds, scoring seconds)"""
        totals = FidelityTotals(len(lens.config.layers), model.n_heads, model.vocab, 20, 0)
        started = time.perf_counter()
        forward = head_forward(model, batch, lens.config.layers, final_residual=True)  # its z is handed out once
        scoring = time.perf_counter()
        _score_batch(lens, baseline, forward, log_constant, totals, _layer_scorer(model, EvalConfig(exact=exact)))
        return scoring - started, time.perf_counter() - scoring

    run(False, lenses[1])  # warm-up: the tiled path compiles its fused kernel once per process
    times = {(exact, count): [] for exact in (True, False) for count in lenses}
    for _ in range(2):  # fastest of two, each path and layer count
        for exact, count in times:
            times[exact, count].append(run(exact, lenses[count]))
    forward = min(f for exact in (True, False) for f, _ in times[exact, len(layers)])  # capturing every layer
    extra = len(layers) - 1

    def all_heads(exact: bool) -> tuple[float, float]:
        """(all-heads seconds, scoring seconds per layer)"""
        many, one = (min(s for _, s in times[exact, count]) for count in (len(layers), 1))
        per_layer = (many - one) / extra if extra else many
        return forward + max(one - per_layer, 0.0) + per_layer * model.n_layers, per_layer

    (all_tiled, tiled), (all_exact, exact) = all_heads(False), all_heads(True)
    return {"eval_tokens_per_s": batch.numel() / all_tiled, "eval_exact_tokens_per_s": batch.numel() / all_exact,
            "eval_speedup_vs_fp32": all_exact / all_tiled, "eval_scoring_speedup_vs_fp32": exact / tiled,
            "eval_forward_share": forward / all_tiled}


def eval_part(model, four_batches, quick: bool, log) -> dict:
    """`eval_speed` on 2,048 tokens (eval's default batch of 16 windows, over which each layer's factor products are
    spread): every 5th layer when quick, else all. Freed blocks are kept for reuse, as `attention-lens eval` keeps
    them (allocator.py; process-wide from here on, so this part runs last)."""
    reuse_large_blocks()
    log("eval: the tiled path vs the fp32 path, 2,048 tokens, " + ("every 5th layer" if quick else "all layers"))
    return eval_speed(model, torch.cat(four_batches), list(range(0, model.n_layers, 5)) if quick else None)


def decode_floor(model, prompt_tokens: int, repeats: int = 5) -> float:
    """Seconds of the bare bf16 vocabulary product for the rows decode reads (every head at every position):
    the least any readout of those rows must cost."""
    rows = model.n_layers * model.n_heads * prompt_tokens
    y = torch.randn(rows, model.d_model, dtype=torch.bfloat16)
    W_U = model.unembed.W_U.to(torch.bfloat16)
    return seconds(lambda: y @ W_U.T, repeats)


def effects_rates(model, batch, naive_layers) -> dict:
    """Head effects (KL and mean change per token, every head): ours (clean pass once, replay layers L.. for all of
    L's heads at once) against the naive loop (one full forward pass per head under HeadIntervention), on the same
    windows. The naive cost per head does not depend on its layer, so it is timed on the heads of `naive_layers`."""
    from attention_lens.effects import Ablation, EffectsConfig, EffectTotals, head_means
    from attention_lens.intervene import HeadIntervention, Mean

    means = head_means(model, DATA, 2 * SEQ, BATCH, 0)
    layers = list(range(model.n_layers))

    def ours():
        totals = EffectTotals(model, layers, EffectsConfig(bootstrap=2, examples=0))
        totals.add(Ablation(model, layers, "mean", means, torch.bfloat16).measure(batch))

    def naive():
        with torch.no_grad():
            log_p = torch.log_softmax(model.hf(input_ids=batch, use_cache=False).logits.float(), -1)
            p = log_p.exp()
            for layer in naive_layers:
                for head in range(model.n_heads):
                    with HeadIntervention(model, [(layer, head)], Mean(means=means)):
                        log_q = torch.log_softmax(model.hf(input_ids=batch, use_cache=False).logits.float(), -1)
                    change = log_p - log_q
                    (p * change).sum(-1)
                    change.flatten(0, 1).sum(0)

    ours_seconds = seconds(ours, repeats=1)
    naive_seconds = seconds(naive, repeats=1)
    ours_rate = batch.numel() * len(layers) * model.n_heads / ours_seconds
    naive_rate = batch.numel() * len(naive_layers) * model.n_heads / naive_seconds
    return {"effects_head_tokens_per_s": round(ours_rate, 1), "effects_naive_head_tokens_per_s": round(naive_rate, 1),
            "effects_speedup_vs_naive": round(ours_rate / naive_rate, 2), "effects_tokens": batch.numel()}


def rss_child(dtype_name: str) -> float:
    """Peak RSS (GB) of an all-heads training step, alone in its own process."""
    code = ("import torch, attention_lens as al; from attention_lens.train import _step; "
            "from attention_lens.stream import forward; "
            "from bench.run import train_batches; m = al.load_model('smollm2-135m'); "
            "lens = al.Lens.from_model(m, 'affine'); opt = torch.optim.Adam(lens.parameters()); "
            f"_step(lens, opt, forward(m, train_batches(m, 1)[0], lens.config.layers), getattr(torch, '{dtype_name}'), "
            f"{DEFAULT_BLOCK_ROWS}, 0); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    # The child's own high-water mark: RUSAGE_CHILDREN would count this (large) process's pages the child
    # holds between fork and exec.
    child = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    return int(child.stdout.split()[-1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (< 10 minutes on 2 cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--only", choices=["effects", "eval"], help="run one part alone (its keys only)")
    args = parser.parse_args()
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = al.load_model("smollm2-135m")
    vocab, d_model = model.vocab, model.d_model
    rounds = 3 if args.quick else 5
    effects_batch = held_batches(model, 1)[0][:1 if args.quick else 2]
    naive_layers = [0, 15, 29] if args.quick else list(range(0, model.n_layers, 3))
    if args.only == "effects":
        log("head effects: ours vs one forward pass per head ...")
        result = effects_rates(model, effects_batch, naive_layers)
        print(json.dumps(result) if args.json else "\n".join(f"{k:>34}  {v}" for k, v in result.items()))
        return
    if args.only == "eval":
        result = eval_part(model, train_batches(model, 4), args.quick, log)
        print(json.dumps(result) if args.json else "\n".join(f"{k:>34}  {v}" for k, v in result.items()))
        return

    log("measuring GEMM peaks and the exp rate ...")
    peaks = {
        "gemm_4096_fp32": gemm_rate(4096, 4096, 4096, torch.float32, 1 if args.quick else 3),
        "gemm_4096_bf16": gemm_rate(4096, 4096, 4096, torch.bfloat16, 1 if args.quick else 3),
        "exp_per_s_fp32": exp_rate(vocab),
    }
    batches_ = train_batches(model, rounds + 2)
    held = held_batches(model, 2)

    log(f"reference (layer {REFERENCE_LAYER}, {model.n_heads} x Linear({d_model}, {vocab}), fp32) and ours (all "
        f"heads), {rounds} paired rounds ...")
    reference = Reference(model, REFERENCE_LAYER)
    reference.step(batches_[0])  # warm-up
    paired = paired_rounds(model, reference, batches_, dtype, rounds)
    ref_rate = BATCH * SEQ * model.n_heads / paired["reference_seconds"]
    ref_kl = reference.heldout_kl(held)  # after rounds + 1 steps
    ref_wall = paired["reference_seconds"] * (rounds + 1)  # its whole budget, warm-up step included
    del reference
    peaks.update(paired["rounds"][len(paired["rounds"]) // 2]["rates"])  # one round's rates, for the record
    all_heads_rate = BATCH * SEQ * model.n_layers * model.n_heads / paired["ours_seconds"]
    one_layer = measure_ours(model, batches_[-1], dtype, [REFERENCE_LAYER])
    split = step_split(paired.pop("lens"), batches_[-1], dtype)
    flops = paired.pop("flops")
    matmul_flops = flops["factors"] + flops["blocks"] + flops["forward"]
    peak = peaks["gemm_4096_bf16" if dtype == torch.bfloat16 else "gemm_4096_fp32"]

    log("time to the reference's held-out KL (fit) ...")
    reach = time_to_kl(model, ref_kl, [1, 2, 4, 8, 16, 32] if args.quick else [1, 2, 4, 8, 16, 32, 64])

    log("decode and peak RSS ...")
    logit = al.Lens.logit(model)
    prompt = "The quick brown fox jumps over the lazy dog while the president speaks to the Congress of the United States"
    prompt_tokens = model.encode(prompt).shape[1]
    assert prompt_tokens == 20, prompt_tokens  # the decode target is for a 20-token prompt
    decode_seconds = seconds(lambda: al.decode(model, logit, prompt, k=10, position="all"))
    decode_exact = seconds(lambda: al.decode(model, logit, prompt, k=10, position="all", exact=True))
    decode_last = seconds(lambda: al.decode(model, logit, prompt, k=10))
    floor = decode_floor(model, prompt_tokens)
    peak_rss = rss_child(args.dtype)
    log("head effects: ours vs one forward pass per head ...")
    effects = effects_rates(model, effects_batch, naive_layers)

    evaluation = eval_part(model, batches_[:4], args.quick, log)

    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__, "dtype": args.dtype, "quick": args.quick,
        "peaks": {k: round(v / 1e9, 1) for k, v in peaks.items()},  # GFLOP/s; exp_per_s in G elements/s
        "reference_head_tokens_per_s": round(ref_rate, 1),
        "reference_heldout_kl": round(ref_kl, 3),
        "one_layer_head_tokens_per_s": round(one_layer["head_tokens_per_s"], 1),
        "all_heads_head_tokens_per_s": round(all_heads_rate, 1),
        "all_heads_tokens_per_s": round(all_heads_rate / (model.n_layers * model.n_heads), 2),
        "speedup_vs_reference": round(paired["speedup"], 2),
        "speedup_vs_reference_rounds": [round(r["speedup"], 2) for r in paired["rounds"]],
        "roofline_fraction": round(paired["roofline_fraction"], 3),
        "roofline_fraction_rounds": [round(r["roofline_fraction"], 3) for r in paired["rounds"]],
        "roofline_divides_by": ("ideal time of one all-heads step: factor products at peaks.gemm_factors, tile "
                                "products at peaks.gemm_logits and peaks.gemm_dfactors, the model's forward at "
                                "peaks.gemm_forward_fp32, exps at peaks.exp_per_s; each measured in the same round "
                                "as the step it divides (median over rounds)"),
        "mfu": round(matmul_flops / paired["ours_seconds"] / peak, 3),
        "mfu_divides_by": f"peaks.gemm_4096_{'bf16' if dtype == torch.bfloat16 else 'fp32'}",
        "time_split_s": {k: round(v, 2) for k, v in split.__dict__.items()},
        "time_to_reference_kl_ratio": round(reach["seconds"] / ref_wall, 4),
        "time_to_reference_kl": reach,
        "decode_seconds": round(decode_seconds, 3),
        "decode_floor_seconds": round(floor, 3),
        "decode_vs_floor": round(decode_seconds / floor, 2),
        "decode_exact_seconds": round(decode_exact, 3),
        "decode_prompt_tokens": prompt_tokens,
        "decode_last_position_seconds": round(decode_last, 3),
        "peak_rss_gb": round(peak_rss, 2),
        **{key: round(value, 2) for key, value in evaluation.items()},
        **effects,
    }
    if args.json:
        print(json.dumps(result))
        return
    width_ = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:>{width_}}  {value}")


if __name__ == "__main__":
    main()

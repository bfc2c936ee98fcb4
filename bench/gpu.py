"""GPU throughput of the all-heads trainer vs. the original-style reference, on models of the real shapes.

python bench/gpu.py [--out results.json]

The GPU machine cannot carry the real weights, and throughput does not depend on their values, so the
models are built from the real configs (bench/configs/) with random weights; tokens are random ids.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attention_lens as al
from attention_lens.heads import head_contributions, run_with_heads
from attention_lens.objective import head_kl, target_distribution
from attention_lens.stream import forward as head_forward
from attention_lens.train import _step

CONFIGS = Path(__file__).parent / "configs"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu only to smoke-test this script


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def random_model(name: str, dtype: torch.dtype) -> al.Model:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads((CONFIGS / f"{name}.json").read_text()))
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return al.load_model((hf, None), device=DEVICE)


def timed(fn, repeats: int) -> float:
    fn()
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize()
    return (time.perf_counter() - started) / repeats


def ours(model: al.Model, batch: torch.Tensor, dtype: torch.dtype, block_rows: int, repeats: int) -> dict:
    lens = al.Lens.from_model(model, "affine")
    optimizer = torch.optim.Adam(lens.parameters(), lr=1e-3)
    seconds = timed(lambda: _step(lens, optimizer, head_forward(model, batch, lens.config.layers), dtype, block_rows, 0),
                    repeats)  # the forward pass included, as before the step took a HeadBatch
    head_tokens = batch.numel() * model.n_layers * model.n_heads
    return {"batch": list(batch.shape), "block_rows": block_rows, "seconds_per_step": round(seconds, 4),
            "head_tokens_per_s": round(head_tokens / seconds), "tokens_per_s": round(batch.numel() / seconds, 1),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None}


def reference(model: al.Model, batch: torch.Tensor, layer: int, repeats: int) -> dict:
    """The original: one Linear(d_model, vocab) per head of one layer, Python loop, fp32, full logits, Adam."""
    lenses = torch.nn.ModuleList(torch.nn.Linear(model.d_model, model.vocab) for _ in range(model.n_heads)).to(DEVICE)
    optimizer = torch.optim.Adam(lenses.parameters(), lr=1e-3)

    def step():
        logits, capture = run_with_heads(model, batch, [layer])
        log_p = torch.log_softmax(logits.float().flatten(0, 1), dim=-1)
        o = head_contributions(model, layer, capture.heads[layer]).flatten(0, 1)
        optimizer.zero_grad()
        for head, lens in enumerate(lenses):
            loss = F.kl_div(torch.log_softmax(lens(o[:, head]), -1), log_p, log_target=True, reduction="batchmean")
            loss.backward()
        optimizer.step()

    seconds = timed(step, repeats)
    return {"batch": list(batch.shape), "seconds_per_step": round(seconds, 4),
            "head_tokens_per_s": round(batch.numel() * model.n_heads / seconds)}


def check_factored_kl_on_gpu(dtype: torch.dtype = torch.float32) -> float:
    """The factored blockwise KL on the GPU (fp32, or bf16 as training runs) against the textbook formula in
    fp32, on a small random model."""
    model = random_model("smollm2-135m", torch.float32)
    lens = al.Lens.from_model(model, "affine", layers=[3])
    with torch.no_grad():
        for p in lens.parameters():
            p.normal_(0, 0.01)
    ids = torch.randint(0, model.vocab, (2, 32), device=DEVICE)
    logits, capture = run_with_heads(model, ids, [3])
    z = capture.heads[3].z.flatten(0, 1)
    p, neg_entropy = target_distribution(logits.flatten(0, 1))
    factored = head_kl(lens, z, 3, p, neg_entropy, dtype=dtype)
    log_q = torch.log_softmax(lens.logits(z, 3), -1)
    log_p = torch.log_softmax(logits.float().flatten(0, 1), -1)[:, None].expand_as(log_q)
    naive = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    return float((factored - naive.detach()).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__}
    result["factored_kl_max_abs_error"] = check_factored_kl_on_gpu()
    result["factored_kl_bf16_max_abs_error"] = check_factored_kl_on_gpu(torch.bfloat16)
    print(json.dumps(result), file=sys.stderr)
    smollm2 = random_model("smollm2-135m", torch.bfloat16)
    small = torch.randint(0, smollm2.vocab, (1, 8) if args.smoke else (4, 128), device=DEVICE)
    large = torch.randint(0, smollm2.vocab, (1, 16) if args.smoke else (32, 256), device=DEVICE)
    result["smollm2_reference_layer15"] = reference(smollm2, small, 15, 3)
    result["smollm2_all_heads"] = [ours(smollm2, small, torch.bfloat16, 8192, 3),
                                   ours(smollm2, large, torch.bfloat16, 16384, 2)]
    result["speedup_vs_reference"] = round(result["smollm2_all_heads"][1]["head_tokens_per_s"]
                                           / result["smollm2_reference_layer15"]["head_tokens_per_s"], 1)
    print(json.dumps(result), file=sys.stderr)
    del smollm2
    torch.cuda.empty_cache()
    gemma = random_model("gemma3-270m", torch.bfloat16)
    batch = torch.randint(0, gemma.vocab, (1, 8) if args.smoke else (8, 256), device=DEVICE)
    result["gemma3_all_heads"] = ours(gemma, batch, torch.bfloat16, 4096, 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

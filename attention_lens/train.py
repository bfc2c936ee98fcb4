"""KL training of every selected head's lens, all heads from one forward pass of the frozen model."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .checkpoint import Progress, checkpoint_path, load_checkpoint, save_checkpoint
from .data import DataConfig
from .distributed import World, average_
from .errors import AttentionLensError
from .kinds import kind_names
from .lens import Lens, check_memory
from .lens_config import parameter_bytes
from .objective import DEFAULT_BLOCK_ROWS, _autocast, head_kl, target_distribution
from .sharding import exchange, gather_parameters, load_shard, owned_layers, save_shard
from .stream import HeadBatch, HeadStream

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OBJECTIVES = ("per-head", "paper")


@dataclass
class TrainConfig:
    """How lenses are trained."""

    tokens: int = 20_000
    """Token budget (a tiny budget still runs one step)."""
    batch_size: int = 4
    """Windows per step."""
    lr: float = 1e-3
    """Learning rate."""
    optimizer: str = "adam"
    """adam | sgd."""
    dtype: str = "float32"
    """float32 | bfloat16 (autocast for the vocabulary-sized matmuls; optimizer state stays fp32)."""
    seed: int = 0
    """Seeds the data order."""
    checkpoint_every: int = 50
    """Steps between checkpoints (one is always written at the end)."""
    block_rows: int = DEFAULT_BLOCK_ROWS
    """Head-token rows per vocabulary-sized block (memory vs. speed)."""
    shard_heads: bool = False
    """Under torchrun: each process owns the lenses of some layers (for lenses too big for one device)."""
    objective: str = "per-head"
    """per-head: every head's own KL at every position | paper: the original objective, one KL of the
    layer's heads' logits summed, at the last position only (kept to compare against)."""


@dataclass
class StepReport:
    step: int
    steps: int
    tokens: int
    loss: float
    """Mean KL per head-token of this step, nats."""
    seconds: float


def train(
    lens: Lens,
    data: DataConfig,
    config: TrainConfig,
    out: Path | None = None,
    resume: bool = False,
    on_step: Callable[[StepReport], None] | None = None,
    world: World = World(),
) -> Progress:
    """Train `lens` (bound to its model) in place; with `out`, checkpoint there and save the lens at the end. How it
    was trained (data, split, tokens, seed, settings) goes to `lens.config.training`.

    `config.batch_size` counts windows per step over all processes of `world`; each rank trains on its shard
    and the gradients are averaged, so N processes follow the same trajectory as one.
    """
    if not lens.kind_spec.trainable:
        raise AttentionLensError(f"the {lens.kind} lens has no parameters to train; trainable kinds: "
                                 f"{', '.join(kind_names(trainable=True))}")
    if config.optimizer not in ("adam", "sgd"):
        raise AttentionLensError(f"unknown optimizer {config.optimizer!r}; use adam or sgd")
    if config.objective not in OBJECTIVES:
        raise AttentionLensError(f"unknown objective {config.objective!r}; use {' or '.join(OBJECTIVES)}")
    if config.dtype not in DTYPES:
        raise AttentionLensError(f"unknown dtype {config.dtype!r}; use {' or '.join(DTYPES)}")
    full, sharded = lens, config.shard_heads and world.distributed
    # Sharded: every rank runs the forward pass over all layers and sends each layer's z to its owner.
    stream = HeadStream(lens.model, data, full.config.layers, split="train", seed=config.seed,
                        batch_size=config.batch_size, final_residual=sharded or lens.kind_spec.needs_final_residual,
                        world=world)
    if sharded:
        lens = _local_shard(full, config, world)
    check_memory(4 * parameter_bytes(lens.config), "the lens parameters with their gradients and Adam state")
    optimizer = _make_optimizer(lens, config)
    # What makes a checkpoint this run's; the budget and checkpoint interval may change on resume.
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("tokens", "checkpoint_every")}
    run = {"data": dataclasses.asdict(data), "train": settings, "kind": lens.kind,
           "layers": lens.config.layers, "heads": lens.config.heads}
    progress = Progress()
    if resume:
        progress = load_shard(out, lens, optimizer, run, world) if sharded else load_checkpoint(out, lens, optimizer, run)

    tokens_per_step = config.batch_size * data.seq_len
    steps = max(1, math.ceil(config.tokens / tokens_per_step))
    stream.start = progress.windows  # a resumed run sees exactly the windows it would have seen
    forward = iter(stream)
    dtype = DTYPES[config.dtype]
    while progress.step < steps:
        started = time.perf_counter()
        batch = next(forward, None)
        if batch is None:
            break  # data exhausted: progress.tokens says how much was used
        if sharded:
            loss = _sharded_step(lens, optimizer, batch, dtype, config.block_rows, progress.step, world, full)
        else:
            step = _paper_step if config.objective == "paper" else _step
            loss = step(lens, optimizer, batch, dtype, config.block_rows, progress.step, world)
        progress.step += 1
        progress.windows += batch.windows
        progress.tokens += batch.tokens
        progress.loss = loss
        if on_step is not None:
            on_step(StepReport(progress.step, steps, progress.tokens, loss, time.perf_counter() - started))
        if out is not None and progress.step % config.checkpoint_every == 0:
            _checkpoint(out, lens, optimizer, progress, run, world, sharded)
    if out is not None:
        _checkpoint(out, lens, optimizer, progress, run, world, sharded)
    if sharded:
        if full.is_skeleton and world.is_main:
            full.to_empty(device=lens.model.device)  # every layer is overwritten by the gather below
        gather_parameters(lens, full, world)
    full.config.training = {"method": "train", "data": dataclasses.asdict(data), "split": "train",
                            **dataclasses.asdict(config), "world_size": world.size, "tokens_seen": progress.tokens,
                            "steps": progress.step, "final_loss": progress.loss}
    if out is not None and world.is_main:
        full.save(out)
    return progress


def _checkpoint(out: Path, lens: Lens, optimizer, progress: Progress, run: dict, world: World, sharded: bool) -> None:
    if sharded:
        save_shard(out, lens, optimizer, progress, run, world)
    elif world.is_main:
        save_checkpoint(out, lens, optimizer, progress, run)


def _local_shard(full: Lens, config: TrainConfig, world: World) -> Lens:
    """This rank's part of `full`: the lenses of its layers, starting from full's parameters (or, for a skeleton
    `full`, from the kind's initialization: then no rank ever holds the whole lens until the end)."""
    if config.objective != "per-head":
        raise AttentionLensError("`shard_heads` trains the per-head objective only")
    if config.batch_size % world.size:
        raise AttentionLensError(f"`shard_heads` needs `batch_size` divisible by the {world.size} processes")
    model = full.model
    if any(model.layer_device(layer) != model.device for layer in full.config.layers):
        raise AttentionLensError("`shard_heads` and a model split over devices (`device_map`) do not combine: "
                                 "each process of a sharded run holds the whole model; use one or the other")
    layers = owned_layers(full.config.layers, world)
    if not layers:
        raise AttentionLensError(f"{world.size} processes but only {len(full.config.layers)} layers to shard")
    local = Lens.from_model(full.model, full.kind, layers, full.config.heads)
    if full.is_skeleton:
        return local  # fresh parameters, initialized by the kind exactly as the full lens's would be
    with torch.no_grad():
        for name, parameter in local.named_parameters():
            parameter.copy_(getattr(full, name)[[full.layer_index(layer) for layer in layers]])
    return local


def _make_optimizer(lens: Lens, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(lens.parameters(), lr=config.lr)
    return torch.optim.Adam(lens.parameters(), lr=config.lr)


def _step(lens: Lens, optimizer, batch: HeadBatch, dtype: torch.dtype, block_rows: int, step: int,
          world: World = World()) -> float:
    """Each layer's heads of one forward pass of the frozen model, in vocabulary-sized blocks."""
    p, neg_entropy = target_distribution(batch.logits.flatten(0, 1))  # (tokens, vocab)
    tokens = p.shape[0]
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for _, layer, z in batch.layers(lens.config.layers):
        z = z.flatten(0, 1)  # (tokens, head, d_head)
        # Mean over positions, summed over heads: each head's lens gets its own gradient.
        kl = head_kl(lens, z, layer, p, neg_entropy, batch.final_scale(), backward_scale=1.0 / tokens, dtype=dtype,
                     block_rows=block_rows)
        losses.append(kl.mean(0))
    per_head = torch.stack(losses)  # (layer, head)
    _finish_step(lens, optimizer, per_head, step, world)
    return per_head.mean().item()


def _sharded_step(lens: Lens, optimizer, batch: HeadBatch, dtype: torch.dtype, block_rows: int, step: int,
                  world: World, full: Lens) -> float:
    """This rank's windows' forward pass: each layer's z to its owner, then train the owned layers on all windows."""
    z = {layer: batch.z(layer) for layer in full.config.layers}
    owned, residual = exchange(z, batch.capture.final_residual, full.config.layers, world)
    p, neg_entropy = target_distribution(lens.model.unembed(residual.flatten(0, 1)))
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for layer in lens.config.layers:
        kl = head_kl(lens, owned.pop(layer).flatten(0, 1), layer, p, neg_entropy, backward_scale=1.0 / p.shape[0],
                     dtype=dtype, block_rows=block_rows)
        losses.append(kl.mean(0))
    per_head = torch.stack(losses)
    # No gradient exchange: each rank alone owns its parameters. Only the stop decision and the log are shared.
    summary = torch.stack([per_head.sum(), torch.tensor(float(per_head.numel())), (~torch.isfinite(per_head)).any().float()])
    dist.all_reduce(summary)
    if summary[2] > 0:
        bad = (~torch.isfinite(per_head)).nonzero()
        where = f"layer {lens.config.layers[int(bad[0, 0])]} head {lens.config.heads[int(bad[0, 1])]}" if len(bad) else "another rank"
        raise AttentionLensError(f"non-finite loss at step {step + 1}, {where}; lower `lr` (the last good checkpoint is kept)")
    optimizer.step()
    return float(summary[0] / summary[1])


def _finish_step(lens: Lens, optimizer, losses: torch.Tensor, step: int, world: World) -> None:
    """Average losses and gradients over ranks, refuse non-finite losses, then step (the same on every rank)."""
    average_([losses] + [p.grad for p in lens.parameters() if p.grad is not None], world)
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        where = f"layer {lens.config.layers[int(bad[0, 0])]}"
        if losses.dim() == 2:
            where += f" head {lens.config.heads[int(bad[0, 1])]}"
        raise AttentionLensError(
            f"non-finite loss at step {step + 1}, {where}; lower `lr` (the last good checkpoint is kept)"
        )
    optimizer.step()


def _paper_step(lens: Lens, optimizer, batch: HeadBatch, dtype: torch.dtype, block_rows: int, step: int,
                world: World = World()) -> float:
    """The original Attention Lens objective: KL to the model at the last position of the layer's summed lens logits.

    Heads are trained jointly, so no single head's lens is asked to match the model on its own.
    """
    p, neg_entropy = target_distribution(batch.logits[:, -1])  # (batch, vocab)
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for _, layer, z in batch.layers(lens.config.layers):
        z = z[:, -1]  # (batch, head, d_head)
        with _autocast(z.device, dtype):
            summed = lens.logits(z, layer).float().sum(-2)  # (batch, vocab)
        kl = (neg_entropy - (p * summed).sum(-1) + torch.logsumexp(summed, dim=-1)).mean()
        kl.backward()
        losses.append(kl.detach())
    per_layer = torch.stack(losses)
    _finish_step(lens, optimizer, per_layer, step, world)
    return per_layer.mean().item()


def existing_run(out: Path) -> bool:
    return (out / "lens.safetensors").exists() or checkpoint_path(out).exists()

"""Head sharding under torchrun: each rank owns the lenses of some layers; head outputs travel to their owner.

    rank 0: windows 0,2,..  --forward-->  z[layers A+B], residual      rank 0 trains layers A
    rank 1: windows 1,3,..  --forward-->  z[layers A+B], residual      rank 1 trains layers B
                 all-to-all: z[A] -> rank 0, z[B] -> rank 1  (each rank gets its layers' z for every window)
                 all-gather: the final residual (d_model per token), from which each rank recomputes
                             the model's next-token distribution (85x less traffic than the logits)

Lens parameters and optimizer state never leave their owner during training (no gradient all-reduce);
each rank checkpoints its own shard, and rank 0 gathers only the parameters for the final lens file.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .checkpoint import CHECKPOINT_DIR, Progress, load_checkpoint, save_checkpoint
from .distributed import World
from .errors import AttentionLensError
from .lens import Lens


def owned_layers(layers: list[int], world: World, rank: int | None = None) -> list[int]:
    """Layers dealt round-robin to ranks; every layer costs the same, so counts differ by at most one."""
    return layers[(world.rank if rank is None else rank) :: world.size]


def exchange(z: dict[int, Tensor], residual: Tensor, layers: list[int], world: World) -> tuple[dict, Tensor]:
    """z of this rank's windows for all layers -> z of every rank's windows for this rank's layers.

    z[layer]: (batch_r, pos, head, d_head); residual: (batch_r, pos, d_model). Returns the owned layers' z as
    (batch, pos, head, d_head) and the residual (batch, pos, d_model), windows ordered by source rank.
    """
    sends = [torch.stack([z[layer] for layer in owned_layers(layers, world, k)]) for k in range(world.size)]
    mine = owned_layers(layers, world)
    shape = (len(mine), *residual.shape[:2], *next(iter(z.values())).shape[2:])
    receives = [torch.empty(shape, dtype=sends[0].dtype, device=residual.device) for _ in range(world.size)]
    dist.all_to_all(receives, sends)
    gathered = [torch.empty_like(residual) for _ in range(world.size)]
    dist.all_gather(gathered, residual.contiguous())
    owned = {layer: torch.cat([r[i] for r in receives]) for i, layer in enumerate(mine)}
    return owned, torch.cat(gathered)


def shard_path(out: Path, world: World, step: int) -> Path:
    return out / CHECKPOINT_DIR / f"shard-{world.rank}-of-{world.size}.step{step:09d}.safetensors"


def save_shard(out: Path, lens: Lens, optimizer, progress: Progress, run: dict, world: World) -> None:
    """Each rank writes its shard under a step-numbered name; older shards go only once all ranks have written."""
    path = shard_path(out, world, progress.step)
    save_checkpoint(out, lens, optimizer, progress, run, path=path)
    dist.barrier()
    for old in _shard_steps(out, world):
        if old != progress.step:
            shard_path(out, world, old).unlink(missing_ok=True)


def load_shard(out: Path, lens: Lens, optimizer, run: dict, world: World) -> Progress:
    """Resume from the newest step every rank has a shard of (a kill mid-write leaves the previous one)."""
    steps = _shard_steps(out, world)
    newest = torch.tensor([max(steps) if steps else -1])
    dist.all_reduce(newest, op=dist.ReduceOp.MIN)
    step = int(newest)
    if step < 0:
        raise AttentionLensError(
            f"nothing to resume: no complete set of {world.size} checkpoint shards in {out / CHECKPOINT_DIR}; "
            "resume with the same number of processes, or start without `resume`"
        )
    return load_checkpoint(out, lens, optimizer, run, path=shard_path(out, world, step))


def _shard_steps(out: Path, world: World) -> list[int]:
    pattern = re.compile(rf"shard-{world.rank}-of-{world.size}\.step(\d+)\.safetensors$")
    folder = out / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name)))


def gather_parameters(local: Lens, full: Lens, world: World) -> None:
    """Copy every rank's layers into `full` on rank 0 (all ranks take part in the gather; only rank 0 needs the
    result, and elsewhere `full` may be a skeleton without memory)."""
    layers = full.config.layers
    for name, parameter in full.named_parameters():
        mine = getattr(local, name).detach()
        width = len(owned_layers(layers, world, 0))  # rank 0 owns the most layers
        padded = torch.zeros(width, *mine.shape[1:], dtype=mine.dtype, device=mine.device)
        padded[: mine.shape[0]] = mine
        pieces = [torch.empty_like(padded) for _ in range(world.size)]
        dist.all_gather(pieces, padded)
        if not world.is_main:
            continue
        with torch.no_grad():
            for rank, piece in enumerate(pieces):
                for i, layer in enumerate(owned_layers(layers, world, rank)):
                    parameter[full.layer_index(layer)] = piece[i]

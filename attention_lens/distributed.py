"""Data-parallel lens training across processes started by torchrun: ranks, batch shards, averaged gradients.

Every rank reads the same deterministic stream of global batches and keeps its slice, so the data a run
sees does not depend on the number of processes and a checkpoint resumes under any world size.
Gradients are averaged with one all-reduce per step after all of the step's blockwise backward passes
(DDP's per-backward bucket hooks would fire once per vocabulary block instead).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import AttentionLensError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main rank writes checkpoints, lenses and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device: str) -> World:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on GPUs)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    return world


def rank_device(device: str, world: World) -> str:
    """Each rank of a multi-GPU run takes the GPU of its local rank."""
    if world.distributed and device == "cuda":
        return f"cuda:{world.local_rank}"
    return device


def shard(batch: Tensor, world: World) -> Tensor:
    """This rank's windows of a global batch (batch, pos): every size-th one, starting at its rank."""
    if batch.shape[0] < world.size:
        raise AttentionLensError(
            f"a batch of {batch.shape[0]} windows cannot be split over {world.size} processes; "
            "raise `batch_size` to at least the number of processes"
        )
    return batch[world.rank :: world.size]


def average_(tensors: list[Tensor], world: World) -> None:
    """In place: the mean over ranks, as one flat all-reduce."""
    if not world.distributed or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def finish(world: World) -> None:
    """Wait for every rank before teardown: a rank that destroys the group while another still uses it
    aborts inside gloo ("terminate called without an active exception")."""
    if world.distributed and dist.is_initialized():
        dist.barrier()


def close(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()

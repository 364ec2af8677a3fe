"""Data-parallel training when launched by torchrun / `accelerate launch` / srun (WORLD_SIZE > 1).

Nothing to configure in the harness: the launcher's environment decides. Gloo on CPU, NCCL on
GPUs. Rank 0 writes the run folder; every rank trains on its slice of each global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init() -> Dist:
    """Join the process group the launcher set up (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def all_reduce(value: float, d: Dist, op: str = "sum") -> float:
    """Sum or max of a number over ranks (identity in a single process)."""
    if d.world == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if torch.cuda.is_available():
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return float(t.item())


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()

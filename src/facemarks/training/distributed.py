"""DistributedDataParallel plumbing: joining the ``torchrun`` process group, this process's rank, sums over processes.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) nothing is initialised and the rank / world are ``(0, 1)``.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (NCCL on CUDA, gloo on CPU) -> (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank_world()


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum ``t`` over all processes on ``device`` (NCCL needs CUDA tensors) -> a CPU tensor."""
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()

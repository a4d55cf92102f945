"""Distributed data parallel helpers: torchrun environment, process group (gloo on CPU, nccl on CUDA).

Run a preset on N processes with ``torchrun --nproc_per_node N -m facemeta train CONFIG`` or
``facemeta train CONFIG --nproc N`` (which spawns the processes itself: facemeta.train.launch). Every
process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment; outside torchrun the world is
one process and every helper here is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) outside it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def init_process_group(device: torch.device) -> None:
    """Join the process group when WORLD_SIZE > 1: nccl for CUDA devices, gloo for CPU."""
    _, world, local = env_ranks()
    if world <= 1 or is_distributed():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)


def destroy_process_group() -> None:
    """Leave the process group (if one was joined)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `module` on `device` (gradients averaged across processes).

    static_graph: the same parameters take part in every step, which also covers the ones a timm
    trunk builds but never uses without its classifier (e.g. MobileNetV3's conv_head).
    """
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(module, device_ids=[device.index], output_device=device.index,
                                       static_graph=True)
    return DistributedDataParallel(module, static_graph=True)


def replicas_in_sync(module: nn.Module) -> bool:
    """True when every process holds the same parameters (compares a float64 checksum across ranks)."""
    if not is_distributed():
        return True
    params = [p.detach().double() for p in module.parameters()]
    dev = params[0].device if params else torch.device("cpu")
    total = torch.stack([p.sum() for p in params] + [p.abs().sum() for p in params]).sum().reshape(1) \
        if params else torch.zeros(1, dtype=torch.float64, device=dev)
    gathered = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, total)
    return all(bool(torch.equal(g, gathered[0])) for g in gathered)

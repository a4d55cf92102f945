"""Start a training run on N local processes, as torchrun would (``facemeta train CONFIG --nproc N``)."""

from __future__ import annotations

import os
import socket
from typing import Any

import torch

from facemeta.train.config import config_from_dict
from facemeta.train.data import prepare_data
from facemeta.train.trainer import Trainer


def free_port() -> int:
    """A free TCP port on localhost for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, cfg_dict: dict[str, Any], resume: bool, threads: int | None,
            progress: bool) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if threads:
        torch.set_num_threads(threads)
    cfg = config_from_dict(cfg_dict)
    Trainer(cfg, prepare_data(cfg), resume=resume, progress=progress and rank == 0).fit()


def launch(cfg: Any, nproc: int, resume: bool = False, threads: int | None = None, progress: bool = False) -> str:
    """Train `cfg` (a TrainConfig) on `nproc` local processes (torch.multiprocessing spawn); returns the model path.

    The same as torchrun with --nproc_per_node nproc on one machine; a failing process raises here.
    """
    import torch.multiprocessing as mp

    if nproc < 1:
        raise ValueError("nproc must be >= 1")
    prepare_data(cfg, progress=progress)  # align into the cache once, before the processes start
    port = free_port()
    mp.spawn(_worker, args=(nproc, port, cfg.to_dict(), resume, threads, progress), nprocs=nproc, join=True)
    return os.path.join(cfg.output, "model.safetensors")

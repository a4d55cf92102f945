"""DDP: a 2-process run (gloo backend on CPU, torch.multiprocessing spawn, as torchrun would start it)
trains on real aligned faces, keeps both replicas identical, and checkpoints."""

from __future__ import annotations

import json

import torch

from facemeta.models.checkpoint import load_checkpoint
from facemeta.train.config import load_config
from facemeta.train.ddp import env_ranks
from facemeta.train.launch import launch
from facemeta.train.state import STATE_FILE, load_state


def test_two_process_gloo_run_trains_and_checkpoints(data_dir, tmp_path):
    out = tmp_path / "ddp"
    cfg = load_config("smoke", overrides={
        "data.root": str(data_dir), "output": str(out), "steps": 6, "checkpoint_every": 3, "log_every": 3,
        "model.image_size": 32, "model.embedding_size": 64, "sampler.identities_per_domain": 4,
        "threads": 1, "deterministic": False, "optim.warmup_steps": 0})
    assert env_ranks() == (0, 1, 0)  # this process is not part of a world
    path = launch(cfg, nproc=2, threads=1)

    model, meta = load_checkpoint(path)
    assert meta["training"]["world_size"] == 2
    assert meta["training"]["replicas_in_sync"] is True
    assert meta["training"]["batch_size"] == 2 * (2 * 4 * 2)  # each process: 2 domains x 4 ids x 2 images
    assert meta["step"] == 6 and meta["threshold"] is not None
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())

    state = load_state(out / "checkpoints" / STATE_FILE)
    assert state["step"] == 6 and state["sampler"]["world_size"] == 2
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*.safetensors")) == \
        ["step-000003.safetensors", "step-000006.safetensors"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "start" and lines[0]["world_size"] == 2
    assert [r["step"] for r in lines if "loss" in r] == [3, 6]  # rank 0 alone writes the log
    assert lines[-1]["event"] == "end" and lines[-1]["replicas_in_sync"] is True
    # the weights moved away from the common initialisation
    first, _ = load_checkpoint(out / "checkpoints" / "step-000003.safetensors")
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), model.state_dict().values(),
                                                     strict=True))

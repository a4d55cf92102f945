"""`facemeta train CONFIG`: train a face embedder from a YAML preset (a path or a shipped name)."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `train` and its options."""
    from facemeta.commands.options import LODO_CHOICES, METHOD_CHOICES, shipped_presets

    names = shipped_presets()
    p = subparsers.add_parser(
        "train", help=f"train a face embedder from a YAML preset ({names} or a file)",
        description=f"Train a face embedder from a YAML preset: a file path or a shipped preset name ({names}; "
                    "weights/MODEL_CARD.md names the recipe of the shipped model). The preset's `method` picks "
                    "the objective (--method below, or --set method=NAME). Checkpoints, metrics.jsonl and the final "
                    "model.safetensors (with a verification threshold calibrated on held-out source-domain "
                    "identities) go to the output folder. Under torchrun every process trains its share of "
                    "each batch (DDP: gloo on CPU, nccl on CUDA).")
    p.add_argument("config", metavar="CONFIG", help=f"YAML file or preset name ({names})")
    p.add_argument("--out", help="output folder (overrides the preset's `output`)")
    p.add_argument("--steps", type=int, help="number of optimiser steps (overrides `steps`)")
    p.add_argument("--seed", type=int, help="random seed (overrides `seed`)")
    p.add_argument("--method", choices=METHOD_CHOICES, metavar="METHOD",
                   help="training method (overrides `method`): %(choices)s")
    p.add_argument("--leave-out", choices=LODO_CHOICES, metavar="TARGET",
                   help="leave-one-domain-out protocol (%(choices)s): train on LFW folds 1-5 + the other two small "
                        "sets")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set optim.lr=0.05 --set model.backbone=resnet18")
    p.add_argument("--resume", action="store_true", help="continue the run in the output folder from its last checkpoint")
    p.add_argument("--nproc", type=int, default=1,
                   help="spawn this many DDP processes on this machine (or launch with torchrun instead)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the validated config as JSON and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the config, then train (in this process, or in --nproc spawned DDP processes)."""
    from facemeta.errors import ConfigError
    from facemeta.train.config import load_config

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"output={json.dumps(args.out)}")
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.method is not None:
        overrides.append(f"method={json.dumps(args.method)}")
    cfg = load_config(args.config, overrides=overrides, leave_out=args.leave_out)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if args.nproc < 1:
        raise ConfigError("--nproc must be >= 1")
    if args.nproc > 1:
        from facemeta.train.launch import launch

        path = launch(cfg, args.nproc, resume=args.resume,
                      progress=not args.no_progress and sys.stderr.isatty())
    else:
        from facemeta.train.data import prepare_data
        from facemeta.train.trainer import Trainer

        progress = not args.no_progress and sys.stderr.isatty()
        trainer = Trainer(cfg, prepare_data(cfg, progress=progress), resume=args.resume, progress=progress)
        path = trainer.fit()
        if not trainer.is_main:  # under torchrun, rank 0 alone reports
            return 0
    print(f"model: {path}")
    return 0

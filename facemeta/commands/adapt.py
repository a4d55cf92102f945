"""`facemeta adapt MODEL --labelled DIR --out NEW.safetensors`: fine-tune a model for a new domain from a few
labelled people (facemeta.train.adapt)."""

from __future__ import annotations

import argparse
import json
import sys

ENROLLED = "enrolled"  # facemeta.train.adapt.ENROLLED, repeated so that --help does not import torch


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `adapt` and its options."""
    p = subparsers.add_parser(
        "adapt", help="fine-tune a model for a new domain from a few labelled people",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Adapt a facemeta model to a new domain (a camera, a thermal gate, masks...) from a few\n"
                    "labelled people, and write a new model with its own fingerprint and threshold.\n\n"
                    "DIR holds one folder per person (the folder's name is the label) with that person's photos\n"
                    f"from the NEW domain: DIR/<person>/*.jpg; the same person's photos from the ENROLMENT domain\n"
                    f"(what a gallery holds) may go in DIR/<person>/{ENROLLED}/*.jpg. At least 2 people; 10-20 is\n"
                    "the intended size (20 people, 160 photos: under 3 minutes on 2 CPU cores in the runs the\n"
                    "README describes).\n\n"
                    "Every photo is aligned once (as `enroll` would); the last residual blocks and the embedding\n"
                    "layer are fine-tuned on them (prototype CosFace over the people); the threshold is\n"
                    "calibrated on impostor pairs among the labelled photos at the base model's false-accept\n"
                    "rate. OUT.json carries an \"adapted_on\" section (domain, people, photos, steps, base model);\n"
                    "OUT.md is a model card. --domain NAME (with --unlabelled DIR2 of any people's photos of that\n"
                    "domain, else the labelled new-domain photos) also stores the domain's statistics and a\n"
                    "threshold for vectors normalised by them. An ONNX export cannot be adapted: adapt its\n"
                    ".safetensors, then export again. Galleries must be enrolled again with the new model.\n\n"
                    "An ensemble (e.g. dlib's prior with SFace) is adapted member by member, each on its own chip\n"
                    "of the same photos (dlib's ResNet its last --tail-blocks residual blocks, other members their\n"
                    "last --other-blocks, by default none: their embedding layer), the weights of the combination\n"
                    "kept; --members 0,1 picks the members to adapt (default all; the others stay as they are).\n"
                    "The result is an ensemble with its own fingerprint and a threshold calibrated on the\n"
                    "ensemble's vectors.")
    p.add_argument("model", metavar="MODEL", help="the base model checkpoint (.safetensors): a model or an ensemble")
    p.add_argument("--labelled", required=True, metavar="DIR", help="folder of identity folders (see above)")
    p.add_argument("--out", required=True, metavar="NEW.safetensors", help="the adapted model to write")
    p.add_argument("--domain", metavar="NAME", help="name of the new domain (stored, with its statistics)")
    p.add_argument("--unlabelled", metavar="DIR2", help="unlabelled photos of the new domain (needs --domain)")
    p.add_argument("--steps", type=int, help="fine-tuning steps (default 30)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-4)")
    p.add_argument("--tail-blocks", type=int, help="trailing residual blocks fine-tuned (default 4; 0: head only)")
    p.add_argument("--other-blocks", type=int,
                   help="trailing blocks fine-tuned on a backbone other than dlib's ResNet, e.g. SFace's 13 "
                        "depthwise-separable pairs (default 0: its embedding layer only)")
    p.add_argument("--margin", type=float,
                   help="CosFace margin of the loss (default 0.2; SFace, which already tells a few people apart, "
                        "only moves from about 0.5: benchmarks/results/adapt/sface-recipe/)")
    p.add_argument("--interpolate", type=float,
                   help="share of the change kept, 0..1 (default 0.5: halfway back to the base)")
    p.add_argument("--members", metavar="I,J", help="an ensemble's members to adapt, numbered from 0 (default all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the flip augmentation")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Exit 0 after writing the model; 1 with a one-line error on bad input (nothing written)."""
    import torch

    from facemeta.errors import ConfigError
    from facemeta.train.adapt import AdaptSettings, adapt_model

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = AdaptSettings(seed=args.seed)
    for key in ("steps", "lr", "tail_blocks", "other_blocks", "margin", "interpolate"):
        if getattr(args, key) is not None:
            setattr(settings, key, getattr(args, key))
    summary = adapt_model(args.model, args.labelled, args.out, settings, domain=args.domain,
                          unlabelled=args.unlabelled, progress=not args.no_progress and not args.json,
                          members=args.members)
    if args.json:
        print(json.dumps(summary))
        return 0
    for path, why in summary["skipped"]:
        print(f"skipped {path}: {why}", file=sys.stderr)
    a = summary["adapted_on"]
    print(f"wrote {summary['model']} (fingerprint {summary['fingerprint']}; base {a['base_model']['fingerprint']}): "
          f"{a['people']} people, {a['photos']['new']} new-domain + {a['photos']['enrolled']} enrolment photos, "
          f"{a['steps']} steps in {a['seconds']} s; threshold {summary['threshold']:.4f} at FAR "
          f"{summary['threshold_far']:g}")
    if "members" in a:
        print("members adapted: " + ", ".join(f"{m['member']} ({m['backbone']})" for m in a["members"] if m["adapted"]))
    return 0

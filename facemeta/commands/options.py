"""Options several commands share: which runtime embeds the faces (torch or ONNX Runtime)."""

from __future__ import annotations

import argparse

from facemeta.errors import CheckpointError


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    """--runtime torch|onnx and --onnx FILE.onnx."""
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                   help="what runs the embedding network: torch, or ONNX Runtime on the CPU (needs "
                        "pip install 'facemeta[onnx]'; detection stays in torch)")
    p.add_argument("--onnx", metavar="FILE.onnx",
                   help="with --runtime onnx: a graph from `facemeta export` for this model (default: exported "
                        "into the cache on first use)")


def runtime_options(args: argparse.Namespace) -> dict:
    """The FaceEmbedder / FaceRecognizer keywords of --runtime and --onnx (checked: --onnx needs --runtime onnx)."""
    if args.onnx and args.runtime != "onnx":
        raise CheckpointError("--onnx needs --runtime onnx")
    return {"runtime": args.runtime, "onnx_path": args.onnx}

"""Options several commands share: which runtime embeds the faces (torch or ONNX Runtime), which search
backend a new gallery gets, and the names of the shipped presets their help lists."""

from __future__ import annotations

import argparse

from facemeta.errors import CheckpointError, GalleryError


def shipped_presets(folder: str = "") -> str:
    """The preset names shipped in facemeta/configs/<folder> ('' for training presets, 'bench' for benchmark
    ones), comma-joined: read from the package's files, without importing torch to build a parser."""
    from importlib import resources

    root = resources.files("facemeta") / "configs"
    if folder:
        root = root / folder
    return ", ".join(sorted(f.name.removesuffix(".yaml") for f in root.iterdir() if f.name.endswith(".yaml")))


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


def add_backend_options(p: argparse.ArgumentParser) -> None:
    """--backend faiss|milvus and --milvus-uri URI: where a NEW gallery's embeddings are searched."""
    p.add_argument("--backend", choices=["faiss", "milvus"], default="faiss",
                   help="search backend of a NEW gallery: faiss (an index file in the folder, the default) or "
                        "milvus (needs pip install 'facemeta[milvus]'); an existing gallery keeps its own")
    p.add_argument("--milvus-uri", metavar="URI",
                   help="with --backend milvus: a Milvus server (http://host:19530; its token from "
                        "$FACEMETA_MILVUS_TOKEN) or a Milvus Lite file ending in .db (default: milvus.db in "
                        "the gallery folder)")


def backend_options(args: argparse.Namespace) -> dict:
    """The FaceRecognizer / Gallery.create keywords of --backend and --milvus-uri (checked together)."""
    if args.milvus_uri and args.backend != "milvus":
        raise GalleryError("--milvus-uri needs --backend milvus")
    return {"backend": args.backend, "milvus_uri": args.milvus_uri}

"""`facemeta identify GALLERY IMAGE`: who is each face in a photo? Best identity or "unknown", score, box."""

from __future__ import annotations

import argparse
import json

from facemeta.commands.text import shown
from facemeta.errors import NoFaceError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `identify` and its options."""
    p = subparsers.add_parser(
        "identify", help="name every face in a photo from a gallery",
        description="Detect every face in IMAGE, embed each, and search the gallery: each face gets its best "
                    "identity, or 'unknown' when the score is below the threshold (default: the gallery's, "
                    "taken from the model's calibrated threshold when the gallery was created).")
    p.add_argument("gallery", metavar="GALLERY", help="gallery folder")
    p.add_argument("image", metavar="IMAGE", help="image file")
    p.add_argument("--top-k", type=int, default=1, help="candidate identities to list per face (default 1)")
    p.add_argument("--threshold", type=float, help="open-set threshold (cosine); below it a face is 'unknown'")
    p.add_argument("--model", help="model checkpoint (.safetensors); default: the model in weights/ or $FACEMETA_MODEL")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Exit 0 after printing every face; 1 (one-line error) when there is no face or bad input."""
    from facemeta.checks import check_threshold
    from facemeta.errors import GalleryError
    from facemeta.recognizer import FaceRecognizer

    if args.top_k < 1:
        raise GalleryError(f"--top-k must be >= 1, got {args.top_k}")
    check_threshold(args.threshold, "--threshold")
    with FaceRecognizer(args.gallery, args.model, device=args.device) as fr:
        if not fr.exists():
            raise GalleryError(f"no gallery at {args.gallery}; enroll someone first")
        faces = fr.identify(args.image, top_k=args.top_k, threshold=args.threshold)
        threshold = args.threshold if args.threshold is not None else fr.gallery().threshold
    if not faces:
        raise NoFaceError(f"no face found in {args.image}")
    if args.json:
        print(json.dumps({"image": args.image, "gallery": args.gallery, "threshold": threshold, "faces": faces}))
        return 0
    for i, f in enumerate(faces, 1):
        box = ",".join(f"{v:.0f}" for v in f["box"])
        score = "-" if f["score"] is None else f"{f['score']:.4f}"
        line = f"face {i} [{box}]: {shown(f['identity'])} ({score})"
        if args.top_k > 1 and f["candidates"]:
            line += "  candidates: " + ", ".join(f"{shown(c['identity'])} {c['score']:.4f}" for c in f["candidates"])
        elif f["identity"] == "unknown" and f["candidates"]:
            line += f"  nearest: {shown(f['candidates'][0]['identity'])}"
        print(line)
    return 0

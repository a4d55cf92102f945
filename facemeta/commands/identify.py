"""`facemeta identify GALLERY IMAGE_OR_FOLDER...`: who is each face? Best identity or "unknown", score, box.

One image: its faces (an image without a face is an error). Many images or folders: the model and MTCNN
load once, images are decoded and detected in batches, a progress bar runs on stderr, and each image gets
its lines (with --json, one JSON object per line); an image that cannot be read or holds no face is
reported on its own line and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from facemeta.commands.options import add_runtime_options, runtime_options
from facemeta.commands.text import shown
from facemeta.errors import NoFaceError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `identify` and its options."""
    p = subparsers.add_parser(
        "identify", help="name every face in photos from a gallery",
        description="Detect every face in each IMAGE (files, or folders of images), embed each, and search the "
                    "gallery: each face gets its best identity, or 'unknown' when the score is below the "
                    "threshold (default: the gallery's, taken from the model's calibrated threshold when the "
                    "gallery was created). Many images are identified in one run with the model loaded once "
                    "and images detected in batches; with --json each image is one JSON line. Exit code 1 when "
                    "no image could be identified (for one image: when it holds no face or cannot be read).")
    p.add_argument("gallery", metavar="GALLERY", help="gallery folder")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files or folders of images (not recursive)")
    p.add_argument("--top-k", type=int, default=1, help="candidate identities to list per face (default 1)")
    p.add_argument("--threshold", type=float, help="open-set threshold (cosine); below it a face is 'unknown'")
    p.add_argument("--domain", metavar="NAME",
                   help="the domain the photos come from (`facemeta domain add`): faces are normalised by its "
                        "statistics, and its calibrated threshold is used unless --threshold")
    p.add_argument("--model", help="model checkpoint (.safetensors); default: the model in weights/ or $FACEMETA_MODEL")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--batch-size", type=int, default=16, help="images decoded and detected together (default 16)")
    add_runtime_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print JSON: one object per image, one per line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Exit 0 after printing every face; 1 (one-line error) when no image gave a face or the input is bad."""
    from facemeta.errors import GalleryError
    from facemeta.recognizer import FaceRecognizer, image_files

    paths = image_files(args.images)
    if not paths:
        raise NoFaceError(f"no image files in {', '.join(args.images)}")
    single = len(paths) == 1 and not Path(args.images[0]).is_dir()
    with FaceRecognizer(args.gallery, args.model, device=args.device, **runtime_options(args)) as fr:
        if not fr.exists():
            raise GalleryError(f"no gallery at {args.gallery}; enroll someone first")
        plain = args.domain is None and args.threshold is None and fr.gallery().threshold is None
        threshold, far, source = (None, None, "none") if plain else fr.threshold_for(args.domain, args.threshold)
        results = fr.identify_files(paths, top_k=args.top_k, threshold=threshold, batch_size=args.batch_size,
                                    domain=args.domain)
        used = {"threshold": threshold, "threshold_far": far, "threshold_source": source, "domain": args.domain}
        if single:
            return _one_image(args, paths[0], next(results)[1], used)
        return _many_images(args, results, len(paths), used)


def _one_image(args: argparse.Namespace, path: Path, faces, used: dict) -> int:
    """The answer for one image: its faces, or its error as the command's error."""
    if isinstance(faces, Exception):
        raise faces
    if not faces:
        raise NoFaceError(f"no face found in {path}")
    if args.json:
        print(json.dumps({"image": str(path), "gallery": args.gallery, **used, "faces": faces}))
    else:
        for line in _face_lines(faces, args.top_k):
            print(line)
    return 0


def _many_images(args: argparse.Namespace, results, total: int, used: dict) -> int:
    """Each image's faces (or why it has none) as it is identified; 1 when no image gave a face."""
    from tqdm import tqdm

    identified = 0
    with tqdm(total=total, unit="img", desc="identify", file=sys.stderr,
              disable=args.no_progress or args.json or not sys.stderr.isatty()) as bar:
        for path, faces in results:
            bar.update(1)
            error = str(faces) if isinstance(faces, Exception) else None if faces else f"no face found in {path}"
            identified += error is None
            if args.json:
                record = {"image": str(path), "gallery": args.gallery, **used}
                print(json.dumps(record | ({"error": error} if error else {"faces": faces})), flush=True)
            elif error:
                bar.write(f"{shown(str(path))}: {shown(error)}")
            else:
                bar.write("\n".join(f"{shown(str(path))}: {line}" for line in _face_lines(faces, args.top_k)))
    if not identified:
        print(f"facemeta identify: error: none of the {total} images gave a face to identify", file=sys.stderr)
        return 1
    return 0


def _face_lines(faces: list[dict], top_k: int) -> list[str]:
    """One line per face: its box, identity and score (and candidates or the nearest identity)."""
    lines = []
    for i, f in enumerate(faces, 1):
        box = ",".join(f"{v:.0f}" for v in f["box"])
        score = "-" if f["score"] is None else f"{f['score']:.4f}"
        line = f"face {i} [{box}]: {shown(f['identity'])} ({score})"
        if top_k > 1 and f["candidates"]:
            line += "  candidates: " + ", ".join(f"{shown(c['identity'])} {c['score']:.4f}" for c in f["candidates"])
        elif f["identity"] == "unknown" and f["candidates"]:
            line += f"  nearest: {shown(f['candidates'][0]['identity'])}"
        lines.append(line)
    return lines

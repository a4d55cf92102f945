"""`facemeta enroll GALLERY NAME IMAGES...` (or `--folder DIR` of identity subfolders): add people to a gallery."""

from __future__ import annotations

import argparse
import json
import sys

from facemeta.commands.options import (
    INDEX_CHOICES,
    add_backend_options,
    add_runtime_options,
    backend_options,
    face_policy_choices,
    runtime_options,
)
from facemeta.commands.text import shown
from facemeta.errors import GalleryError, NoFaceError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `enroll` and its options."""
    p = subparsers.add_parser(
        "enroll", help="add people's photos to a face gallery",
        description="Detect, align and embed one face per photo (the largest by default) and store it in the "
                    "gallery under NAME (created on first use with the model's fingerprint and threshold). "
                    "IMAGES may be files or folders of images. With --folder, every subfolder of DIR is one "
                    "person named after it. Each person is one transaction: an interrupted run keeps every "
                    "person it finished, and a rerun skips the photos (same file content) already enrolled "
                    "for that person unless --force.")
    p.add_argument("gallery", metavar="GALLERY", help="gallery folder")
    p.add_argument("name", metavar="NAME", nargs="?", help="the person's name")
    p.add_argument("images", metavar="IMAGES", nargs="*", help="image files or folders of that person")
    p.add_argument("--folder", metavar="DIR", help="a folder of identity subfolders to enroll instead of NAME IMAGES")
    p.add_argument("--model", help="model checkpoint (.safetensors); default: the model in weights/ or $FACEMETA_MODEL")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--select", choices=face_policy_choices(exclude=("all",)), default="subject", metavar="POLICY",
                   help="which face of a photo with several to enroll (%(choices)s; default subject: size, nearness to the centre "
                        "and detector confidence together, as training alignment chooses; a warning when two compete)")
    p.add_argument("--index", choices=INDEX_CHOICES, default="flat", metavar="KIND",
                   help="index of a NEW gallery (%(choices)s; flat = exact; HNSW/IVF for very large galleries)")
    add_backend_options(p)
    add_runtime_options(p)
    p.add_argument("--domain", metavar="NAME",
                   help="the domain the photos come from (`facemeta domain add`): stored raw and normalised by its "
                        "statistics (default: the gallery's default domain, no normalisation)")
    p.add_argument("--force", action="store_true",
                   help="enroll photos again even when the same file content is already enrolled for that person")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Exit 0 when at least one image was enrolled or all were already enrolled; 1 with a one-line
    error otherwise."""
    from facemeta.recognizer import ALREADY_ENROLLED, FaceRecognizer

    if args.folder and (args.name or args.images):
        raise GalleryError("give either NAME IMAGES... or --folder DIR, not both")
    if not args.folder and (not args.name or not args.images):
        raise GalleryError("give NAME and at least one image (or --folder DIR)")
    with FaceRecognizer(args.gallery, args.model, device=args.device, select=args.select, index=args.index,
                        **backend_options(args), **runtime_options(args)) as fr:
        if args.folder:
            result = fr.enroll_folder(args.folder, progress=not args.no_progress and not args.json, force=args.force,
                                      domain=args.domain)
        else:
            result = fr.enroll(args.name, args.images, force=args.force, domain=args.domain)
        info = fr.gallery().info() if fr.exists() else {"identities": 0, "embeddings": 0}
    failed = [(what, why) for what, why in result.skipped if not why.startswith(ALREADY_ENROLLED)]
    for what, why in failed:
        print(f"skipped {shown(what)}: {shown(why)}", file=sys.stderr)
    for what, why in result.warnings:  # enrolled, but two faces competed to be the photo's subject
        print(f"warning: {shown(what)}: {shown(why)}", file=sys.stderr)
    if result.already:
        print(f"skipped {result.already} image(s) already enrolled for the same person (--force adds them again)",
              file=sys.stderr)
    if not result.total and not result.already:
        first = f": {shown(failed[0][0])}: {shown(failed[0][1])}" if failed else ""
        raise NoFaceError(f"nothing was enrolled: no usable face in any image{first}")
    if args.json:
        print(json.dumps({"gallery": args.gallery, "added": result.added, "skipped": result.skipped,
                          "already_enrolled": result.already, "domain": args.domain,
                          "warnings": [{"image": what, "warning": why} for what, why in result.warnings],
                          "identities": info["identities"], "embeddings": info["embeddings"]}))
    elif not result.total:
        print(f"nothing new to enroll into {args.gallery}: {result.already} image(s) already enrolled "
              f"({info['identities']} people, {info['embeddings']} embeddings; {len(failed)} skipped)")
    else:
        people = len(result.added)
        who = shown(next(iter(result.added))) if people == 1 else f"{people} people"
        print(f"enrolled {result.total} image(s) of {who} into {args.gallery} "
              f"({info['identities']} people, {info['embeddings']} embeddings; {len(failed)} skipped, "
              f"{result.already} already enrolled)")
    return 0

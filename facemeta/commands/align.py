"""`facemeta align SRC DST`: detect and align every face image of a folder tree or shared set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from facemeta.commands.options import ALIGN_SELECT_CHOICES
from facemeta.data.sets import SET_NAMES


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `facemeta align`."""
    p = subparsers.add_parser(
        "align", help="align a folder of face images (or a shared set) onto the 112x112 template",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Detect five landmarks with MTCNN in every image under SRC and warp each face onto\n"
                    "the 5-point template (similarity transform), writing PNGs into DST with the same tree.\n\n"
                    "SRC is a folder laid out as identity/image or domain/identity/image, or the name of a\n"
                    "shared set (lfw, yaleb, mfr2, orl) read from --data. Faces that MTCNN misses are retried\n"
                    "on a padded canvas, with contrast equalisation, with relaxed thresholds, and (for sets\n"
                    "declared --pre-cropped; yaleb and orl by default) as a template crop; the route taken is\n"
                    "recorded per image. DST/manifest.csv lists the aligned faces (path, identity, domain,\n"
                    "score, landmarks, route, ...); DST/failures.csv lists the images it could not use\n"
                    "(unreadable, no face, several faces). Running again skips finished images.",
        epilog="examples:\n  facemeta align photos/ aligned/\n  facemeta align yaleb aligned/yaleb --workers 2\n"
               "  facemeta align lfw aligned/lfw --data /data/faces --size 160 --json")
    p.add_argument("src", metavar="SRC", help="folder of images, or a shared set name: " + ", ".join(SET_NAMES))
    p.add_argument("dst", metavar="DST", help="output folder (created; reused to resume)")
    p.add_argument("--data", metavar="DIR", help="face data folder for set names (default $FACEMETA_DATA or ../shared/data)")
    p.add_argument("--size", type=int, default=112, help="side of the aligned square in pixels (default 112)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2; 1 = in this process)")
    p.add_argument("--select", choices=ALIGN_SELECT_CHOICES, default="subject", metavar="POLICY",
                   help="which face of a photo to keep (%(choices)s): the subject (default: size, nearness to the "
                        "centre and detector confidence together; the choice verify, enroll and identify make too), "
                        "the largest, the most confident, or 'single': fail with 'several faces' when there is more "
                        "than one")
    p.add_argument("--pre-cropped", action="store_true",
                   help="images are face crops: allow the template-crop fallback (default for yaleb and orl)")
    p.add_argument("--layout", choices=("auto", "identity", "domain"), default="auto",
                   help="folder layout of SRC (default: auto)")
    p.add_argument("--retry-failures", action="store_true", help="try again the images that failed before")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Read SRC, align into DST, print the counts."""
    from facemeta.align.pipeline import align_rows
    from facemeta.data.sets import PRE_CROPPED_SETS
    from facemeta.errors import FacemetaError

    src = Path(args.src)
    pre_cropped = bool(args.pre_cropped)
    if src.is_dir():
        from facemeta.data.folder import image_folder

        rows = image_folder(src, layout=args.layout)
    elif args.src in SET_NAMES:
        from facemeta.data.sets import read_set
        from facemeta.paths import DataNotFoundError

        try:
            rows = read_set(args.src, args.data)
        except DataNotFoundError as exc:
            raise FacemetaError(str(exc)) from None
        pre_cropped = pre_cropped or args.src in PRE_CROPPED_SETS
    else:
        raise FacemetaError(f"{args.src}: not a folder nor a shared set name ({', '.join(SET_NAMES)})")
    if not rows:
        raise FacemetaError(f"{args.src}: no images found")
    if args.size < 16:
        raise FacemetaError(f"--size must be at least 16, not {args.size}")
    if args.workers < 1:
        raise FacemetaError(f"--workers must be at least 1, not {args.workers}")
    dst = Path(args.dst)
    stats: dict = {}
    align_rows(rows, dst, size=args.size, workers=args.workers, pre_cropped=pre_cropped,
               progress=not args.no_progress and not args.json, select=args.select,
               retry_failures=args.retry_failures, stats=stats)
    summary = {"src": str(args.src), "dst": str(dst), "size": args.size, "pre_cropped": pre_cropped, **stats,
               "manifest": str(dst / "manifest.csv"), "failures_csv": str(dst / "failures.csv")}
    status = 0 if stats["aligned"] else 1  # a job that aligned nothing failed, whatever it reports
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(stats, dst)
    if status:
        print(f"facemeta align: error: none of the {stats['images']} images gave an aligned face "
              f"(reasons in {dst / 'failures.csv'})", file=sys.stderr)
    return status


def _print_summary(stats: dict, dst: Path) -> None:
    """The human-readable end of a run: counts, routes, failure reasons, where the manifest is."""
    print(f"aligned {stats['aligned']} of {stats['images']} images into {dst}"
          + (f" ({stats['skipped']} already done, skipped)" if stats["skipped"] else ""))
    if stats["routes"]:
        print("routes: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["routes"].items(), key=lambda kv: -kv[1])))
    if stats["failed"]:
        print(f"failed {stats['failed']}: " + ", ".join(f"{k} {v}" for k, v in stats["reasons"].items())
              + f" (see {dst / 'failures.csv'})")
    print(f"manifest: {dst / 'manifest.csv'}")

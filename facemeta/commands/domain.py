"""`facemeta domain add|list|remove|export|calibrate`: named domains of a gallery (where photos come from: a door
camera, a sketch artist, a scanner), with statistics of the model's embeddings estimated from unlabelled photos
of any people of it. A photo given ``--domain NAME`` (enroll, identify, verify) is normalised by its domain's
statistics before it is compared; photos without one use the default domain (no normalisation)."""

from __future__ import annotations

import argparse
import json
import sys

from facemeta.commands.options import (
    DOMAIN_STAT_CHOICES,
    INDEX_CHOICES,
    add_backend_options,
    add_runtime_options,
    backend_options,
    face_policy_choices,
    runtime_options,
)
from facemeta.commands.text import shown
from facemeta.errors import GalleryError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model checkpoint (.safetensors); default: the model in weights/ or $FACEMETA_MODEL")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--select", choices=face_policy_choices(exclude=("all",)), default="subject", metavar="POLICY",
                   help="which face of a photo with several to use (%(choices)s; default subject: size, nearness to the centre and "
                        "detector confidence together, as training alignment chooses; a warning when two compete)")
    add_runtime_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `domain` and its subcommands."""
    p = subparsers.add_parser(
        "domain", help="named domains of a gallery: statistics from unlabelled photos, for matching across domains",
        description="A domain is where photos come from (photo, sketch, door-2, thermal...). Its statistics (the "
                    "mean of the model's embeddings) are estimated from unlabelled photos of ANY people of it, and "
                    "every face given that domain (enroll/identify --domain, verify --domain-a/--domain-b) is "
                    "normalised by them before it is compared. The default statistic, offset, moves a domain "
                    "towards the photos the model was trained on (its source statistics, checkpoint meta "
                    "domain_reference): v' = (v - s * (mean - source mean)) / |...|, with s in 0..0.5 larger the "
                    "further the domain lies from the source (an ordinary photo domain gets 0 and stays as the "
                    "model embeds it). A model without source statistics uses the plain mean: "
                    "v' = (v - mean) / |...|. Photos without a domain use the default domain (compared as the "
                    "model embeds them).")
    sub = p.add_subparsers(dest="domain_command", metavar="SUBCOMMAND", required=True)

    a = sub.add_parser("add", help="count unlabelled photos into a domain (created if new)",
                       description="Embed one face per photo and (re-)estimate the domain's statistics from every "
                                   "photo behind it. More photos refine the estimate; a photo already counted (same "
                                   "file content) is skipped; unusable photos are reported and skipped. People "
                                   "enrolled under the domain are normalised again without reading any image. The "
                                   "gallery is created when the folder is new or empty, as enroll does. One "
                                   "transaction: an interrupted add changes nothing.")
    a.add_argument("gallery", metavar="GALLERY", help="gallery folder")
    a.add_argument("name", metavar="NAME", help="domain name (checked as person names are)")
    a.add_argument("images", metavar="IMAGES", nargs="*", help="image files or folders of the domain (any people)")
    a.add_argument("--folder", metavar="DIR", help="a folder of the domain's images (instead of IMAGES)")
    a.add_argument("--kind", choices=DOMAIN_STAT_CHOICES, metavar="KIND",
                   help="statistic of a new domain (%(choices)s; default offset when the model has source "
                        "statistics, else mean; an existing domain keeps its own)")
    a.add_argument("--index", choices=INDEX_CHOICES, default="flat", metavar="KIND",
                   help="index of a NEW gallery (%(choices)s)")
    add_backend_options(a)
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(a)
    a.set_defaults(func=run_add)

    ls = sub.add_parser("list", help="the domains of a gallery: photos behind each and how stable its estimate is",
                        description="Each domain: photos behind its statistics, people's embeddings enrolled under "
                                    "it, the statistic, its stability (relative standard error of the mean: under "
                                    "0.1 stable, under 0.25 fair, else rough) and its calibrated threshold.")
    ls.add_argument("gallery", metavar="GALLERY", help="gallery folder")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.set_defaults(func=run_list)

    rm = sub.add_parser("remove", help="remove a domain and its photos",
                        description="Remove a domain. Refused while people are enrolled under it unless --force, "
                                    "which keeps them in the default domain (their raw vectors, no normalisation).")
    rm.add_argument("gallery", metavar="GALLERY", help="gallery folder")
    rm.add_argument("name", metavar="NAME", help="domain name")
    rm.add_argument("--force", action="store_true", help="remove it even with people enrolled under it")
    rm.add_argument("--json", action="store_true", help="print one JSON object")
    rm.set_defaults(func=run_remove)

    ex = sub.add_parser("export", help="write a domain's statistics to a small file (for verify --domains)",
                        description="Write a domain's statistics (and calibrated threshold) as a small JSON file "
                                    "that `facemeta verify A B --domains FILE --domain-a NAME ...` and the Python "
                                    "API (facemeta.recognizer.load_domain_file) read without a gallery.")
    ex.add_argument("gallery", metavar="GALLERY", help="gallery folder")
    ex.add_argument("name", metavar="NAME", help="domain name")
    ex.add_argument("out", metavar="OUT", help="file to write (e.g. scarf.domain.json)")
    ex.add_argument("--json", action="store_true", help="print one JSON object")
    ex.set_defaults(func=run_export)

    c = sub.add_parser("calibrate", help="set a domain's threshold at a stated FAR from photos of different people",
                       description="Embed one photo each of DIFFERENT people of the domain, normalise them by its "
                                   "statistics, and set the domain's threshold so that at most --far of their "
                                   "impostor pairs score at or above it. identify/verify use it for photos of "
                                   "that domain. Adding photos to the domain later clears it (new statistics).")
    c.add_argument("gallery", metavar="GALLERY", help="gallery folder")
    c.add_argument("name", metavar="NAME", help="domain name")
    c.add_argument("--distinct", metavar="DIR", required=True,
                   help="folder of photos of different people, one each (files or identity subfolders: the "
                        "first image of each)")
    c.add_argument("--far", type=float, default=1e-2, help="false-accept rate the threshold is set at (default 0.01)")
    _common(c)
    c.set_defaults(func=run_calibrate)


def _recognizer(args: argparse.Namespace, new_gallery: bool = False):
    from facemeta.recognizer import FaceRecognizer

    extra = {"index": args.index, **backend_options(args)} if new_gallery else {}
    return FaceRecognizer(args.gallery, args.model, device=args.device, select=args.select,
                          **runtime_options(args), **extra)


def _domain_json(d) -> dict:
    return d.to_dict()


def run_add(args: argparse.Namespace) -> int:
    """Exit 0 when photos were added (or all were counted already); 1 with a one-line error otherwise."""
    from pathlib import Path

    from facemeta.recognizer import image_files

    if bool(args.folder) == bool(args.images):
        raise GalleryError("give IMAGES... or --folder DIR (one of them)")
    if args.folder and not Path(args.folder).is_dir():
        raise GalleryError(f"{args.folder} is not a folder")
    paths = image_files([args.folder] if args.folder else args.images)
    if not paths:
        raise GalleryError(f"no image files in {args.folder or ', '.join(args.images)}")
    from tqdm import tqdm

    with tqdm(total=len(paths), unit="img", desc=f"domain {args.name}", file=sys.stderr,
              disable=args.no_progress or args.json or not sys.stderr.isatty()) as bar, \
            _recognizer(args, new_gallery=True) as fr:
        result = fr.add_domain(args.name, paths, kind=args.kind, on_image=lambda _p: bar.update(1))
    for what, why in result.skipped:
        print(f"skipped {shown(what)}: {shown(why)}", file=sys.stderr)
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr)
    d = result.domain
    if args.json:
        print(json.dumps({"gallery": args.gallery, "domain": _domain_json(d), "added": result.added,
                          "already_counted": result.already, "skipped": result.skipped, "warning": result.warning}))
    else:
        print(f"domain {shown(d.name)}: {result.added} photo(s) added, {result.already} already counted, "
              f"{len(result.skipped)} skipped; {d.photos} photo(s) in all, estimate {d.stability_word}"
              + (f" ({d.stability:.3f})" if d.stability is not None else "")
              + (f"; {d.enrolled} enrolled embedding(s) re-normalised" if d.enrolled else ""))
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Exit 0 after listing the domains (none is not an error)."""
    from facemeta.gallery import Gallery
    from facemeta.gallery.domains import DEFAULT_DESCRIPTION, list_domains

    with Gallery.open(args.gallery, load_index=False) as g:
        found = list_domains(g)
    if args.json:
        print(json.dumps({"gallery": args.gallery, "default": DEFAULT_DESCRIPTION,
                          "domains": [_domain_json(d) for d in found]}))
        return 0
    print(f"{len(found)} domain(s) in {args.gallery}; photos without one: {DEFAULT_DESCRIPTION}")
    plain = [d.name for d in found if d.stats.kind != "offset"]
    if plain:
        print(f"note: not the offset rule in {', '.join(shown(n) for n in plain)} (the model had no source "
              "statistics, meta domain_reference, or --kind chose another): the domain's whole mean is removed, "
              "which loses on domains close to the model's photos (benchmarks/results/cross_domain)")
    for d in found:
        stab = "unknown (1 photo)" if d.stability is None else f"{d.stability_word} ({d.stability:.3f})"
        thr = f"threshold {d.threshold:.4f} at FAR {d.far:g}" if d.threshold is not None else "not calibrated"
        print(f"  {shown(d.name)}: {d.photos} photo(s), {d.enrolled} enrolled embedding(s), {d.stats.kind} "
              f"(strength {d.stats.strength:g}), estimate {stab}, {thr}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    """Exit 0 after removing the domain."""
    from facemeta.gallery import Gallery
    from facemeta.gallery.domains import remove_domain

    with Gallery.open(args.gallery, mode="w") as g:
        moved = remove_domain(g, args.name, force=args.force)
    if args.json:
        print(json.dumps({"gallery": args.gallery, "removed": args.name, "moved_to_default": moved}))
    else:
        print(f"removed domain {shown(args.name)}" + (f"; {moved} embedding(s) now in the default domain" if moved else ""))
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Exit 0 after writing the statistics file."""
    from facemeta.gallery import Gallery
    from facemeta.gallery.domain_files import write_domain_file

    with Gallery.open(args.gallery, load_index=False) as g:
        out = write_domain_file(g, args.name, args.out)
    if args.json:
        print(json.dumps({"gallery": args.gallery, "domain": args.name, "out": str(out)}))
    else:
        print(f"wrote domain {shown(args.name)} to {out}")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    """Exit 0 after storing the domain's threshold."""
    from pathlib import Path

    from facemeta.recognizer import image_files

    root = Path(args.distinct)
    if not root.is_dir():
        raise GalleryError(f"{root} is not a folder")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    paths = [f[0] for f in (image_files([d]) for d in subdirs) if f] if subdirs else image_files([root])
    with _recognizer(args) as fr:
        d, skipped = fr.calibrate_domain(args.name, paths, far=args.far)
    for what, why in skipped:
        print(f"skipped {shown(what)}: {shown(why)}", file=sys.stderr)
    few = d.calibration_pairs * d.far < 1
    if few:
        print(f"warning: {d.calibration_pairs} impostor pairs cannot resolve FAR {d.far:g}: the threshold is the "
              "highest impostor score; give photos of more people", file=sys.stderr)
    if args.json:
        print(json.dumps({"gallery": args.gallery, "domain": _domain_json(d), "skipped": skipped}))
    else:
        print(f"domain {shown(d.name)}: threshold {d.threshold:.4f} at FAR {d.far:g} "
              f"({d.calibration_pairs} impostor pairs of {d.calibration_pairs and len(paths) - len(skipped)} people)")
    return 0

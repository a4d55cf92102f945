"""`facemeta gallery export GALLERY OUT` and `facemeta gallery import IN GALLERY`: a gallery as one portable,
versioned, checksummed file (facemeta.gallery.portable), for backups and for moving a gallery between
backends or machines."""

from __future__ import annotations

import argparse
import json
import sys

from facemeta.commands.options import BACKEND_CHOICES
from facemeta.commands.text import shown

BAR_FROM = 10000  # embeddings from which a progress bar is shown (on a terminal, without --json)


def add_actions(actions: argparse._SubParsersAction) -> None:
    """Register the `export` and `import` actions of `facemeta gallery`."""
    a = actions.add_parser("export", help="write the whole gallery into one checksummed file (a backup)",
                           description="Write every person and embedding of GALLERY, with its model, settings "
                                       "and provenance, into the file OUT (written atomically).")
    a.add_argument("gallery", metavar="GALLERY")
    a.add_argument("out", metavar="OUT")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("import", help="read an export file into a new gallery or one of the same model",
                           description="Check the export file IN whole, then import it: into a new gallery "
                                       "(a missing or empty folder) with the file's settings, or into an "
                                       "existing gallery of the same model, skipping photos it already has.")
    a.add_argument("file", metavar="IN")
    a.add_argument("gallery", metavar="GALLERY")
    a.add_argument("--any-model", action="store_true",
                   help="import embeddings made by another model than the gallery's (they are then compared "
                        "as if they were its own: only for the same model under another fingerprint)")
    a.add_argument("--backend", choices=BACKEND_CHOICES, metavar="BACKEND",
                   help="backend of a new gallery (%(choices)s)")
    a.add_argument("--milvus-uri", metavar="URI", help="Milvus server or file of a new milvus gallery")
    a.add_argument("--json", action="store_true")


class _Bar:
    """A tqdm bar on stderr, made on the first report once the total is known (none for small jobs)."""

    def __init__(self, desc: str, enabled: bool) -> None:
        self.desc, self.enabled, self.bar = desc, enabled, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="emb", desc=self.desc, file=sys.stderr,
                            disable=not self.enabled or total < BAR_FROM)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    """Exit 0 on success; 1 with a one-line error (no gallery, a damaged or foreign file, another model)."""
    from facemeta.gallery import Gallery
    from facemeta.gallery.portable import export_gallery, import_gallery

    bar = _Bar(args.action, not args.json and sys.stderr.isatty())
    try:
        if args.action == "export":
            with Gallery.open(args.gallery, load_index=False) as g:
                result = export_gallery(g, args.out, progress=bar)
        else:
            options = {k: v for k, v in (("backend", args.backend), ("milvus_uri", args.milvus_uri)) if v}
            result = import_gallery(args.file, args.gallery, fingerprint_override=args.any_model,
                                    create_kwargs=options or None, progress=bar)
    finally:
        bar.close()
    if args.json:
        print(json.dumps(result))
    elif args.action == "export":
        print(f"exported {result['people']} people, {result['embeddings']} embeddings to {shown(args.out)} "
              f"({result['bytes']} bytes, sha256 {result['sha256']})")
    else:
        what = "new gallery" if result["new"] else f"skipped {result['skipped']} already there"
        print(f"imported {result['embeddings']} embeddings of {result['people']} people into "
              f"{shown(args.gallery)} ({what}; it holds {result['total']} embeddings)")
    return 0

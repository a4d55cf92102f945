"""`facemeta gallery list|info|remove|rename|repair|export|import`: look after a face gallery (no model needed)."""

from __future__ import annotations

import argparse
import json
import time

from facemeta.commands import gallery_transfer
from facemeta.commands.text import shown


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `gallery` and its actions."""
    p = subparsers.add_parser("gallery", help="list, inspect, rename, remove people in a face gallery; export and import it",
                              description="Manage a gallery folder made by `facemeta enroll`.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("list", help="people and their number of photos")
    a.add_argument("gallery", metavar="GALLERY")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("info", help="size, model fingerprint, index and its status, threshold; --check verifies everything")
    a.add_argument("gallery", metavar="GALLERY")
    a.add_argument("--check", action="store_true",
                   help="also run SQLite's integrity check, recompute the embeddings digest, and compare the "
                        "index's ids and vectors with the database")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("remove", help="remove a person and all their photos")
    a.add_argument("gallery", metavar="GALLERY")
    a.add_argument("name", metavar="NAME")
    a = actions.add_parser("rename", help="rename a person")
    a.add_argument("gallery", metavar="GALLERY")
    a.add_argument("name", metavar="NAME")
    a.add_argument("new", metavar="NEW")
    a = actions.add_parser("repair", help="rebuild the index from the database, always (keeps the old file aside)")
    a.add_argument("gallery", metavar="GALLERY")
    gallery_transfer.add_actions(actions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Exit 0 on success; 1 with a one-line error (no gallery, unknown name, damaged files, locked).
    list and info read the database only, so they work when the index file is damaged."""
    from facemeta.gallery import Gallery
    from facemeta.gallery.domains import list_domains

    if args.action in ("export", "import"):
        return gallery_transfer.run(args)
    if args.action == "list":
        with Gallery.open(args.gallery, load_index=False) as g:
            people = g.identities()
        if args.json:
            print(json.dumps([{"name": p.name, "images": p.count, "created": p.created} for p in people]))
        else:
            for p in people:
                print(f"{shown(p.name)}\t{p.count}")
            print(f"{len(people)} people, {sum(p.count for p in people)} embeddings")
    elif args.action == "info":
        with Gallery.open(args.gallery, load_index=False) as g:
            info = g.info()
            info["domains"] = [d.to_dict() for d in list_domains(g)]
            if args.check:
                info["check"] = g.check()
                info["index_status"] = g.index_status()
        if args.json:
            print(json.dumps(info))
        else:
            info["created"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["created"]))
            info["domains"] = "; ".join(f"{d['name']}: {d['photos']} photos, " + (
                f"threshold {d['threshold']:.4f} at FAR {d['far']:g}" if d["threshold"] is not None
                else "threshold not calibrated (the gallery's is used)") for d in info["domains"]) or "none"
            for k, v in info.items():
                print(f"{k}: {v}")
        if args.check and (info["check"]["database"] != "ok" or not info["check"]["index_matches_database"]):
            return 1
    elif args.action == "remove":
        with Gallery.open(args.gallery, mode="w") as g:
            n = g.remove(args.name)
        print(f"removed {shown(args.name.strip())} ({n} embeddings)")
    elif args.action == "rename":
        with Gallery.open(args.gallery, mode="w") as g:
            g.rename(args.name, args.new)
        print(f"renamed {shown(args.name.strip())} to {shown(args.new.strip())}")
    elif args.action == "repair":
        with Gallery.open(args.gallery, mode="w", repair=True) as g:
            ok = g.check()
            done = g.repaired
        print(f"index rebuilt from the database: {ok['embeddings']} embeddings, database {ok['database']}")
        if done:
            why = f" ({done['problem']})" if done["problem"] else ""
            print(f"the previous index{why} is kept as {done['aside']}")
            if done["digest_fixed"]:
                print("the recorded embeddings digest did not match the stored embeddings and was recomputed")
    return 0

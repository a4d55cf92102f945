"""The `facemeta` command line: a thin dispatcher over facemeta.commands.<name>.

Every subcommand module defines ``add_parser(subparsers)`` (which sets ``func=run`` on its
parser) and ``run(args) -> int``. Heavy imports (torch, MTCNN) happen inside ``run`` so that
``--help`` stays fast. Errors from bad input print one line on stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import sys

from facemeta.errors import FacemetaError
from facemeta.version import __version__

# Order of the subcommands in `facemeta --help`.
COMMANDS = [
    "detect", "align", "train", "eval", "verify", "benchmark",
    "enroll", "identify", "gallery", "domain", "serve", "export", "adapt",
]

EXIT_ERROR = 1


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser with every available subcommand (or with `only` that one: a command's run
    then imports no other command's options, some of which load heavy modules to list their choices)."""
    parser = argparse.ArgumentParser(
        prog="facemeta",
        description="Face recognition that keeps working in unseen domains: align faces with MTCNN, "
                    "meta-train timm backbones (MFR, CDT, MAML, Reptile), benchmark on unseen domains, "
                    "and verify or identify faces with a FAISS gallery.",
    )
    parser.add_argument("--version", action="version", version=f"facemeta {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in [only] if only in COMMANDS else COMMANDS:
        module_name = f"facemeta.commands.{name.replace('-', '_')}"
        if importlib.util.find_spec(module_name) is None:
            continue
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FacemetaError as exc:
        print(f"facemeta {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # a full or read-only disk: one line, not a traceback
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        what = "disk full" if exc.errno != errno.EROFS else "read-only file system"
        print(f"facemeta {args.command}: error: {what}: {exc.filename or exc.strerror}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"facemeta {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

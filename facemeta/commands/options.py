"""Options several commands share: which runtime embeds the faces (torch or ONNX Runtime), which search
backend a new gallery gets, the names of the shipped presets their help lists, and choices read from the
registries where things are defined (:class:`RegistryChoices`)."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator

from facemeta.errors import CheckpointError, GalleryError


class RegistryChoices:
    """argparse ``choices`` read from a registry (facemeta.registry.Registry, or any sequence of names) named
    by module and attribute, imported only when a value is checked or the help is shown, so building the
    parser imports no torch, FAISS or detector. Give the argument a ``metavar`` (argparse would otherwise list
    the choices, and import the module, while the parser is built) and ``%(choices)s`` in its help.

    `exclude`: names of the registry this option does not accept (say why where it is used)."""

    def __init__(self, module: str, attr: str, exclude: tuple[str, ...] = ()):
        self.module, self.attr, self.exclude = module, attr, exclude

    def registry(self) -> object:
        """The registry itself (`attr` may name fallbacks: ``"A|B"`` is A, else B)."""
        module = importlib.import_module(self.module)
        for attr in self.attr.split("|"):
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"{self.module} has none of {self.attr}")

    def names(self) -> tuple[str, ...]:
        """The registry's names, less `exclude`."""
        registry = self.registry()
        names = registry.names() if hasattr(registry, "names") else tuple(registry)
        return tuple(n for n in names if n not in self.exclude)

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"RegistryChoices({self.module}.{self.attr})"


# The registries the commands' choices come from (tests/test_registries.py checks every choice list against them).
BACKEND_CHOICES = RegistryChoices("facemeta.gallery.backends", "BACKENDS")
INDEX_CHOICES = RegistryChoices("facemeta.gallery.faiss_index", "KINDS")
DOMAIN_STAT_CHOICES = RegistryChoices("facemeta.gallery.domain_stats", "KINDS")  # a domain's statistic
METHOD_CHOICES = RegistryChoices("facemeta.train.methods", "METHODS")
LODO_CHOICES = RegistryChoices("facemeta.train.config", "LODO_TARGETS")
SET_CHOICES = RegistryChoices("facemeta.data.sets", "SETS")
RUNTIME_CHOICES = RegistryChoices("facemeta.embedder", "RUNTIMES")  # numpy only: no torch to check --runtime onnx
# `facemeta align --select`: the alignment pipeline's choices (the face policies, and 'single': fail on several faces)
ALIGN_SELECT_CHOICES = RegistryChoices("facemeta.align.pipeline", "SELECT")


def face_policy_choices(exclude: tuple[str, ...] = ()) -> RegistryChoices:
    """``--select`` choices: the face-selection policies of facemeta.align.detect (its FACE_POLICIES registry,
    or its POLICIES names where there is none), less `exclude`."""
    return RegistryChoices("facemeta.align.detect", "FACE_POLICIES|POLICIES", exclude)


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
    p.add_argument("--runtime", choices=RUNTIME_CHOICES, default="torch", metavar="RUNTIME",
                   help="what runs the networks (%(choices)s): torch, or ONNX Runtime on the CPU (needs pip "
                        "install 'facemeta[onnx]'; the embedding network and MTCNN's three are exported into the "
                        "cache once, with torch; later runs load no torch)")
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
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="faiss", metavar="BACKEND",
                   help="search backend of a NEW gallery (%(choices)s): faiss (an index file in the folder, the "
                        "default) or milvus (needs pip install 'facemeta[milvus]'); an existing gallery keeps its "
                        "own")
    p.add_argument("--milvus-uri", metavar="URI",
                   help="with --backend milvus: a Milvus server (http://host:19530; its token from "
                        "$FACEMETA_MILVUS_TOKEN) or a Milvus Lite file ending in .db (default: milvus.db in "
                        "the gallery folder)")


def backend_options(args: argparse.Namespace) -> dict:
    """The FaceRecognizer / Gallery.create keywords of --backend and --milvus-uri (checked together)."""
    if args.milvus_uri and args.backend != "milvus":
        raise GalleryError("--milvus-uri needs --backend milvus")
    return {"backend": args.backend, "milvus_uri": args.milvus_uri}

"""facemeta: face recognition trained to work in domains it never saw.

The Python API: ``FaceRecognizer`` (a gallery: enroll, identify, verify, list, rename, remove) and
``FaceEmbedder`` (image file -> detected, aligned face -> unit vector; verify two photos). Both load lazily,
so ``import facemeta`` imports neither torch nor FAISS.
"""

from facemeta.version import __version__

__all__ = ["FaceEmbedder", "FaceRecognizer", "__version__"]


def __getattr__(name: str):
    """Lazy top-level API: `facemeta.FaceRecognizer`, `facemeta.FaceEmbedder`."""
    if name == "FaceRecognizer":
        from facemeta.recognizer import FaceRecognizer

        return FaceRecognizer
    if name == "FaceEmbedder":
        from facemeta.embedder import FaceEmbedder

        return FaceEmbedder
    raise AttributeError(f"module 'facemeta' has no attribute {name!r}")

"""facemeta: face recognition trained to work in domains it never saw."""

__version__ = "0.1.0"

__all__ = ["FaceRecognizer", "__version__"]


def __getattr__(name: str):
    """Lazy top-level API: `facemeta.FaceRecognizer` without importing torch or FAISS at `import facemeta`."""
    if name == "FaceRecognizer":
        from facemeta.recognizer import FaceRecognizer

        return FaceRecognizer
    raise AttributeError(f"module 'facemeta' has no attribute {name!r}")

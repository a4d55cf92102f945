"""facemeta.gallery: an on-disk face gallery (FAISS index + SQLite records). Vectors in, identities out.

    from facemeta.gallery import Gallery
    with Gallery.create("people", dim=512, fingerprint=model_fp) as g:
        g.enroll("ada", vectors, fingerprint=model_fp, sources=paths)
    with Gallery.open("people") as g:          # read-only; mode="w" for the single writer
        g.identify(query_vectors)              # -> [Match(name, score, ...)] or "unknown"

It imports nothing of facemeta beyond errors and atomic writes.
"""

from facemeta.gallery.search import KINDS, SCORINGS, IndexSpec
from facemeta.gallery.store import UNKNOWN, Gallery, Identity, Match, Record, check_name

__all__ = ["Gallery", "Identity", "IndexSpec", "KINDS", "Match", "Record", "SCORINGS", "UNKNOWN", "check_name"]

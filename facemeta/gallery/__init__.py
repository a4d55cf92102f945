"""facemeta.gallery: an on-disk face gallery (FAISS index + SQLite records). Vectors in, identities out.

    from facemeta.gallery import Gallery
    with Gallery.create("people", dim=512, fingerprint=model_fp) as g:
        g.enroll("ada", vectors, fingerprint=model_fp, sources=paths)
    with Gallery.open("people") as g:          # read-only; mode="w" for the single writer
        g.identify(query_vectors)              # -> [Match(name, score, ...)] or "unknown"

It imports nothing of facemeta beyond errors and atomic writes. The modules, from the bottom up:
files (plain files only), lock (the one writer), validate (names, embeddings, thresholds), schema
(the SQLite file), records (reading and changing it), faiss_index (index kinds, build, search),
index_file (the stamped index file and its binding), ranking (hits to identities), index_cache (the
index kept as the cache of the records), store (the Gallery that joins them).
"""

from facemeta.gallery.faiss_index import KINDS, IndexSpec
from facemeta.gallery.ranking import SCORINGS, Match
from facemeta.gallery.records import Identity, Record
from facemeta.gallery.store import Gallery
from facemeta.gallery.validate import UNKNOWN, check_name

__all__ = ["Gallery", "Identity", "IndexSpec", "KINDS", "Match", "Record", "SCORINGS", "UNKNOWN", "check_name"]

"""facemeta.gallery: enroll / search / remove / rename on synthetic identity clusters, every index kind."""

from __future__ import annotations

import numpy as np
import pytest

from facemeta.errors import GalleryError
from facemeta.gallery import UNKNOWN, Gallery, IndexSpec

DIM = 64
FP = "model-a"


def clusters(n_ids: int, per_id: int, seed: int = 0, noise: float = 0.6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Identity centres on the unit sphere plus noisy samples: (centres, samples [n_ids*per_id], labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_ids), per_id)
    x = centres[labels] + noise * rng.standard_normal((len(labels), DIM)).astype(np.float32) / np.sqrt(DIM)
    return centres, x / np.linalg.norm(x, axis=1, keepdims=True), labels


def fresh_queries(centres: np.ndarray, seed: int, noise: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = centres + noise * rng.standard_normal(centres.shape).astype(np.float32) / np.sqrt(DIM)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def gallery(tmp_path):
    centres, x, labels = clusters(60, 3)
    g = Gallery.create(tmp_path / "g", dim=DIM, fingerprint=FP)
    g.enroll_many([f"id{i}" for i in labels], x, fingerprint=FP, sources=[f"img{j}.png" for j in range(len(x))],
                  scores=[0.99] * len(x))
    yield g, centres
    g.close()


def test_identify_clusters_and_topk_over_identities(gallery):
    g, centres = gallery
    assert len(g) == 180 and len(g.identities()) == 60
    got = g.identify(fresh_queries(centres, 1), fingerprint=FP)
    assert [m.name for m in got] == [f"id{i}" for i in range(60)]
    top = g.search(fresh_queries(centres[:3], 2), k=5)
    for matches in top:
        names = [m.name for m in matches]
        assert len(names) == 5 and len(set(names)) == 5  # identities, not images
        scores = [m.score for m in matches]
        assert scores == sorted(scores, reverse=True)
    # Asking for more identities than exist returns them all, once each.
    everything = g.search(centres[0], k=500)[0]
    assert sorted(m.name for m in everything) == sorted(f"id{i}" for i in range(60))


def test_best_vs_mean_scoring(tmp_path):
    e = np.eye(DIM, dtype=np.float32)
    q = e[0]
    a_close = e[0] * 0.95 + e[1] * np.sqrt(1 - 0.95**2)  # cos 0.95 to q
    a_far = -e[0] * 0.5 + e[2] * np.sqrt(1 - 0.25)  # cos -0.5
    b1 = e[0] * 0.8 + e[3] * 0.6  # cos 0.8
    b2 = e[0] * 0.8 + e[4] * 0.6
    with Gallery.create(tmp_path / "g", dim=DIM, fingerprint=FP) as g:
        g.enroll("alice", np.stack([a_close, a_far]), fingerprint=FP)
        g.enroll("bob", np.stack([b1, b2]), fingerprint=FP)
        best = g.search(q, k=2, scoring="best")[0]
        mean = g.search(q, k=2, scoring="mean")[0]
    assert [m.name for m in best] == ["alice", "bob"] and best[0].score == pytest.approx(0.95, abs=1e-5)
    assert [m.name for m in mean] == ["bob", "alice"]
    assert mean[0].score == pytest.approx(0.8, abs=1e-5) and mean[1].score == pytest.approx(0.225, abs=1e-5)


def test_threshold_unknown_and_stored_default(gallery, tmp_path):
    g, centres = gallery
    rng = np.random.default_rng(5)
    stranger = rng.standard_normal(DIM).astype(np.float32)
    known = fresh_queries(centres[:1], 9)[0]
    m_known, m_stranger = g.identify(np.stack([known, stranger]), threshold=0.5)
    assert m_known.name == "id0" and m_known.known and m_known.score > 0.5
    assert m_stranger.name == UNKNOWN and not m_stranger.known and m_stranger.nearest and m_stranger.score < 0.5
    # The top-k list keeps below-threshold candidates, flagged.
    assert all(not m.known for m in g.search(stranger, k=3, threshold=0.5)[0])
    g.set_defaults(threshold=0.5, scoring="mean")
    g.close()
    with Gallery.open(g.path) as r:
        assert r.threshold == 0.5 and r.scoring == "mean"
        assert r.identify(stranger)[0].name == UNKNOWN
    with Gallery.create(tmp_path / "empty", dim=DIM, fingerprint=FP) as e:
        assert e.identify(known)[0].name == UNKNOWN and e.search(known, k=3) == [[]]


def test_remove_rename_records_persist(gallery):
    g, centres = gallery
    q = fresh_queries(centres, 3)
    assert g.remove("id0") == 3
    g.rename("id1", "Ada Lovelace")
    with pytest.raises(GalleryError, match="already exists"):
        g.rename("id2", "Ada Lovelace")
    with pytest.raises(GalleryError, match="no identity"):
        g.remove("id0")
    recs = g.records("id2")
    assert [r.source for r in recs] == ["img6.png", "img7.png", "img8.png"]
    assert recs[0].fingerprint == FP and recs[0].score == pytest.approx(0.99) and recs[0].identity == "id2"
    g.close()
    with Gallery.open(g.path) as r:
        assert len(r) == 177 and "id0" not in {i.name for i in r.identities()}
        names = [m.name for m in r.identify(q)]
        assert names[0] != "id0" and names[1] == "Ada Lovelace" and names[2:] == [f"id{i}" for i in range(2, 60)]
        assert r.check() == {"database": "ok", "index_matches_database": True, "embeddings": 177, "index_count": 177}
        v = r.vectors("id3")
        assert v.shape == (3, DIM) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
        with pytest.raises(GalleryError, match="read-only"):
            r.enroll("x", v[0], fingerprint=FP)


def test_bad_input_is_refused(gallery, tmp_path):
    g, centres = gallery
    v = centres[0]
    for call, pattern in [
        (lambda: g.enroll("x", v, fingerprint="model-b"), "model"),
        (lambda: g.search(v, fingerprint="model-b"), "model"),
        (lambda: g.enroll("x", np.ones(DIM + 1), fingerprint=FP), "do not fit"),
        (lambda: g.search(np.ones((2, 32))), "do not fit"),
        (lambda: g.enroll("x", np.full(DIM, np.nan), fingerprint=FP), "NaN"),
        (lambda: g.enroll("x", np.zeros(DIM), fingerprint=FP), "zeros"),
        (lambda: g.enroll("unknown", v, fingerprint=FP), "reserved"),
        (lambda: g.enroll("  ", v, fingerprint=FP), "bad identity name"),
        (lambda: g.search(v, k=0), "top-k"),
        (lambda: g.search(v, scoring="median"), "scoring"),
        (lambda: Gallery.create(g.path, dim=DIM, fingerprint=FP), "already exists"),
        (lambda: Gallery.open(tmp_path / "nope"), "no gallery"),
        (lambda: Gallery.create(tmp_path / "h", dim=DIM, fingerprint=FP, index="lsh"), "unknown index kind"),
    ]:
        with pytest.raises(GalleryError, match=pattern):
            call()
    assert len(g) == 180  # nothing was added by the failed calls


def test_hnsw_tombstones_and_reopen(tmp_path):
    centres, x, labels = clusters(300, 2, seed=3)
    spec = IndexSpec(kind="hnsw", m=16, ef_construction=40, ef_search=64)
    with Gallery.create(tmp_path / "g", dim=DIM, fingerprint=FP, index=spec) as g:
        g.enroll_many([f"id{i}" for i in labels], x, fingerprint=FP)
        for i in range(10):
            g.remove(f"id{i}")  # HNSW cannot delete: these become tombstones
        assert g.info()["index_built"] == "hnsw" and g._index.built.tombstones
        q = fresh_queries(centres, 4)
        got = [m.name for m in g.identify(q)]
    assert not {f"id{i}" for i in range(10)} & set(got)
    assert np.mean([a == f"id{i}" for i, a in enumerate(got) if i >= 10]) >= 0.98
    with Gallery.open(tmp_path / "g") as r:
        assert r.info()["index_built"] == "hnsw" and r.check()["index_matches_database"]
        assert [m.name for m in r.identify(q)] == got


def test_ivf_falls_back_to_flat_then_trains_and_keeps_recall(tmp_path):
    centres, x, labels = clusters(400, 2, seed=4)
    spec = IndexSpec(kind="ivf", nlist=16, nprobe=4)
    with Gallery.create(tmp_path / "g", dim=DIM, fingerprint=FP, index=spec) as g:
        g.enroll_many([f"id{i}" for i in labels[:300]], x[:300], fingerprint=FP)
        assert g.info()["index_built"] == "flat"  # 300 < 39 * 16 training points
        g.enroll_many([f"id{i}" for i in labels[300:]], x[300:], fingerprint=FP)
        assert g.info()["index_built"] == "ivf" and g.info()["nlist"] == 16
        g.remove("id5")
        q = fresh_queries(centres, 6)
        ivf = [m.name for m in g.identify(q)]
        g.rebuild_index("flat")
        flat = [m.name for m in g.identify(q)]
    recall = np.mean([a == b for a, b in zip(ivf, flat, strict=True)])
    assert recall >= 0.95, recall
    assert "id5" not in ivf
    with Gallery.open(tmp_path / "g") as r:
        assert r.info()["index"] == "flat"


def test_reader_sees_writer_changes_and_writers_exclude_each_other(tmp_path):
    centres, x, labels = clusters(20, 1, seed=7)
    w = Gallery.create(tmp_path / "g", dim=DIM, fingerprint=FP)
    w.enroll_many([f"id{i}" for i in labels[:10]], x[:10], fingerprint=FP)
    w.save()
    r = Gallery.open(tmp_path / "g")  # readers take no lock
    assert len(r) == 10
    with pytest.raises(GalleryError, match="another writer"):
        Gallery.open(tmp_path / "g", mode="w", lock_timeout=0.2)
    w.enroll_many([f"id{i}" for i in labels[10:]], x[10:], fingerprint=FP)
    w.remove("id0")
    assert [m.name for m in r.identify(x[10:12])] == ["id10", "id11"]  # refreshed from the database
    assert len(r) == 19 and r.identify(x[0])[0].name != "id0"
    w.close()
    w2 = Gallery.open(tmp_path / "g", mode="w", lock_timeout=0.2)
    w2.close()
    r.close()

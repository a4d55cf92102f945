"""What normalising by a domain's statistics costs, as a share of identify's time (issue 25: under 2%).

A gallery holds photo 1 of each of the 40 ORL people (the model in weights/); a domain ``door`` is made from 10
other ORL photos. Timed in one process, on the same 80 probes (ORL photos 2 and 3), in alternating rounds:
``FaceRecognizer.identify_files`` without a domain and with ``domain="door"`` (detect, align, embed, normalise,
search), per photo; and the normalisation alone (``gallery.domain_stats.normalise`` of one face's vector by the
domain's statistics, and of the 80 vectors at once), timed over many calls. The share is the normalisation of one
face against identify's time per photo; the end-to-end difference is reported too, but on a shared machine it is
within the noise.

    python benchmarks/bench_domain_cost.py   (writes benchmarks/results/cross_domain/domain_cost.md and .json)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from results_files import machine, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of identify with and without (3)")
    ap.add_argument("--out", default="benchmarks/results/cross_domain/domain_cost", help="output stem (.md and .json)")
    args = ap.parse_args()

    import torch

    from facemeta.data.sets import read_set
    from facemeta.gallery.domain_stats import normalise
    from facemeta.recognizer import FaceRecognizer

    torch.set_num_threads(1)
    rows = read_set("orl")
    by_person: dict[str, list[str]] = {}
    for r in rows:
        by_person.setdefault(r.identity, []).append(r.path)
    probes = [p for paths in by_person.values() for p in paths[1:3]]
    with tempfile.TemporaryDirectory() as tmp:
        rec = FaceRecognizer(Path(tmp) / "gallery")
        for person, paths in by_person.items():
            rec.enroll(person, [paths[0]])
        rec.add_domain("door", [paths[5] for paths in list(by_person.values())[:10]])
        stats = rec.domain("door").stats
        list(rec.identify_files(probes[:8]))  # warm up (model, MTCNN, index)
        plain, with_domain = [], []
        for _ in range(args.rounds):
            for arm, domain in ((plain, None), (with_domain, "door")):
                start = time.perf_counter()
                answers = list(rec.identify_files(probes, domain=domain))
                arm.append((time.perf_counter() - start) / len(probes))
        assert all(not isinstance(a, Exception) for _, a in answers)
        vectors = np.stack([v for v in rec.embedder.embed_files(probes) if v is not None])
        reps = 20000
        start = time.perf_counter()
        for i in range(reps):
            normalise(vectors[i % len(vectors)][None], stats)
        one = (time.perf_counter() - start) / reps
        start = time.perf_counter()
        for _ in range(reps // 100):
            normalise(vectors, stats)
        batch = (time.perf_counter() - start) / (reps // 100) / len(vectors)
    per_photo = float(np.median(plain))
    result = {"machine": machine(), "probes": len(probes), "rounds": args.rounds, "domain_kind": stats.kind,
              "domain_photos": int(stats.count),
              "identify_s_per_photo": per_photo, "identify_with_domain_s_per_photo": float(np.median(with_domain)),
              "identify_rounds": plain, "identify_with_domain_rounds": with_domain,
              "normalise_one_s": one, "normalise_batched_s_per_vector": batch,
              "share_one_percent": 100 * one / per_photo, "share_batched_percent": 100 * batch / per_photo}
    md = "\n".join([
        "# Domain normalisation: its cost against identify's time", "",
        f"`python benchmarks/bench_domain_cost.py` on {result['machine']}; one torch thread. ORL gallery of 40 "
        f"people (photo 1 each), {len(probes)} probes (photos 2 and 3), domain `door` of {stats.count} ORL photos "
        f"(kind `{stats.kind}`). Medians over {args.rounds} alternating rounds.", "",
        "| measure | time | share of identify |", "| --- | ---: | ---: |",
        f"| identify_files, per photo, no domain | {1e3 * per_photo:.1f} ms | 100% |",
        f"| identify_files, per photo, domain `door` | {1e3 * result['identify_with_domain_s_per_photo']:.1f} ms | "
        f"{100 * result['identify_with_domain_s_per_photo'] / per_photo:.1f}% |",
        f"| normalise one face's vector | {1e6 * one:.1f} µs | {result['share_one_percent']:.3f}% |",
        f"| normalise, per vector in a batch of {len(vectors)} | {1e6 * batch:.2f} µs | "
        f"{result['share_batched_percent']:.4f}% |", "",
        "The normalisation of a face costs the share in the last two rows; the end-to-end rows differ by the "
        "machine's noise (other processes share its cores).", ""])
    write_results(args.out, result, md)
    print(md)


if __name__ == "__main__":
    main()

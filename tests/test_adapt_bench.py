"""`facemeta benchmark adapt` (facemeta.experiments.adapt_bench): the Yale B and thermal protocols, the draws,
resuming, intervals and the comparison of two starts. Numpy only (no model is run)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facemeta.experiments import adapt_bench as ab


def _data(people_conditions: dict[str, list[int]]) -> dict:
    people = [p for p, cs in people_conditions.items() for _ in cs]
    conditions = [c for cs in people_conditions.values() for c in cs]
    return {"people": np.array(people), "conditions": np.array(conditions)}


def test_yaleb_and_thermal_protocols_follow_the_cross_domain_split():
    """Yale B: each person's one frontal photo enrols, the side-light (>77 degrees) photos are the target;
    thermal: gallery photos enrol, probes of enrolled AND never-enrolled people are the target."""
    from facemeta.experiments.cross_domain_protocols import benchmark_rows, protocols

    yale = ab.protocol_rows("yaleb-side")
    enrol = [r for r in yale if r[2] == 1]
    assert len(enrol) == 38 and all("A+000E+00" in r[0] for r in enrol)
    assert len({r[1] for r in enrol}) == 38
    target_angles = [r[0] for r in yale if r[2] == 0]
    assert target_angles and not set(target_angles) & {r[0] for r in enrol}
    rows = benchmark_rows("yaleb")
    side = protocols("yaleb", rows)[0].probes["light >77"]
    assert set(target_angles) == {r.path for r, s in zip(rows, side, strict=True) if s}

    thermal = ab.protocol_rows("thermal")
    data = {"people": np.array([r[1] for r in thermal]), "conditions": np.array([r[2] for r in thermal])}
    assert (data["conditions"] == 1).sum() == 164 and len(thermal) == 410
    assert len(ab.eligible_people(data)) == 41  # enrolled people; the other 41 only make impostor pairs
    assert len(set(data["people"])) == 82


def test_draws_pick_only_people_with_both_conditions_and_score_the_others():
    data = _data({"a": [1, 0], "b": [1, 0, 0], "c": [1, 0], "d": [1, 0], "never": [0, 0], "only-enrolled": [1]})
    assert ab.eligible_people(data).tolist() == ["a", "b", "c", "d"]
    assert ab.feasible(data, 0) and ab.feasible(data, 2) and not ab.feasible(data, 3) and not ab.feasible(data, 1)
    for seed in range(5):
        inside, other = ab.draw(data, 2, seed)
        chosen = set(data["people"][inside])
        assert len(chosen) == 2 and chosen <= {"a", "b", "c", "d"}
        assert not chosen & set(data["people"][other]) and len(inside) + len(other) == len(data["people"])
    assert ab.draw(data, 2, 0)[0].tolist() == ab.draw(data, 2, 0)[0].tolist()  # a draw is a function of (seed, k)


def test_results_resume_only_for_the_same_model_and_settings(tmp_path):
    from facemeta.errors import ConfigError

    settings = {"adapt": {"steps": 30}}
    cells = [{"protocol": "thermal", "k": 10, "seed": s, "rows": {"base": {"tar": 0.4}, "stats-only": {"tar": 0.42},
                                                                  "adapt": {"tar": 0.5 + s / 100}}} for s in (0, 1, 2)]
    ab.write_results({"model": "m", "fingerprint": "f1", "far": 0.01, "settings": settings, "cells": cells,
                      "skipped": [{"protocol": "yaleb-side", "k": 20, "seed": 0, "why": "19 people"}]}, tmp_path)
    assert len(ab.load_previous(tmp_path, "f1", settings)["cells"]) == 3
    with pytest.raises(ConfigError, match="another --out"):
        ab.load_previous(tmp_path, "f2", settings)
    with pytest.raises(ConfigError):
        ab.load_previous(tmp_path, "f1", {"adapt": {"steps": 31}})
    # a field added to AdaptSettings after the file was written resumes at its default, never at another value
    assert ab.load_previous(tmp_path, "f1", {"adapt": {"steps": 30, "centres": "batch"}})
    with pytest.raises(ConfigError):
        ab.load_previous(tmp_path, "f1", {"adapt": {"steps": 30, "centres": "start"}})
    assert ab.load_previous(tmp_path / "none", "f1", settings) == {}
    md = (tmp_path / "results.md").read_text()
    assert "| thermal | 10 | adapt | 3 |" in md and "Not run (too few people): yaleb-side k = 20" in md
    assert json.loads((tmp_path / "results.json").read_text())["fingerprint"] == "f1"


def test_intervals_widen_with_spread_and_starts_pair_by_draw():
    lo, hi = ab.interval([0.01, 0.02, 0.03])
    assert lo < 0.02 < hi and ab.interval([0.02]) is None
    lo2, hi2 = ab.interval([0.0, 0.02, 0.04])
    assert hi2 - lo2 > hi - lo

    def doc(tars):
        return {"cells": [{"protocol": "mfr2-mask", "k": 10, "seed": s, "rows": {"adapt": {"tar": t}}}
                          for s, t in enumerate(tars)]}

    out = ab.compare_starts(doc([0.5, 0.6, 0.7]), doc([0.55, 0.65, 0.75, 0.9]))  # seed 3 only in b: not paired
    assert len(out) == 1 and out[0]["n"] == 3 and out[0]["mean"] == pytest.approx(0.05)
    assert out[0]["std"] == pytest.approx(0.0)


def test_run_resumes_skips_infeasible_k_and_runs_without_adapt(tmp_path, monkeypatch):
    """The runner on a random dlib-architecture checkpoint and random faces (no alignment): cells are written,
    a rerun computes nothing it already holds, an infeasible k is listed, and --no-adapt (no settings) gives the
    base and statistics-only rows only."""
    import torch

    from facemeta.models.backbone import ModelConfig, build_model
    from facemeta.models.checkpoint import save_checkpoint
    from facemeta.train.adapt import AdaptSettings

    torch.manual_seed(0)
    model_path = save_checkpoint(build_model(ModelConfig(backbone="dlib_resnet29", head="linear", embedding_size=128,
                                                         image_size=150)), tmp_path / "m.safetensors",
                                 {"align_chip": "dlib", "align_size": 150})
    rng = np.random.default_rng(0)
    data = {**_data({f"p{i}": [1, 0, 0] for i in range(5)}),
            "faces": [rng.integers(0, 255, (15, 150, 150, 3), dtype=np.uint8)]}
    monkeypatch.setattr(ab, "aligned_parts", lambda *a, **k: data)
    calls = []
    real = ab.run_cell
    monkeypatch.setattr(ab, "run_cell", lambda *a, **k: calls.append(a[2:4]) or real(*a, **k))
    settings = {"adapt": AdaptSettings(steps=2)}
    out = tmp_path / "out"
    doc = ab.run_adapt_bench(model_path, ["thermal"], [0, 2, 4], [0], settings, out)
    assert sorted(calls) == [(0, 0), (2, 0)] and {c["k"] for c in doc["skipped"]} == {4}
    assert set(doc["cells"][1]["rows"]) == {"base", "stats-only", "adapt"}
    calls.clear()
    again = ab.run_adapt_bench(model_path, ["thermal"], [0, 2], [0, 1], settings, out)
    assert calls == [(0, 1), (2, 1)] and len(again["cells"]) == 4  # only the new draws ran
    bare = ab.run_adapt_bench(model_path, ["thermal"], [2], [0], {}, tmp_path / "bare")
    assert set(bare["cells"][0]["rows"]) == {"base", "stats-only"}
    assert "none (--no-adapt" in (tmp_path / "bare" / "results.md").read_text()


def test_an_ensemble_base_is_adapted_member_by_member_with_stats_rows(tmp_path, monkeypatch):
    """An ensemble (two random dlib-architecture members, weights 1 and 3) runs through the grid: its base row's
    vectors are the ensemble's own (EnsembleModel.embed), each member is adapted (its own loss per member), the
    +stats rows are written, and a rerun without --with-stats is refused in one line."""
    import torch

    from facemeta.errors import ConfigError
    from facemeta.models.backbone import ModelConfig, build_model
    from facemeta.models.ensemble import ensemble_of, save_ensemble
    from facemeta.train.adapt import AdaptSettings

    torch.manual_seed(0)
    members = [build_model(ModelConfig(backbone="dlib_resnet29", head="linear", embedding_size=128, image_size=150))
               for _ in range(2)]
    ens = ensemble_of(members, [("dlib", 150), ("dlib", 150)], weights=[1.0, 3.0])
    model_path = tmp_path / "ens.safetensors"
    save_ensemble(ens, model_path, {"threshold": 0.5, "threshold_far": 1e-3})
    rng = np.random.default_rng(1)
    faces = rng.integers(0, 255, (12, 150, 150, 3), dtype=np.uint8)
    data = {**_data({f"p{i}": [1, 0, 0] for i in range(4)}), "faces": [faces, faces]}
    monkeypatch.setattr(ab, "aligned_parts", lambda *a, **k: data)
    settings = {"adapt": AdaptSettings(steps=2, tail_blocks=1),
                "enrolled": AdaptSettings(steps=2, tail_blocks=1, centres="enrolled")}  # needs the photos' domains
    doc = ab.run_adapt_bench(model_path, ["thermal"], [0, 2], [0], settings, tmp_path / "out", stats_rows=True)
    rows = doc["cells"][1]["rows"]
    assert set(rows) == {"base", "stats-only", "adapt", "adapt+stats", "enrolled", "enrolled+stats"}
    assert len(rows["adapt"]["loss_first"]) == 2 and len(doc["members"]) == 2
    from facemeta.experiments.cross_domain_embed import combine

    parts, weights = ab.model_parts(ens)
    cache = ab.part_cache(parts, data["faces"], settings)
    ours = combine([ab.tail_vectors(p, *c) for p, c in zip(parts, cache, strict=True)], weights)
    theirs = ens.embed([faces, faces], flip=True)
    assert (ours * theirs).sum(1).min() > 0.999
    assert ab.score(ours, data["people"], data["conditions"])["tar"] == pytest.approx(doc["cells"][0]["rows"]["base"]["tar"])
    with pytest.raises(ConfigError, match="with the \\+stats rows") as err:
        ab.run_adapt_bench(model_path, ["thermal"], [2], [1], settings, tmp_path / "out")
    assert "\n" not in str(err.value)

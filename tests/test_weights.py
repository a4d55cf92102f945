"""The shipped model in weights/: it loads, it is the file its model card describes, and the CLI uses it.

The card's figures come from tools/ship_ensemble.py (v3, an ensemble; tools/ship_model.py wrote v2's); these
tests check that the committed files agree
with each other (a model retrained without regenerating the card fails here) and that `facemeta
verify` picks the model up without --model.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from facemeta.cli import main
from facemeta.embedder import WEIGHTS_DIR, default_model_path, file_fingerprint

MODEL = WEIGHTS_DIR / "default.safetensors"
CARD = WEIGHTS_DIR / "model-card.json"


@pytest.fixture(scope="module")
def card() -> dict:
    assert MODEL.is_file() and CARD.is_file(), "weights/ must hold default.safetensors and model-card.json"
    return json.loads(CARD.read_text())


def test_shipped_model_matches_its_card(card, monkeypatch):
    from safetensors import safe_open

    from facemeta.models.checkpoint import read_checkpoint_info
    from facemeta.models.ensemble import EnsembleModel, load_model

    monkeypatch.delenv("FACEMETA_MODEL", raising=False)
    assert default_model_path() == MODEL
    assert hashlib.sha256(MODEL.read_bytes()).hexdigest() == card["model"]["sha256"]
    # v3: an ensemble (issue 29), chosen by benchmarks/results/shipped_v3/RULE.md, whose verdict the card copies
    model, meta = load_model(MODEL)
    assert isinstance(model, EnsembleModel) and model.embedding_size == card["model"]["embedding_size"]
    doc = read_checkpoint_info(MODEL)
    members = card["model"]["members"]
    assert [m.config.backbone for m in model.members] == [m["backbone"] for m in members]
    assert model.chips == [(m["chip"], m["align_size"]) for m in members]
    # a member the card calls referenced holds no tensors in the file: weights facemeta did not train stay out
    with safe_open(str(MODEL), "pt") as fh:
        stored = {k.split(".")[1] for k in fh.keys()}
    for i, (entry, row) in enumerate(zip(doc["config"]["members"], members, strict=True)):
        assert bool(entry.get("prior")) == (not row["stored"]) == (str(i) not in stored)
    assert card["rule"]["choice"] and any(c["eligible"] and c["name"] == card["rule"]["choice"]
                                          for c in card["rule"]["candidates"])
    assert MODEL.stat().st_size < 25e6  # small enough to commit and to ship
    # the default verification threshold is the one calibrated at FAR 1e-3 on held-out source identities
    assert meta["threshold"] == card["threshold"]["threshold"] and meta["threshold_far"] == 1e-3
    assert "domain_reference" in meta and "domain_threshold" in meta  # the domains' rule needs them
    text = (WEIGHTS_DIR / "MODEL_CARD.md").read_text()
    assert card["model"]["sha256"][:16] in text
    if any(m["backbone"] == "sface" for m in members):  # Apache-2.0: the licence text and a NOTICE ship with it
        assert "Apache License" in (WEIGHTS_DIR / "LICENSE-Apache-2.0.txt").read_text()
        assert "SFace" in (WEIGHTS_DIR / "NOTICE").read_text()


def test_verify_uses_the_shipped_model_by_default(data_dir, capsys, monkeypatch):
    monkeypatch.delenv("FACEMETA_MODEL", raising=False)
    photo = data_dir / "orl" / "s1"
    code = main(["verify", str(photo / "1.pgm"), str(photo / "2.pgm"), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    res = json.loads(out)
    assert res["fingerprint"] == file_fingerprint(MODEL)  # the shipped weights, picked without --model
    assert res["threshold_far"] == 1e-3 and -1.0 <= res["score"] <= 1.0

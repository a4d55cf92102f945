"""The shipped model in weights/: it loads, it is the file its model card describes, and the CLI uses it.

The card's figures come from tools/ship_model.py; these tests check that the committed files agree
with each other (a model retrained without regenerating the card fails here) and that `facemeta
verify` picks the model up without --model.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from facemeta.cli import main
from facemeta.embedder import WEIGHTS_DIR, default_model_path, file_fingerprint
from facemeta.models.checkpoint import load_checkpoint

MODEL = WEIGHTS_DIR / "default.safetensors"
CARD = WEIGHTS_DIR / "model-card.json"


@pytest.fixture(scope="module")
def card() -> dict:
    assert MODEL.is_file() and CARD.is_file(), "weights/ must hold default.safetensors and model-card.json"
    return json.loads(CARD.read_text())


def test_shipped_model_matches_its_card(card, monkeypatch):
    monkeypatch.delenv("FACEMETA_MODEL", raising=False)
    assert default_model_path() == MODEL
    assert hashlib.sha256(MODEL.read_bytes()).hexdigest() == card["model"]["sha256"]
    model, meta = load_checkpoint(MODEL)
    # fine-tuned by facemeta from the prior (dlib's public-domain encoder), on dlib's chips
    assert model.config.backbone == card["model"]["backbone"] == "dlib_resnet29"
    assert meta["config"]["model"]["pretrained"] and meta["align_chip"] == "dlib" and meta["training"]["steps"] > 0
    assert meta.get("weights_dtype", "float32") == card["dtype"]
    assert MODEL.stat().st_size < 25e6  # small enough to commit and to ship
    # the default verification threshold is the one calibrated at FAR 1e-3 on held-out source identities
    assert meta["threshold"] == card["thresholds"]["1e-3"]["threshold"] and meta["threshold_far"] == 1e-3
    # ORL was never a training domain: the card's ORL figures are on an unseen domain
    assert "orl" not in {s["set"] for s in card["training"]["sources"]}
    text = (WEIGHTS_DIR / "MODEL_CARD.md").read_text()
    assert card["model"]["sha256"][:16] in text


def test_verify_uses_the_shipped_model_by_default(data_dir, capsys, monkeypatch):
    monkeypatch.delenv("FACEMETA_MODEL", raising=False)
    photo = data_dir / "orl" / "s1"
    code = main(["verify", str(photo / "1.pgm"), str(photo / "2.pgm"), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    res = json.loads(out)
    assert res["fingerprint"] == file_fingerprint(MODEL)  # the shipped weights, picked without --model
    assert res["threshold_far"] == 1e-3 and -1.0 <= res["score"] <= 1.0

"""Synthetic source domains (facemeta.data.styles): the styles on real aligned faces, how a styled domain's
people are split, and real training steps of a meta method on a styled domain."""

from __future__ import annotations

import numpy as np
import pytest

from facemeta.align.warp import template
from facemeta.data.styles import STYLES, apply_style, domain_name, source_set
from facemeta.errors import ConfigError

SMALL_LFW = {"set": "lfw", "people_folds": [1, 2, 3, 4, 5], "min_images": 4, "max_identities": 40,
             "limit_per_identity": 8}


@pytest.fixture(scope="module")
def chips(aligned_sample):
    """Real LFW faces aligned on the arcface chip (112 px), RGB uint8."""
    from facemeta.data.samplers import read_rgb

    return [read_rgb(r.path) for r in aligned_sample("lfw")[1][:6]]


def test_styles_change_the_face_reproducibly(chips):
    layout = template(112, "arcface") / 112
    for image in chips:
        for name in STYLES:
            a = apply_style(name, image, np.random.default_rng(5), layout)
            b = apply_style(name, image, np.random.default_rng(5), layout)
            assert a.dtype == np.uint8 and a.shape == image.shape and np.array_equal(a, b)
            assert np.abs(a.astype(int) - image).mean() > 5  # a real change, not noise
        lit = apply_style("harsh_light", image, np.random.default_rng(1), layout)
        assert np.array_equal(lit[..., 0], lit[..., 1]) and np.array_equal(lit[..., 1], lit[..., 2])  # grey
        masked = apply_style("mask", image, np.random.default_rng(2), layout)
        pts = (layout * 112).round().astype(int)
        eyes_row = int(pts[:2, 1].min()) - 5
        assert np.array_equal(masked[:eyes_row], image[:eyes_row])  # eyes and forehead untouched
        for x, y in pts[3:]:  # both mouth corners covered
            assert not np.array_equal(masked[y, x], image[y, x])


def test_style_inputs_are_checked(chips):
    layout = template(112, "arcface") / 112
    with pytest.raises(ValueError, match="unknown style"):
        apply_style("fog", chips[0], np.random.default_rng(0), layout)
    with pytest.raises(ValueError, match="uint8"):
        apply_style("mask", chips[0].astype(np.float32), np.random.default_rng(0), layout)
    with pytest.raises(ValueError, match="layout"):
        apply_style("mask", chips[0], np.random.default_rng(0), layout[:3])
    assert domain_name("lfw", "mask") == "lfw+mask" and source_set("lfw+mask") == "lfw" and source_set("orl") == "orl"


def test_config_keeps_styles_off_targets_and_out_of_duplicates():
    from facemeta.train.config import leave_one_out, load_config

    with pytest.raises(ConfigError, match="style: must be one of"):
        load_config("smoke", overrides={"data.sources": [SMALL_LFW, {"set": "lfw", "style": "fog"}]})
    with pytest.raises(ConfigError, match="builds a domain from target set yaleb"):
        load_config("smoke", overrides={"data.sources": [SMALL_LFW, {"set": "yaleb", "style": "mask"}]})
    with pytest.raises(ConfigError, match="listed twice with style mask"):
        load_config("smoke", overrides={"data.sources": [SMALL_LFW, {"set": "lfw", "style": "mask"},
                                                         {"set": "lfw", "style": "mask"}]})
    with pytest.raises(ConfigError, match=r"people_folds: must select the people of the lfw source \(\[1, 2\]\)"):
        load_config("smoke", overrides={"data.sources": [{"set": "lfw", "people_folds": [1, 2]},
                                                         {"set": "lfw", "style": "mask"}]})  # would train folds 3-10
    load_config("smoke", overrides={"data.sources": [{"set": "lfw", "people_folds": [1, 2]},
                                                     {"set": "lfw", "style": "mask", "people_folds": [2, 1]}]})
    data = {"data": {"sources": [{"set": "lfw"}, {"set": "lfw", "style": "mask"}, {"set": "orl", "style": "mask"}]}}
    kept = leave_one_out(data, "orl")["data"]["sources"]
    assert [(s["set"], s.get("style")) for s in kept] == [("lfw", None), ("yaleb", None), ("mfr2", None),
                                                          ("lfw", "mask")]
    assert kept[-1]["people_folds"] == [1, 2, 3, 4, 5]  # the styled LFW keeps to the training people too


def test_styled_domain_shares_classes_and_trains_nobody_held_out(data_dir, tmp_path):
    """Real data: the styled LFW domain has the same people as LFW (one class each), none of the people held
    out of LFW, and no held-out rows of its own; then two real MFR steps over the three domains."""
    from facemeta.models.checkpoint import load_checkpoint
    from facemeta.train.config import load_config
    from facemeta.train.data import prepare_data
    from facemeta.train.trainer import Trainer

    sources = [SMALL_LFW, {"set": "orl", "max_identities": 30, "limit_per_identity": 8},
               {**SMALL_LFW, "style": "harsh_light"}]
    cfg = load_config("smoke", overrides={"data.root": str(data_dir), "output": str(tmp_path / "run"), "steps": 2,
                                          "threads": 2, "method": "mfr", "checkpoint_every": 0,
                                          "data.sources": sources, "optim.warmup_steps": 0})
    data = prepare_data(cfg)
    by_domain = {d: {r.identity for r in data.train if r.domain == d} for d in ("lfw", "lfw+harsh_light")}
    held = {r.identity for r in data.heldout if r.domain == "lfw"}
    assert held and by_domain["lfw"] and by_domain["lfw+harsh_light"] == by_domain["lfw"]
    assert not held & by_domain["lfw+harsh_light"]
    assert {r.domain for r in data.heldout} == {"lfw", "orl"}
    assert all(r.extra.get("style") == "harsh_light" for r in data.train if r.domain == "lfw+harsh_light")
    model, meta = load_checkpoint(Trainer(cfg, data, progress=False).fit())
    assert meta["method"] == "mfr" and np.isfinite(meta["threshold"])
    assert "lfw+harsh_light" in meta["training"]["train"]

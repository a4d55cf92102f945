"""Candidate adapt settings for SFace (issue 26: a recipe that moves it), compared through `facemeta benchmark adapt`
(facemeta.experiments.adapt_bench) by benchmarks/adapt_sface_recipe.py.

SFace separates k labelled people from the first step (the default loss is near zero), so adapt's defaults leave it
where it was. The candidates fine-tune more of it (``other_blocks``: its last depthwise-separable pairs with the
head), at higher learning rates, and change the loss to the pairs the benchmark scores (``centres="enrolled"``:
each new-domain photo against its own person's ENROLMENT centre; facemeta.train.adapt_loss).

Two things the benchmark does not do yet, which these candidates need, are supplied here: :func:`as_adapt_runs`
resolves the settings per backbone as adapt does (facemeta.train.adapt.member_settings: SFace's ``other_blocks``),
where adapt_bench.for_backbone trains SFace's head only; :func:`run_cell` tells adapt which of the k people's photos
are enrolment photos (``domains``, as `facemeta adapt` knows from DIR/<person>/enrolled/).
"""

from __future__ import annotations

import numpy as np


def sface_choices() -> dict:
    """The candidate settings for SFace-type members (names say what differs from adapt's defaults)."""
    from facemeta.train.adapt import AdaptSettings as S

    enr = {"other_blocks": 2, "centres": "enrolled", "interpolate": 1.0}
    return {
        "default": S(),  # today's: SFace's embedding head, lr 1e-4, batch centres, m 0.2, half the change kept
        "head-lr1e-2": S(lr=1e-2),  # the best SFace setting of benchmarks/results/adapt/start-sface/choice/
        "b2-lr1e-2": S(other_blocks=2, lr=1e-2),
        "b2-m0.5-lr1e-2-i1": S(other_blocks=2, margin=0.5, lr=1e-2, interpolate=1.0),
        "enr-head-m0.5-lr1e-2-i1": S(centres="enrolled", margin=0.5, lr=1e-2, interpolate=1.0),
        "enr-b2-m0.5-lr1e-2": S(**{**enr, "interpolate": 0.5}, margin=0.5, lr=1e-2),
        "enr-b2-m0.5-lr1e-2-i1": S(**enr, margin=0.5, lr=1e-2),
        "enr-b2-m0.7-lr1e-2-i1": S(**enr, margin=0.7, lr=1e-2),
        "enr-b2-m0.5-lr3e-2-i1": S(**enr, margin=0.5, lr=3e-2),
    }


def as_adapt_runs(model, settings_list: dict) -> dict:
    """The settings as facemeta.train.adapt.adapt_model runs them on `model` (tail_blocks from other_blocks on a
    backbone other than dlib's ResNet); an ensemble's as given (applied member by member)."""
    from facemeta.train.adapt import member_settings

    if hasattr(model, "members"):
        return settings_list
    return {n: member_settings(model, s) for n, s in settings_list.items()}


def run_cell(model, data: dict, k: int, seed: int, settings_list: dict, *args, **kwargs) -> dict:
    """adapt_bench.run_cell with the k people's enrolment photos (condition 1) told apart from their new-domain
    ones (condition 0) in every adapt run, as `facemeta adapt` tells them apart."""
    from functools import partial

    from facemeta.experiments import adapt_bench
    from facemeta.train import adapt

    adapt_idx, _ = adapt_bench.draw(data, k, seed)
    domains = np.where(data["conditions"][adapt_idx] == 1, adapt.ENROL, adapt.NEW)
    original = adapt.adapt_in_place
    adapt.adapt_in_place = partial(original, domains=domains)
    try:
        return ORIGINAL_RUN_CELL[0](model, data, k, seed, settings_list, *args, **kwargs)
    finally:
        adapt.adapt_in_place = original


ORIGINAL_RUN_CELL: list = []  # adapt_bench.run_cell, kept by :func:`install` before it is replaced


def install() -> None:
    """Make facemeta.experiments.adapt_bench run these candidates as adapt would (:func:`as_adapt_runs`,
    :func:`run_cell`), for a benchmark script's process."""
    from facemeta.experiments import adapt_bench

    if not ORIGINAL_RUN_CELL:
        ORIGINAL_RUN_CELL.append(adapt_bench.run_cell)
    adapt_bench.run_cell = run_cell
    adapt_bench.for_backbone = as_adapt_runs

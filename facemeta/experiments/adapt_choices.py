"""Candidate adapt settings for SFace (issue 26: a recipe that moves it), compared through `facemeta benchmark adapt`
(facemeta.experiments.adapt_bench) by benchmarks/adapt_sface_recipe.py.

SFace separates k labelled people from the first step (the default loss is near zero), so adapt's defaults leave it
where it was. The candidates fine-tune more of it (``other_blocks``: its last depthwise-separable pairs with the
head), at higher learning rates, and change the loss to the pairs the benchmark scores (``centres="enrolled"``:
each new-domain photo against its own person's ENROLMENT centre; facemeta.train.adapt_loss).

The benchmark resolves them per backbone as adapt does (facemeta.train.adapt.member_settings: SFace's
``other_blocks``) and tells adapt which of the k people's photos are enrolment photos, as `facemeta adapt` knows
from DIR/<person>/enrolled/.
"""

from __future__ import annotations


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

"""Sinusoid regression (Finn et al. 2017): meta-learned inits adapt far better than a pooled one.

A small CPU version of benchmarks/meta_sinusoid.py (which holds the full run and its results).
Every net is evaluated on the same 200 new tasks: 1 SGD step of lr 0.01 on K = 10 points, MSE
on 100 points. Training: pooled and MAML 1500 iterations x 5 tasks, Reptile 300 x 5 tasks x 5
inner steps (about 20 s of CPU in all). Asserted: MAML's mean MSE < 0.6 x the pooled net's
(measured: 1.17 vs 2.49), and Reptile's paired per-task gain over the pooled net is positive with
its 95% CI clear of zero (measured: 2.09 vs 2.49). The slow test
runs the full benchmark configuration and asserts the same with MAML < 0.5 x pooled.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_benchmark_script


@pytest.fixture(scope="module")
def sin():
    return load_benchmark_script("meta_sinusoid")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = a - b
    return float(d.mean()), float(1.96 * d.std() / math.sqrt(len(d)))


def test_maml_and_reptile_beat_pooled_small(sin):
    base = dict(meta_batch=5, alpha=0.01, outer_lr=3e-3, eval_tasks=200, seed=0)
    cfg = sin.Config(iterations=1500, **base)
    pooled = sin.evaluate(sin.train_pooled(cfg), cfg, steps=(1,))["steps_1"]
    maml = sin.evaluate(sin.train_maml(cfg), cfg, steps=(1,))["steps_1"]
    rcfg = sin.Config(iterations=300, reptile_steps=5, reptile_lr=0.02, reptile_eps=1.0, **base)
    reptile = sin.evaluate(sin.train_reptile(rcfg), cfg, steps=(1,))["steps_1"]
    m, p, r = float(maml.mean()), float(pooled.mean()), float(reptile.mean())
    print(f"MSE after 1 step: maml {m:.3f}, reptile {r:.3f}, pooled {p:.3f}")
    assert m < 0.6 * p
    gain, ci = _paired(pooled, reptile)
    assert gain - ci > 0, (gain, ci)


@pytest.mark.slow
def test_full_benchmark_configuration(sin):
    res = sin.run(sin.Config())
    m = res["methods"]
    assert m["maml"]["steps_1"]["mse"] < 0.5 * m["pooled"]["steps_1"]["mse"]
    g = res["paired_gain_over_pooled"]["reptile"]["steps_1"]
    assert g["mse"] - g["ci95"] > 0

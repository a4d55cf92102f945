"""5-way 1-shot on real faces (ORL), identities held out: MAML beats nearest centroid at init.

Meta-training uses subjects s1-s25 only, test episodes s26-s40 only. Default run (about 15 s of
CPU): conv4 with 16 channels at 23x28, first-order MAML, 150 iterations x 2 tasks, 150 test
episodes. Asserted: MAML's accuracy is above nearest-centroid on the same network's features
before meta-training, with the paired 95% CI of the gain clear of zero (measured here: about
76% vs 61%). The slow test runs the benchmark's configuration (32 channels, first order,
600 x 4 tasks, 400 episodes; see benchmarks/results/meta_orl_fewshot.md).
"""

from __future__ import annotations

import pytest
from conftest import load_benchmark_script


@pytest.fixture(scope="module")
def orl():
    return load_benchmark_script("meta_orl_fewshot")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _check(res: dict) -> None:
    r = res["results"]
    maml, base = r["MAML"]["acc"], r["centroid @ init (baseline)"]["acc"]
    gain = res["paired_gain_maml_over_baseline"]
    print(f"MAML {maml:.3f}, centroid at init {base:.3f}, paired gain {gain['acc']:.3f} ± {gain['ci95']:.3f}")
    assert maml > base
    assert gain["acc"] - gain["ci95"] > 0
    assert 0.2 < base < 1.0  # 5-way: chance is 0.2; the baseline is a real one


def test_orl_images_load(orl, data_dir):
    x, s = orl.load_orl(data_dir / "orl", (23, 28))
    assert x.shape == (400, 1, 28, 23) and s[:10] == [1] * 10 and s[-1] == 40
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.2


def test_maml_beats_centroid_on_held_out_identities(orl, data_dir):
    cfg = orl.Config(iterations=150, meta_batch=2, channels=16, first_order=True, test_episodes=150)
    _check(orl.run(data_dir / "orl", cfg))


@pytest.mark.slow
def test_benchmark_configuration(orl, data_dir):
    _check(orl.run(data_dir / "orl", orl.Config()))

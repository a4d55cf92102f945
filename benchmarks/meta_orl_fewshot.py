"""5-way 1-shot face identification on ORL with MAML, identities held out from meta-training.

Data: ORL / AT&T (40 subjects x 10 grey 92x112 images), read with PIL, resized to W x H
(default 23 x 28, or 46 x 56), scaled to [-1, 1]. Meta-training episodes use subjects s1-s25 only;
test episodes use s26-s40 only (disjoint identities). Network: Finn et al.'s 4-block conv net
(conv3x3-BN-ReLU-maxpool, 32 channels) and a linear 5-way head. BatchNorm uses batch statistics
in every pass (train mode, as in Finn et al.'s code), through facemeta.meta's cloned-buffer policy.

Compared on the same test episodes (mean accuracy ± 95% CI over episodes):
- "centroid @ init": nearest class centroid (cosine) on the conv features of the very same
  network before meta-training (its random initialisation) - the baseline the issue asks for;
- "centroid on pixels": the same on raw pixels (context: ORL is easy for pixel matching);
- "MAML": adapt the meta-trained network on the 5 support images (``test_steps`` SGD steps),
  classify the queries;
- "centroid @ MAML": nearest centroid on the meta-trained network's features.

Usage: python benchmarks/meta_orl_fewshot.py [--iterations 600] [--second-order] [--size 23x28] [--channels 32] [--out results]
The test suite runs a small configuration (tests/test_meta_orl.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from facemeta.meta import MAML, EpisodeSampler, functional_forward

TRAIN_SUBJECTS = range(1, 26)
TEST_SUBJECTS = range(26, 41)


def load_orl(root: Path, size: tuple[int, int]) -> tuple[torch.Tensor, list[int]]:
    """All 400 ORL images as a [400, 1, H, W] float tensor in [-1, 1] and subject numbers 1..40."""
    xs, ys = [], []
    for s in range(1, 41):
        for i in range(1, 11):
            path = root / f"s{s}" / f"{i}.pgm"
            with Image.open(path) as im:
                a = np.asarray(im.convert("L").resize(size, Image.BILINEAR), dtype=np.float32)
            xs.append(torch.from_numpy(a / 127.5 - 1.0)[None])
            ys.append(s)
    return torch.stack(xs), ys


class Conv4(nn.Module):
    """Finn et al.'s few-shot conv net: 4 x (conv3x3, BN, ReLU, maxpool 2), then a linear head."""

    def __init__(self, n_way: int, in_hw: tuple[int, int], channels: int = 32) -> None:
        super().__init__()
        blocks, c = [], 1
        for _ in range(4):
            blocks += [nn.Conv2d(c, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2)]
            c = channels
        self.features = nn.Sequential(*blocks, nn.Flatten())
        with torch.no_grad():
            dim = self.features(torch.zeros(2, 1, *in_hw)).shape[1]
        self.head = nn.Linear(dim, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class Config:
    """One ORL few-shot run."""

    iterations: int = 600
    meta_batch: int = 4
    n_way: int = 5
    k_shot: int = 1
    n_query: int = 5
    inner_steps: int = 1
    test_steps: int = 5
    inner_lr: float = 0.4        # Finn et al.'s Omniglot value
    outer_lr: float = 3e-3
    first_order: bool = True     # --second-order for full MAML (about twice the CPU time)
    channels: int = 32
    width: int = 23
    height: int = 28
    test_episodes: int = 400
    seed: int = 0


def _ce(net: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda p: F.cross_entropy(functional_forward(net, p, x), y)


def _split(images: torch.Tensor, subjects: list[int], keep: range) -> tuple[torch.Tensor, list[int]]:
    idx = [i for i, s in enumerate(subjects) if s in keep]
    return images[idx], [subjects[i] for i in idx]


def _episode(images: torch.Tensor, ep) -> tuple[torch.Tensor, ...]:
    return (images[list(ep.support)], torch.tensor(ep.support_labels),
            images[list(ep.query)], torch.tensor(ep.query_labels))


def train_maml(net: Conv4, images: torch.Tensor, subjects: list[int], cfg: Config) -> dict:
    """Meta-train ``net`` in place on episodes of the training subjects; returns a small log."""
    maml = MAML(net, inner_steps=cfg.inner_steps, inner_lr=cfg.inner_lr, first_order=cfg.first_order)
    opt = torch.optim.Adam(maml.parameters(), lr=cfg.outer_lr)
    sampler = EpisodeSampler(subjects, cfg.n_way, cfg.k_shot, cfg.n_query,
                             num_episodes=cfg.iterations * cfg.meta_batch, seed=cfg.seed + 1)
    net.train()
    log, it = [], iter(sampler)
    for step in range(cfg.iterations):
        tasks = []
        for _ in range(cfg.meta_batch):
            xs, ys, xq, yq = _episode(images, next(it))
            tasks.append((_ce(net, xs, ys), _ce(net, xq, yq)))
        opt.zero_grad()
        out = maml.meta_backward(tasks)
        opt.step()
        if step % max(1, cfg.iterations // 10) == 0 or step == cfg.iterations - 1:
            log.append({"iteration": step, **{k: round(v, 4) for k, v in out.items()}})
    return {"log": log}


def _cosine_centroid_acc(fs: torch.Tensor, ys: torch.Tensor, fq: torch.Tensor, yq: torch.Tensor, n: int) -> float:
    cent = torch.stack([fs[ys == c].mean(0) for c in range(n)])
    sim = F.normalize(fq, dim=1) @ F.normalize(cent, dim=1).T
    return float((sim.argmax(1) == yq).float().mean())


def evaluate(net: Conv4, images: torch.Tensor, subjects: list[int], cfg: Config,
             with_maml: bool = True) -> dict[str, np.ndarray]:
    """Per-episode accuracies on the test subjects for every method (same episodes for all)."""
    sampler = EpisodeSampler(subjects, cfg.n_way, cfg.k_shot, cfg.n_query,
                             num_episodes=cfg.test_episodes, seed=10_000 + cfg.seed)
    maml = MAML(net, inner_lr=cfg.inner_lr, first_order=True)
    net.train()  # batch statistics, as during meta-training (cloned buffers: nothing is updated)
    acc: dict[str, list[float]] = {"centroid": [], "pixels": [], "maml": []}
    for ep in sampler:
        xs, ys, xq, yq = _episode(images, ep)
        acc["pixels"].append(_cosine_centroid_acc(xs.flatten(1), ys, xq.flatten(1), yq, cfg.n_way))
        with torch.no_grad():
            fs = functional_forward(net.features, dict(net.features.named_parameters()), xs)
            fq = functional_forward(net.features, dict(net.features.named_parameters()), xq)
        acc["centroid"].append(_cosine_centroid_acc(fs, ys, fq, yq, cfg.n_way))
        if with_maml:
            p = maml.adapt(_ce(net, xs, ys), steps=cfg.test_steps)
            with torch.no_grad():
                logits = functional_forward(net, {k: v.detach() for k, v in p.items()}, xq)
            acc["maml"].append(float((logits.argmax(1) == yq).float().mean()))
    return {k: np.asarray(v) for k, v in acc.items() if v}


def mean_ci(a: np.ndarray) -> dict[str, float]:
    """Mean and 95% normal CI half-width over episodes."""
    return {"acc": float(a.mean()), "ci95": float(1.96 * a.std(ddof=1) / math.sqrt(len(a)))}


def run(root: Path, cfg: Config) -> dict:
    """Baselines at init, meta-training, evaluation; returns a JSON-able dict."""
    load0 = os.getloadavg()[0]
    torch.manual_seed(cfg.seed)
    images, subjects = load_orl(root, (cfg.width, cfg.height))
    tr_x, tr_s = _split(images, subjects, TRAIN_SUBJECTS)
    te_x, te_s = _split(images, subjects, TEST_SUBJECTS)
    net = Conv4(cfg.n_way, (cfg.height, cfg.width), cfg.channels)
    before = evaluate(net, te_x, te_s, cfg, with_maml=True)
    t0 = time.perf_counter()
    log = train_maml(net, tr_x, tr_s, cfg)
    train_s = time.perf_counter() - t0
    after = evaluate(net, te_x, te_s, cfg)
    res = {
        "config": asdict(cfg),
        "train_s": round(train_s, 1),
        "results": {
            "centroid on pixels": mean_ci(before["pixels"]),
            "centroid @ init (baseline)": mean_ci(before["centroid"]),
            "MAML adapt @ init (no meta-training)": mean_ci(before["maml"]),
            "MAML": mean_ci(after["maml"]),
            "centroid @ MAML features": mean_ci(after["centroid"]),
        },
        "paired_gain_maml_over_baseline": mean_ci(after["maml"] - before["centroid"]),
        "machine": f"{os.cpu_count()} cores, load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end",
        **log,
    }
    return res


def markdown(res: dict) -> str:
    """Markdown table of a ``run`` result."""
    c = res["config"]
    lines = [
        f"{c['n_way']}-way {c['k_shot']}-shot, {c['n_query']} queries per class, {c['test_episodes']} test "
        f"episodes on held-out subjects s26-s40 (meta-training on s1-s25), images {c['width']}x{c['height']}, conv4 with {c['channels']} channels; "
        f"MAML {'first' if c['first_order'] else 'second'} order, {c['inner_steps']} inner step(s) of lr "
        f"{c['inner_lr']} in training, {c['test_steps']} at test, {c['iterations']} iterations x "
        f"{c['meta_batch']} tasks ({res['train_s']} s wall; {res.get('machine', 'machine load not recorded')}).",
        "",
        "| method | accuracy | 95% CI |",
        "|---|---|---|",
    ]
    for name, r in res["results"].items():
        lines.append(f"| {name} | {100 * r['acc']:.1f}% | ± {100 * r['ci95']:.1f} |")
    g = res["paired_gain_maml_over_baseline"]
    lines.append(f"| MAML − baseline (paired, same episodes) | {100 * g['acc']:+.1f} pts | ± {100 * g['ci95']:.1f} |")
    return "\n".join(lines)


def write_report(res: dict, out: Path) -> str:
    """Write meta_orl_fewshot.json and meta_orl_fewshot.md under ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta_orl_fewshot.json").write_text(json.dumps(res, indent=1))
    md = "# ORL 5-way 1-shot, held-out identities: MAML vs nearest centroid\n\n" + markdown(res) + "\n"
    (out / "meta_orl_fewshot.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="folder holding orl/ (default: facemeta data root)")
    ap.add_argument("--iterations", type=int, default=Config.iterations)
    ap.add_argument("--size", default="23x28", help="W x H after resizing")
    ap.add_argument("--second-order", action="store_true")
    ap.add_argument("--channels", type=int, default=Config.channels)
    ap.add_argument("--episodes", type=int, default=Config.test_episodes)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.data is None:
        from facemeta.paths import data_root  # the benchmark (not facemeta.meta) may use the project

        a.data = data_root()
    w, h = (int(v) for v in a.size.lower().split("x"))
    cfg = Config(iterations=a.iterations, width=w, height=h, first_order=not a.second_order, seed=a.seed,
                 channels=a.channels, test_episodes=a.episodes)
    res = run(a.data / "orl", cfg)
    print(write_report(res, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

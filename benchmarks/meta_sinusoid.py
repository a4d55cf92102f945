"""Sinusoid regression (Finn et al., ICML 2017, section 5.1) with facemeta.meta.

Tasks: y = A sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5]; K = 10 support points;
network 1-40-40-1 with ReLU. Three ways to get an initialisation, each trained on the same
number of tasks:
- MAML (second order, 1 inner SGD step of α),
- Reptile (k inner SGD steps on the support set, outer ε),
- "pooled": ordinary regression on points of all tasks pooled (Finn et al.'s pretrained baseline).
Each is then evaluated identically on the same held-out tasks: adapt on K points with n SGD
steps of lr α (n = 0, 1, 10) and measure MSE on 100 fresh points of the task.

Usage: python benchmarks/meta_sinusoid.py [--iterations 20000] [--meta-batch 25] [--out results]
The test suite runs ``run(...)`` with a small budget (tests/test_meta_sinusoid.py).
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

import torch
from torch import nn

from facemeta.meta import MAML, Reptile, functional_forward

A_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


def sample_tasks(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Amplitudes and phases of ``n`` random tasks."""
    amp = torch.empty(n).uniform_(*A_RANGE, generator=g)
    phase = torch.empty(n).uniform_(*PHASE_RANGE, generator=g)
    return amp, phase


def sample_points(amp: torch.Tensor, phase: torch.Tensor, k: int, g: torch.Generator):
    """k random points of each task: x, y of shape [n, k, 1]."""
    x = torch.empty(amp.shape[0], k, 1).uniform_(*X_RANGE, generator=g)
    return x, amp[:, None, None] * torch.sin(x - phase[:, None, None])


def make_net(seed: int) -> nn.Module:
    """The 1-40-40-1 ReLU network of Finn et al."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def mse(net: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Squared-error loss of ``net`` as a function of a params dict."""
    return lambda p: ((functional_forward(net, p, x) - y) ** 2).mean()


@dataclass
class Config:
    """One sinusoid run (defaults: a CPU-sized version of Finn et al.'s setting)."""

    iterations: int = 5000       # Finn et al.: 70,000 iterations of 25 tasks
    meta_batch: int = 10
    k_shot: int = 10
    alpha: float = 0.01          # inner / adaptation SGD lr (Finn et al.: 0.01)
    outer_lr: float = 2e-3       # Adam, for MAML and pooled (Finn et al.: 1e-3, with 35x more tasks)
    reptile_steps: int = 10
    reptile_lr: float = 0.01
    reptile_eps: float = 0.3     # linearly annealed to 0
    eval_tasks: int = 300
    eval_points: int = 100
    seed: int = 0


def train_maml(cfg: Config) -> nn.Module:
    """Second-order MAML, 1 inner step of α, Adam outer, K points support and K query per task."""
    net = make_net(cfg.seed)
    maml = MAML(net, inner_steps=1, inner_lr=cfg.alpha)
    opt = torch.optim.Adam(maml.parameters(), lr=cfg.outer_lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    for _ in range(cfg.iterations):
        amp, ph = sample_tasks(cfg.meta_batch, g)
        xs, ys = sample_points(amp, ph, cfg.k_shot, g)
        xq, yq = sample_points(amp, ph, cfg.k_shot, g)
        opt.zero_grad()
        maml.meta_backward((mse(net, xs[i], ys[i]), mse(net, xq[i], yq[i])) for i in range(cfg.meta_batch))
        opt.step()
    return net


def train_reptile(cfg: Config) -> nn.Module:
    """Reptile: ``reptile_steps`` SGD steps on the K support points, outer ε linearly annealed to 0."""
    net = make_net(cfg.seed)
    rep = Reptile(net, inner_steps=cfg.reptile_steps, inner_lr=cfg.reptile_lr, epsilon=cfg.reptile_eps)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    for it in range(cfg.iterations):
        amp, ph = sample_tasks(cfg.meta_batch, g)
        xs, ys = sample_points(amp, ph, 2 * cfg.k_shot, g)  # same points per task as MAML sees
        rep.step([mse(net, xs[i], ys[i]) for i in range(cfg.meta_batch)],
                 epsilon=cfg.reptile_eps * (1 - it / cfg.iterations))
    return net


def train_pooled(cfg: Config) -> nn.Module:
    """The pretrained baseline: plain regression on the pooled points of the same number of tasks."""
    net = make_net(cfg.seed)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.outer_lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    for _ in range(cfg.iterations):
        amp, ph = sample_tasks(cfg.meta_batch, g)
        x, y = sample_points(amp, ph, 2 * cfg.k_shot, g)
        opt.zero_grad()
        ((net(x.reshape(-1, 1)) - y.reshape(-1, 1)) ** 2).mean().backward()
        opt.step()
    return net


def evaluate(net: nn.Module, cfg: Config, steps: tuple[int, ...] = (0, 1, 10), seed: int = 12345):
    """Post-adaptation MSE of each of ``eval_tasks`` new tasks (the same tasks for every net),
    as ``{"steps_<n>": tensor of per-task MSE}``."""
    g = torch.Generator().manual_seed(seed)
    amp, ph = sample_tasks(cfg.eval_tasks, g)
    xs, ys = sample_points(amp, ph, cfg.k_shot, g)
    xe = torch.linspace(*X_RANGE, cfg.eval_points).reshape(1, -1, 1).expand(cfg.eval_tasks, -1, -1)
    ye = amp[:, None, None] * torch.sin(xe - ph[:, None, None])
    maml = MAML(net, inner_lr=cfg.alpha, first_order=True)
    out: dict[str, torch.Tensor] = {}
    for n in steps:
        errs = []
        for i in range(cfg.eval_tasks):
            p = maml.adapt(mse(net, xs[i], ys[i]), steps=n)
            with torch.no_grad():
                errs.append(float(mse(net, xe[i], ye[i])({k: v.detach() for k, v in p.items()})))
        out[f"steps_{n}"] = torch.tensor(errs)
    return out


def _mean_ci(t: torch.Tensor) -> dict[str, float]:
    return {"mse": float(t.mean()), "ci95": float(1.96 * t.std() / math.sqrt(len(t)))}


def run(cfg: Config, methods: tuple[str, ...] = ("maml", "reptile", "pooled"),
        steps: tuple[int, ...] = (0, 1, 10)) -> dict:
    """Train each method on ``cfg`` and evaluate it; returns a JSON-able dict with mean ± 95% CI
    per method and, per method, the paired difference (pooled − method) over the same tasks."""
    trainers = {"maml": train_maml, "reptile": train_reptile, "pooled": train_pooled}
    load0 = os.getloadavg()[0]
    res: dict = {"config": asdict(cfg), "methods": {}, "paired_gain_over_pooled": {}}
    errs = {}
    for m in methods:
        t0 = time.perf_counter()
        net = trainers[m](cfg)
        train_s = round(time.perf_counter() - t0, 1)
        errs[m] = evaluate(net, cfg, steps)
        res["methods"][m] = {"train_s": train_s, **{k: _mean_ci(v) for k, v in errs[m].items()}}
    res["machine"] = f"{os.cpu_count()} cores, load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    if "pooled" in errs:
        for m in errs:
            if m != "pooled":
                res["paired_gain_over_pooled"][m] = {
                    k: _mean_ci(errs["pooled"][k] - errs[m][k]) for k in errs[m]
                }
    return res


def markdown(res: dict) -> str:
    """A small Markdown table of a ``run`` result."""
    keys = [k for k in next(iter(res["methods"].values())) if k.startswith("steps_")]
    head = " | ".join(f"MSE after {k[6:]} step(s)" for k in keys)
    lines = [f"| method | {head} | train wall s |", "|---" * (len(keys) + 2) + "|"]
    for m, r in res["methods"].items():
        cells = [f"{r[k]['mse']:.3f} ± {r[k]['ci95']:.3f}" for k in keys]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {r['train_s']} |")
    for m, gains in res.get("paired_gain_over_pooled", {}).items():
        cells = [f"{gains[k]['mse']:.3f} ± {gains[k]['ci95']:.3f}" for k in keys]
        lines.append(f"| pooled − {m} (paired) | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def write_report(res: dict, out: Path) -> str:
    """Write meta_sinusoid.json and meta_sinusoid.md under ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta_sinusoid.json").write_text(json.dumps(res, indent=1))
    c = res["config"]
    md = (
        "# Sinusoid regression: MAML and Reptile vs a pooled-pretrained network\n\n"
        f"Finn et al. 2017 setting (A in [0.1, 5], phase in [0, pi], x in [-5, 5], K={c['k_shot']}, 1-40-40-1 ReLU), "
        f"trained on {c['iterations']} x {c['meta_batch']} tasks per method (CPU, 1 thread, seed {c['seed']}). "
        f"Evaluation: the same {c['eval_tasks']} new tasks for every net; adapt on K points with n SGD steps of "
        f"lr {c['alpha']}; MSE on {c['eval_points']} points over [-5, 5]; mean ± 95% CI over tasks. "
        "MAML: second order, 1 inner step of that lr, Adam outer. "
        f"Reptile: {c['reptile_steps']} inner SGD steps of lr {c['reptile_lr']}, eps {c['reptile_eps']} annealed to 0.\n\n"
        + markdown(res) + "\n\nPaired rows: per-task MSE of the pooled net minus that of the method (positive = better than pooled).\n"
        f"Train times are wall seconds ({res.get('machine', 'machine load not recorded')}).\n"
        "Finn et al. (2017) show their sinusoid results only as plots (qualitative fits, and MSE against "
        "the number of gradient steps for K = 5, 10, 20, MAML vs a pretrained net vs an oracle), after "
        "70,000 iterations of 25 tasks; we transcribe no number from them and claim none as reproduced.\n"
    )
    (out / "meta_sinusoid.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=Config.iterations)
    ap.add_argument("--meta-batch", type=int, default=Config.meta_batch)
    ap.add_argument("--alpha", type=float, default=Config.alpha)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = Config(iterations=a.iterations, meta_batch=a.meta_batch, alpha=a.alpha, seed=a.seed)
    res = run(cfg)
    print(write_report(res, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How much each term of ERM, MFR and CDT pulls on the backbone at the first step from the prior.

For one leave-one-out split of a benchmark preset (default `prior-styled`, target `orl`: its sources only) it
builds each method's starting state exactly as a run does (the prior's weights, prototype class weights) and,
on the first `--episodes` episodes (the ones a run trains on first, augmentations included), measures the
gradient with respect to the BACKBONE's parameters of every term of the objectives, at weight 1:

- erm: CosFace on the pooled batch (the reference direction);
- mfr: meta-train L_cls (cosine softmax), L_hp (hard pairs), L_da (domain alignment); meta-test L_cls + L_hp;
- cdt: meta-train CosFace, triplet; meta-test CosFace + triplet, and L_cdt(j | i) (domain i's metric);
- the virtual step: how far the meta-test gradient at θ' = θ − α∇L_S moves from the one at θ, for several
  α (first order, as the presets train): the only thing that makes MFR/CDT's step differ from a sum of losses.

For each term: the norm of its gradient, its ratio to the classification term of the same method, and its
cosine with ERM's gradient; mean over episodes. Nothing is trained; no target image is read.

    python benchmarks/term_gradients.py --out benchmarks/results/term_gradients
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from results_files import machine, write_results


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """The gradient of `loss` with respect to `params`, flattened into one vector (zeros where unused)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for p, g in zip(params, grads, strict=True)])


def mfr_test_grad(joint, params: dict[str, torch.Tensor], parts, settings) -> torch.Tensor:
    """The backbone gradient of MFR's meta-test loss (L_cls + hp_weight · L_hp) on the domains `parts`, at
    `params`."""
    from facemeta.meta import functional_forward
    from facemeta.objectives.mfr import hard_pair_attention_loss
    from facemeta.train.methods import split_by_domain

    x = torch.cat([d.images for d in parts])
    y = torch.cat([d.all_labels for d in parts])
    e = functional_forward(joint, params, x, buffers="copy")
    head = {k[len("heads.cls."):]: v for k, v in params.items() if k.startswith("heads.cls.")}
    logits = torch.func.functional_call(joint.heads["cls"], head, (e,))
    hp = torch.stack([hard_pair_attention_loss(g, q, settings.tau_p, settings.tau_n)
                      for g, q in split_by_domain(e, parts)]).mean()
    loss = torch.nn.functional.cross_entropy(logits, y) + settings.hp_weight * hp
    return flat_grad(loss, [params[n] for n in params if n.startswith("model.")])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="prior-styled", help="benchmark preset whose runs are diagnosed")
    ap.add_argument("--target", default="orl", help="the left-out target (its sources are used, never it)")
    ap.add_argument("--episodes", type=int, default=6, help="episodes to average over (default 6)")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.0005, 0.005, 0.05],
                    help="virtual-step sizes to measure (the presets train with 0.0005; 0 checks the "
                         "measurement: it must give 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/term_gradients")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from facemeta.data.episodes import EpisodicDomainSampler
    from facemeta.experiments.presets import load_bench_preset, run_config
    from facemeta.objectives.cdt import cross_domain_triplet_loss, pair_covariances
    from facemeta.objectives.mfr import domain_alignment_loss, hard_pair_attention_loss
    from facemeta.objectives.triplet import triplet_loss
    from facemeta.train.data import prepare_data
    from facemeta.train.methods import Joint, load_episode, split_by_domain
    from facemeta.train.trainer import Trainer

    preset = load_bench_preset(args.preset)
    setups = {}
    data = None
    for method in ("erm", "mfr", "cdt"):
        cfg = run_config(preset, args.target, method, preset.seeds[0])
        data = data or prepare_data(cfg)
        model, head, dataset = Trainer(cfg, data, progress=False).start_state()
        setups[method] = (cfg, Joint(model, head if isinstance(head, torch.nn.ModuleDict) else {"cls": head}),
                          dataset)
    cfg0, _, dataset = setups["erm"]
    settings = setups["mfr"][0].meta
    sampler = EpisodicDomainSampler(dataset.labels, dataset.domains, cfg0.sampler.identities_per_domain,
                                    settings.meta_test_domains, seed=cfg0.seed)
    rows: dict[str, list[dict[str, float]]] = {}

    def record(name: str, grad: torch.Tensor, ref: torch.Tensor, erm: torch.Tensor) -> None:
        rows.setdefault(name, []).append({
            "norm": float(grad.norm()), "ratio": float(grad.norm() / ref.norm().clamp_min(1e-12)),
            "cos_erm": float(torch.nn.functional.cosine_similarity(grad, erm, dim=0))})

    for i in range(args.episodes):
        batch = load_episode(dataset, sampler.episode(i), cfg0.seed)
        x_all = torch.cat([d.images for d in batch.domains])
        y_all = torch.cat([d.all_labels for d in batch.domains])
        # ERM: CosFace on the pooled batch
        joint = setups["erm"][1]
        params = [p for p in joint.model.parameters() if p.requires_grad]
        g_erm = flat_grad(joint.heads["cls"].loss(joint(x_all), y_all), params)
        record("erm: CosFace (pooled)", g_erm, g_erm, g_erm)

        tr, te = batch.meta_train, batch.meta_test
        x_tr = torch.cat([d.images for d in tr])
        y_tr = torch.cat([d.all_labels for d in tr])
        dom_tr = torch.cat([torch.full((2 * len(d.labels),), d.domain) for d in tr])
        x_te = torch.cat([d.images for d in te])
        y_te = torch.cat([d.all_labels for d in te])

        # MFR
        joint = setups["mfr"][1]
        params = [p for p in joint.model.parameters() if p.requires_grad]
        emb = joint(x_tr)
        g_cls = flat_grad(joint.heads["cls"].loss(emb, y_tr), params)
        hp = torch.stack([hard_pair_attention_loss(g, p, settings.tau_p, settings.tau_n)
                          for g, p in split_by_domain(emb, tr)]).mean()
        record("mfr: L_cls meta-train (cosine softmax)", g_cls, g_cls, g_erm)
        record("mfr: L_hp meta-train", flat_grad(hp, params), g_cls, g_erm)
        record("mfr: L_da meta-train", flat_grad(domain_alignment_loss(emb, dom_tr), params), g_cls, g_erm)
        emb_te = joint(x_te)
        record("mfr: L_cls meta-test", flat_grad(joint.heads["cls"].loss(emb_te, y_te), params), g_cls, g_erm)
        hp_te = torch.stack([hard_pair_attention_loss(g, p, settings.tau_p, settings.tau_n)
                             for g, p in split_by_domain(emb_te, te)]).mean()
        record("mfr: L_hp meta-test", flat_grad(hp_te, params), g_cls, g_erm)

        # CDT
        joint = setups["cdt"][1]
        params = [p for p in joint.model.parameters() if p.requires_grad]
        emb = joint(x_tr)
        g_cls = flat_grad(joint.heads["cls"].loss(emb, y_tr), params)
        trip = torch.stack([triplet_loss(torch.cat([g, p]), d.all_labels, margin=settings.triplet_margin)
                            for d, (g, p) in zip(tr, split_by_domain(emb, tr), strict=True)]).mean()
        record("cdt: CosFace meta-train", g_cls, g_cls, g_erm)
        record("cdt: triplet meta-train", flat_grad(trip, params), g_cls, g_erm)
        covs = [pair_covariances(torch.cat([g, p]).detach(), d.all_labels)
                for d, (g, p) in zip(tr, split_by_domain(emb, tr), strict=True)]
        emb_te = joint(x_te)
        cdt = torch.stack([cross_domain_triplet_loss(torch.cat([g, p]), d.all_labels, cp, cn, settings.cdt_margin,
                                                     settings.cdt_mining)
                           for d, (g, p) in zip(te, split_by_domain(emb_te, te), strict=True)
                           for cp, cn in covs]).mean()
        record("cdt: L_cdt meta-test", flat_grad(cdt, params), g_cls, g_erm)

        # The virtual step (MFR's losses): meta-test gradient at θ − α∇L_S against the one at θ.
        joint = setups["mfr"][1]
        theta = {n: p for n, p in joint.named_parameters() if p.requires_grad}
        emb = joint(x_tr)
        loss_s = (joint.heads["cls"].loss(emb, y_tr)
                  + settings.hp_weight * torch.stack([hard_pair_attention_loss(g, p, settings.tau_p, settings.tau_n)
                                 for g, p in split_by_domain(emb, tr)]).mean()
                  + settings.da_weight * domain_alignment_loss(emb, dom_tr))
        g_s = torch.autograd.grad(loss_s, list(theta.values()), allow_unused=True)
        at_theta = mfr_test_grad(joint, {n: t.detach().requires_grad_() for n, t in theta.items()}, te, settings)
        for alpha in args.alphas:
            fast = {n: (t - alpha * g).detach().requires_grad_() if g is not None else t.detach().requires_grad_()
                    for (n, t), g in zip(theta.items(), g_s, strict=True)}
            moved = mfr_test_grad(joint, fast, te, settings) - at_theta
            record(f"mfr: virtual step alpha {alpha:g} (grad L_T(θ') − grad L_T(θ))", moved, at_theta, g_erm)
        print(f"episode {i + 1}/{args.episodes} done", file=sys.stderr, flush=True)

    summary = {name: {k: statistics.fmean(r[k] for r in recs) for k in recs[0]} for name, recs in rows.items()}
    lines = [f"# Gradient of each term on the backbone, first steps from the prior (preset `{preset.name}`, "
             f"leave-{args.target}-out sources)", "",
             f"Machine: {machine()}. Mean over the first {args.episodes} episodes of the sources (seed "
             f"{cfg0.seed}); each method's starting state as its runs build it (prior weights, prototype class "
             "weights); every term at weight 1. `ratio`: norm / the norm of the same method's classification term "
             "on the meta-train domains (for the virtual step: / the meta-test gradient at θ). `cos ERM`: cosine "
             "with ERM's gradient on the same images.", "",
             "| term | grad norm | ratio | cos ERM |", "| --- | --- | --- | --- |"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['norm']:.4g} | {s['ratio']:.3f} | {s['cos_erm']:.3f} |")
    write_results(args.out, {"preset": preset.name, "target": args.target, "episodes": args.episodes,
                             "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
                             "terms": summary, "per_episode": rows, "machine": machine()}, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The Python part of benchmarks/gpu_check.sh (issue 26, item 4): one stage per call, each writing its own part
file as it goes, so a stage that fails or runs out of time loses only itself, and a rerun resumes.

Stages (``--stage``):
- ``env``: torch, CUDA, the device, bf16 support, and whether facemeta's training modules import.
- ``train``: training throughput per method (erm, mfr, cdt, reptile, adapt-maml-fo, adapt-reptile) through
  facemeta.train.methods.train_step: dlib_resnet29 at 150 px (the shipped model's architecture; weights random,
  which does not change the cost), synthetic episodes of 3 domains x B identities x 2 images; variants fp32,
  bf16 autocast, bf16 + channels_last, and bf16 + channels_last + torch.compile for ERM (a plain forward; the
  meta methods' functional inner loops are not compiled). Images per second = images per step / s per step.
- ``embed``: embedding throughput (images/s, forward only, inference mode) of the shipped model (each member of
  an ensemble) and SFace's architecture; fp32, bf16 + channels_last, and the same compiled.
- ``adapt``: facemeta adapt's procedure (facemeta.train.adapt: the tail fine-tuned on cached front features,
  interpolated back, threshold calibrated) at larger budgets than the CPU default (more steps, more blocks,
  k = 20), scored as `facemeta benchmark adapt` scores (facemeta.experiments.adapt_bench: TAR@FAR=1e-2 on the
  other people's enrolment-vs-target pairs), on real aligned faces carried in ``--carry`` (written here by
  ``--stage prepare``); without them, on random faces (timings only, no accuracy).
- ``report``: every part -> results.json and results.md.
- ``prepare`` (run on the CPU machine, not in the script): write ``--carry`` (default runs/gpu_carry, ignored by
  git): a single-model base checkpoint and the aligned faces of the adapt benchmark's protocols (npz), for the
  device run's ``carry``.

The adapt and prepare stages live in benchmarks/gpu_adapt.py, the shared plumbing (part files, timers, budget) in
benchmarks/gpu_common.py.

``--quick`` (or QUICK=1): tiny sizes, a couple of steps, for a dry run on a CPU; results go to the dry-run
folder. ``--budget`` seconds: a stage starts no new measurement after it (the shell script also kills a
stage at its own limit). Parts are rewritten after every measurement; a rerun skips what a part already holds
for the same setup (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_common, gpu_adapt beside this file
from gpu_adapt import stage_adapt, stage_prepare, stats_only_np  # noqa: E402
from gpu_common import ROOT, Budget, Part, device_of, timed, write_json  # noqa: E402

METHOD_ORDER = ("erm", "mfr", "cdt", "reptile", "adapt-maml-fo", "adapt-reptile")
STAGES = ("env", "train", "embed", "adapt", "report", "prepare")
__all__ = ["main", "model_configs", "stats_only_np"]  # stats_only_np: re-exported for the tests


# ---------------------------------------------------------------- env
def stage_env(args, out: Path) -> None:
    """What the machine is, and whether facemeta's modules the other stages need import here."""
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(), "quick": args.quick}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), memory_gib=round(p.total_memory / 2 ** 30, 1),
                    multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported(),
                    cuda_version=torch.version.cuda)
    imports = {}
    for mod in ("facemeta.train.methods", "facemeta.train.adapt", "facemeta.experiments.adapt_bench",
                "facemeta.models.ensemble", "facemeta.models.sface", "timm", "safetensors", "scipy"):
        try:
            __import__(mod)
            imports[mod] = "ok"
        except Exception as exc:  # report every missing piece, not the first
            imports[mod] = f"{type(exc).__name__}: {exc}"[:200]
    info["imports"] = imports
    info["carry"] = sorted(p.name for p in Path(args.carry).glob("*")) if Path(args.carry).is_dir() else []
    write_json(out / "parts" / "env.json", {"stage": "env", "rows": {"env": info}})
    print(json.dumps(info, indent=1), flush=True)


# ---------------------------------------------------------------- train
def synthetic_batch(b: int, size: int, device, channels_last: bool):
    """An EpisodeBatch of 3 domains x b identities x (gallery, probe), random pixels, distinct global labels."""
    import torch

    from facemeta.train.methods import DomainTensors, EpisodeBatch

    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    doms = []
    for d in range(3):
        imgs = [torch.randn(b, 3, size, size, generator=g).to(device).contiguous(memory_format=fmt) for _ in range(2)]
        doms.append(DomainTensors(d, imgs[0], imgs[1], (torch.arange(b) + b * d).to(device)))
    return EpisodeBatch(doms[:2], doms[2:])


def train_variants(quick: bool, device) -> list[tuple[str, bool, bool, bool]]:
    """(name, bf16, channels_last, compile) of each variant measured."""
    if quick:
        return [("fp32", False, False, False), ("bf16+cl", True, True, False)]
    if device.type != "cuda":
        return [("fp32", False, False, False)]
    return [("fp32", False, False, False), ("bf16", True, False, False), ("bf16+cl", True, True, False),
            ("bf16+cl+compile", True, True, True)]


def stage_train(args, out: Path) -> None:
    """Seconds per step and images per second of each method x variant (see the module docstring)."""
    import torch

    from facemeta.models.backbone import ModelConfig, build_model
    from facemeta.objectives.margins import CosFaceHead
    from facemeta.train.methods import Joint, MethodSettings, build_heads, train_step

    device = device_of(args.device)
    b, steps, warm = (2, 1, 1) if args.quick else (args.identities, args.repeats, 3)
    setup = {"backbone": "dlib_resnet29", "image_size": 150, "embedding": 128, "identities_per_domain": b,
             "domains": 3, "images_per_step": 3 * b * 2, "repeats": steps, "warmup": warm, "device": str(device),
             "quick": args.quick}
    part = Part(out, "train", setup, args.fresh)
    budget = Budget(args.budget)
    settings = MethodSettings()
    methods = [m for m in METHOD_ORDER if not args.methods or m in args.methods.split(",")]
    for vname, bf16, cl, comp in train_variants(args.quick, device):
        for method in methods:
            key = f"{method}/{vname}"
            if comp and method != "erm" or part.has(key):
                continue
            if budget.over():
                print(f"  budget spent before {key}", flush=True)
                part.save()
                return
            try:
                torch.manual_seed(0)
                model = build_model(ModelConfig(backbone="dlib_resnet29", head="linear", embedding_size=128,
                                                image_size=150))
                heads = build_heads(method, 128, 3 * b, lambda: CosFaceHead(128, 3 * b, s=64.0, m=0.05), settings)
                joint = Joint(model, heads).to(device).train()
                if cl:
                    joint = joint.to(memory_format=torch.channels_last)
                if comp:
                    joint.model.compile()
                opt = torch.optim.SGD(joint.parameters(), lr=1e-4, momentum=0.9)
                batch = synthetic_batch(b, 150, device, cl)
                losses = []

                def step(joint=joint, batch=batch, opt=opt, method=method, bf16=bf16, losses=losses):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        res = train_step(method, joint, batch, opt, settings, grad_clip=5.0)
                    losses.append(res.losses["loss"])

                t = timed(step, device, warm, steps)
                row = {**t, "method": method, "variant": vname, "images_per_step": batch.num_images,
                       "images_per_s": round(batch.num_images / t["median_s"], 1),
                       "loss_finite": bool(np.isfinite(losses).all())}
                part.add(key, row)
                print(f"  {key}: {row['median_s']:.4f} s/step, {row['images_per_s']} img/s", flush=True)
            except Exception as exc:  # one failed variant must not lose the others
                part.error(key, exc)
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()


# ---------------------------------------------------------------- embed
def embed_models(args) -> list[tuple[str, object, str]]:
    """(name, network, where its weights came from) for the shipped model (each member of an ensemble) and
    SFace's architecture. A checkpoint that cannot be loaded here (an ensemble member referencing a package that
    is not installed) is rebuilt from its config with random weights: the cost is the architecture's."""
    from facemeta.models.backbone import ModelConfig, build_model

    found = []
    path = Path(args.model) if args.model else ROOT / "weights" / "default.safetensors"
    try:
        from facemeta.models.ensemble import load_model

        model, _ = load_model(path)
        members = list(model.members) if hasattr(model, "members") else [model]
        for i, m in enumerate(members):
            found.append((f"shipped[{i}] {m.config.backbone}" if len(members) > 1 else "shipped", m,
                          f"{path.name} (trained weights)"))
    except Exception as exc:  # rebuild the architectures from the sidecar JSON
        why = f"{type(exc).__name__}: {exc}"[:120]
        try:
            sidecar = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            configs = list(model_configs(sidecar.get("config")))  # the model's, or each member's
        except Exception:  # noqa: BLE001 - no sidecar: say why the model itself failed
            configs = []
        if not configs:
            print(f"  shipped model not measured: {why}", flush=True)
        fields = ModelConfig.__dataclass_fields__
        for i, cfg in enumerate(configs):
            model = build_model(ModelConfig(**{k: v for k, v in cfg.items() if k in fields}))
            found.append((f"shipped[{i}] {cfg['backbone']}" if len(configs) > 1 else "shipped", model,
                          f"{path.name} config, random weights (load failed: {why})"))
    found.append(("sface", build_model(ModelConfig(backbone="sface", head="insightface", embedding_size=128,
                                                   image_size=112)), "SFace architecture, random weights"))
    return found


def model_configs(doc):
    """Every dict holding a "backbone" key in a checkpoint's JSON (a model's config, or an ensemble's members')."""
    if isinstance(doc, dict):
        if "backbone" in doc and isinstance(doc["backbone"], str):
            yield doc
            return
        for v in doc.values():
            yield from model_configs(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from model_configs(v)


def stage_embed(args, out: Path) -> None:
    """Forward-only images/s of each network at a fixed batch, per variant."""
    import torch

    device = device_of(args.device)
    batch, steps = (4, 1) if args.quick else (args.embed_batch, args.repeats)
    variants = [("fp32", False, False)] if device.type != "cuda" else [
        ("fp32", False, False), ("bf16+cl", True, False), ("bf16+cl+compile", True, True)]
    if args.quick:
        variants = [("fp32", False, False), ("bf16+cl", True, False)]
    part = Part(out, "embed", {"batch": batch, "repeats": steps, "device": str(device), "quick": args.quick},
                args.fresh)
    budget = Budget(args.budget)
    networks = embed_models(args)
    for vname, bf16, comp in variants:  # every network uncompiled before any compile
        for name, model, source in networks:
            size = model.config.image_size
            key = f"{name}/{vname}"
            if part.has(key):
                continue
            if budget.over():
                print(f"  budget spent before {key}", flush=True)
                return
            try:
                m = model.to(device).eval()
                if bf16:
                    m = m.to(memory_format=torch.channels_last)
                fwd = torch.compile(m) if comp else m
                x = torch.randn(batch, 3, size, size, device=device)
                if bf16:
                    x = x.contiguous(memory_format=torch.channels_last)

                def run(fwd=fwd, x=x, bf16=bf16):
                    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        fwd(x)

                t = timed(run, device, 3 if not args.quick else 1, steps)
                row = {**t, "network": name, "weights": source, "variant": vname, "batch": batch,
                       "image_size": size, "images_per_s": round(batch / t["median_s"], 1)}
                part.add(key, row)
                print(f"  {key}: {row['images_per_s']} img/s", flush=True)
            except Exception as exc:  # keep the other networks' figures
                part.error(key, exc)

# ---------------------------------------------------------------- report
def fmt(v, spec: str = ".1f") -> str:
    return "" if v is None else format(v, spec)


def stage_report(args, out: Path) -> None:
    """Merge the parts into results.json and results.md."""
    parts = {}
    for p in sorted((out / "parts").glob("*.json")):
        parts[p.stem] = json.loads(p.read_text(encoding="utf-8"))
    write_json(out / "results.json", parts)
    env = parts.get("env", {}).get("rows", {}).get("env", {})
    lines = ["# GPU check (benchmarks/gpu_check.sh)", "",
             f"Device: {env.get('device', 'no CUDA device')} (torch {env.get('torch')}, CUDA {env.get('cuda_version')}, "
             f"{env.get('cpus')} CPUs); {'DRY RUN (--quick): tiny sizes, not a measurement' if env.get('quick') else ''}",
             ""]
    train = parts.get("train")
    if train:
        s = train["setup"]
        lines += ["## Training throughput per method", "",
                  f"{s['backbone']} at {s['image_size']} px, {s['images_per_step']} images per step (3 domains x "
                  f"{s['identities_per_domain']} identities x 2), random weights and pixels; median of {s['repeats']} "
                  "steps after warm-up (first call: compile and autotuning).", "",
                  "| method | variant | s/step | images/s | first call (s) | peak GiB | loss finite |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in train["rows"].values():
            lines.append(f"| {r['method']} | {r['variant']} | {r['median_s']:.4f} | {r['images_per_s']} | "
                         f"{r['first_call_s']} | {fmt(r.get('peak_memory_gib'), '.2f')} | {r['loss_finite']} |")
        lines += [f"- {k}: {v}" for k, v in train.get("errors", {}).items()] + [""]
    emb = parts.get("embed")
    if emb:
        lines += ["## Embedding throughput", "", f"Batch {emb['setup']['batch']}, forward only (no flip), "
                  "inference mode.", "", "| network | weights | variant | images/s | first call (s) |",
                  "| --- | --- | --- | --- | --- |"]
        for r in emb["rows"].values():
            lines.append(f"| {r['network']} | {r['weights']} | {r['variant']} | {r['images_per_s']} | "
                         f"{r['first_call_s']} |")
        lines += [f"- {k}: {v}" for k, v in emb.get("errors", {}).items()] + [""]
    ad = parts.get("adapt")
    if ad:
        lines += ["## Adapt at larger budgets", "", f"Base: {ad['setup']['base']}. TAR at FAR=1e-2 (%) on the other "
                  "people's enrolment-vs-target pairs, mean over draws (n); fit: seconds of the tail's fine-tuning.",
                  "", "| protocol | k | setting | n | base | stats-only | adapt | adapt − stats-only | fit (s) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        groups: dict = {}
        for r in ad["rows"].values():
            groups.setdefault((r["protocol"], r["k"], r["setting"]), []).append(r)
        for (proto, k, name), rs in groups.items():
            def m(row, field="tar", rs=rs):
                return 100 * float(np.mean([x["rows"][row][field] for x in rs]))
            synthetic = rs[0].get("synthetic")
            tar = (lambda row: "—") if synthetic else (lambda row: f"{m(row):.1f}")
            diff = "—" if synthetic else f"{m('adapt') - m('stats-only'):+.1f}"
            fit = float(np.mean([x["rows"]["adapt"]["fit_seconds"] for x in rs]))
            lines.append(f"| {proto} | {k} | {name} | {len(rs)} | {tar('base')} | {tar('stats-only')} | "
                         f"{tar('adapt')} | {diff} | {fit:.2f} |")
        lines += [f"- {k}: {v}" for k, v in ad.get("errors", {}).items()] + [""]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run one stage (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--stage", choices=STAGES, required=True)
    ap.add_argument("--out", help="results folder (default benchmarks/results/gpu, or .../gpu/dry-run with --quick)")
    ap.add_argument("--quick", action="store_true", default=os.environ.get("QUICK") == "1",
                    help="tiny dry run (also QUICK=1)")
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda or cpu")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds after which a stage starts nothing new")
    ap.add_argument("--fresh", action="store_true", help="ignore what the stage's part already holds")
    ap.add_argument("--carry", default=str(ROOT / "runs" / "gpu_carry"),
                    help="folder of the carried base model and aligned faces (prepare writes it)")
    ap.add_argument("--model", help="embed/prepare: the model (default weights/default.safetensors)")
    ap.add_argument("--protocols", help="prepare: comma list of adapt protocols to carry")
    ap.add_argument("--methods", help="train: comma list (default every method)")
    ap.add_argument("--identities", type=int, default=32, help="train: identities per domain (GPU run)")
    ap.add_argument("--embed-batch", type=int, default=256, help="embed: batch size (GPU run)")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (GPU run)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "gpu" / ("dry-run" if args.quick else "")
    if args.quick:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    {"env": stage_env, "train": stage_train, "embed": stage_embed, "adapt": stage_adapt,
     "report": stage_report, "prepare": stage_prepare}[args.stage](args, out)
    print(f"stage {args.stage}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

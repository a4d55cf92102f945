"""Adapt a facemeta model to a new domain from a few labelled people (issue 26): ``facemeta adapt``.

Layout of the labelled folder (DIR): one sub-folder per person, named after them, holding that person's photos
from the NEW domain (``DIR/<person>/*.jpg``); the same person's photos from the ENROLMENT domain (the photos a
gallery would hold, e.g. ordinary camera portraits) may sit in a sub-folder ``DIR/<person>/enrolled/``. Both
kinds train the model (same label); the enrolment photos make the cross-domain pairs it learns to match.

The procedure (chosen on shared data, benchmarks/results/adapt/choice/; measured in benchmarks/results/adapt/,
where it stays within about a point of the base model on the other people of the target):
1. align every photo once, through the product's route (the embedder's MTCNN and fallback routes, warped onto
   the model's chip), and run the FROZEN front of the network once over the faces and their mirror images;
2. fine-tune the TAIL (facemeta.train.adapt_tail: the last ``tail_blocks`` residual blocks of the dlib-prior
   ResNet and the embedding layer; for SFace its last ``other_blocks`` depthwise-separable pairs (default 0) and
   its embedding head; the embedding head only for other backbones; batch norms' running statistics frozen) on
   the cached features, ``steps`` full-batch steps of plain SGD on a prototype CosFace loss over the k people
   (facemeta.train.adapt_loss; class centres = each person's current mean embedding, or with ``centres``
   "enrolled" their enrolment photos' mean, against which the new-domain photos are classified; a centre needs
   no weights, so the same loss serves as the inner loop of meta-training, facemeta.train.adapt_episodes);
3. interpolate back toward the base weights (keep ``interpolate`` of the change: WiSE-FT);
4. calibrate the threshold on impostor pairs (different people) among the labelled photos at the base model's
   false-accept rate, and write the checkpoint with an "adapted_on" model-card section and a .md card beside it.

With a domain (``domain``, optionally ``unlabelled`` photos of it), the domain's statistics
(facemeta.gallery.domain_stats, mean kind) are estimated from the base model's vectors, subtracted from the
new-domain embeddings inside the loss, re-estimated with the adapted model and stored in the meta
(``domains.<name>``) with a threshold calibrated on vectors normalised the same way.

An ensemble (facemeta.models.ensemble, e.g. dlib's prior and SFace) is adapted member by member: each chosen
member by steps 1-3 on its own chip of the same photos (a domain's mean removed in that member's space), the
others and the weights of the combination kept; step 4 runs on the ensemble's vectors, and the result is an
ensemble checkpoint (every member's tensors in the file) with its own fingerprint. The photos are read and aligned
by facemeta.train.adapt_faces.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facemeta.errors import CheckpointError, ConfigError
from facemeta.train.adapt_faces import (  # noqa: F401  (re-exported: the benchmark aligns through align_photos)
    ENROL,
    ENROLLED,
    NEW,
    LabelledFaces,
    align_chips,
    align_photos,
    labelled_faces,
    progress_bar,
    read_labelled,
    unlabelled_faces,
)
from facemeta.train.adapt_loss import CENTRES, adapt_loss, class_centres, prototype_cosface_loss  # noqa: F401
from facemeta.train.adapt_tail import Tail, front_features  # noqa: F401  (re-exported)


@dataclass
class AdaptSettings:
    """What `adapt` trains and how. Defaults chosen on AR neutral vs scarf and MFR2 unmasked vs masked, k = 10
    people, scored on the other people (benchmarks/results/adapt/choice/): the stable setting that lost least
    against the base model; lr 1e-4 because from the shipped model (gradient norm ~80 on the embedding layer at
    s 30) SGD at 3e-4 and above makes the loss oscillate and climb.

    tail_blocks: trailing residual blocks of dlib_resnet29 fine-tuned with the embedding layer (0: the
      embedding layer only; other backbones train their embedding head only). steps, lr: full-batch plain SGD.
    scale, margin: CosFace's s and m on cosines to the class centres. interpolate: share of the change kept
      (1: the fine-tuned weights, 0: the base). centres: the class centres of the loss, each person's mean
      embedding in the current step ("batch") or at the start, before any step ("start", fixed targets).
      "enrolled": each person's mean over their enrolment photos only, and only the new-domain photos classified
      against them (the cross-domain pairs; facemeta.train.adapt_loss). seed: the flip augmentation's draws.
    other_blocks: trailing blocks fine-tuned with the embedding head on a backbone other than dlib_resnet29 that
      has them (SFace: its 13 depthwise-separable pairs, the last two its 7x7 stage); 0 (the default): the
      embedding head only. tail_blocks counts dlib's residual blocks only.
    """

    tail_blocks: int = 4
    steps: int = 30
    lr: float = 1e-4
    scale: float = 30.0
    margin: float = 0.2
    interpolate: float = 0.5
    centres: str = "batch"
    seed: int = 0
    other_blocks: int = 0

    def check(self) -> None:
        """ConfigError naming the first setting out of range."""
        for ok, msg in ((self.tail_blocks >= 0, "tail_blocks must be >= 0"), (self.steps >= 1, "steps must be >= 1"),
                        (self.lr > 0, "lr must be > 0"), (self.scale > 0, "scale must be > 0"),
                        (self.margin >= 0, "margin must be >= 0"),
                        (0 <= self.interpolate <= 1, "interpolate must be in [0, 1]"),
                        (self.centres in CENTRES, f"centres must be one of {', '.join(CENTRES)}"),
                        (self.other_blocks >= 0, "other_blocks must be >= 0")):
            if not ok:
                raise ConfigError(msg)


# ---------------------------------------------------------------- input
def check_base_model(path: str | os.PathLike) -> Path:
    """The base checkpoint's path; an ONNX export is refused (its graph cannot be fine-tuned here), and so is a
    file that is not a facemeta checkpoint (a one-line CheckpointError)."""
    from facemeta.embedder import checkpoint_path
    from facemeta.models.checkpoint import read_checkpoint_info

    p = Path(path)
    if p.suffix.lower() == ".onnx":
        raise CheckpointError(f"{p} is an ONNX export: adapt fine-tunes facemeta checkpoints only; adapt the "
                              ".safetensors it was exported from (its contract names its fingerprint), then export")
    p = checkpoint_path(p)
    try:
        read_checkpoint_info(p)
    except CheckpointError as exc:
        raise CheckpointError(f"{p} is not a facemeta model: {exc}") from None
    return p


# ---------------------------------------------------------------- the loss and the fit
def tail_embed(tail: nn.Module, feats: torch.Tensor, shift: torch.Tensor | None = None,
               params: dict | None = None) -> torch.Tensor:
    """Unit embeddings of cached front features through the tail (at `params` when given, facemeta.meta's
    functional form), with a domain's mean `shift` [N,E] removed and renormalised when given."""
    if params is None:
        raw = tail(feats)
    else:
        from facemeta.meta import functional_forward

        raw = functional_forward(tail, params, feats)
    emb = F.normalize(raw, dim=1)
    return emb if shift is None else F.normalize(emb - shift, dim=1)


def draw_views(feats: torch.Tensor, flipped: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each face as itself or its mirror image, at random (the flip augmentation on cached features)."""
    pick = torch.rand(len(feats), generator=generator) < 0.5
    return torch.where(pick.view(-1, *([1] * (feats.dim() - 1))), flipped, feats)


def train_mode(tail: nn.Module) -> None:
    """Training mode for the tail, with its batch norms (SFace's head) kept in eval mode: a batch of a few
    labelled photos would replace their running statistics (which the interpolation does not take back) and
    normalise the loss's embeddings by batch statistics the adapted model never uses. dlib's ResNet has none."""
    tail.train()
    for m in tail.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def fit_tail(tail: Tail, feats: torch.Tensor, flipped: torch.Tensor, labels: torch.Tensor,
             settings: AdaptSettings, shift: torch.Tensor | None = None, progress: bool = False,
             desc: str = "adapt", enrolled: torch.Tensor | None = None) -> list[float]:
    """`settings.steps` full-batch SGD steps of the prototype CosFace loss (facemeta.train.adapt_loss, centres
    per `settings.centres`; `enrolled` [N] bool marks the enrolment photos, which centres "enrolled" needs) on the
    tail's parameters, then the interpolation back toward where they started. Returns the loss of each step."""
    if settings.centres == "enrolled" and enrolled is None:
        raise ConfigError("centres 'enrolled' needs enrolment photos told apart (DIR/<person>/enrolled/)")
    params = [p for p in tail.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed)
    train_mode(tail)
    losses = []
    bar = progress_bar(settings.steps, desc, "step", progress)
    centres = None
    if settings.centres == "start":
        with torch.no_grad():
            centres = class_centres(torch.cat([tail_embed(tail, feats, shift), tail_embed(tail, flipped, shift)]),
                                    torch.cat([labels, labels]))
    for _ in range(settings.steps):
        opt.zero_grad(set_to_none=True)
        loss = adapt_loss(tail_embed(tail, draw_views(feats, flipped, gen), shift), labels, settings.centres,
                          settings.scale, settings.margin, centres, enrolled)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    tail.eval()
    with torch.no_grad():
        for p, p0 in zip(params, start, strict=True):
            p.copy_(p0 + settings.interpolate * (p - p0))
    return losses


def calibrate(vectors: np.ndarray, labels: np.ndarray, far: float) -> tuple[float, int]:
    """Threshold at `far` on the impostor pairs (different people) among labelled vectors -> (threshold,
    number of impostor pairs). Accept when score >= threshold."""
    from facemeta.eval.metrics import threshold_at_far

    iu = np.triu_indices(len(vectors), 1)
    scores = (vectors @ vectors.T)[iu]
    same = labels[iu[0]] == labels[iu[1]]
    return float(np.clip(threshold_at_far(scores, same, far), -1.0, 1.0)), int((~same).sum())


# ---------------------------------------------------------------- the whole procedure
def domain_shift(vectors: np.ndarray | None, n: int, domains: np.ndarray) -> torch.Tensor | None:
    """Per labelled photo, the mean to remove: the domain's mean for new-domain photos, 0 for enrolment ones."""
    if vectors is None:
        return None
    from facemeta.gallery.domain_stats import estimate

    mean = torch.from_numpy(estimate(vectors, "mean").mean)
    return torch.where(torch.from_numpy(domains == NEW)[:, None], mean[None, :], torch.zeros(n, mean.numel()))


def parse_members(text: str | None, count: int) -> list[int]:
    """'0,2' -> [0, 2]: the members of an ensemble of `count` to adapt (None: all); a one-line ConfigError for
    anything else, and for a choice on a single model (count 1)."""
    if text is None:
        return list(range(count))
    if count == 1:
        raise ConfigError("--members chooses members of an ensemble; this model is a single model (adapt it whole)")
    try:
        chosen = sorted({int(t) for t in str(text).split(",") if t.strip()})
    except ValueError:
        raise ConfigError(f"--members: expected member numbers like 0,1, got {text!r}") from None
    if not chosen or chosen[0] < 0 or chosen[-1] >= count:
        raise ConfigError(f"--members: this ensemble's members are 0..{count - 1}, got {text!r}")
    return chosen


def _check_request(model_path, out, settings: AdaptSettings, domain, unlabelled, members
                   ) -> tuple[Path, Path, list[int]]:
    """Every argument checked before anything is aligned -> (base checkpoint, out, members to adapt)."""
    from facemeta.models.checkpoint import read_checkpoint_info

    settings.check()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got {out}")
    if unlabelled is not None and domain is None:
        raise ConfigError("--unlabelled needs --domain NAME (the domain the photos come from)")
    base_path = check_base_model(model_path)
    if out.resolve() == base_path.resolve():
        raise ConfigError(f"--out {out} is the base model itself; write the adapted model to a new file")
    config = read_checkpoint_info(base_path).get("config") or {}
    count = len(config.get("members") or ()) if config.get("kind") == "ensemble" else 1
    return base_path, out, parse_members(members, count)


def adapt_in_place(model: nn.Module, faces: np.ndarray, labels: np.ndarray, settings: AdaptSettings,
                   shift: torch.Tensor | None = None, progress: bool = False, desc: str = "adapt",
                   domains: np.ndarray | None = None) -> list[float]:
    """The adapt procedure on a loaded model (changed in place): cache the frozen front's features of the
    aligned `faces`, fit the tail on `labels` (0..k-1), interpolate back. `domains` (per face, ENROL or NEW;
    centres "enrolled" needs them). Returns the step losses."""
    tail = Tail(model, settings.tail_blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in tail.parameters():
        p.requires_grad_(True)
    try:
        feats, flipped = front_features(tail, faces)
        enrolled = None if domains is None else torch.from_numpy(np.asarray(domains) == ENROL)
        return fit_tail(tail, feats, flipped, torch.as_tensor(labels).long(), settings, shift, progress, desc,
                        enrolled)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()


def _vectors(model: nn.Module, chips: list[np.ndarray]) -> np.ndarray:
    """Flip-TTA unit vectors of faces given on every chip the model reads (an ensemble: one batch per member)."""
    from facemeta.models.backbone import embed

    if hasattr(model, "chips"):
        return model.embed(chips, flip=True)
    return embed(model, chips[0], flip=True)


def member_settings(model: nn.Module, settings: AdaptSettings) -> AdaptSettings:
    """The settings a model (or member) is adapted with: tail_blocks counts dlib's residual blocks; another
    backbone fine-tunes its last `other_blocks` (SFace's pairs; default 0: its embedding head only)."""
    if not hasattr(model.backbone, "stem_conv") and settings.tail_blocks != settings.other_blocks:
        return replace(settings, tail_blocks=settings.other_blocks)
    return settings


def adapt_model(model_path: str | os.PathLike, labelled: str | os.PathLike, out: str | os.PathLike,
                settings: AdaptSettings | None = None, domain: str | None = None,
                unlabelled: str | os.PathLike | None = None, progress: bool = False,
                members: str | None = None) -> dict:
    """Adapt the checkpoint at `model_path` to the photos of `labelled` (see the module docstring) and write
    `out` (.safetensors + .json + .md). Returns the summary (the meta's "adapted_on" section and more).

    An ensemble (facemeta.models.ensemble) is adapted member by member, each by the same procedure on its own
    chip of the same photos (`members`: '0,1', the ones to adapt; default all); the others are kept as they are,
    the weights too, and the threshold is calibrated on the ensemble's vectors."""
    from facemeta.embedder import FaceEmbedder, file_fingerprint

    settings = settings or AdaptSettings()
    base_path, out, chosen = _check_request(model_path, out, settings, domain, unlabelled, members)
    t0 = time.perf_counter()
    embedder = FaceEmbedder(base_path)
    model, base_meta = embedder.model, embedder.meta
    ensemble = hasattr(model, "chips")
    parts = list(model.members) if ensemble else [model]
    data = labelled_faces(embedder, labelled, progress)
    unl, unl_from = unlabelled_faces(embedder, data, domain, unlabelled, progress)
    runs = []
    for i in chosen:
        part, part_settings = parts[i], member_settings(parts[i], settings)
        shift = domain_shift(None if unl is None else _vectors(part, [unl[i]]), len(data.labels), data.domains)
        losses = adapt_in_place(part, data.chips[i], data.labels, part_settings, shift, progress,
                                desc=f"adapt member {i}" if ensemble else "adapt", domains=data.domains)
        runs.append((i, part_settings, losses))
    far = float(base_meta.get("threshold_far") or 1e-3)
    vectors = _vectors(model, data.chips)
    threshold, impostors = calibrate(vectors, data.labels, far)
    adapted_on = {
        "domain": domain or "unnamed", "people": len(data.people),
        "photos": {"new": int((data.domains == NEW).sum()), "enrolled": int((data.domains == ENROL).sum())},
        "photos_skipped": len(data.skipped), "steps": settings.steps,
        "base_model": {"file": base_path.name, "fingerprint": embedder.fingerprint,
                       "threshold": base_meta.get("threshold"), "threshold_far": base_meta.get("threshold_far")},
        "threshold_from": f"{impostors} impostor pairs (different people) among the labelled photos, adapted model, "
                          f"flip TTA, at the base model's FAR {far:g}",
        "labelled_folder": Path(labelled).name,
    }
    if ensemble:
        done = {i: (s, losses) for i, s, losses in runs}
        adapted_on["settings"] = asdict(settings)
        adapted_on["members"] = [
            {"member": i, "backbone": p.config.backbone, "chip": chip, "align_size": size, "adapted": i in done,
             **({"tail_blocks": done[i][0].tail_blocks,
                 "loss": {"first": done[i][1][0], "last": done[i][1][-1]}} if i in done else {})}
            for i, (p, (chip, size)) in enumerate(zip(parts, model.chips, strict=True))]
        meta = {"method": "adapt", "threshold": threshold, "threshold_far": far, "adapted_on": adapted_on}
    else:
        _, used, losses = runs[0]
        adapted_on["settings"] = asdict(used)
        adapted_on["backbone"] = model.config.backbone
        adapted_on["loss"] = {"first": losses[0], "last": losses[-1]}
        meta = {"align_size": embedder.align_size, "align_chip": embedder.align_chip, "method": "adapt",
                "align_template": base_meta.get("align_template"),
                "threshold": threshold, "threshold_far": far, "adapted_on": adapted_on}
    if unl is not None:
        from facemeta.gallery.domain_stats import estimate, normalise

        stats = estimate(_vectors(model, unl), "mean")
        normed = vectors.copy()
        normed[data.domains == NEW] = normalise(vectors[data.domains == NEW], stats)
        meta["domains"] = {domain: {"stats": stats.to_dict(), "threshold": calibrate(normed, data.labels, far)[0],
                                    "threshold_far": far, "from": unl_from}}
    adapted_on["seconds"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save(model, out, meta)
    from facemeta.atomic import atomic_write

    summary = {"model": str(out), "fingerprint": file_fingerprint(out), "threshold": threshold,
               "threshold_far": far, "adapted_on": adapted_on, "skipped": data.skipped,
               "domains": sorted(meta.get("domains", {}))}
    with atomic_write(out.with_suffix(".md")) as fh:
        fh.write(model_card(summary))
    return summary


def _save(model: nn.Module, out: Path, meta: dict) -> None:
    """Write the adapted checkpoint: a single model, or an ensemble (facemeta.models.ensemble.save_ensemble: an
    adapted member's tensors are stored in full; a member left equal to an installed prior may stay a reference
    to it, where the ensemble module stores such references)."""
    if not hasattr(model, "chips"):
        from facemeta.models.checkpoint import save_checkpoint

        save_checkpoint(model, out, meta)
        return
    from facemeta.models.ensemble import save_ensemble

    save_ensemble(model, out, meta)


def _what(tail_blocks: int, backbone: str | None = None) -> str:
    kind = "depthwise-separable" if backbone == "sface" else "residual"
    return f"the last {tail_blocks} {kind} blocks and the embedding layer" if tail_blocks else "the embedding layer"


def model_card(summary: dict) -> str:
    """The Markdown model card written beside an adapted model (OUT.md)."""
    a = summary["adapted_on"]
    base, s = a["base_model"], a["settings"]
    recipe = (f"full-batch SGD steps (lr {s['lr']:g}), prototype CosFace (s {s['scale']:g}, m {s['margin']:g}); "
              f"{s['interpolate']:g} of the change kept")
    if "members" in a:
        trained = [m for m in a["members"] if m["adapted"]]
        steps = [f"- Steps: {a['steps']} {recipe}; {a['seconds']} s. An ensemble: each member adapted by itself, "
                 "on its own chip of the same photos, the weights of the combination kept:"]
        steps += [f"  - member {m['member']} ({m['backbone']}, {m['chip']} chip {m['align_size']} px): "
                  + (f"{_what(m['tail_blocks'], m['backbone'])}, loss {m['loss']['first']:.3f} -> {m['loss']['last']:.3f}"
                     if m["adapted"] else "kept as it was") for m in a["members"]]
        if not trained:
            steps.append("  - (no member adapted: only the threshold is new)")
    else:
        steps = [f"- Steps: {a['steps']} full-batch SGD steps (lr {s['lr']:g}) of {_what(s['tail_blocks'], a.get('backbone'))}, "
                 f"prototype CosFace (s {s['scale']:g}, m {s['margin']:g}); {s['interpolate']:g} of the change kept; "
                 f"loss {a['loss']['first']:.3f} -> {a['loss']['last']:.3f}; {a['seconds']} s"]
    lines = [
        f"# {Path(summary['model']).stem}: adapted facemeta model", "",
        f"`{Path(summary['model']).name}` (fingerprint `{summary['fingerprint']}`), written by `facemeta adapt`.", "",
        "## Adapted on", "",
        f"- Domain: {a['domain']} (labelled folder `{a['labelled_folder']}`)",
        f"- People: {a['people']}; photos: {a['photos']['new']} from the new domain, {a['photos']['enrolled']} from "
        f"the enrolment domain ({a['photos_skipped']} skipped: unreadable or no face)",
        *steps,
        f"- Base model: `{base['file']}` (fingerprint `{base['fingerprint']}`, threshold {base['threshold']})",
        "",
        "## Threshold", "",
        f"{summary['threshold']:.4f} (same person when the cosine is at least this): {a['threshold_from']}. "
        "The adapted people's impostor pairs were trained apart, so on other people of the domain the false-accept "
        "rate may be higher than this nominal one; recalibrate on held-out people when you have them.",
    ]
    if summary["domains"]:
        lines += ["", f"Domain statistics stored for: {', '.join(summary['domains'])} (meta `domains`)."]
    lines += ["", "Galleries enrolled with the base model must be enrolled again with this one (another fingerprint)."]
    return "\n".join(lines) + "\n"

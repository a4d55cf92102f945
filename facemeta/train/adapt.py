"""Adapt a facemeta model to a new domain from a few labelled people (issue 26): ``facemeta adapt``.

Layout of the labelled folder (DIR): one sub-folder per person, named after them, holding that person's photos
from the NEW domain (``DIR/<person>/*.jpg``); the same person's photos from the ENROLMENT domain (the photos a
gallery would hold, e.g. ordinary camera portraits) may sit in a sub-folder ``DIR/<person>/enrolled/``. Both
kinds train the model (same label); the enrolment photos make the cross-domain pairs it learns to match.

The procedure (chosen on shared data, benchmarks/results/adapt/choice/; measured in benchmarks/results/adapt/,
where it stays within about a point of the base model on the other people of the target):
1. align every photo once, through the product's route (the embedder's MTCNN and fallback routes, warped onto
   the model's chip), and run the FROZEN front of the network once over the faces and their mirror images;
2. fine-tune the TAIL (the last ``tail_blocks`` residual blocks of the dlib-prior ResNet and the embedding
   layer; only the embedding layer for other backbones) on the cached features, ``steps`` full-batch steps of
   plain SGD on a prototype CosFace loss over the k people (class centres = each person's current mean
   embedding; a centre needs no weights, so the same loss serves as the inner loop of meta-training,
   facemeta.train.adapt_episodes);
3. interpolate back toward the base weights (keep ``interpolate`` of the change: WiSE-FT);
4. calibrate the threshold on impostor pairs (different people) among the labelled photos at the base model's
   false-accept rate, and write the checkpoint with an "adapted_on" model-card section and a .md card beside it.

With a domain (``domain``, optionally ``unlabelled`` photos of it), the domain's statistics
(facemeta.gallery.domain_stats, mean kind) are estimated from the base model's vectors, subtracted from the
new-domain embeddings inside the loss, re-estimated with the adapted model and stored in the meta
(``domains.<name>``) with a threshold calibrated on vectors normalised the same way.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facemeta.errors import CheckpointError, ConfigError, FacemetaError, NoFaceError

ENROLLED = "enrolled"  # DIR/<person>/enrolled/: the person's photos from the enrolment domain
NEW, ENROL = 0, 1  # domain codes of a labelled photo


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
      seed: the flip augmentation's draws.
    """

    tail_blocks: int = 4
    steps: int = 30
    lr: float = 1e-4
    scale: float = 30.0
    margin: float = 0.2
    interpolate: float = 0.5
    centres: str = "batch"
    seed: int = 0

    def check(self) -> None:
        """ConfigError naming the first setting out of range."""
        for ok, msg in ((self.tail_blocks >= 0, "tail_blocks must be >= 0"), (self.steps >= 1, "steps must be >= 1"),
                        (self.lr > 0, "lr must be > 0"), (self.scale > 0, "scale must be > 0"),
                        (self.margin >= 0, "margin must be >= 0"),
                        (0 <= self.interpolate <= 1, "interpolate must be in [0, 1]"),
                        (self.centres in ("batch", "start"), "centres must be batch or start")):
            if not ok:
                raise ConfigError(msg)


@dataclass
class LabelledFaces:
    """Aligned faces of the labelled people: uint8 [N,S,S,3], a label (index into people) and a domain code
    (NEW or ENROL) each, the source paths, and the photos that could not be used (path, why)."""

    faces: np.ndarray
    labels: np.ndarray
    domains: np.ndarray
    people: list[str]
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


# ---------------------------------------------------------------- input
def _images(folder: Path) -> list[Path]:
    from facemeta.data.folder import IMAGE_SUFFIXES

    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_labelled(folder: str | os.PathLike) -> dict[str, tuple[list[Path], list[Path]]]:
    """DIR -> {person: (new-domain photos, enrolment-domain photos)}; one-line errors for a DIR that is not
    a folder of identity folders or that holds fewer than two people."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"--labelled {root} is not a folder")
    people: dict[str, tuple[list[Path], list[Path]]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        new = _images(d)
        enrolled = _images(d / ENROLLED) if (d / ENROLLED).is_dir() else []
        if new or enrolled:
            people[d.name] = (new, enrolled)
    if not people:
        loose = _images(root)
        what = f"holds {len(loose)} photos but no identity folders" if loose else "has no identity folders with photos"
        raise ConfigError(f"--labelled {root} {what}: put each person's photos in {root}/<person>/ "
                          f"(enrolment-domain photos in {root}/<person>/{ENROLLED}/)")
    if len(people) < 2:
        raise ConfigError(f"--labelled {root} holds one person only ({next(iter(people))}); adapting needs at least "
                          "2 labelled people, one folder each")
    return people


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


def align_photos(embedder, paths: list[Path], progress: bool = False, desc: str = "align"
                 ) -> tuple[list[np.ndarray | None], list[tuple[str, str]]]:
    """Align photos through the product's one route (FaceEmbedder.files_faces: its detector, routes, face
    policy, chip and size), one face each -> (the aligned crop or None per path, [(path, why)] for the others)."""
    faces: list[np.ndarray | None] = [None] * len(paths)
    skipped: list[tuple[str, str]] = []
    bar = _bar(len(paths), desc, "img", progress)
    for i, (path, found) in enumerate(embedder.files_faces(list(paths))):
        if isinstance(found, FacemetaError):
            skipped.append((str(path), str(found)))
        elif not found:
            skipped.append((str(path), "no face found"))
        else:
            faces[i] = found[0].crop
        bar.update(1)
    bar.close()
    return faces, skipped


def labelled_faces(embedder, folder: str | os.PathLike, progress: bool = False) -> LabelledFaces:
    """Read DIR (:func:`read_labelled`) and align every photo once; refuses (one line) when fewer than two
    people keep a photo with a face."""
    people = read_labelled(folder)
    rows = [(name, path, code) for name, (new, enr) in people.items()
            for code, paths in ((NEW, new), (ENROL, enr)) for path in paths]
    faces, skipped = align_photos(embedder, [r[1] for r in rows], progress)
    kept = [(r, f) for r, f in zip(rows, faces, strict=True) if f is not None]
    names = sorted({r[0] for r, _ in kept})
    if len(names) < 2:
        found = f"only {names[0]} has" if names else "none of the people has"
        raise NoFaceError(f"--labelled {folder}: {found} a photo with a face ({len(skipped)} of {len(rows)} photos "
                          f"without one, e.g. {Path(skipped[0][0]).name}); adapting needs 2 people with faces")
    index = {n: i for i, n in enumerate(names)}
    return LabelledFaces(np.stack([f for _, f in kept]), np.array([index[r[0]] for r, _ in kept]),
                         np.array([r[2] for r, _ in kept]), names, [str(r[1]) for r, _ in kept], skipped)


def _bar(total: int, desc: str, unit: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False)


# ---------------------------------------------------------------- the network split into frozen front and tail
class Tail(nn.Module):
    """The trainable end of a FaceEmbeddingModel: its last `blocks` (dlib_resnet29's residual blocks) and its
    embedding head; its parameters ARE the model's (shared tensors), so training the tail trains the model.
    ``forward(features)`` takes what :meth:`front` returns and gives the raw (unnormalised) embedding."""

    def __init__(self, model: nn.Module, blocks: int):
        super().__init__()
        trunk = model.backbone
        self.head_kind = model.config.head
        has_blocks = isinstance(getattr(trunk, "blocks", None), nn.Sequential) and hasattr(trunk, "stem_conv")
        if blocks and not has_blocks:
            raise ConfigError(f"tail_blocks > 0 needs the dlib_resnet29 backbone; {model.config.backbone} adapts "
                              "its embedding head only (tail_blocks 0)")
        self.split = len(trunk.blocks) - min(blocks, len(trunk.blocks)) if has_blocks else None
        self.blocks = nn.Sequential(*list(trunk.blocks)[self.split:]) if has_blocks else nn.Sequential()
        self.fc = model.fc
        self.bn2 = getattr(model, "bn2", None)
        self.features = getattr(model, "features", None)
        self._model = [model]  # not a submodule: its parameters stay out of this module's

    @torch.no_grad()
    def front(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen front of the network on normalised images [B,3,S,S] -> the tail's input."""
        model = self._model[0]
        if self.split is None:
            return model.feature_map(x)
        trunk = model.backbone
        x = F.max_pool2d(F.relu(trunk.stem_affine(trunk.stem_conv(x))), 3, 2)
        return trunk.blocks[:self.split](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        if self.head_kind == "linear":
            return self.fc(x.mean(dim=(2, 3)))
        return self.features(self.fc(torch.flatten(self.bn2(x), 1)))


def front_features(tail: Tail, faces: np.ndarray, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen front over aligned faces and their mirror images -> (features, mirrored features)."""
    from facemeta.models.backbone import preprocess

    model = tail._model[0]
    model.eval()
    out, flipped = [], []
    with torch.inference_mode():
        for i in range(0, len(faces), batch):
            x = preprocess(faces[i:i + batch], model.config)
            out.append(tail.front(x))
            flipped.append(tail.front(torch.flip(x, dims=[3])))
    return torch.cat(out).clone(), torch.cat(flipped).clone()


# ---------------------------------------------------------------- the loss and the fit
def class_centres(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each person's mean embedding, detached and renormalised -> [k, E] (labels 0..k-1)."""
    onehot = F.one_hot(labels, int(labels.max()) + 1).to(emb.dtype)
    return F.normalize((onehot.t() @ emb.detach()) / onehot.sum(0).clamp(min=1)[:, None], dim=1)


def prototype_cosface_loss(emb: torch.Tensor, labels: torch.Tensor, scale: float, margin: float,
                           centres: torch.Tensor | None = None) -> torch.Tensor:
    """CosFace over the people of a batch with class centres `centres` [k,E] (default: each person's mean
    embedding in this batch, :func:`class_centres`): cross-entropy of s·(cos(e, c_j) − m·[j = y]).
    Unit embeddings [N,E], labels [N] (0..k-1)."""
    onehot = F.one_hot(labels, int(labels.max()) + 1).to(emb.dtype)
    centres = class_centres(emb, labels) if centres is None else centres
    logits = scale * (emb @ centres.t() - margin * onehot)
    return F.cross_entropy(logits, labels)


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


def fit_tail(tail: Tail, feats: torch.Tensor, flipped: torch.Tensor, labels: torch.Tensor,
             settings: AdaptSettings, shift: torch.Tensor | None = None, progress: bool = False) -> list[float]:
    """`settings.steps` full-batch SGD steps of :func:`prototype_cosface_loss` on the tail's parameters, then
    the interpolation back toward where they started. Returns the loss of each step."""
    params = [p for p in tail.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed)
    tail.train()
    losses = []
    bar = _bar(settings.steps, "adapt", "step", progress)
    centres = None
    if settings.centres == "start":
        with torch.no_grad():
            centres = class_centres(torch.cat([tail_embed(tail, feats, shift), tail_embed(tail, flipped, shift)]),
                                    torch.cat([labels, labels]))
    for _ in range(settings.steps):
        opt.zero_grad(set_to_none=True)
        loss = prototype_cosface_loss(tail_embed(tail, draw_views(feats, flipped, gen), shift), labels,
                                      settings.scale, settings.margin, centres)
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
def _domain_shift(vectors: np.ndarray | None, n: int, domains: np.ndarray) -> torch.Tensor | None:
    """Per labelled photo, the mean to remove: the domain's mean for new-domain photos, 0 for enrolment ones."""
    if vectors is None:
        return None
    from facemeta.gallery.domain_stats import estimate

    mean = torch.from_numpy(estimate(vectors, "mean").mean)
    return torch.where(torch.from_numpy(domains == NEW)[:, None], mean[None, :], torch.zeros(n, mean.numel()))


def _unlabelled_faces(embedder, data: LabelledFaces, domain: str | None, unlabelled: str | os.PathLike | None,
                      progress: bool) -> tuple[np.ndarray | None, str]:
    """Faces that estimate the new domain's statistics: the --unlabelled photos, else (with a domain) the
    labelled new-domain photos, else None -> (faces, where they came from)."""
    if unlabelled is None:
        if domain is None or not (data.domains == NEW).any():
            return None, ""
        faces = data.faces[data.domains == NEW]
        return faces, f"{len(faces)} labelled new-domain photos"
    from facemeta.data.folder import IMAGE_SUFFIXES

    if not Path(unlabelled).is_dir():
        raise ConfigError(f"--unlabelled {unlabelled} is not a folder")
    loose = sorted(p for p in Path(unlabelled).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    found = [f for f in align_photos(embedder, loose, progress, desc="unlabelled")[0] if f is not None]
    if not found:
        raise NoFaceError(f"--unlabelled {unlabelled}: no face found in any of its {len(loose)} photos")
    return np.stack(found), f"{len(found)} unlabelled photos"


def _check_request(model_path, out, settings: AdaptSettings, domain, unlabelled) -> tuple[Path, Path]:
    """Every argument checked before anything is aligned -> (base checkpoint, out)."""
    settings.check()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got {out}")
    if unlabelled is not None and domain is None:
        raise ConfigError("--unlabelled needs --domain NAME (the domain the photos come from)")
    base_path = check_base_model(model_path)
    if out.resolve() == base_path.resolve():
        raise ConfigError(f"--out {out} is the base model itself; write the adapted model to a new file")
    return base_path, out


def adapt_in_place(model: nn.Module, faces: np.ndarray, labels: np.ndarray, settings: AdaptSettings,
                   shift: torch.Tensor | None = None, progress: bool = False) -> list[float]:
    """The adapt procedure on a loaded model (changed in place): cache the frozen front's features of the
    aligned `faces`, fit the tail on `labels` (0..k-1), interpolate back. Returns the step losses."""
    tail = Tail(model, settings.tail_blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in tail.parameters():
        p.requires_grad_(True)
    try:
        feats, flipped = front_features(tail, faces)
        return fit_tail(tail, feats, flipped, torch.as_tensor(labels).long(), settings, shift, progress)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()


def adapt_model(model_path: str | os.PathLike, labelled: str | os.PathLike, out: str | os.PathLike,
                settings: AdaptSettings | None = None, domain: str | None = None,
                unlabelled: str | os.PathLike | None = None, progress: bool = False) -> dict:
    """Adapt the checkpoint at `model_path` to the photos of `labelled` (see the module docstring) and write
    `out` (.safetensors + .json + .md). Returns the summary (the meta's "adapted_on" section and more)."""
    from facemeta.embedder import FaceEmbedder, file_fingerprint
    from facemeta.models.backbone import embed
    from facemeta.models.checkpoint import save_checkpoint

    settings = settings or AdaptSettings()
    base_path, out = _check_request(model_path, out, settings, domain, unlabelled)
    t0 = time.perf_counter()
    embedder = FaceEmbedder(base_path)
    model, base_meta = embedder.model, embedder.meta
    if settings.tail_blocks and not hasattr(model.backbone, "stem_conv"):  # not the dlib-prior ResNet: head only
        settings = replace(settings, tail_blocks=0)
    data = labelled_faces(embedder, labelled, progress)
    unl, unl_from = _unlabelled_faces(embedder, data, domain, unlabelled, progress)
    shift = _domain_shift(None if unl is None else embed(model, unl, flip=True), len(data.labels), data.domains)
    losses = adapt_in_place(model, data.faces, data.labels, settings, shift, progress)
    far = float(base_meta.get("threshold_far") or 1e-3)
    vectors = embed(model, data.faces, flip=True)
    threshold, impostors = calibrate(vectors, data.labels, far)
    adapted_on = {
        "domain": domain or "unnamed", "people": len(data.people),
        "photos": {"new": int((data.domains == NEW).sum()), "enrolled": int((data.domains == ENROL).sum())},
        "photos_skipped": len(data.skipped), "steps": settings.steps,
        "base_model": {"file": base_path.name, "fingerprint": embedder.fingerprint,
                       "threshold": base_meta.get("threshold"), "threshold_far": base_meta.get("threshold_far")},
        "settings": asdict(settings), "loss": {"first": losses[0], "last": losses[-1]},
        "threshold_from": f"{impostors} impostor pairs (different people) among the labelled photos, adapted model, "
                          f"flip TTA, at the base model's FAR {far:g}",
        "labelled_folder": Path(labelled).name,
    }
    meta = {"align_size": embedder.align_size, "align_chip": embedder.align_chip, "method": "adapt",
            "align_template": base_meta.get("align_template"),
            "threshold": threshold, "threshold_far": far, "adapted_on": adapted_on}
    if unl is not None:
        from facemeta.gallery.domain_stats import estimate, normalise

        stats = estimate(embed(model, unl, flip=True), "mean")
        normed = vectors.copy()
        normed[data.domains == NEW] = normalise(vectors[data.domains == NEW], stats)
        meta["domains"] = {domain: {"stats": stats.to_dict(), "threshold": calibrate(normed, data.labels, far)[0],
                                    "threshold_far": far, "from": unl_from}}
    adapted_on["seconds"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out, meta)
    from facemeta.atomic import atomic_write

    summary = {"model": str(out), "fingerprint": file_fingerprint(out), "threshold": threshold,
               "threshold_far": far, "adapted_on": adapted_on, "skipped": data.skipped,
               "domains": sorted(meta.get("domains", {}))}
    with atomic_write(out.with_suffix(".md")) as fh:
        fh.write(model_card(summary))
    return summary


def model_card(summary: dict) -> str:
    """The Markdown model card written beside an adapted model (OUT.md)."""
    a = summary["adapted_on"]
    base, s = a["base_model"], a["settings"]
    what = (f"the last {s['tail_blocks']} residual blocks and the embedding layer" if s["tail_blocks"]
            else "the embedding layer")
    lines = [
        f"# {Path(summary['model']).stem}: adapted facemeta model", "",
        f"`{Path(summary['model']).name}` (fingerprint `{summary['fingerprint']}`), written by `facemeta adapt`.", "",
        "## Adapted on", "",
        f"- Domain: {a['domain']} (labelled folder `{a['labelled_folder']}`)",
        f"- People: {a['people']}; photos: {a['photos']['new']} from the new domain, {a['photos']['enrolled']} from "
        f"the enrolment domain ({a['photos_skipped']} skipped: unreadable or no face)",
        f"- Steps: {a['steps']} full-batch SGD steps (lr {s['lr']:g}) of {what}, prototype CosFace "
        f"(s {s['scale']:g}, m {s['margin']:g}); {s['interpolate']:g} of the change kept; "
        f"loss {a['loss']['first']:.3f} -> {a['loss']['last']:.3f}; {a['seconds']} s",
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

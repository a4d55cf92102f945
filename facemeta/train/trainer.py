"""ERM training of a face embedder over pooled source domains, with checkpoints and exact resume.

A run writes into its output folder:
- ``config.yaml``: the validated config;
- ``checkpoints/step-NNNNNN.safetensors`` (+ .json): the model every ``checkpoint_every`` steps
  (the last ``keep_checkpoints`` kept), and ``checkpoints/state.pt``: optimiser, scheduler, margin
  head, AMP scaler, sampler position and RNG states (torch.save, plain tensors and numbers only,
  loaded with ``weights_only=True``), pointing at the model checkpoint of the same step;
- ``metrics.jsonl``: one JSON object per logged step / validation / checkpoint / end;
- ``model.safetensors`` (+ .json): the final model, whose meta holds the training data, method,
  validation metrics and the verification ``threshold`` calibrated at ``threshold_far`` on pairs of
  held-out SOURCE-domain identities (never the unseen targets).

Exact resume: batches are a pure function of (seed, epoch, position) and every augmentation is
seeded per (step, slot), so a run killed after a checkpoint and resumed replays the same data and
(on CPU, with deterministic algorithms) ends with the same weights as an unbroken run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facemeta.data.manifest import ManifestRow
from facemeta.errors import CheckpointError, ConfigError, one_line
from facemeta.train import ddp
from facemeta.train.config import SourceSpec, TrainConfig, build_augment, dump_config

STATE_FILE = "state.pt"
STATE_VERSION = 1


# ---------------------------------------------------------------- data
@dataclass
class SourceData:
    """Aligned rows of the source domains, split by identity into training and held-out parts."""

    train: list[ManifestRow]
    heldout: list[ManifestRow]
    failures: dict[str, int]

    def summary(self) -> dict[str, Any]:
        """Counts per domain (identities, images) of both parts, for logs and checkpoint meta."""
        out: dict[str, Any] = {}
        for part, rows in (("train", self.train), ("heldout", self.heldout)):
            per: dict[str, dict[str, Any]] = defaultdict(lambda: {"identities": set(), "images": 0})
            for r in rows:
                per[r.domain]["identities"].add(r.identity)
                per[r.domain]["images"] += 1
            out[part] = {d: {"identities": len(v["identities"]), "images": v["images"]} for d, v in sorted(per.items())}
        out["alignment_failures"] = dict(self.failures)
        return out


def _group(rows: list[ManifestRow]) -> dict[str, list[ManifestRow]]:
    """Rows by identity, in their original order."""
    groups: dict[str, list[ManifestRow]] = defaultdict(list)
    for r in rows:
        groups[r.identity].append(r)
    return groups


def select_source_rows(spec: SourceSpec, root: str | None = None) -> list[ManifestRow]:
    """The raw (unaligned) rows a source spec asks for: people folds, min images, size caps."""
    from facemeta.data.sets import read_set

    rows = read_set(spec.set, root)
    if spec.people_folds:
        folds = {str(f) for f in spec.people_folds}
        rows = [r for r in rows if r.extra.get("people_fold") in folds]
    groups = _group(rows)
    names = sorted(n for n, g in groups.items() if len(g) >= spec.min_images)
    if spec.max_identities is not None:
        names = names[:spec.max_identities]
    out: list[ManifestRow] = []
    for n in names:
        g = groups[n]
        out.extend(g[:spec.limit_per_identity] if spec.limit_per_identity else g)
    return out


def _heldout_identities(names: list[str], fraction: float, minimum: int, keep: int) -> set[str]:
    """Identities held out of training: a fixed hash order (same for every seed and method)."""
    n = max(minimum, int(round(fraction * len(names))))
    n = min(n, len(names) - keep)
    if n < 2:
        return set()
    ordered = sorted(names, key=lambda s: hashlib.sha1(s.encode("utf-8")).hexdigest())
    return set(ordered[:n])


def prepare_data(cfg: TrainConfig, progress: bool = False) -> SourceData:
    """Align (cached) the source domains' selected images and split identities train / held-out.

    Images are aligned into facemeta.align.pipeline.aligned_dir (shared with aligned_set);
    identities with fewer than `min_images` aligned images are dropped. Identity names are made
    domain-qualified (``lfw/Name``) so classes of different domains never merge.
    """
    from facemeta.align.pipeline import PRE_CROPPED_SETS, align_rows, aligned_dir

    train: list[ManifestRow] = []
    heldout: list[ManifestRow] = []
    failures: dict[str, int] = {}
    keep = cfg.sampler.identities_per_domain
    for spec in cfg.data.sources:
        raw = select_source_rows(spec, cfg.data.root)
        dst = aligned_dir(spec.set, cfg.data.align_size, cfg.data.align_chip, cfg.data.cache)
        aligned, failed = align_rows(raw, dst, size=cfg.data.align_size, workers=cfg.data.align_workers,
                                     pre_cropped=spec.set in PRE_CROPPED_SETS, progress=progress,
                                     chip=cfg.data.align_chip)
        failures[spec.set] = len(failed)
        groups = {n: g for n, g in _group(aligned).items() if len(g) >= spec.min_images}
        held = _heldout_identities(sorted(groups), cfg.eval.heldout_fraction, cfg.eval.min_heldout, keep)
        if len(groups) - len(held) < keep:
            raise ConfigError(f"data.sources: {spec.set} has {len(groups) - len(held)} training identities with "
                              f">= {spec.min_images} aligned images; sampler.identities_per_domain={keep} needs more")
        for name in sorted(groups):
            for r in groups[name]:
                row = ManifestRow(r.path, f"{spec.set}/{name}", spec.set, dict(r.extra))
                (heldout if name in held else train).append(row)
    return SourceData(train, heldout, failures)


# ---------------------------------------------------------------- model
def model_config(cfg: TrainConfig):
    """The ModelConfig of a run: its model section, with the backbone's own normalisation where none is given."""
    from facemeta.models.backbone import ModelConfig, default_normalisation

    mean, std = default_normalisation(cfg.model.backbone)
    return ModelConfig(backbone=cfg.model.backbone, embedding_size=cfg.model.embedding_size,
                       image_size=cfg.model.image_size, dropout=cfg.model.dropout, head=cfg.model.head,
                       mean=tuple(cfg.model.mean or mean), std=tuple(cfg.model.std or std))


def pretrained_file(cfg: TrainConfig) -> str | None:
    """The weights a run starts from: model.pretrained_path, or with model.pretrained the backbone's installed
    weights (the prior for dlib_resnet29, converted into the cache on first use); None for random weights."""
    from facemeta.models import dlib_resnet

    if cfg.model.pretrained_path:
        return cfg.model.pretrained_path
    if not cfg.model.pretrained:
        return None
    if cfg.model.backbone != dlib_resnet.PRIOR_NAME:
        raise ConfigError(f"model.pretrained: no installed weights for '{cfg.model.backbone}' (facemeta never "
                          f"downloads); use backbone {dlib_resnet.PRIOR_NAME} or give model.pretrained_path")
    return str(dlib_resnet.prior_weights_path(cfg.data.cache))


def freeze(model: nn.Module, prefixes: list[str]) -> int:
    """Keep the parameters whose names start with one of `prefixes` fixed; returns how many were frozen.
    A prefix that names no parameter is a ConfigError (a typo would otherwise train everything)."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in names):
            raise ConfigError(f"model.frozen: no parameter name starts with '{prefix}' (e.g. {names[0]})")
    count = 0
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in prefixes):
            p.requires_grad_(False)
            count += 1
    return count


def class_prototypes(model: nn.Module, rows: list[ManifestRow], identity_to_label: dict[str, int],
                     device: torch.device, chunk: int = 256, cache_key: str | None = None,
                     cache: str | None = None) -> torch.Tensor:
    """Normalised mean embedding of each identity's training faces under `model` (no augmentation) -> [C, E].

    With `cache_key` (naming the starting weights file: runs of every method and seed from the same weights on
    the same data share it), the result is kept in ``cache_root()/prototypes/``."""
    from facemeta.images import load_image
    from facemeta.models.backbone import embed
    from facemeta.paths import cache_root

    path = None
    if cache_key:
        text = "\n".join([cache_key, json.dumps(model.config.to_dict(), sort_keys=True),
                          *(f"{r.path}\t{identity_to_label[r.identity]}" for r in rows)])
        path = cache_root(cache) / "prototypes" / f"{hashlib.sha1(text.encode('utf-8')).hexdigest()[:20]}.npy"
        if path.is_file():
            return torch.from_numpy(np.load(path, allow_pickle=False))
    sums = torch.zeros(len(identity_to_label), model.config.embedding_size)
    model.to(device)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        vectors = torch.from_numpy(embed(model, [load_image(r.path) for r in part], channels_last=False))
        labels = torch.tensor([identity_to_label[r.identity] for r in part])
        sums.index_add_(0, labels, vectors)
    prototypes = F.normalize(sums, dim=1)
    if path is not None:
        from facemeta.atomic import atomic_write

        with atomic_write(path, "wb") as fh:
            np.save(fh, prototypes.numpy(), allow_pickle=False)
    return prototypes


def _file_key(path: str) -> str:
    """Name, size and modification time of a weights file: enough to tell two starting points apart."""
    st = Path(path).stat()
    return f"{Path(path).name}:{st.st_size}:{st.st_mtime_ns}"


def init_class_weights(head: nn.Module, prototypes: torch.Tensor) -> int:
    """Copy `prototypes` [C, E] into every class-weight matrix of that shape in `head`; returns how many."""
    count = 0
    with torch.no_grad():
        for module in head.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and tuple(weight.shape) == tuple(prototypes.shape):
                weight.copy_(prototypes.to(weight.device, weight.dtype))
                count += 1
    if not count:
        raise ConfigError("loss.init: prototypes found no class-weight matrix of the training classes' shape")
    return count


# ---------------------------------------------------------------- schedule and state
def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier at `step` (0-based): linear warm-up to 1, then cosine down to `min_ratio` (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors / numbers only (loadable with weights_only)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training-state file safely (weights_only); CheckpointError when missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no training state to resume from: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a corrupt file
        raise CheckpointError(f"training state {path} is unreadable: {one_line(exc)}") from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"training state {path} is not a facemeta state file (version {STATE_VERSION})")
    return state


class _Objective(nn.Module):
    """Model + margin head (+ distillation, with teacher vectors) as one module, so DDP synchronises them all;
    returns (loss, correct)."""

    def __init__(self, model: nn.Module, head: nn.Module, distill: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.head = head
        self.distill = distill

    def forward(self, x: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.model(x)
        with torch.autocast(x.device.type, enabled=False):  # margins and softmax in float32
            logits = self.head(emb.float(), labels)
            loss = F.cross_entropy(logits, labels)
            if self.distill is not None and teacher is not None:
                loss = loss + self.distill(emb.float(), teacher)[0]
        correct = (logits.detach().argmax(1) == labels).sum()
        return loss, correct


class _WithTeacher(torch.utils.data.Dataset):
    """A FaceDataset whose items also carry the teacher's embedding of that face (for distillation)."""

    def __init__(self, dataset, teacher: torch.Tensor):
        self.dataset, self.teacher = dataset, teacher

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index = int(item[0]) if isinstance(item, (tuple, list)) else int(item)
        return (*self.dataset[item], self.teacher[index])


# ---------------------------------------------------------------- trainer
class Trainer:
    """Train one config: ``Trainer(cfg).fit()`` -> path of the final model checkpoint.

    resume: continue from output/checkpoints/state.pt (ConfigError if the saved config differs in
    anything that changes the result). progress: a tqdm bar on the main process. Inside torchrun
    (WORLD_SIZE > 1) it joins the process group (gloo on CPU, nccl on CUDA), splits every global
    batch between processes and only rank 0 writes files.
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        self.resume = resume
        self.progress = progress
        self.out = Path(cfg.output)
        self.ckpt_dir = self.out / "checkpoints"
        self.rank, self.world_size, self.local_rank = ddp.env_ranks()
        self.is_main = self.rank == 0
        self.step = 0
        self.resumed_from: int | None = None
        self.distill: nn.Module | None = None  # distillation from the prior (cfg.distill), built in fit
        self.teacher: torch.Tensor | None = None  # the teacher's embedding of each training face

    # -- setup
    def _device(self) -> torch.device:
        want = self.cfg.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError("device: cuda was asked for but no CUDA device is available")
            if self.world_size > 1:
                return torch.device("cuda", self.local_rank)
        return torch.device(want)

    def _metrics(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl, stamped with the wall-clock time (Unix seconds)."""
        if not self.is_main:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**record, "time": round(time.time(), 3)}, sort_keys=False) + "\n")

    def _trim_metrics(self, step: int) -> None:
        """On resume, drop log lines written after the checkpoint we restart from."""
        path = self.out / "metrics.jsonl"
        if not self.is_main or not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if int(rec.get("step", 0)) <= step and rec.get("event") != "end":
                kept.append(line)
        from facemeta.atomic import atomic_write

        with atomic_write(path) as fh:
            fh.write("".join(k + "\n" for k in kept))

    def _result_config(self) -> dict[str, Any]:
        """Settings that decide the result (compared on resume); output, logging and workers excluded."""
        d = self.cfg.to_dict()
        for key in ("output", "log_every", "keep_checkpoints", "checkpoint_every", "name"):
            d.pop(key, None)
        d["data"].pop("workers", None)
        d["data"].pop("align_workers", None)
        d["data"].pop("root", None)  # where the data lives does not change the result
        d["data"].pop("cache", None)
        return d

    # -- checkpoints
    def _save(self, model: nn.Module, head: nn.Module, optimizer, scheduler, scaler, sampler, epoch: int,
              position: int, meta: dict[str, Any]) -> Path:
        from facemeta.atomic import atomic_write
        from facemeta.models.checkpoint import save_checkpoint

        name = f"step-{self.step:06d}.safetensors"
        weights = save_checkpoint(model, self.ckpt_dir / name, {**meta, "step": self.step})
        state = {
            "version": STATE_VERSION, "step": self.step, "checkpoint": name,
            "config": json.dumps(self._result_config(), sort_keys=True),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "head": head.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "distill": self.distill.state_dict() if self.distill is not None else None,
            "sampler": sampler.state_dict(consumed=position) | {"epoch": epoch},
            "rng": rng_state(),
        }
        with atomic_write(self.ckpt_dir / STATE_FILE, "wb") as fh:
            torch.save(state, fh)
        # only now, with the state pointing at the new checkpoint, drop the oldest ones
        kept = sorted(self.ckpt_dir.glob("step-*.safetensors"))
        for old in kept[:-self.cfg.keep_checkpoints]:
            for p in (old, old.with_suffix(".json")):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        self._metrics({"event": "checkpoint", "step": self.step, "path": str(weights)})
        return weights

    # -- validation
    def _validate(self, model: nn.Module, heldout: list[ManifestRow], channels_last: bool = False) -> dict[str, Any]:
        """Verification on all pairs of the held-out source identities, with the threshold at eval.far."""
        from facemeta.eval.benchmark import embed_rows, evaluate_rows, far_key

        far_levels = sorted({1e-2, 1e-3, float(self.cfg.eval.far)}, reverse=True)
        # channels_last False mid-run: keep the training memory layout
        emb = embed_rows(model, heldout, flip=self.cfg.eval.flip, channels_last=channels_last)
        res = evaluate_rows(model, heldout, flip=self.cfg.eval.flip, far_levels=far_levels, embeddings=emb)
        res.pop("roc", None)
        key = far_key(self.cfg.eval.far)
        res["threshold"] = res[key.replace("tar@", "threshold@")]
        res["threshold_far"] = float(self.cfg.eval.far)
        domains = sorted({r.domain for r in heldout})
        if len(domains) > 1:  # pooled pairs mix the domains' score scales: each domain on its own too
            res["per_domain"] = {}
            for dom in domains:
                idx = [i for i, r in enumerate(heldout) if r.domain == dom]
                if len({heldout[i].identity for i in idx}) >= 2:
                    one = evaluate_rows(model, [heldout[i] for i in idx], flip=self.cfg.eval.flip,
                                        far_levels=far_levels, embeddings=emb[idx])
                    res["per_domain"][dom] = {k: one[k] for k in ("n_images", "tar@far=1e-2", "tar@far=1e-3", "auc")}
        return res

    # -- meta methods (facemeta.train.methods): one episode of every source domain per step
    def _meta_loop(self, model: nn.Module, head: nn.Module, optimizer, scheduler, sampler, dataset,
                   device: torch.device, meta: dict[str, Any], data, bar) -> None:
        """Train cfg.method (mfr, cdt, maml-fo, reptile) from self.step to cfg.steps.

        Episodes come from EpisodicDomainSampler and augmentations are seeded per (seed, step,
        slot), so both are pure functions of the step: exact resume needs only the step.
        """
        from facemeta.data.episodes import EpisodicDomainSampler
        from facemeta.train.methods import Joint, load_episode, train_step

        cfg = self.cfg
        episodes = EpisodicDomainSampler(dataset.labels, dataset.domains, cfg.sampler.identities_per_domain,
                                         cfg.meta.meta_test_domains, seed=cfg.seed)
        joint = Joint(model, head).train()
        loss_sum, seen, t_log = 0.0, 0, time.perf_counter()
        while self.step < cfg.steps:
            episode = episodes.episode(self.step)
            batch = load_episode(dataset, episode, cfg.seed, device)
            extra = None
            if self.distill is not None:
                teacher = self.teacher[torch.from_numpy(episode.indices)].to(device)

                def extra(joint, batch, teacher=teacher):
                    emb = joint(torch.cat([d.images for d in batch.domains]))
                    loss, match, structure = self.distill(emb.float(), teacher)
                    return loss, {"distill_match": float(match), "distill_structure": float(structure)}
            res = train_step(cfg.method, joint, batch, optimizer, cfg.meta, cfg.optim.grad_clip, extra_loss=extra)
            scheduler.step()
            self.step += 1
            loss_value = res.losses["loss"]
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at step {self.step}")
            loss_sum += loss_value * res.images
            seen += res.images
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.3g}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                dt = time.perf_counter() - t_log
                self._metrics({"step": self.step, "loss": loss_sum / max(seen, 1), **{
                    k: v for k, v in res.losses.items() if k != "loss"}, "lr": scheduler.get_last_lr()[0],
                    "grad_norm": res.grad_norm, "images_per_s": seen / dt if dt > 0 else None})
                loss_sum, seen, t_log = 0.0, 0, time.perf_counter()
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.steps and data.heldout:
                val = self._validate(model, data.heldout)
                self._metrics({"event": "validation", "step": self.step,
                               **{k: v for k, v in val.items() if isinstance(v, (int, float))}})
                joint.train()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self._save(model, head, optimizer, scheduler, None, sampler, 0, 0, meta)

    # -- main loop
    def fit(self) -> Path:
        """Train to cfg.steps (from a saved state with resume) and return the final checkpoint path."""
        prev_threads = torch.get_num_threads()
        prev_det = torch.are_deterministic_algorithms_enabled()
        try:
            return self._fit()
        finally:
            torch.set_num_threads(prev_threads)
            if torch.are_deterministic_algorithms_enabled() != prev_det:
                torch.use_deterministic_algorithms(prev_det)

    def _fit(self) -> Path:
        from facemeta.data.samplers import DomainBalancedBatchSampler, FaceDataset
        from facemeta.data.transforms import build_train_transform
        from facemeta.models.backbone import build_model
        from facemeta.models.checkpoint import load_checkpoint, save_checkpoint
        from facemeta.objectives.margins import ArcFaceHead, CosFaceHead

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = self._device()
        if cfg.deterministic:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fastest kernels, not bit-reproducible
        ddp.init_process_group(device)

        state = None
        state_path = self.ckpt_dir / STATE_FILE
        if self.resume:
            state = load_state(state_path)
            if state["config"] != json.dumps(self._result_config(), sort_keys=True):
                raise ConfigError(f"cannot resume {self.out}: its saved config differs from this one "
                                  "(resume with the same config, or train into a new --out)")
        elif self.is_main and state_path.exists():
            raise ConfigError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")

        # data: the main process aligns (cached) first, the others then read the cache
        if self.is_main:
            data = prepare_data(cfg, progress=self.progress)
        ddp.barrier()
        if not self.is_main:
            data = prepare_data(cfg, progress=False)
        domains = [s.set for s in cfg.data.sources]
        domain_to_index = {d: i for i, d in enumerate(domains)}
        identity_to_label = {n: i for i, n in enumerate(sorted({r.identity for r in data.train}))}
        augment = build_augment(cfg.augment)
        model_cfg = model_config(cfg)
        transform = build_train_transform(augment, cfg.model.image_size, model_cfg.mean, model_cfg.std)
        dataset = FaceDataset(data.train, transform, identity_to_label, domain_to_index)
        sampler = DomainBalancedBatchSampler(
            dataset.labels, dataset.domains, cfg.sampler.identities_per_domain, cfg.sampler.images_per_identity,
            seed=cfg.seed, rank=self.rank, world_size=self.world_size, with_seeds=True)

        # model, head, optimiser (the same seed on every rank: identical initial weights)
        seed_everything(cfg.seed)
        model = build_model(model_cfg, pretrained_path=pretrained_file(cfg))
        freeze(model, cfg.model.frozen)
        head_cls = ArcFaceHead if cfg.loss.head == "arcface" else CosFaceHead
        if cfg.method == "erm":
            head = head_cls(cfg.model.embedding_size, len(identity_to_label), s=cfg.loss.s, m=cfg.loss.m)
        else:  # facemeta.train.methods: the method's heads (CDT's margin head is CosFace, as in the paper)
            from facemeta.train.methods import build_heads

            if self.world_size > 1:
                raise ConfigError(f"method {cfg.method} runs in one process (no DDP); use method erm under torchrun")
            margin_cls = CosFaceHead if cfg.method == "cdt" else head_cls
            head = nn.ModuleDict(build_heads(
                cfg.method, cfg.model.embedding_size, len(identity_to_label),
                lambda: margin_cls(cfg.model.embedding_size, len(identity_to_label), s=cfg.loss.s, m=cfg.loss.m),
                cfg.meta))
        if state is None and cfg.loss.init == "prototypes" and cfg.steps:
            start = pretrained_file(cfg)
            init_class_weights(head, class_prototypes(model, data.train, identity_to_label, device,
                                                      cache_key=_file_key(start) if start else None,
                                                      cache=cfg.data.cache))
        self.distill, self.teacher = None, None
        if cfg.distill.weight or cfg.distill.pair_weight:
            from facemeta.models.dlib_resnet import PRIOR_EMBEDDING_SIZE
            from facemeta.objectives.distill import DistillationLoss
            from facemeta.train.teacher import teacher_embeddings

            self.teacher = torch.from_numpy(teacher_embeddings(data.train, cfg.data.cache, cfg.data.align_workers))
            self.distill = DistillationLoss(cfg.model.embedding_size, PRIOR_EMBEDDING_SIZE, cfg.distill.weight,
                                            cfg.distill.pair_weight).to(device)
        if state is not None:
            loaded, _ = load_checkpoint(self.ckpt_dir / state["checkpoint"], expected=model_cfg)
            model.load_state_dict(loaded.state_dict())
            head.load_state_dict(state["head"])
            if self.distill is not None and state.get("distill"):
                self.distill.load_state_dict(state["distill"])
        model.to(device)
        head.to(device)
        objective: nn.Module = _Objective(model, head, self.distill)
        if self.world_size > 1:
            objective = ddp.wrap(objective, device)
        decay, no_decay = [], []
        extra_params = list(self.distill.parameters()) if self.distill is not None else []
        for p in list(model.parameters()) + list(head.parameters()) + extra_params:
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if cfg.optim.name == "sgd":
            optimizer = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum)
        else:
            optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr)
        o = cfg.optim
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg.steps, o.warmup_steps, o.schedule, o.min_lr_ratio))
        use_amp = cfg.amp and device.type == "cuda"
        amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None

        epoch, position = 0, 0
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            self.step = int(state["step"])
            self.resumed_from = self.step
            epoch, position = int(state["sampler"]["epoch"]), int(state["sampler"]["position"])
            set_rng_state(state["rng"])
            self._trim_metrics(self.step)
            self._metrics({"event": "resume", "step": self.step})
        else:
            self._metrics({"event": "start", "step": 0, "world_size": self.world_size, "device": str(device),
                           "data": data.summary(), "batch_size": sampler.batch_size * self.world_size,
                           "classes": len(identity_to_label)})

        meta = {"method": cfg.method if cfg.steps else "zero-shot", "align_size": cfg.data.align_size, "align_chip": cfg.data.align_chip,
                "training": {"sources": [s.__dict__ for s in cfg.data.sources], "targets": list(cfg.data.targets),
                             "steps": cfg.steps, "seed": cfg.seed, "batch_size": sampler.batch_size * self.world_size,
                             "images_seen": cfg.steps * sampler.batch_size * self.world_size,
                             "classes": len(identity_to_label), **data.summary()},
                "config": cfg.to_dict()}

        bar = None
        if self.progress and self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.name or 'run'}", unit="step",
                       dynamic_ncols=True)
        objective.train()
        loss_sum, correct_sum, seen, t_log = 0.0, 0, 0, time.perf_counter()
        try:
            if cfg.method != "erm":
                self._meta_loop(model, head, optimizer, scheduler, sampler, dataset, device, meta, data, bar)
                epoch, position = 0, 0  # episodes are a function of the step alone
            while cfg.method == "erm" and self.step < cfg.steps:
                sampler.set_epoch(epoch)
                if position:
                    sampler.load_state_dict({"epoch": epoch, "position": position})
                loader = torch.utils.data.DataLoader(
                    dataset if self.teacher is None else _WithTeacher(dataset, self.teacher), batch_sampler=sampler, num_workers=cfg.data.workers,
                    pin_memory=device.type == "cuda", persistent_workers=False,
                    # own generator: creating a loader must not draw from the global torch RNG
                    generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
                for x, labels, _dom, *teacher in loader:
                    x = x.to(device, non_blocking=True)
                    labels = labels.to(device, non_blocking=True)
                    teacher = teacher[0].to(device, non_blocking=True) if teacher else None
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        loss, correct = objective(x, labels, teacher)
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.unscale_(optimizer)
                    else:
                        loss.backward()
                    params = [p for g in optimizer.param_groups for p in g["params"]]
                    if cfg.optim.grad_clip:
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip))
                    else:
                        grad_norm = float(torch.linalg.vector_norm(
                            torch.stack([p.grad.norm() for p in params if p.grad is not None])))
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    scheduler.step()
                    self.step += 1
                    position += 1
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value):
                        raise FloatingPointError(f"loss became {loss_value} at step {self.step}")
                    loss_sum += loss_value * x.shape[0]
                    correct_sum += int(correct)
                    seen += x.shape[0]
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.3g}")
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        dt = time.perf_counter() - t_log
                        self._metrics({"step": self.step, "epoch": epoch, "loss": loss_sum / max(seen, 1),
                                       "train_acc": correct_sum / max(seen, 1), "lr": scheduler.get_last_lr()[0],
                                       "grad_norm": grad_norm,
                                       "images_per_s": seen * self.world_size / dt if dt > 0 else None})
                        loss_sum, correct_sum, seen, t_log = 0.0, 0, 0, time.perf_counter()
                    if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.steps \
                            and self.is_main and data.heldout:
                        val = self._validate(model, data.heldout)
                        self._metrics({"event": "validation", "step": self.step,
                                       **{k: v for k, v in val.items() if isinstance(v, (int, float))}})
                        objective.train()
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                        if self.is_main:
                            self._save(model, head, optimizer, scheduler, scaler, sampler, epoch, position, meta)
                        ddp.barrier()
                    if self.step >= cfg.steps:
                        break
                if position >= sampler.num_batches:
                    epoch, position = epoch + 1, 0
        finally:
            if bar is not None:
                bar.close()

        final = self.out / "model.safetensors"
        in_sync = ddp.replicas_in_sync(objective)  # collective: every rank takes part
        if self.world_size > 1:
            meta["training"]["world_size"] = self.world_size
            meta["training"]["replicas_in_sync"] = in_sync
        if self.is_main:
            self._save(model, head, optimizer, scheduler, scaler, sampler, epoch, position, meta)
            if data.heldout:
                val = self._validate(model, data.heldout, channels_last=True)
                meta["threshold"] = val["threshold"]
                meta["threshold_far"] = val["threshold_far"]
                meta["validation"] = {"set": "held-out source identities (all pairs)",
                                      **{k: v for k, v in val.items()
                                         if isinstance(v, (int, float, str, bool)) or v is None},
                                      **({"per_domain": val["per_domain"]} if "per_domain" in val else {})}
            save_checkpoint(model, final, {**meta, "step": self.step})
            self._metrics({"event": "end", "step": self.step, "checkpoint": str(final), "replicas_in_sync": in_sync,
                           "threshold": meta.get("threshold"), "auc": meta.get("validation", {}).get("auc")})
        ddp.barrier()
        ddp.destroy_process_group()
        return final

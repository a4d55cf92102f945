"""The Trainer: one loop that trains a face embedder with any method, with checkpoints and exact resume.

``Trainer(cfg, prepare_data(cfg)).fit()``: the caller prepares the source data (facemeta.train.data) and
hands it over. A run writes into its output folder:
- ``config.yaml``: the validated config;
- ``checkpoints/step-NNNNNN.safetensors`` (+ .json): the model every ``checkpoint_every`` steps
  (the last ``keep_checkpoints`` kept), and ``checkpoints/state.pt``: optimiser, scheduler, margin
  head, AMP scaler, sampler position and RNG states (torch.save, plain tensors and numbers only,
  loaded with ``weights_only=True``), pointing at the model checkpoint of the same step;
- ``metrics.jsonl``: one JSON object per logged step / validation / checkpoint / end;
- ``model.safetensors`` (+ .json): the final model, whose meta holds the training data, method,
  validation metrics and the verification ``threshold`` calibrated at ``threshold_far`` on pairs of
  held-out SOURCE-domain identities (never the unseen targets).

Every method is a kind of step (facemeta.train.steps: ERM's pooled batches, or an episode of a meta
method); logging, validation and checkpoint cadence live in :meth:`Trainer._loop` alone.

Exact resume: batches are a pure function of (seed, epoch, position) and every augmentation is
seeded per (step, slot), so a run killed after a checkpoint and resumed replays the same data and
(on CPU, with deterministic algorithms) ends with the same weights as an unbroken run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facemeta.data.manifest import ManifestRow
from facemeta.errors import ConfigError
from facemeta.train import ddp
from facemeta.train.config import TrainConfig, build_augment, dump_config
from facemeta.train.data import SourceData
from facemeta.train.start import (
    class_prototypes,
    freeze,
    init_class_weights,
    model_config,
    pretrained_file,
    weights_file_key,
)
from facemeta.train.state import (
    STATE_FILE,
    STATE_VERSION,
    load_state,
    lr_factor,
    rng_state,
    seed_everything,
    set_rng_state,
)
from facemeta.train.steps import ErmSteps, MarginObjective, MetaSteps


@dataclass
class _Parts:
    """What a run trains with, built by :meth:`Trainer._build`."""

    model: nn.Module
    head: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    dataset: Any
    sampler: Any
    objective: nn.Module
    classes: int


class Trainer:
    """Train one config on its prepared source data: ``Trainer(cfg, data).fit()`` -> path of the final model.

    resume: continue from output/checkpoints/state.pt (ConfigError if the saved config differs in
    anything that changes the result). progress: a tqdm bar on the main process. Inside torchrun
    (WORLD_SIZE > 1) it joins the process group (gloo on CPU, nccl on CUDA), splits every global
    batch between processes and only rank 0 writes files.
    """

    def __init__(self, cfg: TrainConfig, data: SourceData, resume: bool = False, progress: bool = True):
        if not isinstance(data, SourceData):
            raise TypeError("Trainer(cfg, data): data is the run's prepared SourceData (facemeta.train.data.prepare_data)")
        self.cfg = cfg
        self.data = data
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

    # -- the run
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
        cfg = self.cfg
        device = self._setup_torch()
        state = self._open_run()
        parts = self._build(device, state)
        steps = self._steps(parts, device, state)
        if state is not None:
            parts.optimizer.load_state_dict(state["optimizer"])
            parts.scheduler.load_state_dict(state["scheduler"])
            if steps.scaler is not None and state.get("scaler"):
                steps.scaler.load_state_dict(state["scaler"])
            self.step = self.resumed_from = int(state["step"])
            set_rng_state(state["rng"])
            self._trim_metrics(self.step)
            self._metrics({"event": "resume", "step": self.step})
        else:
            self._metrics({"event": "start", "step": 0, "world_size": self.world_size, "device": str(device),
                           "data": self.data.summary(), "batch_size": parts.sampler.batch_size * self.world_size,
                           "classes": parts.classes})
        batch_size = parts.sampler.batch_size * self.world_size
        from facemeta.align.warp import template_digest

        meta = {"method": cfg.method if cfg.steps else "zero-shot", "align_size": cfg.data.align_size,
                "align_chip": cfg.data.align_chip, "align_template": template_digest(cfg.data.align_chip),
                "training": {"sources": [s.__dict__ for s in cfg.data.sources], "targets": list(cfg.data.targets),
                             "steps": cfg.steps, "seed": cfg.seed, "batch_size": batch_size,
                             "images_seen": cfg.steps * batch_size, "classes": parts.classes,
                             **self.data.summary()},
                "config": cfg.to_dict()}
        self._loop(parts, steps, meta)
        return self._finish(parts, steps, meta)

    def start_state(self) -> tuple[nn.Module, nn.Module, Any]:
        """The model, the method's head(s) and the training dataset that a fresh run takes its first step from
        (starting weights, class weights as the config says), built without training or writing any file: for
        diagnostics such as benchmarks/term_gradients.py."""
        parts = self._build(self._device(), None)
        return parts.model, parts.head, parts.dataset

    def _setup_torch(self) -> torch.device:
        """Threads, determinism and the process group; returns the device."""
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
        return device

    def _open_run(self) -> dict[str, Any] | None:
        """The saved state to resume from (None for a new run); the output folder and its config.yaml."""
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
            dump_config(self.cfg, self.out / "config.yaml")
        return state

    def _build(self, device: torch.device, state: dict[str, Any] | None) -> _Parts:
        """Dataset and sampler, model and head (from the saved state on resume), distillation, optimiser."""
        from facemeta.align.warp import template
        from facemeta.data.samplers import DomainBalancedBatchSampler, FaceDataset
        from facemeta.data.transforms import build_train_transform
        from facemeta.models.backbone import build_model
        from facemeta.models.checkpoint import load_checkpoint

        cfg, data = self.cfg, self.data
        domain_to_index = {s.domain: i for i, s in enumerate(cfg.data.sources)}
        identity_to_label = {n: i for i, n in enumerate(sorted({r.identity for r in data.train}))}
        model_cfg = model_config(cfg)
        transform = build_train_transform(build_augment(cfg.augment), cfg.model.image_size, model_cfg.mean,
                                          model_cfg.std)
        size = cfg.data.align_size
        dataset = FaceDataset(data.train, transform, identity_to_label, domain_to_index,
                              layout=template(size, cfg.data.align_chip) / size)
        sampler = DomainBalancedBatchSampler(
            dataset.labels, dataset.domains, cfg.sampler.identities_per_domain, cfg.sampler.images_per_identity,
            seed=cfg.seed, rank=self.rank, world_size=self.world_size, with_seeds=True)
        seed_everything(cfg.seed)  # the same seed on every rank: identical initial weights
        model = build_model(model_cfg, pretrained_path=pretrained_file(cfg))
        freeze(model, cfg.model.frozen)
        head = self._head(len(identity_to_label))
        if state is None and cfg.loss.init == "prototypes" and cfg.steps:
            start = pretrained_file(cfg)
            init_class_weights(head, class_prototypes(model, data.train, identity_to_label, device,
                                                      cache_key=weights_file_key(start) if start else None,
                                                      cache=cfg.data.cache))
        self._build_distillation(device)
        if state is not None:
            loaded, _ = load_checkpoint(self.ckpt_dir / state["checkpoint"], expected=model_cfg)
            model.load_state_dict(loaded.state_dict())
            head.load_state_dict(state["head"])
            if self.distill is not None and state.get("distill"):
                self.distill.load_state_dict(state["distill"])
        model.to(device)
        head.to(device)
        objective: nn.Module = MarginObjective(model, head, self.distill)
        if self.world_size > 1:
            objective = ddp.wrap(objective, device)
        optimizer = self._optimizer(model, head)
        o = cfg.optim
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg.steps, o.warmup_steps, o.schedule, o.min_lr_ratio))
        return _Parts(model, head, optimizer, scheduler, dataset, sampler, objective, len(identity_to_label))

    def _head(self, classes: int) -> nn.Module:
        """The margin head (ERM), or the method's heads (facemeta.train.methods; CDT's margin head is CosFace,
        as in the paper)."""
        from facemeta.objectives.margins import MARGIN_HEADS

        cfg = self.cfg
        head_cls = MARGIN_HEADS[cfg.loss.head]
        if cfg.method == "erm":
            return head_cls(cfg.model.embedding_size, classes, s=cfg.loss.s, m=cfg.loss.m)
        from facemeta.train.methods import METHODS, build_heads

        if self.world_size > 1:
            raise ConfigError(f"method {cfg.method} runs in one process (no DDP); use method erm under torchrun")
        required = METHODS.get(cfg.method).margin_head  # CDT's is CosFace, as in the paper
        margin_cls = MARGIN_HEADS[required] if required else head_cls
        return nn.ModuleDict(build_heads(
            cfg.method, cfg.model.embedding_size, classes,
            lambda: margin_cls(cfg.model.embedding_size, classes, s=cfg.loss.s, m=cfg.loss.m), cfg.meta))

    def _build_distillation(self, device: torch.device) -> None:
        """The teacher's vectors of the training faces and the distillation loss, when cfg.distill asks."""
        cfg = self.cfg
        self.distill, self.teacher = None, None
        if cfg.distill.weight or cfg.distill.pair_weight:
            from facemeta.objectives.distill import DistillationLoss
            from facemeta.train.teacher import teacher_embeddings

            self.teacher = torch.from_numpy(teacher_embeddings(self.data.train, cfg.data.cache, cfg.data.align_workers,
                                                               teacher=cfg.distill.teacher))
            self.distill = DistillationLoss(cfg.model.embedding_size, self.teacher.shape[1], cfg.distill.weight,
                                            cfg.distill.pair_weight).to(device)

    def _optimizer(self, model: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
        """SGD or AdamW over the trainable parameters, without weight decay on biases and norms."""
        cfg = self.cfg
        decay, no_decay = [], []
        extra_params = list(self.distill.parameters()) if self.distill is not None else []
        for p in list(model.parameters()) + list(head.parameters()) + extra_params:
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if cfg.optim.name == "sgd":
            return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum)
        return torch.optim.AdamW(groups, lr=cfg.optim.lr)

    def _steps(self, parts: _Parts, device: torch.device, state: dict[str, Any] | None) -> ErmSteps | MetaSteps:
        """The run's kind of step: ERM batches (resumed at the saved epoch and position) or a meta method."""
        cfg = self.cfg
        if cfg.method == "erm":
            epoch, position = (int(state["sampler"]["epoch"]), int(state["sampler"]["position"])) if state else (0, 0)
            return ErmSteps(parts.objective, parts.optimizer, parts.dataset, parts.sampler, self.teacher, device,
                            cfg.seed, cfg.data.workers, cfg.optim.grad_clip, cfg.amp, epoch, position)
        return MetaSteps(cfg.method, parts.model, parts.head, parts.optimizer, parts.dataset, device, cfg,
                         self.distill, self.teacher)

    def _loop(self, parts: _Parts, steps: ErmSteps | MetaSteps, meta: dict[str, Any]) -> None:
        """Train from self.step to cfg.steps: the one place for logging, validation and checkpoint cadence."""
        cfg = self.cfg
        bar = None
        if self.progress and self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.name or 'run'}", unit="step",
                       dynamic_ncols=True)
        parts.objective.train()
        steps.train_mode()
        loss_sum, correct_sum, seen, t_log = 0.0, 0, 0, time.perf_counter()
        try:
            while self.step < cfg.steps:
                res = steps.step(self.step)
                parts.scheduler.step()
                self.step += 1
                if not math.isfinite(res.loss):
                    raise FloatingPointError(f"loss became {res.loss} at step {self.step}")
                loss_sum += res.loss * res.images
                correct_sum += res.correct or 0
                seen += res.images
                lr = parts.scheduler.get_last_lr()[0]
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{res.loss:.3f}", lr=f"{lr:.3g}")
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    dt = time.perf_counter() - t_log
                    accuracy = {} if res.correct is None else {"train_acc": correct_sum / max(seen, 1)}
                    self._metrics({"step": self.step, **steps.log_fields(), "loss": loss_sum / max(seen, 1),
                                   **accuracy, **res.extras, "lr": lr, "grad_norm": res.grad_norm,
                                   "images_per_s": seen * self.world_size / dt if dt > 0 else None})
                    loss_sum, correct_sum, seen, t_log = 0.0, 0, 0, time.perf_counter()
                if self.step < cfg.steps:
                    self._between_steps(parts, steps, meta)
        finally:
            if bar is not None:
                bar.close()

    def _between_steps(self, parts: _Parts, steps: ErmSteps | MetaSteps, meta: dict[str, Any]) -> None:
        """Validation every eval.every steps and a checkpoint every checkpoint_every steps (not at the last
        step: :meth:`_finish` saves that one)."""
        cfg = self.cfg
        if cfg.eval.every and self.step % cfg.eval.every == 0 and self.is_main and self.data.heldout:
            val = self._validate(parts.model, self.data.heldout)
            self._metrics({"event": "validation", "step": self.step,
                           **{k: v for k, v in val.items() if isinstance(v, (int, float))}})
            steps.train_mode()
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            if self.is_main:
                self._save(parts.model, parts.head, parts.optimizer, parts.scheduler, steps.scaler, parts.sampler,
                           *steps.position(), meta)
            ddp.barrier()

    def _interpolate(self, model: nn.Module, meta: dict[str, Any]) -> None:
        """The final model between the starting and the trained weights (cfg.interpolate; WiSE-FT). The last
        checkpoint keeps the trained weights, so a resumed or longer run continues from them."""
        from facemeta.models.backbone import build_model
        from facemeta.train.interpolation import interpolate_into

        start = build_model(model_config(self.cfg), pretrained_path=pretrained_file(self.cfg))
        interpolate_into(model, start.state_dict(), self.cfg.interpolate)
        meta["interpolate"] = {"alpha": self.cfg.interpolate, "with": "the starting weights",
                               "method": "WiSE-FT (Wortsman et al. 2022)"}

    def _finish(self, parts: _Parts, steps: ErmSteps | MetaSteps, meta: dict[str, Any]) -> Path:
        """Last checkpoint and state, the final weights (interpolated with the start when cfg.interpolate < 1), the
        threshold calibrated on the held-out identities, the final model."""
        from facemeta.models.checkpoint import save_checkpoint

        final = self.out / "model.safetensors"
        in_sync = ddp.replicas_in_sync(parts.objective)  # collective: every rank takes part
        if self.world_size > 1:
            meta["training"]["world_size"] = self.world_size
            meta["training"]["replicas_in_sync"] = in_sync
        if self.is_main:
            self._save(parts.model, parts.head, parts.optimizer, parts.scheduler, steps.scaler, parts.sampler,
                       *steps.position(), meta)
            if self.cfg.interpolate != 1 and self.cfg.steps:
                self._interpolate(parts.model, meta)
            if self.data.heldout:
                val = self._validate(parts.model, self.data.heldout, channels_last=True)
                meta["threshold"] = val["threshold"]
                meta["threshold_far"] = val["threshold_far"]
                meta["validation"] = {"set": "held-out source identities (all pairs)",
                                      **{k: v for k, v in val.items()
                                         if isinstance(v, (int, float, str, bool)) or v is None},
                                      **({"per_domain": val["per_domain"]} if "per_domain" in val else {})}
            save_checkpoint(parts.model, final, {**meta, "step": self.step})
            self._metrics({"event": "end", "step": self.step, "checkpoint": str(final), "replicas_in_sync": in_sync,
                           "threshold": meta.get("threshold"), "auc": meta.get("validation", {}).get("auc")})
        ddp.barrier()
        ddp.destroy_process_group()
        return final

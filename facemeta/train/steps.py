"""One training step of any method behind one interface, so that the Trainer has one loop for all of them.

- :class:`ErmSteps`: ERM, the pooled domain-balanced batches of facemeta.data.samplers through the margin
  head (epochs of a DataLoader; mixed precision on CUDA; DistributedDataParallel under torchrun).
- :class:`MetaSteps`: the meta methods (mfr, cdt, maml-fo, reptile), one episode of every source domain per
  step (facemeta.train.methods.train_step).

Each ``step(index)`` takes one optimiser step and returns a :class:`Step` for the logs; the Trainer steps
the learning-rate schedule, logs, validates and saves checkpoints in one place. ``position()`` is where the
data stream stands (epoch, batches consumed), saved with a checkpoint for an exact resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from facemeta.train.methods import Joint, clip_gradients, load_episode, train_step


@dataclass
class Step:
    """What one training step did: its loss, how many images it saw, the gradient norm before clipping,
    ERM's correct classifications (None for the meta methods) and other values to log."""

    loss: float
    images: int
    grad_norm: float
    correct: int | None = None
    extras: dict[str, float] = field(default_factory=dict)


class MarginObjective(nn.Module):
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


class WithTeacher(torch.utils.data.Dataset):
    """A FaceDataset whose items also carry the teacher's embedding of that face (for distillation)."""

    def __init__(self, dataset, teacher: torch.Tensor):
        self.dataset, self.teacher = dataset, teacher

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index = int(item[0]) if isinstance(item, (tuple, list)) else int(item)
        return (*self.dataset[item], self.teacher[index])


class ErmSteps:
    """ERM steps over the domain-balanced batch sampler, epoch after epoch.

    Each epoch's DataLoader has its own generator (seed * 1000 + epoch), so creating one never draws from
    the global torch RNG; a resumed run restarts inside its epoch at the saved position.
    """

    def __init__(self, objective: nn.Module, optimizer: torch.optim.Optimizer, dataset, sampler,
                 teacher: torch.Tensor | None, device: torch.device, seed: int, workers: int,
                 grad_clip: float | None, amp: bool, epoch: int = 0, position: int = 0):
        self.objective, self.optimizer, self.sampler = objective, optimizer, sampler
        self.dataset = dataset if teacher is None else WithTeacher(dataset, teacher)
        self.device, self.seed, self.workers, self.grad_clip = device, seed, workers, grad_clip
        self.use_amp = amp and device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp and self.amp_dtype == torch.float16 else None
        self.epoch, self.consumed = epoch, position
        self._batches = None

    def position(self) -> tuple[int, int]:
        """(epoch, batches consumed in it); a finished epoch counts as the start of the next."""
        if self.consumed >= self.sampler.num_batches:
            return self.epoch + 1, 0
        return self.epoch, self.consumed

    def log_fields(self) -> dict[str, Any]:
        """What ERM adds to each log line: the epoch."""
        return {"epoch": self.epoch}

    def train_mode(self) -> None:
        """Back to training mode (after a validation pass)."""
        self.objective.train()

    def _next_batch(self):
        while True:
            if self._batches is None:
                self.epoch, self.consumed = self.position()
                self.sampler.set_epoch(self.epoch)
                if self.consumed:
                    self.sampler.load_state_dict({"epoch": self.epoch, "position": self.consumed})
                loader = torch.utils.data.DataLoader(
                    self.dataset, batch_sampler=self.sampler, num_workers=self.workers,
                    pin_memory=self.device.type == "cuda", persistent_workers=False,
                    generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
                self._batches = iter(loader)
            try:
                batch = next(self._batches)
            except StopIteration:
                self._batches = None
                self.consumed = self.sampler.num_batches
                continue
            self.consumed += 1
            return batch

    def step(self, index: int) -> Step:
        """One optimiser step on the next batch (`index`, the step number, is not needed: the sampler's
        position is the state)."""
        x, labels, _domains, *teacher = self._next_batch()
        x = x.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        teacher = teacher[0].to(self.device, non_blocking=True) if teacher else None
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            loss, correct = self.objective(x, labels, teacher)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = clip_gradients(self.optimizer, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return Step(float(loss.detach()), int(x.shape[0]), grad_norm, correct=int(correct))


class MetaSteps:
    """Steps of a meta method: episode `index` of the episodic sampler (a pure function of the step, as are
    its augmentations, so an exact resume needs only the step number)."""

    scaler = None  # the meta methods train in float32

    def __init__(self, method: str, model: nn.Module, head: nn.Module, optimizer: torch.optim.Optimizer,
                 dataset, device: torch.device, cfg, distill: nn.Module | None = None,
                 teacher: torch.Tensor | None = None):
        from facemeta.data.episodes import EpisodicDomainSampler

        self.method, self.optimizer, self.dataset, self.device, self.cfg = method, optimizer, dataset, device, cfg
        self.distill, self.teacher = distill, teacher
        self.episodes = EpisodicDomainSampler(dataset.labels, dataset.domains, cfg.sampler.identities_per_domain,
                                              cfg.meta.meta_test_domains, seed=cfg.seed)
        self.joint = Joint(model, head).train()

    def position(self) -> tuple[int, int]:
        """Episodes depend on the step alone: no data position to save."""
        return 0, 0

    def log_fields(self) -> dict[str, Any]:
        """Nothing beyond the step's own losses."""
        return {}

    def train_mode(self) -> None:
        """Back to training mode (after a validation pass)."""
        self.joint.train()

    def step(self, index: int) -> Step:
        """One step of the method on episode `index`."""
        episode = self.episodes.episode(index)
        batch = load_episode(self.dataset, episode, self.cfg.seed, self.device)
        extra = None
        if self.distill is not None:
            teacher = self.teacher[torch.from_numpy(episode.indices)].to(self.device)

            def extra(joint, batch, teacher=teacher):
                emb = joint(torch.cat([d.images for d in batch.domains]))
                loss, match, structure = self.distill(emb.float(), teacher)
                return loss, {"distill_match": float(match), "distill_structure": float(structure)}
        res = train_step(self.method, self.joint, batch, self.optimizer, self.cfg.meta, self.cfg.optim.grad_clip,
                         extra_loss=extra)
        extras = {k: v for k, v in res.losses.items() if k != "loss"}
        return Step(res.losses["loss"], res.images, res.grad_norm, extras=extras)

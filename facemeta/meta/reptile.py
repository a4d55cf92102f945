"""Reptile (Nichol, Achiam and Schulman, 2018, "On First-Order Meta-Learning Algorithms").

For each task in a batch: copy θ, take k steps of an inner optimiser (SGD by default, any torch
optimiser factory) on the copy to reach θ̃_i; then θ ← θ + ε · mean_i(θ̃_i − θ).

The copy is a dict of detached leaf tensors run through ``functional_forward``, so the module is
not deep-copied and its BatchNorm running statistics are never changed by the inner loop
(cloned buffers; see ``functional``). ``meta_backward`` (the outer-gradient verb every learner here
shares, facemeta.meta.base) writes θ − mean(θ̃) into ``.grad`` so that any outer optimiser can apply
it (plain SGD with lr ε gives exactly the Reptile update); ``step`` applies that update in place with
ε, for use without an optimiser.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .base import LossFn, MetaLearner
from .functional import Params, as_params, check_float, check_int, detached_params, loss_scalar, named_params

OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]

__all__ = ["Reptile"]


class Reptile(MetaLearner):
    """Reptile meta-learner around any ``nn.Module`` (the shape of facemeta.meta.base).

    ``inner_optimizer`` builds the inner optimiser from a list of tensors (default
    ``SGD(lr=inner_lr)``); ``epsilon`` is the outer step size of ``step``.

    >>> import torch
    >>> from torch import nn
    >>> from facemeta.meta import functional_forward
    >>> model = nn.Linear(1, 1)
    >>> _ = nn.init.zeros_(model.weight)
    >>> x = torch.linspace(-1, 1, 8).unsqueeze(1)
    >>> def mse(slope):
    ...     return lambda params: ((functional_forward(model, params, x) - slope * x) ** 2).mean()
    >>> reptile = Reptile(model, inner_steps=5, inner_lr=0.1, epsilon=0.5)
    >>> logs = reptile.step([mse(2.0), mse(3.0)])  # θ moves half way to the tasks' mean adapted weights
    >>> 0.0 < model.weight.item() < 2.0, sorted(logs)
    (True, ['inner_loss'])
    """

    def __init__(
        self,
        model: nn.Module,
        inner_steps: int = 5,
        inner_lr: float = 0.01,
        epsilon: float = 0.1,
        inner_optimizer: OptimizerFactory | None = None,
    ) -> None:
        super().__init__(model)
        self.inner_steps = check_int("inner_steps", inner_steps, low=1)
        self.inner_lr = check_float("inner_lr", inner_lr, low=0.0)
        self.epsilon = check_float("epsilon", epsilon, low=0.0)
        self.inner_optimizer = inner_optimizer or (lambda ts: torch.optim.SGD(ts, lr=self.inner_lr))

    def adapt(self, loss_fn: LossFn, params: Mapping[str, Tensor] | None = None, steps: int | None = None,
              return_losses: bool = False) -> Params | tuple[Params, list[float]]:
        """Inner loop on a copy of ``params`` (default θ): ``steps`` optimiser steps on ``loss_fn(params)``
        (called once per step, so a closure may draw a fresh batch). Returns θ̃ (detached), and the losses
        when ``return_losses``."""
        steps = self.inner_steps if steps is None else check_int("steps", steps, low=0)
        fast = detached_params(as_params(params, self.model))
        opt = self.inner_optimizer(list(fast.values()))
        losses: list[float] = []
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_scalar(loss_fn(fast), "Reptile loss_fn")
            if not loss.requires_grad:
                raise ValueError("Reptile loss_fn returned a loss that does not depend on the params it was given")
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        adapted = {n: t.detach() for n, t in fast.items()}
        return (adapted, losses) if return_losses else adapted

    def _mean_delta(self, tasks: Iterable[LossFn]) -> tuple[Params, float]:
        theta = named_params(self.model)
        total = {n: torch.zeros_like(p) for n, p in theta.items()}
        count, loss_sum = 0, 0.0
        for loss_fn in tasks:
            adapted, losses = self.adapt(loss_fn, return_losses=True)
            for n, p in theta.items():
                total[n].add_(adapted[n] - p.detach())
            loss_sum += losses[0] if losses else float("nan")
            count += 1
        if count == 0:
            raise ValueError("Reptile needs at least one task")
        return {n: t / count for n, t in total.items()}, loss_sum / count

    def meta_backward(self, tasks: Iterable[LossFn]) -> dict[str, float]:
        """Accumulate θ − mean_i θ̃_i into ``.grad`` (a descent direction for any optimiser)."""
        delta, first_loss = self._mean_delta(tasks)
        with torch.no_grad():
            for n, p in named_params(self.model).items():
                if p.grad is None:
                    p.grad = -delta[n]
                else:
                    p.grad.sub_(delta[n])
        return {"inner_loss": first_loss}

    def step(self, tasks: Iterable[LossFn], epsilon: float | None = None) -> dict[str, float]:
        """θ ← θ + ε · mean_i(θ̃_i − θ) in place; returns the mean first inner loss."""
        eps = self.epsilon if epsilon is None else check_float("epsilon", epsilon, low=0.0)
        delta, first_loss = self._mean_delta(tasks)
        with torch.no_grad():
            for n, p in named_params(self.model).items():
                p.add_(delta[n], alpha=eps)
        return {"inner_loss": first_loss}

"""The meta-train / meta-test step (MLDG, Li et al., AAAI 2018) that MFR and CDT build on.

One step, for losses given as callables of a params dict:

    L_S = loss_train(θ)                      meta-train loss at θ
    θ'  = θ − α ∇_θ L_S                      one virtual SGD step
    L_T = loss_test(θ')                      meta-test loss at the virtual parameters
    total = γ L_S + (1 − γ) L_T              and ``.grad`` += ∇_θ total

Second order keeps the graph of ∇L_S, so ∇_θ L_T(θ') = (I − α H_S) ∇L_T(θ'); first order treats
∇L_S as a constant, so it is ∇L_T evaluated at θ'. Either way the γ L_S part of the gradient is
γ ∇L_S, which the step already has, so it is added to ``.grad`` directly instead of
back-propagating through L_S a second time (a first-order step then costs two forward and two
backward passes, about one SGD step on the union of both batches).

Gradients accumulate into ``.grad`` like ``loss.backward()``: zero them before, step any torch
optimiser after. The callables decide BatchNorm handling through ``functional_forward``; its
default (cloned buffers) leaves running statistics untouched, and a trainer that wants them to
track training passes ``buffers="live"`` in its meta-train pass at θ only.

Example (an MFR/CDT-style trainer)::

    step = MLDG(model, alpha=1e-3, gamma=0.5, first_order=False)
    opt.zero_grad()
    res = step.step(
        lambda p: loss_s(functional_forward(model, p, x_s, buffers="live"), y_s),
        lambda p: loss_t(functional_forward(model, p, x_t), y_t),
    )
    opt.step()                                 # log res.loss_train, res.loss_test, res.total
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .functional import Params, as_params, check_float, loss_scalar

__all__ = ["MetaStepResult", "meta_train_test_step", "MLDG"]


@dataclass
class MetaStepResult:
    """Losses of one meta-train/meta-test step (floats, for logging)."""

    loss_train: float
    loss_test: float
    total: float


def meta_train_test_step(
    model: nn.Module,
    loss_train: Callable[[Params], Tensor],
    loss_test: Callable[[Params], Tensor],
    alpha: float,
    gamma: float = 0.5,
    first_order: bool = False,
    params: Mapping[str, Tensor] | None = None,
) -> MetaStepResult:
    """One MLDG step: accumulate ∇_θ[γ L_S(θ) + (1 − γ) L_T(θ − α∇L_S)] into ``.grad``.

    ``params`` (default: the model's trainable parameters) must be leaf tensors whose ``.grad``
    an optimiser will read. Returns the two losses and the total for logging.
    """
    alpha = check_float("alpha", alpha, low=0.0)
    gamma = check_float("gamma", gamma, low=0.0, high=1.0)
    theta = as_params(params, model)
    if not theta:
        raise ValueError("meta_train_test_step: the model has no trainable parameters")
    names = list(theta)
    tensors = [theta[n] for n in names]

    ls = loss_scalar(loss_train(theta), "loss_train")
    if not ls.requires_grad:
        raise ValueError("loss_train returned a loss that does not depend on the params it was given")
    second_order = not first_order
    grads = torch.autograd.grad(ls, tensors, create_graph=second_order, allow_unused=True)
    fast = {
        n: (p if g is None else p - alpha * (g if second_order else g.detach()))
        for n, p, g in zip(names, tensors, grads, strict=True)
    }
    lt = loss_scalar(loss_test(fast), "loss_test")
    if gamma < 1.0 and lt.requires_grad:
        (lt * (1.0 - gamma)).backward()
    if gamma > 0.0:
        with torch.no_grad():
            for p, g in zip(tensors, grads, strict=True):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = gamma * g.detach()
                else:
                    p.grad.add_(g.detach(), alpha=gamma)
    ls_f, lt_f = float(ls.detach()), float(lt.detach())
    return MetaStepResult(loss_train=ls_f, loss_test=lt_f, total=gamma * ls_f + (1.0 - gamma) * lt_f)


class MLDG:
    """The MLDG step with its settings bound: ``MLDG(model, alpha, gamma, first_order).step(lS, lT)``."""

    def __init__(self, model: nn.Module, alpha: float, gamma: float = 0.5, first_order: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"MLDG needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self.alpha = check_float("alpha", alpha, low=0.0)
        self.gamma = check_float("gamma", gamma, low=0.0, high=1.0)
        self.first_order = bool(first_order)

    def step(
        self,
        loss_train: Callable[[Params], Tensor],
        loss_test: Callable[[Params], Tensor],
        params: Mapping[str, Tensor] | None = None,
    ) -> MetaStepResult:
        """Accumulate the meta-gradient into ``.grad`` (see ``meta_train_test_step``)."""
        return meta_train_test_step(self.model, loss_train, loss_test, self.alpha, self.gamma,
                                    self.first_order, params)

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

    mldg = MLDG(model, alpha=1e-3, gamma=0.5, first_order=False)
    opt.zero_grad()
    res = mldg.meta_backward([(
        lambda p: loss_s(functional_forward(model, p, x_s, buffers="live"), y_s),
        lambda p: loss_t(functional_forward(model, p, x_t), y_t),
    )])
    opt.step()                                 # log res["loss_train"], res["loss_test"], res["total"]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .base import LossFn, MetaLearner
from .functional import Params, as_params, check_float, check_int, loss_scalar, named_params, sgd_update

__all__ = ["MetaStepResult", "meta_train_test_step", "MLDG"]


@dataclass
class MetaStepResult:
    """Losses of one meta-train/meta-test step (floats, for logging).

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(2, 1)
    >>> x = torch.ones(4, 2)
    >>> res = meta_train_test_step(model, lambda p: (x @ p["weight"].T + p["bias"]).pow(2).mean(),
    ...                            lambda p: (x @ p["weight"].T + p["bias"] - 1).pow(2).mean(), alpha=0.1)
    >>> isinstance(res, MetaStepResult), abs(res.total - (0.5 * res.loss_train + 0.5 * res.loss_test)) < 1e-9
    (True, True)
    """

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


class MLDG(MetaLearner):
    """The MLDG step with its settings bound, in the shape of facemeta.meta.base:
    ``MLDG(model, alpha, gamma, first_order).meta_backward([(loss_train, loss_test)])``.

    >>> import torch
    >>> from torch import nn
    >>> from facemeta.meta import functional_forward
    >>> model = nn.Linear(1, 1)
    >>> x = torch.linspace(-1, 1, 8).unsqueeze(1)
    >>> def mse(slope):  # a domain: points on a line of this slope
    ...     return lambda params: ((functional_forward(model, params, x) - slope * x) ** 2).mean()
    >>> mldg = MLDG(model, alpha=0.1, gamma=0.5, first_order=True)
    >>> logs = mldg.meta_backward([(mse(2.0), mse(1.5))])  # (meta-train, meta-test) domains
    >>> sorted(logs), model.weight.grad is not None
    (['loss_test', 'loss_train', 'total'], True)
    """

    def __init__(self, model: nn.Module, alpha: float, gamma: float = 0.5, first_order: bool = False) -> None:
        super().__init__(model)
        self.alpha = check_float("alpha", alpha, low=0.0)
        self.gamma = check_float("gamma", gamma, low=0.0, high=1.0)
        self.first_order = bool(first_order)

    def adapt(self, loss_fn: LossFn, params: Mapping[str, Tensor] | None = None, steps: int | None = None,
              return_losses: bool = False) -> Params | tuple[Params, list[float]]:
        """The virtual step(s) θ' = θ − α∇L(θ) (one by default), keeping the graph unless first order."""
        steps = 1 if steps is None else check_int("steps", steps, low=0)
        current = as_params(params, self.model)
        losses: list[float] = []
        for _ in range(steps):
            loss = loss_scalar(loss_fn(current), "MLDG loss_fn")
            grads = torch.autograd.grad(loss, list(current.values()), create_graph=not self.first_order,
                                        allow_unused=True)
            current = sgd_update(current, grads, {n: self.alpha for n in current})
            losses.append(float(loss.detach()))
        return (current, losses) if return_losses else current

    def meta_backward(self, tasks: Iterable[tuple[LossFn, LossFn]],
                      params: Mapping[str, Tensor] | None = None) -> dict[str, float]:
        """Accumulate into ``.grad`` the mean over tasks of the MLDG meta-gradient of each (loss_train,
        loss_test) pair (see :func:`meta_train_test_step`); returns the mean losses."""
        tasks = list(tasks)
        if not tasks:
            raise ValueError("meta_backward needs at least one (loss_train, loss_test) task")
        theta = as_params(params, self.model) if params is not None else named_params(self.model)
        before = {n: None if p.grad is None else p.grad.clone() for n, p in theta.items()} if len(tasks) > 1 else {}
        results = [meta_train_test_step(self.model, lt, lq, self.alpha, self.gamma, self.first_order, params)
                   for lt, lq in tasks]
        if len(tasks) > 1:  # the sum of the tasks' gradients -> their mean
            with torch.no_grad():
                for n, p in theta.items():
                    old = before[n]
                    if p.grad is None:
                        continue
                    if old is None:
                        p.grad.div_(len(tasks))
                    else:
                        p.grad.copy_(old + (p.grad - old) / len(tasks))
        keys = asdict(results[0])
        return {k: sum(getattr(r, k) for r in results) / len(results) for k in keys}

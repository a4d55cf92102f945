"""MAML (Finn et al., ICML 2017) with optional learned per-layer, per-step inner learning rates.

The inner loop takes k gradient steps from θ on a task's support loss,
θ_{s+1} = θ_s − α_s ⊙ ∇L_support(θ_s), and returns the adapted parameters as a dict; the caller
evaluates its query loss at them and back-propagates into θ. Second order keeps the graph of each
inner gradient (``create_graph=True``), so the meta-gradient includes the Hessian terms; first
order (FOMAML) treats the inner gradients as constants, so the meta-gradient is ∇L_query(θ_k).

Learned learning rates (``learn_lr=True``): one α per parameter tensor and per inner step, as in
MAML++ (Antoniou et al., ICLR 2019, "LSLR"); with ``lr_per_element=True`` one α per weight and per
step, as in Meta-SGD (Li et al., 2017). They are ``nn.Parameter``s of this module, so an outer
optimiser built on ``MAML(...).parameters()`` updates them together with the model. They are not
clamped; the outer optimiser may drive one negative, as in both papers.

BatchNorm: every pass goes through ``functional_forward`` with cloned buffers, so running
statistics are never changed by MAML (batch statistics in train mode; see ``functional``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from .base import LossFn, MetaLearner
from .functional import Params, as_params, check_float, check_int, loss_scalar, named_params, sgd_update

__all__ = ["MAML", "LossFn"]


def _key(name: str) -> str:
    """ParameterDict keys may not contain dots."""
    return name.replace(".", "__")


class MAML(MetaLearner):
    """Model-agnostic meta-learning around any ``nn.Module`` (the shape of facemeta.meta.base).

    ``adapt(loss_fn)`` runs the inner loop and returns adapted params; ``forward(x, params=...)``
    runs the model at any params; ``meta_backward(tasks)`` does a whole outer gradient for a
    batch of tasks (the caller then steps any torch optimiser built on ``self.parameters()``).

    Fit y = slope·x, one slope per task:

    >>> import torch
    >>> from torch import nn
    >>> from facemeta.meta import functional_forward
    >>> model = nn.Linear(1, 1)
    >>> x = torch.linspace(-1, 1, 8).unsqueeze(1)
    >>> def mse(slope):
    ...     return lambda params: ((functional_forward(model, params, x) - slope * x) ** 2).mean()
    >>> maml = MAML(model, inner_steps=3, inner_lr=0.1, first_order=True)
    >>> adapted, losses = maml.adapt(mse(2.0), return_losses=True)
    >>> losses[-1] < losses[0]  # the inner loop fits the task
    True
    >>> opt = torch.optim.SGD(maml.parameters(), lr=0.1)
    >>> opt.zero_grad()
    >>> logs = maml.meta_backward([(mse(2.0), mse(2.0)), (mse(-1.0), mse(-1.0))])  # (support, query) per task
    >>> sorted(logs), model.weight.grad.shape
    (['query_loss', 'support_loss'], torch.Size([1, 1]))
    >>> opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        inner_steps: int = 1,
        inner_lr: float = 0.01,
        first_order: bool = False,
        learn_lr: bool = False,
        lr_per_element: bool = False,
    ) -> None:
        super().__init__(model)
        self.inner_steps = check_int("inner_steps", inner_steps, low=0)
        self.inner_lr = check_float("inner_lr", inner_lr, low=0.0)
        self.first_order = bool(first_order)
        self.learn_lr = bool(learn_lr)
        if lr_per_element and not learn_lr:
            raise ValueError("lr_per_element=True needs learn_lr=True")
        self.lrs: nn.ParameterDict | None = None
        if learn_lr:
            steps = max(1, self.inner_steps)
            self.lrs = nn.ParameterDict(
                {
                    _key(n): nn.Parameter(
                        torch.full((steps, *(p.shape if lr_per_element else ())), self.inner_lr,
                                   dtype=p.dtype, device=p.device)
                    )
                    for n, p in named_params(model).items()
                }
            )

    def step_lrs(self, step: int, names: Iterable[str]) -> dict[str, Tensor | float]:
        """The learning rate of each named tensor at inner step ``step`` (learned ones past the
        last trained step reuse the last step's value)."""
        if self.lrs is None:
            return {n: self.inner_lr for n in names}
        out: dict[str, Tensor | float] = {}
        for n in names:
            k = _key(n)
            if k not in self.lrs:
                raise ValueError(f"no learned learning rate for parameter {n!r}")
            table = self.lrs[k]
            out[n] = table[min(step, table.shape[0] - 1)]
        return out

    def adapt(
        self,
        loss_fn: LossFn,
        params: Mapping[str, Tensor] | None = None,
        steps: int | None = None,
        first_order: bool | None = None,
        return_losses: bool = False,
    ) -> Params | tuple[Params, list[float]]:
        """Inner loop: ``steps`` (default ``inner_steps``) gradient steps on ``loss_fn(params)``.

        ``loss_fn`` is called once per step with the current params dict (a closure may draw a
        fresh batch each time). ``first_order`` overrides the module's setting (use True at test
        time: no graph of the inner gradients is kept). Returns the adapted params, and the
        inner losses (floats, one per step) when ``return_losses``.
        """
        steps = self.inner_steps if steps is None else check_int("steps", steps, low=0)
        fo = self.first_order if first_order is None else bool(first_order)
        current = as_params(params, self.model)
        losses: list[float] = []
        for s in range(steps):
            loss = loss_scalar(loss_fn(current), "MAML loss_fn")
            if not loss.requires_grad:
                raise ValueError("MAML loss_fn returned a loss that does not depend on the params it was given")
            grads = torch.autograd.grad(loss, list(current.values()), create_graph=not fo, allow_unused=True)
            current = sgd_update(current, grads, self.step_lrs(s, current))
            losses.append(float(loss.detach()))
        return (current, losses) if return_losses else current

    def meta_backward(self, tasks: Iterable[tuple[LossFn, LossFn]]) -> dict[str, float]:
        """Accumulate into ``.grad`` the mean over tasks of ∇ L_query(adapt(L_support)).

        ``tasks`` yields (support_loss_fn, query_loss_fn) pairs. Each task is back-propagated on
        its own (memory of one task at a time). Returns mean first inner loss and mean query loss.
        """
        tasks = list(tasks)
        if not tasks:
            raise ValueError("meta_backward needs at least one task")
        sup, qry = 0.0, 0.0
        for support_fn, query_fn in tasks:
            adapted, losses = self.adapt(support_fn, return_losses=True)
            q = loss_scalar(query_fn(adapted), "MAML query loss_fn")
            (q / len(tasks)).backward()
            sup += losses[0] if losses else float("nan")
            qry += float(q.detach())
        return {"support_loss": sup / len(tasks), "query_loss": qry / len(tasks)}

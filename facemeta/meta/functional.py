"""Run any ``nn.Module`` with an explicit dict of (fast) parameters.

Meta-learning needs the same network evaluated at several points in parameter space (θ, θ', θ̃)
without copying or mutating the module. ``functional_forward`` does that through
``torch.func.functional_call``, with the module's buffers handled explicitly.

BatchNorm policy (the one every meta pass in facemeta.meta follows)
-------------------------------------------------------------------
A functional pass runs in the module's current mode: in ``train()`` mode BatchNorm normalises
with the statistics of the batch it is given (as in Finn et al.'s MAML code), in ``eval()`` mode
with the stored running statistics. By default (``buffers="copy"``) the pass receives *clones*
of the module's buffers, so whatever BatchNorm writes during the pass (running_mean,
running_var, num_batches_tracked) lands in throw-away copies: inner-loop and adapted-parameter
passes never change the module's running statistics. A trainer that wants the running
statistics to follow training passes ``buffers="live"`` for the one pass it considers the
ordinary forward (e.g. the meta-train loss at θ in an MLDG step); that pass then behaves exactly
like ``module(x)``. Cloning costs one copy of the buffers per pass (a few KB for a ResNet).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]
BufferPolicy = Literal["copy", "live"] | Mapping[str, Tensor]

__all__ = [
    "Params",
    "named_params",
    "named_buffers",
    "functional_forward",
    "detached_params",
    "sgd_update",
]


def named_params(module: nn.Module, trainable_only: bool = True) -> Params:
    """The module's parameters as an ordered ``{name: tensor}`` dict (the tensors themselves, so
    gradients of a functional pass flow back to the module's leaves)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad or not trainable_only}


def named_buffers(module: nn.Module, copy: bool = True) -> Params:
    """The module's buffers as ``{name: tensor}``; cloned by default so a pass cannot change them."""
    return {n: (b.clone() if copy else b) for n, b in module.named_buffers()}


def detached_params(params: Mapping[str, Tensor], requires_grad: bool = True) -> Params:
    """Independent leaf copies of ``params`` (e.g. Reptile's inner copy, which an optimiser steps)."""
    return {n: p.detach().clone().requires_grad_(requires_grad) for n, p in params.items()}


def functional_forward(
    module: nn.Module,
    params: Mapping[str, Tensor],
    *args: Any,
    buffers: BufferPolicy = "copy",
    **kwargs: Any,
) -> Any:
    """Call ``module(*args, **kwargs)`` with ``params`` in place of its parameters.

    ``params`` may cover only some parameters; the others are the module's own. ``buffers``:
    "copy" (default: clones, the module's running statistics stay untouched), "live" (the
    module's own buffers, updated as by a normal forward) or an explicit ``{name: tensor}`` dict.
    """
    if isinstance(buffers, str):
        if buffers == "copy":
            bufs = named_buffers(module, copy=True)
        elif buffers == "live":
            bufs = named_buffers(module, copy=False)
        else:
            raise ValueError(f"buffers must be 'copy', 'live' or a dict of tensors, not {buffers!r}")
    else:
        bufs = dict(buffers)
    unknown = set(params) - set(n for n, _ in module.named_parameters())
    if unknown:
        raise ValueError(f"params has names the module does not have: {sorted(unknown)[:5]}")
    return functional_call(module, (dict(params), bufs), args, kwargs, strict=False)


def sgd_update(
    params: Mapping[str, Tensor],
    grads: Iterable[Tensor | None],
    lrs: Mapping[str, Tensor | float] | float,
) -> Params:
    """θ − lr·g for every tensor (a ``None`` gradient leaves the tensor as it is).

    ``lrs`` is one float or a ``{name: lr}`` dict whose values may be tensors (learned, scalar
    or of the parameter's shape); the result keeps the autograd graph through params, grads and lrs.
    """
    out: Params = {}
    for (name, p), g in zip(params.items(), grads, strict=True):
        if g is None:
            out[name] = p
            continue
        lr = lrs[name] if isinstance(lrs, Mapping) else lrs
        out[name] = p - lr * g
    return out


def as_params(module_or_params: nn.Module | Mapping[str, Tensor] | None, module: nn.Module) -> Params:
    """Normalise an optional params argument: ``None`` -> the module's trainable parameters."""
    if module_or_params is None:
        return named_params(module)
    if isinstance(module_or_params, nn.Module):
        return named_params(module_or_params)
    return dict(module_or_params)


def check_float(name: str, value: float, low: float | None = None, high: float | None = None) -> float:
    """Validate a numeric setting and return it as a float (clear ValueError on bad input)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, not {value!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, not {value!r}")
    if low is not None and v < low:
        raise ValueError(f"{name} must be >= {low}, not {value!r}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, not {value!r}")
    return v


def check_int(name: str, value: int, low: int = 1) -> int:
    """Validate an integer setting (no bools, >= low)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, not {value!r}")
    return value


def loss_scalar(loss: Any, where: str) -> Tensor:
    """Check that a user loss callable returned a scalar tensor (clear error otherwise)."""
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        got = type(loss).__name__ if not isinstance(loss, Tensor) else f"tensor of shape {tuple(loss.shape)}"
        raise ValueError(f"{where} must return a scalar tensor, got {got}")
    return loss


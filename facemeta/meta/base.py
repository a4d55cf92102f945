"""The shape every meta-learner here shares (as learn2learn's small wrappers do): an ``nn.Module`` around any
model, with

- ``forward(*args, params=None)``: the wrapped model run at a params dict (default: its own parameters);
- ``adapt(loss_fn, params=None, steps=None, return_losses=False)``: the inner loop, returning the adapted
  parameters as a dict (and the inner losses, floats, when asked);
- ``meta_backward(tasks)``: the one verb for the outer gradient: it accumulates into ``.grad`` like
  ``loss.backward()`` and returns floats to log; the caller zeroes the gradients before and steps any torch
  optimiser after.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from .functional import BufferPolicy, Params, as_params, functional_forward

LossFn = Callable[[Params], Tensor]

__all__ = ["LossFn", "MetaLearner"]


class MetaLearner(nn.Module):
    """Base of MAML, Reptile and MLDG: holds the model and runs it at any params.

    >>> import torch
    >>> from torch import nn
    >>> wrapped = MetaLearner(nn.Linear(3, 1))
    >>> zeros = {n: torch.zeros_like(p) for n, p in wrapped.model.named_parameters()}
    >>> wrapped(torch.ones(2, 3), params=zeros).tolist()  # the model at other parameters; its own are untouched
    [[0.0], [0.0]]
    >>> torch.equal(wrapped(torch.ones(2, 3)), wrapped.model(torch.ones(2, 3)))
    True
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} needs an nn.Module, got {type(model).__name__}")
        self.model = model

    def forward(self, *args: Any, params: Mapping[str, Tensor] | None = None,
                buffers: BufferPolicy = "copy", **kwargs: Any) -> Any:
        """Run the wrapped model at ``params`` (default: its own parameters)."""
        return functional_forward(self.model, as_params(params, self.model), *args, buffers=buffers, **kwargs)

"""Weight-space interpolation between a run's starting weights and its trained weights (WiSE-FT).

Wortsman et al., "Robust fine-tuning of zero-shot models" (CVPR 2022): fine-tuning a strong pretrained model
gains on the training distribution and loses robustness on shifted ones; the weights half way between the
zero-shot and the fine-tuned model often keep most of the gain and recover the robustness, at no extra
inference cost. ``interpolate: a`` in a training config makes the final model ``start + a * (trained - start)``
(1: the trained weights unchanged; 0: the starting weights). BatchNorm running statistics are interpolated like
the weights (the prior's architecture has none: its affine layers are fixed scales folded into its convolutions).
"""

from __future__ import annotations

import torch
from torch import nn


def interpolate_state(start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """``start + alpha * (trained - start)`` for every floating tensor; other tensors (counters) from `trained`.

    Raises ValueError when the two state dicts do not hold the same names and shapes."""
    if set(start) != set(trained):
        missing = sorted(set(start) ^ set(trained))
        raise ValueError(f"interpolation needs the same parameters in both models; differing: {missing[:3]}")
    out = {}
    for name, t in trained.items():
        s = start[name]
        if s.shape != t.shape:
            raise ValueError(f"interpolation: {name} has shape {tuple(s.shape)} at the start, {tuple(t.shape)} trained")
        if t.is_floating_point():
            s = s.to(t.device, torch.float32)
            out[name] = (s + alpha * (t.float() - s)).to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def interpolate_into(model: nn.Module, start: dict[str, torch.Tensor], alpha: float) -> None:
    """Replace `model`'s weights in place by their interpolation with `start` (see :func:`interpolate_state`)."""
    model.load_state_dict(interpolate_state(start, model.state_dict(), alpha))

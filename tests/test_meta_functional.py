"""functional_forward and the BatchNorm policy: meta passes never change running statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from facemeta.meta import MAML, Reptile, functional_forward, meta_train_test_step, named_params


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3),
    )


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 1, 6, 6, generator=g) * 3 + 2, torch.randint(0, 3, (8,), generator=g)


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def _ce(model, x, y):
    return lambda p: nn.functional.cross_entropy(functional_forward(model, p, x), y)


def test_functional_forward_equals_module_call_and_keeps_stats():
    model = _bn_net().train()
    x, _ = _batch(1)
    before = _buffers(model)
    out = functional_forward(model, named_params(model), x)
    assert all(torch.equal(before[k], v) for k, v in model.named_buffers())
    # Same numbers as an ordinary train-mode call (batch statistics), which does move the stats.
    ref = model(x)
    assert torch.allclose(out, ref, atol=1e-6)
    assert not torch.equal(before["1.running_mean"], model.get_buffer("1.running_mean"))


def test_live_buffers_update_like_a_normal_forward():
    model, twin = _bn_net().train(), _bn_net().train()
    x, _ = _batch(2)
    functional_forward(model, named_params(model), x, buffers="live")
    twin(x)
    for (k, a), (_, b) in zip(model.named_buffers(), twin.named_buffers(), strict=True):
        assert torch.equal(a, b), k
    assert int(model.get_buffer("1.num_batches_tracked")) == 1


def test_functional_forward_at_other_params_changes_output_not_module():
    model = _bn_net().eval()
    x, _ = _batch(3)
    fast = {k: v + 0.5 for k, v in named_params(model).items()}
    w = model[0].weight.detach().clone()
    assert not torch.allclose(functional_forward(model, fast, x), model(x))
    assert torch.equal(model[0].weight, w)
    with pytest.raises(ValueError, match="buffers"):
        functional_forward(model, fast, x, buffers="share")


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_passes_leave_running_stats_untouched(first_order):
    model = _bn_net().train()
    (xs, ys), (xq, yq) = _batch(4), _batch(5)
    before = _buffers(model)

    maml = MAML(model, inner_steps=3, inner_lr=0.1, first_order=first_order)
    adapted = maml.adapt(_ce(model, xs, ys))
    _ce(model, xq, yq)(adapted).backward()
    maml.meta_backward([(_ce(model, xs, ys), _ce(model, xq, yq))] * 2)
    meta_train_test_step(model, _ce(model, xs, ys), _ce(model, xq, yq), 0.1, 0.5, first_order)
    Reptile(model, inner_steps=3, inner_lr=0.1).step([_ce(model, xs, ys), _ce(model, xq, yq)])

    for k, v in model.named_buffers():
        assert torch.equal(before[k], v), f"{k} changed by a meta pass"
    # ...while the passes did use batch statistics (train mode) and did train: grads exist.
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_mldg_meta_train_pass_can_track_stats():
    """The documented opt-in: a live meta-train pass at θ moves the stats, the θ' pass does not."""
    model = _bn_net().train()
    (xs, ys), (xq, yq) = _batch(6), _batch(7)
    twin = _bn_net().train()
    twin(xs)

    def live(p):
        return nn.functional.cross_entropy(functional_forward(model, p, xs, buffers="live"), ys)

    meta_train_test_step(model, live, _ce(model, xq, yq), 0.1, 0.5)
    for (k, a), (_, b) in zip(model.named_buffers(), twin.named_buffers(), strict=True):
        assert torch.equal(a, b), k


def test_meta_imports_nothing_else_of_facemeta():
    """facemeta.meta stands alone (DESIGN.md): importing it loads no other facemeta module."""
    import subprocess
    import sys

    code = ("import sys, facemeta.meta; "
            "print(sorted(m for m in sys.modules if m.startswith('facemeta') and not m.startswith('facemeta.meta')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['facemeta', 'facemeta.version']"  # the package root and its version string only

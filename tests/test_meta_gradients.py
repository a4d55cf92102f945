"""Meta-gradients of MAML, MLDG and Reptile against closed forms and independent double backprop.

A linear model with squared loss has L(w) = ½ wᵀA w − bᵀw + c, so every meta-gradient has a
closed form (A is the Hessian); a tanh MLP is checked against torch.func.grad nested by hand.
All in float64, to 1e-6 (they agree to ~1e-12).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from facemeta.meta import MAML, MLDG, Reptile, functional_forward, meta_train_test_step, named_params

TOL = 1e-6
D = 4


def _data(seed: int, n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, y


def _quad(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hessian A and b of ½ mean((x w − y)²): ∇ = A w − b."""
    n = x.shape[0]
    return x.T @ x / n, (x.T @ y / n).squeeze(1)


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    m = nn.Linear(D, 1, bias=False).double()
    nn.init.normal_(m.weight)
    return m


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda p: 0.5 * ((functional_forward(model, p, x) - y) ** 2).mean()


@pytest.fixture()
def setup():
    model = _linear()
    xs, ys = _data(1)
    xq, yq = _data(2)
    a, b = _quad(xs, ys)
    c, d = _quad(xq, yq)
    w = model.weight.detach().clone().squeeze(0)
    return model, (xs, ys, xq, yq), (a, b, c, d), w


@pytest.mark.parametrize("steps", [1, 2])
def test_maml_second_order_matches_closed_form(setup, steps):
    model, (xs, ys, xq, yq), (a, b, c, d), w = setup
    alpha = 0.3
    maml = MAML(model, inner_steps=steps, inner_lr=alpha, first_order=False)
    adapted = maml.adapt(_loss(model, xs, ys))
    _loss(model, xq, yq)(adapted).backward()
    m = torch.eye(D, dtype=torch.float64) - alpha * a
    th = w
    for _ in range(steps):
        th = th - alpha * (a @ th - b)
    expected = torch.linalg.matrix_power(m, steps) @ (c @ th - d)
    assert torch.allclose(adapted["weight"].detach().squeeze(0), th, atol=1e-12)
    assert torch.allclose(model.weight.grad.squeeze(0), expected, atol=TOL, rtol=0)
    # The Hessian term matters here: the first-order answer differs by far more than TOL.
    assert (expected - (c @ th - d)).abs().max() > 1e-2


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_first_order_is_gradient_at_adapted_point(setup, steps):
    model, (xs, ys, xq, yq), (a, b, c, d), w = setup
    alpha = 0.3
    maml = MAML(model, inner_steps=steps, inner_lr=alpha, first_order=True)
    adapted = maml.adapt(_loss(model, xs, ys))
    _loss(model, xq, yq)(adapted).backward()
    # Independently: the gradient of L_T at θ' computed on a fresh leaf.
    leaf = adapted["weight"].detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(_loss(model, xq, yq)({"weight": leaf}), leaf)
    assert torch.allclose(model.weight.grad, g_ref, atol=TOL, rtol=0)
    th = w
    for _ in range(steps):
        th = th - alpha * (a @ th - b)
    assert torch.allclose(model.weight.grad.squeeze(0), c @ th - d, atol=TOL, rtol=0)


def test_learned_lr_gradients(setup):
    """dL_T/dα for a per-layer and a per-element (Meta-SGD) learned α, one step: closed forms."""
    model, (xs, ys, xq, yq), (a, b, c, d), w = setup
    alpha = 0.2
    g_s = a @ w - b
    th = w - alpha * g_s
    g_t = c @ th - d
    for per_element, expected in [(False, -(g_s @ g_t)), (True, -(g_s * g_t))]:
        model.weight.grad = None
        maml = MAML(model, inner_steps=1, inner_lr=alpha, learn_lr=True, lr_per_element=per_element)
        assert any(p is maml.lrs["weight"] for p in maml.parameters())
        maml.meta_backward([(_loss(model, xs, ys), _loss(model, xq, yq))])
        got = maml.lrs["weight"].grad[0].reshape(-1)
        assert torch.allclose(got, expected.reshape(-1), atol=TOL, rtol=0)
        m = torch.eye(D, dtype=torch.float64) - alpha * a
        assert torch.allclose(model.weight.grad.squeeze(0), m @ g_t, atol=TOL, rtol=0)


def test_learned_lr_is_updated_by_any_optimiser(setup):
    model, (xs, ys, xq, yq), _, _ = setup
    maml = MAML(model, inner_steps=2, inner_lr=0.1, learn_lr=True)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-2)
    before = maml.lrs["weight"].detach().clone()
    w_before = model.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        maml.meta_backward([(_loss(model, xs, ys), _loss(model, xq, yq))])
        opt.step()
    assert maml.lrs["weight"].shape == (2,)
    assert not torch.allclose(maml.lrs["weight"], before)
    assert not torch.allclose(model.weight, w_before)


@pytest.mark.parametrize("first_order", [False, True])
def test_mldg_matches_closed_form(setup, first_order):
    model, (xs, ys, xq, yq), (a, b, c, d), w = setup
    alpha, gamma = 0.25, 0.3
    res = meta_train_test_step(model, _loss(model, xs, ys), _loss(model, xq, yq), alpha, gamma, first_order)
    g_s = a @ w - b
    th = w - alpha * g_s
    g_t = c @ th - d
    m = torch.eye(D, dtype=torch.float64) if first_order else torch.eye(D, dtype=torch.float64) - alpha * a
    expected = gamma * g_s + (1 - gamma) * (m @ g_t)
    assert torch.allclose(model.weight.grad.squeeze(0), expected, atol=TOL, rtol=0)
    ls = float(_loss(model, xs, ys)({"weight": w.unsqueeze(0)}))
    lt = float(_loss(model, xq, yq)({"weight": th.unsqueeze(0)}))
    assert res.loss_train == pytest.approx(ls, abs=1e-12)
    assert res.loss_test == pytest.approx(lt, abs=1e-12)
    assert res.total == pytest.approx(gamma * ls + (1 - gamma) * lt, abs=1e-12)


def test_mldg_accumulates_like_backward(setup):
    model, (xs, ys, xq, yq), _, _ = setup
    mldg = MLDG(model, alpha=0.1, gamma=0.5)
    mldg.meta_backward([(_loss(model, xs, ys), _loss(model, xq, yq))])
    once = model.weight.grad.clone()
    mldg.meta_backward([(_loss(model, xs, ys), _loss(model, xq, yq))])
    assert torch.allclose(model.weight.grad, 2 * once, atol=1e-12)
    # several tasks: the mean of their meta-gradients, added to what .grad held
    mldg.meta_backward([(_loss(model, xs, ys), _loss(model, xq, yq))] * 3)
    assert torch.allclose(model.weight.grad, 3 * once, atol=1e-12)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 5)
        self.l2 = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def _mlp_case():
    torch.manual_seed(3)
    model = _MLP().double()
    g = torch.Generator().manual_seed(4)
    xs, xq = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    ys, yq = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    return model, xs, ys, xq, yq


def _ref_loss(model, x, y):
    return lambda p: ((functional_call(model, p, (x,)) - y) ** 2).mean()


def test_maml_second_order_matches_nested_func_grad():
    """Two inner steps on a tanh MLP: our meta-gradient vs torch.func.grad of the unrolled loss."""
    model, xs, ys, xq, yq = _mlp_case()
    alpha = 0.4
    lsf, ltf = _ref_loss(model, xs, ys), _ref_loss(model, xq, yq)

    def unrolled(p):
        for _ in range(2):
            gs = grad(lsf)(p)
            p = {k: p[k] - alpha * gs[k] for k in p}
        return ltf(p)

    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    ref = grad(unrolled)(theta)
    maml = MAML(model, inner_steps=2, inner_lr=alpha)
    maml.meta_backward([(lsf, ltf)])
    for k, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[k], atol=TOL, rtol=0), k


def test_mldg_second_order_matches_nested_func_grad():
    model, xs, ys, xq, yq = _mlp_case()
    alpha, gamma = 0.3, 0.6
    lsf, ltf = _ref_loss(model, xs, ys), _ref_loss(model, xq, yq)

    def total(p):
        gs = grad(lsf)(p)
        return gamma * lsf(p) + (1 - gamma) * ltf({k: p[k] - alpha * gs[k] for k in p})

    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    ref = grad(total)(theta)
    meta_train_test_step(model, lsf, ltf, alpha, gamma, first_order=False)
    for k, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[k], atol=TOL, rtol=0), k


def test_reptile_matches_closed_form(setup):
    model, (xs, ys, xq, yq), (a, b, c, d), w = setup
    lr, k, eps = 0.1, 3, 0.5
    rep = Reptile(model, inner_steps=k, inner_lr=lr, epsilon=eps)
    ends = []
    for hess, lin in [(a, b), (c, d)]:
        th = w.clone()
        for _ in range(k):
            th = th - lr * (hess @ th - lin)
        ends.append(th)
    expected = w + eps * ((ends[0] - w) + (ends[1] - w)) / 2
    rep.step([_loss(model, xs, ys), _loss(model, xq, yq)])
    assert torch.allclose(model.weight.detach().squeeze(0), expected, atol=TOL, rtol=0)


def test_reptile_meta_gradient_with_outer_sgd_equals_step(setup):
    model, (xs, ys, xq, yq), _, _ = setup
    twin = copy.deepcopy(model)
    Reptile(model, inner_steps=2, inner_lr=0.1, epsilon=0.3).step([_loss(model, xs, ys)])
    rep = Reptile(twin, inner_steps=2, inner_lr=0.1)
    opt = torch.optim.SGD(twin.parameters(), lr=0.3)
    opt.zero_grad()
    rep.meta_backward([_loss(twin, xs, ys)])
    opt.step()
    assert torch.allclose(model.weight, twin.weight, atol=1e-12)


def test_reptile_inner_adam_matches_plain_training():
    """The inner loop with any optimiser equals training a deep copy with that optimiser."""
    model, xs, ys, _, _ = _mlp_case()
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    for _ in range(4):
        opt.zero_grad()
        ((ref(xs) - ys) ** 2).mean().backward()
        opt.step()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    rep = Reptile(model, inner_steps=4, inner_optimizer=lambda ts: torch.optim.Adam(ts, lr=0.05))
    adapted, losses = rep.adapt(_ref_loss(model, xs, ys), return_losses=True)
    assert len(losses) == 4 and losses[-1] < losses[0]
    for k, p in ref.named_parameters():
        assert torch.allclose(adapted[k], p, atol=1e-10), k
        assert torch.equal(dict(model.named_parameters())[k], before[k])  # θ itself untouched


def test_named_params_and_bad_input(setup):
    model, (xs, ys, xq, yq), _, _ = setup
    assert list(named_params(model)) == ["weight"]
    with pytest.raises(ValueError, match="gamma"):
        meta_train_test_step(model, _loss(model, xs, ys), _loss(model, xq, yq), 0.1, gamma=1.5)
    with pytest.raises(ValueError, match="scalar"):
        MAML(model).adapt(lambda p: functional_forward(model, p, xs))
    with pytest.raises(ValueError, match="does not depend"):
        MAML(model).adapt(lambda p: torch.zeros((), dtype=torch.float64))
    with pytest.raises(ValueError, match="names the module does not have"):
        functional_forward(model, {"nope": torch.zeros(1)}, xs)
    with pytest.raises(ValueError, match="inner_steps"):
        Reptile(model, inner_steps=0)
    with pytest.raises(TypeError):
        MAML("not a module")  # type: ignore[arg-type]

"""``torch.autograd.gradcheck`` of the hand-written backward (``backend="torch"``), float64.

Every check is gradcheck's full (element-by-element) mode. Inputs are ``[2, 3, H, W]`` with
``H, W`` odd and as small as the case allows (pooled map at least ``(R+1) x R`` so there are
at least two windows). To stay fast on 2 cores, when an input has more than ``MAX_ELEMS``
entries the check perturbs a seeded random subset of ``MAX_ELEMS`` entries (always including
the first and last pixel of the tensor, i.e. both image corners), the rest held fixed: the
Jacobian columns of those entries are checked in full (``conftest.gradcheck_entries``).
The element-wise comparison of the whole gradient against autograd through the reference at
1e-10 lives in ``test_backends.py``.
"""
from __future__ import annotations

import pytest
import torch

import rmi_ext
from conftest import gradcheck_entries, make_inputs, rel_err

MAX_ELEMS = 48


def _odd_size(cfg, target):
    size = 3
    while min(cfg.pooled_size(size, size)) < target:
        size += 2
    return size


def _shape(**opts):
    cfg = rmi_ext.make_config(**opts)
    return (2, 3, _odd_size(cfg, cfg.radius + 1), _odd_size(cfg, cfg.radius))


def check_grad(fn, x, seed=0):
    """Full gradcheck of scalar ``fn`` at ``x``, on a subset of entries if ``x`` is large."""
    return gradcheck_entries(fn, (x,), MAX_ELEMS, seed)


def _loss_fn(labels, scale=1.0, **opts):
    return lambda x: scale * rmi_ext.rmi_loss(x, labels, backend="torch", **opts)


def _grid():
    cases = [(pool, stride, radius) for stride in (2, 3) for pool in ("avg", "max", "interp")
             for radius in (1, 2, 3)]
    return [("avg", 1, r) for r in (1, 2, 3)] + cases


@pytest.mark.parametrize("pool,stride,radius", _grid())
def test_gradcheck_sigmoid_grid(pool, stride, radius):
    opts = dict(pool=pool, stride=stride, radius=radius)
    x, labels = make_inputs(_shape(**opts), 100 + 10 * stride + radius, ignore_frac=0.25)
    assert check_grad(_loss_fn(labels, lambda_way=radius % 2, **opts), x)


@pytest.mark.parametrize("pool,stride,radius",
                         [("avg", 1, 3), ("avg", 2, 2), ("max", 2, 2), ("interp", 2, 2),
                          ("avg", 3, 3), ("max", 3, 1), ("interp", 3, 3)])
def test_gradcheck_softmax(pool, stride, radius):
    opts = dict(pool=pool, stride=stride, radius=radius, mode="softmax")
    x, labels = make_inputs(_shape(**opts), 200 + 10 * stride + radius, mode="softmax",
                            ignore_frac=0.25)
    assert check_grad(_loss_fn(labels, lambda_way=stride % 2, **opts), x)


@pytest.mark.parametrize("pool,pool_size,stride", [("avg", 3, 2), ("max", 3, 2), ("avg", 5, 3),
                                                   ("max", 5, 3), ("avg", 2, 3)])
def test_gradcheck_pool_size_not_stride(pool, pool_size, stride):
    opts = dict(pool=pool, pool_size=pool_size, stride=stride, radius=2)
    x, labels = make_inputs(_shape(**opts), 300 + pool_size)
    assert check_grad(_loss_fn(labels, **opts), x)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_gradcheck_grad_output_not_one(mode):
    x, labels = make_inputs((2, 3, 9, 11), 500, mode=mode)
    assert check_grad(_loss_fn(labels, scale=1.7, stride=2, radius=2, mode=mode), x)
    assert check_grad(_loss_fn(labels, scale=-0.3, stride=3, pool="max", radius=2, mode=mode,
                               lambda_way=0, weight_lambda=0.2), x, seed=1)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_backward_with_non_unit_grad_tensor(mode):
    """``loss.backward(g)`` gives ``g`` times the reference gradient."""
    x, labels = make_inputs((2, 3, 9, 11), 600, mode=mode)
    opts = dict(stride=2, radius=3, pool="avg", mode=mode)
    g = torch.tensor(-2.5, dtype=torch.float64)
    xt = x.detach().clone().requires_grad_(True)
    rmi_ext.rmi_loss(xt, labels, backend="torch", **opts).backward(g)
    xr = x.detach().clone().requires_grad_(True)
    rmi_ext.rmi_loss(xr, labels, backend="reference", **opts).backward()
    assert rel_err(xt.grad, -2.5 * xr.grad) < 1e-10


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("which", ["base", "rmi", "combo"])
def test_gradcheck_terms_separately(mode, which):
    """Gradients of ``rmi_loss_terms``' ``base`` and ``rmi`` separately (and mixed)."""
    x, labels = make_inputs((2, 3, 9, 11), 700, mode=mode)
    opts = dict(stride=2, radius=2, pool="avg", mode=mode)

    def fn(t, backend="torch"):
        terms = rmi_ext.rmi_loss_terms(t, labels, backend=backend, **opts)
        if which == "combo":
            return 0.3 * terms.base - 2.0 * terms.rmi
        return getattr(terms, which)

    assert check_grad(fn, x)
    xt = x.detach().clone().requires_grad_(True)
    fn(xt).backward()
    xr = x.detach().clone().requires_grad_(True)
    fn(xr, "reference").backward()
    assert rel_err(xt.grad, xr.grad) < 1e-10


def test_create_graph_first_order_and_no_silent_double_backward():
    """``create_graph=True`` gives the usual first-order gradient; differentiating it again is
    an error (the hand-written backward is ``once_differentiable``), never a silent wrong value."""
    x, labels = make_inputs((1, 2, 7, 6), 800)
    fn = _loss_fn(labels, stride=2, radius=2)
    g_plain, = torch.autograd.grad(fn(x), x)
    g_graph, = torch.autograd.grad(fn(x), x, create_graph=True)
    assert torch.equal(g_plain, g_graph)
    with pytest.raises(RuntimeError):
        torch.autograd.grad((g_graph ** 2).sum(), x)
    # a grad_output that itself requires grad: differentiating through it is an error too
    v = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    g_v, = torch.autograd.grad(fn(x), x, grad_outputs=v, create_graph=True)
    assert rel_err(g_v, 1.5 * g_plain) < 1e-13
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (g_v ** 2).sum().backward()

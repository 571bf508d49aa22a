"""Issue 5: the C++ CPU kernels (backend "cpu") against the reference and the torch stages."""
from __future__ import annotations

import pytest
import torch

import rmi_ext
from rmi_ext import torch_backend
from rmi_ext._config import make_config

pytestmark = pytest.mark.skipif(rmi_ext.backend_info("cpu")["available"]["cpu"] is not True,
                                reason="C++ extension not built")


def _inputs(shape, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(*shape, generator=g)).to(dtype)
    y = torch.randint(0, shape[1], (shape[0],) + tuple(shape[2:]), generator=g)
    y[:, : max(1, shape[2] // 8)] = 255
    return x, y


def _loss_and_grad(x, y, backend, **kw):
    x = x.detach().requires_grad_(True)
    loss = rmi_ext.rmi_loss(x, y, backend=backend, **kw)
    grad, = torch.autograd.grad(loss * 1.3, x)
    return loss.detach(), grad


def _assert_matches_reference(x, y, loss_tol, grad_tol, **kw):
    ref_loss, ref_grad = _loss_and_grad(x, y, "reference", **kw)
    loss, grad = _loss_and_grad(x, y, "cpu", **kw)
    assert abs(loss.item() - ref_loss.item()) <= loss_tol * abs(ref_loss.item()), kw
    assert (grad - ref_grad).abs().max() <= grad_tol * ref_grad.abs().max(), kw
    assert grad.dtype == x.dtype


@pytest.mark.parametrize("stride", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("pool", ["avg", "max", "interp"])
def test_every_stride_and_pool_float64(stride, pool):
    # pooled maps of about 3R + 4 per side: enough windows for a well-conditioned problem
    # (with K close to d the problem itself is ill-conditioned and backends differ at 1e-9)
    # logits of scale 0.5: with large max-pool windows and scale 2 the pooled P is almost
    # constant (every window holds a sigmoid near 1), Sp nearly singular, and even the two
    # float64 implementations (torch stages, reference) differ at 2e-10
    x, y = _inputs((2, 3, 13 * stride + 3, 12 * stride + 1), seed=stride, scale=0.5)
    _assert_matches_reference(x, y, 1e-10, 1e-10, stride=stride, pool=pool, radius=3)


@pytest.mark.parametrize("radius", list(range(1, 11)))
def test_every_radius_float64(radius):
    size = 3 * radius + 4  # the pooled map holds K >= d windows: a well-conditioned problem
    x, y = _inputs((1, 2, size, size + 3), seed=radius)
    _assert_matches_reference(x, y, 1e-10, 1e-10, stride=1, radius=radius)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("lambda_way", [0, 1])
def test_float32_modes(mode, lambda_way):
    x, y = _inputs((2, 4, 37, 29), dtype=torch.float32)
    _assert_matches_reference(x, y, 1e-5, 1e-4, stride=2, mode=mode, lambda_way=lambda_way,
                              pool_size=3)


def test_thread_counts_give_identical_results():
    x, y = _inputs((2, 5, 45, 39), dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_loss_and_grad(x, y, "cpu", stride=2))
    finally:
        torch.set_num_threads(before)
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


def test_large_k_moment_sums_float32():
    """[1, 2, 1025, 1025] at DF 1: ~1e6 windows; the float32 path's float64 sums stay within 1e-6
    of the float64 computation (the raw-sum form would cancel badly in float32)."""
    x, y = _inputs((1, 2, 1025, 1025), dtype=torch.float32)
    cfg = make_config(stride=1)
    _, _, _, means, cov = torch.ops.rmi_ext.forward_stats(x, y, 3, 1, "avg", 1, 255, "sigmoid")
    _, _, _, means64, cov64 = torch_backend.forward_stats(x.double(), y, cfg)
    assert (cov - cov64).abs().max() <= 1e-6 * cov64.abs().max()
    assert (means - means64).abs().max() <= 1e-6 * means64.abs().max()
    loss = rmi_ext.rmi_loss(x, y, stride=1, backend="cpu")
    loss64 = rmi_ext.rmi_loss(x.double(), y, stride=1, backend="torch")
    assert abs(loss.item() - loss64.item()) <= 1e-6 * abs(loss64.item())


def test_channels_last_and_strided_views_without_copy_semantics():
    x, y = _inputs((2, 3, 33, 35), dtype=torch.float32)
    cl = x.contiguous(memory_format=torch.channels_last)
    view = torch.cat([x, x], dim=3)[..., ::2]  # non-contiguous, stride 2 along W
    for inp in (cl, view):
        _assert_matches_reference(inp, y, 1e-5, 1e-4, stride=2)
    grad = _loss_and_grad(cl, y, "cpu", stride=2)[1]
    assert grad.is_contiguous(memory_format=torch.channels_last)


def test_op_checks_shared_with_cuda_name_the_argument():
    """The C++ checks (csrc/rmi_ops.h, shared by the CPU and CUDA kernels) guard direct op calls."""
    x = torch.randn(1, 2, 9, 9)
    y = torch.zeros(1, 9, 9, dtype=torch.long)
    op = torch.ops.rmi_ext.forward_stats
    for args, message in [
            ((x, y.to(torch.uint16), 3, 1, "avg", 1, 255, "sigmoid"), "labels must be uint8, int8"),
            ((x, y, 11, 1, "avg", 1, 255, "sigmoid"), r"radius must be in \[1, 10\], got 11"),
            ((x, y, 3, 1, "mean", 1, 255, "sigmoid"), "pool must be 'avg', 'max' or 'interp'"),
            ((x, y, 3, 1, "avg", 1, 255, "tanh"), "mode must be 'sigmoid' or 'softmax'"),
            ((x, y, 3, 5, "avg", 5, 255, "sigmoid"), "smaller than the region radius 3"),
            ((x, y[:, :8], 3, 1, "avg", 1, 255, "sigmoid"), r"labels must have shape \[N, H, W\]")]:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    coef = torch.zeros(1, 2, 2, 9, 9, dtype=torch.float64)
    shift = torch.zeros(1, 2, 9, dtype=torch.float64)
    scale = torch.ones((), dtype=torch.float64)
    back = torch.ops.rmi_ext.backward_grad
    with pytest.raises(RuntimeError, match=r"coef must have shape \[1, 2, 2, 9, 9\]"):
        back(x, y, scale, coef[:, :, :1], shift, 3, 1, "avg", 1, 255, "sigmoid")
    with pytest.raises(RuntimeError, match="shift must be float64"):
        back(x, y, scale, coef, shift.float(), 3, 1, "avg", 1, 255, "sigmoid")
    grad = back(x, y, scale, coef, shift, 3, 1, "avg", 1, 255, "sigmoid")
    assert grad.shape == x.shape and torch.isfinite(grad).all()

"""Backend "cpu" (the C++ kernels) specifics: threads, long moment sums, the shared C++ op
checks. Its comparisons with the reference are in test_backends.py (the harness, every backend)."""
from __future__ import annotations

import pytest
import torch

import rmi_ext
from conftest import compare, make_inputs, run
from rmi_ext import torch_backend
from rmi_ext._config import make_config

pytestmark = pytest.mark.skipif(rmi_ext.backend_info("cpu")["available"]["cpu"] is not True,
                                reason="C++ extension not built")


@pytest.mark.slow
@pytest.mark.parametrize("classes", [2**15 - 1, 2**15 + 1])
def test_class_map_type_either_side_of_2_15_classes(classes):
    """The kernels keep each pixel's class in int16 below 2^15 classes and in int32 from there
    on (with_class_type): class ids at the top of either range, max pooling (reads the class
    map at any pixel) and no pooling (row by row), both modes, against the reference in
    float64."""
    x, labels = make_inputs((1, classes, 11, 13), 3, ignore_frac=0.1, invalid_labels=False,
                            requires_grad=False)
    labels[0, 0, :3] = torch.tensor([classes - 1, classes - 2, classes - 3])
    for mode, pool, stride in (("sigmoid", "max", 2), ("softmax", "avg", 1)):
        compare("cpu", x, labels, mode=mode, pool=pool, stride=stride, radius=2)


def test_thread_counts_give_identical_results():
    x, y = make_inputs((2, 5, 45, 39), dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run(x, y, "cpu", stride=2))
    finally:
        torch.set_num_threads(before)
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


def test_large_k_moment_sums_float32():
    """[1, 2, 1025, 1025] at DF 1: ~1e6 windows; the float32 path's float64 sums stay within 1e-6
    of the float64 computation (the raw-sum form would cancel badly in float32)."""
    x, y = make_inputs((1, 2, 1025, 1025), dtype=torch.float32, requires_grad=False)
    cfg = make_config(stride=1)
    _, _, _, means, cov = torch.ops.rmi_ext.forward_stats(x, y, [3, 3], [1, 1], "avg", [1, 1], 255,
                                                             "sigmoid")
    _, _, _, means64, cov64 = torch_backend.forward_stats(x.double(), y, cfg)
    assert (cov - cov64).abs().max() <= 1e-6 * cov64.abs().max()
    assert (means - means64).abs().max() <= 1e-6 * means64.abs().max()
    loss = rmi_ext.rmi_loss(x, y, stride=1, backend="cpu")
    loss64 = rmi_ext.rmi_loss(x.double(), y, stride=1, backend="torch")
    assert abs(loss.item() - loss64.item()) <= 1e-6 * abs(loss64.item())


def test_op_checks_shared_with_cuda_name_the_argument():
    """The C++ checks (csrc/rmi_ops.h, shared by the CPU and CUDA kernels) guard direct op calls."""
    x = torch.randn(1, 2, 9, 9)
    y = torch.zeros(1, 9, 9, dtype=torch.long)
    op = torch.ops.rmi_ext.forward_stats
    A3, A1 = [3, 3], [1, 1]  # radius, stride / pool_size: one side per spatial axis
    for args, message in [
            ((x, y.to(torch.uint16), A3, A1, "avg", A1, 255, "sigmoid"), "labels must be uint8, int8"),
            ((x, y, [11, 11], A1, "avg", A1, 255, "sigmoid"), r"radius must be in \[1, 10\] on every"),
            ((x, y, [3], A1, "avg", A1, 255, "sigmoid"), "one side per spatial axis"),
            ((x, y, A3, A1, "mean", A1, 255, "sigmoid"), "pool must be 'avg', 'max' or 'interp'"),
            ((x, y, A3, A1, "avg", A1, 255, "tanh"), "mode must be 'sigmoid', 'softmax' or 'region'"),
            ((x, y, A3, [5, 5], "avg", [5, 5], 255, "sigmoid"),
             r"downsampled map is 2x2 \(input 9x9.*smaller than the region radius \[3, 3\]"),
            ((x, y[:, :8], A3, A1, "avg", A1, 255, "sigmoid"), r"labels must have shape \[N, H, W\]"),
            ((x[:, :, None], y, [1, 3, 3], [1, 1, 1], "avg", [1, 1, 1], 255, "sigmoid"),
             r"labels must have shape \[N, D, H, W\]"),
            ((x[None, None], y, A3, A1, "avg", A1, 255, "sigmoid"), "logits must be 4-D .* or 5-D")]:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    coef = torch.zeros(1, 2, 2, 9, 9, dtype=torch.float64)
    shift = torch.zeros(1, 2, 9, dtype=torch.float64)
    scale = torch.ones((), dtype=torch.float64)
    back = torch.ops.rmi_ext.backward_grad
    with pytest.raises(RuntimeError, match=r"coef must have shape \[1, 2, 2, 9, 9\]"):
        back(x, y, scale, coef[:, :, :1], shift, A3, A1, "avg", A1, 255, "sigmoid")
    with pytest.raises(RuntimeError, match="shift must be float64"):
        back(x, y, scale, coef, shift.float(), A3, A1, "avg", A1, 255, "sigmoid")
    grad = back(x, y, scale, coef, shift, A3, A1, "avg", A1, 255, "sigmoid")
    assert grad.shape == x.shape and torch.isfinite(grad).all()

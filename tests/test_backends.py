"""Every fast backend on every device against the unfold reference (``backend="reference"``).

Parametrised over ``conftest.BACKEND_DEVICES`` (torch / cpu / triton on CPU tensors, torch / cuda
/ triton on CUDA tensors; pairs that cannot run here are skipped with the reason), compared with
``conftest.compare`` under the one tolerance table ``conftest.TOL``: float64 1e-10 for the loss
and the gradient, float32 1e-5 / 1e-4, fp16 / bf16 1e-5 on the loss and 2e-3 / 1.6e-2 on the
gradient against float32 on the same rounded values. Interpreted Triton runs a sample of each
grid (see conftest) and every case of the tests marked ``every_case``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ld_oracle
import rmi_ext
from rmi_ext._config import LABEL_DTYPES
from conftest import BACKEND_DEVICES, compare, make_inputs, rel_err, run

pytestmark = pytest.mark.parametrize("backend,device", BACKEND_DEVICES)


# ---- pool mode x DF x mode x lambda_way (float64) ------------------------------------------------


def _pool_grid():
    cases = []
    for mode in ("sigmoid", "softmax"):
        for stride in (1, 2, 3, 4):
            for pool in (("avg",) if stride == 1 else ("avg", "max", "interp")):
                for lambda_way in (0, 1):
                    cases.append(pytest.param(mode, pool, stride, lambda_way,
                                              id=f"{mode}-{pool}-s{stride}-lw{lambda_way}"))
    return cases


@pytest.mark.parametrize("mode,pool,stride,lambda_way", _pool_grid())
def test_pool_grid_float64(backend, device, mode, pool, stride, lambda_way):
    x, labels = make_inputs((2, 3, 17, 15), 10 * stride + lambda_way, mode=mode, device=device)
    compare(backend, x, labels, mode=mode, pool=pool, stride=stride,
            radius=3 if stride <= 2 else 2, lambda_way=lambda_way,
            weight_lambda=0.5 if lambda_way else 0.7)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("stride,pool_size", [(2, 3), (3, 5), (3, 2), (4, 6), (2, 1)])
def test_pool_size_not_stride(backend, device, mode, pool, stride, pool_size):
    x, labels = make_inputs((2, 2, 15, 13), 7 * stride + pool_size, mode=mode, device=device)
    compare(backend, x, labels, mode=mode, pool=pool, stride=stride, pool_size=pool_size,
            radius=2)


@pytest.mark.parametrize("pool", ["avg", "max", "interp"])
@pytest.mark.parametrize("stride", [5, 6, 7, 8])
def test_large_strides(backend, device, pool, stride):
    """Pooled maps of 13 x 12 (K >= d windows). Logits of scale 0.5: with large max-pool windows
    and scale 2 the pooled P is almost constant (every window holds a sigmoid near 1), Sp nearly
    singular, and even two float64 implementations differ at 2e-10."""
    x, labels = make_inputs((2, 3, 13 * stride + 3, 12 * stride + 1), stride, scale=0.5,
                            device=device)
    compare(backend, x, labels, stride=stride, pool=pool, radius=3)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("stride,pool_size", [(2, None), (3, 5), (4, 2)])
def test_max_pool_ties(backend, device, mode, stride, pool_size):
    """Many exact ties in every max-pool window: the arg-max is the first maximum in row-major
    order (as ``F.max_pool2d``), whichever backend records it."""
    x, labels = make_inputs((2, 3, 37, 41), 11 + stride, mode=mode, ignore_frac=0.4,
                            requires_grad=False, device=device)
    compare(backend, x.round().clamp(-2, 2), labels, mode=mode, pool="max", stride=stride,
            pool_size=pool_size)


# ---- radius 1..10 --------------------------------------------------------------------------------
# Against the float64 reference only where the problem is well conditioned: K (windows) >= ~2 d.
# With fewer windows than d (e.g. R = 10 on a 13x12 map) autograd through the reference itself
# loses up to ~1e-4 of the gradient (measured against a long-double oracle); those cases are in
# test_ill_conditioned_vs_longdouble below.


@pytest.mark.parametrize("radius", range(1, 11))
def test_radius_1_to_10(backend, device, radius):
    """DF 1 on 25x23: K >= 224 windows for d <= 100."""
    x, labels = make_inputs((1, 2, 25, 23), radius, device=device)
    compare(backend, x, labels, radius=radius, stride=1)


@pytest.mark.parametrize("radius", [4, 5, 6])
def test_radius_pooled(backend, device, radius):
    """DF 2 avg on 25x23 (pooled 13x12)."""
    x, labels = make_inputs((1, 2, 25, 23), 20 + radius, device=device)
    compare(backend, x, labels, radius=radius, stride=2)


@pytest.mark.parametrize("mode,pool,stride,radius,shape",
                         [("softmax", "avg", 1, 10, (1, 2, 25, 23)),
                          ("sigmoid", "max", 2, 10, (1, 2, 49, 45)),
                          ("softmax", "interp", 2, 9, (1, 2, 50, 46)),
                          ("sigmoid", "avg", 3, 6, (1, 2, 49, 45)),
                          ("softmax", "max", 2, 5, (2, 2, 25, 23))])
def test_large_radius_other_modes(backend, device, mode, pool, stride, radius, shape):
    x, labels = make_inputs(shape, radius, mode=mode, device=device)
    compare(backend, x, labels, mode=mode, pool=pool, stride=stride, radius=radius)


@pytest.mark.skipif(not ld_oracle.AVAILABLE, reason="numpy longdouble is plain double here")
@pytest.mark.parametrize("shape,radius", [((1, 2, 13, 12), 10), ((1, 2, 13, 12), 7),
                                          ((2, 2, 16, 15), 10)])
def test_ill_conditioned_vs_longdouble(backend, device, shape, radius):
    """Few windows for a large region (K = 12..42 < d): check against the long-double oracle.

    Measured with the "torch" backend: loss within ~1e-11 and gradient within ~5e-9 of the
    oracle, while the float64 reference's autograd gradient is off by up to ~7e-5 (its loss by
    ~1e-10). The reference comparison is kept as a loose sanity check only.
    """
    x, labels = make_inputs(shape, radius, invalid_labels=False, device=device)
    loss_ld, grad_ld = ld_oracle.loss_and_grad(x.detach().cpu().numpy(), labels.cpu().numpy(),
                                               radius)
    loss, grad = run(x, labels, backend, radius=radius, stride=1)
    assert rel_err(loss, float(loss_ld)) < 1e-9
    assert rel_err(grad, torch.from_numpy(grad_ld.astype(np.float64))) < 1e-7
    ref_loss, ref_grad = run(x, labels, "reference", radius=radius, stride=1)
    assert rel_err(loss, ref_loss) < 1e-8 and rel_err(grad, ref_grad) < 1e-3


# ---- float32, fp16, bf16 -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("pool,stride", [("avg", 1), ("avg", 2), ("max", 2), ("interp", 2),
                                         ("avg", 4), ("max", 3)])
def test_float32(backend, device, mode, pool, stride):
    x, labels = make_inputs((2, 3, 17, 15), stride, dtype=torch.float32, mode=mode,
                            device=device)
    compare(backend, x, labels, mode=mode, pool=pool, stride=stride,
            radius=3 if stride <= 2 else 2)


@pytest.mark.parametrize("stride", [1, 2])
def test_float32_large_map(backend, device, stride):
    """K ~ 1.5e4 windows: a raw-sum moment kernel accumulating in fp32 would cancel badly."""
    x, labels = make_inputs((1, 2, 128, 120), stride, dtype=torch.float32, ignore_frac=0.05,
                            device=device)
    compare(backend, x, labels, stride=stride, radius=3)


@pytest.mark.every_case
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,pool,stride", [("sigmoid", "avg", 4), ("sigmoid", "max", 2),
                                              ("softmax", "interp", 2), ("softmax", "avg", 1)])
def test_half_precision_logits(backend, device, dtype, mode, pool, stride):
    """Loss float32 and gradient in the logits' dtype, close to float32 on the same values."""
    x, labels = make_inputs((2, 3, 17, 15), 3, dtype=dtype, mode=mode, device=device)
    compare(backend, x, labels, mode=mode, pool=pool, stride=stride,
            radius=3 if stride <= 2 else 2)


# ---- ignored pixels, labels ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_ignore_index_other_than_255(backend, device, mode):
    for ignore_index in (1, -1, 1000):
        x, labels = make_inputs((2, 3, 13, 11), 5, mode=mode, ignore_index=ignore_index,
                                invalid_labels=False, device=device)
        compare(backend, x, labels, mode=mode, ignore_index=ignore_index, stride=2, radius=2)


def test_labels_out_of_range_are_ignored_sigmoid(backend, device):
    """Sigmoid mode: labels >= C and negative labels are ignored like ignore_index."""
    x, labels = make_inputs((2, 3, 13, 11), 6, ignore_frac=0.6, device=device)
    assert (labels < 0).any() and (labels >= 3).logical_and(labels != 255).any()
    compare(backend, x, labels, stride=2, radius=2)
    # same as marking them with ignore_index explicitly
    clean = torch.where((labels >= 0) & (labels < 3), labels, torch.full_like(labels, 255))
    loss_a, grad_a = run(x, labels, backend, stride=2, radius=2)
    loss_b, grad_b = run(x, clean, backend, stride=2, radius=2)
    assert rel_err(loss_a, loss_b) < 1e-14 and rel_err(grad_a, grad_b) < 1e-14


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("pool", ["avg", "max", "interp"])
def test_all_ignored_image_in_batch(backend, device, mode, pool):
    x, labels = make_inputs((3, 2, 13, 11), 8, mode=mode, device=device)
    labels[1] = 255
    compare(backend, x, labels, mode=mode, pool=pool, stride=2, radius=2)


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
def test_label_dtypes(backend, device, label_dtype):
    x, labels = make_inputs((2, 3, 13, 11), 9, label_dtype=label_dtype, device=device)
    compare(backend, x, labels, stride=2, radius=3)
    loss, grad = run(x, labels, backend, stride=2, radius=3)
    loss64, grad64 = run(x, labels.long(), backend, stride=2, radius=3)
    assert rel_err(loss, loss64) == 0.0 and rel_err(grad, grad64) == 0.0


@pytest.mark.parametrize("mode,pool", [("sigmoid", "max"), ("softmax", "avg")])
def test_labels_with_a_channel_axis(backend, device, mode, pool):
    """``[N, 1, H, W]`` integer labels (segmentation_models_pytorch, MONAI): the same loss and
    gradient, bit for bit, as the ``[N, H, W]`` map they hold, and the reference's."""
    x, labels = make_inputs((2, 3, 13, 11), 14, mode=mode, label_dtype=torch.uint8,
                            device=device)
    opts = dict(mode=mode, pool=pool, stride=2, radius=2)
    compare(backend, x, labels[:, None], **opts)
    loss, grad = run(x, labels[:, None], backend, **opts)
    loss_map, grad_map = run(x, labels, backend, **opts)
    assert torch.equal(loss, loss_map) and torch.equal(grad, grad_map)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_every_pixel_ignored(backend, device, mode):
    x, labels = make_inputs((2, 3, 24, 24), 1, mode=mode, device=device)
    compare(backend, x, torch.full_like(labels, 255), mode=mode, stride=2)


@pytest.mark.parametrize("stride,pool", [(1, "avg"),
                                         pytest.param(2, "max", marks=pytest.mark.every_case)])
def test_uint8_labels_with_256_classes(backend, device, stride, pool):
    """uint8 labels where 255 is a class (C = 256, ignore_index 7): padded lanes of a kernel's
    tile (the 9x10 image fills none) must not read as label 255."""
    x, labels = make_inputs((1, 256, 9, 10), 17, ignore_frac=0.0, device=device)
    labels[0, 0, :4] = 255
    compare(backend, x, labels.to(torch.uint8), radius=2, stride=stride, pool=pool,
            ignore_index=7)


def test_single_image_single_class(backend, device):
    for shape in ((1, 1, 9, 9), (1, 4, 11, 9), (4, 1, 9, 11)):
        x, labels = make_inputs(shape, 10, device=device)
        compare(backend, x, labels, stride=2, radius=2)


# ---- memory formats, grad_output, terms ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_non_contiguous_inputs(backend, device, mode):
    big, _ = make_inputs((2, 5, 13, 22), 11, mode=mode, requires_grad=False, device=device)
    _, labels = make_inputs((2, 3, 13, 22), 11, mode=mode, requires_grad=False, device=device)
    labels = labels[:, :, ::2]
    views = {
        "channel slice + column step": big[:, 1:4, :, ::2],
        "transposed H/W": big[:, :3, :11, :13].transpose(2, 3),
        "batch step": big[::2, :3, :, :11],
    }
    for name, view in views.items():
        lab = labels[: view.shape[0], : view.shape[2], : view.shape[3]]
        assert not view.is_contiguous(), name
        compare(backend, view, lab, mode=mode, stride=2, radius=2)
    # labels non-contiguous too
    lab_t = labels[:, :11, :11].transpose(1, 2)
    compare(backend, big[:, :3, :11, :11], lab_t, mode=mode, stride=2, radius=2)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
def test_strided_on_every_axis(backend, device, label_dtype):
    """Logits with transposed spatial strides and a channel step of 2, labels sliced along W."""
    x, labels = make_inputs((2, 3, 40, 46), 5, dtype=torch.float32, label_dtype=label_dtype,
                            requires_grad=False, device=device)
    x = torch.cat([x.transpose(2, 3).contiguous().transpose(2, 3)] * 2, dim=1)[:, ::2]
    labels = torch.cat([labels, labels], dim=2)[:, :, ::2]
    assert not x.is_contiguous() and not labels.is_contiguous()
    compare(backend, x, labels, pool="max", stride=2)
    compare(backend, x, labels, pool="avg", stride=1)


@pytest.mark.every_case
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_channels_last(backend, device, dtype, mode):
    x, labels = make_inputs((2, 3, 13, 11), 12, dtype=dtype, mode=mode, requires_grad=False,
                            device=device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()
    compare(backend, x_cl, labels, mode=mode, stride=2, radius=3, pool="max")
    compare(backend, x_cl, labels, mode=mode, stride=1, radius=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_grad_output_not_one(backend, device, dtype, mode):
    x, labels = make_inputs((2, 3, 13, 11), 13, dtype=dtype, mode=mode, device=device)
    out = torch.float64 if dtype == torch.float64 else torch.float32
    for g in (1.7, -0.25, 0.0):
        compare(backend, x, labels, grad_output=torch.tensor(g, dtype=out, device=device), mode=mode,
                stride=2, radius=2, pool="interp")


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_terms_gradients_separately(backend, device, mode):
    x, labels = make_inputs((2, 3, 13, 11), 14, mode=mode, device=device)
    opts = dict(stride=2, radius=3, mode=mode)
    for pick in (lambda t: t.base, lambda t: t.rmi, lambda t: 2.0 * t.base - 0.5 * t.rmi):
        grads, values = [], []
        for b in (backend, "reference"):
            leaf = x.detach().clone().requires_grad_(True)
            value = pick(rmi_ext.rmi_loss_terms(leaf, labels, backend=b, **opts))
            value.backward()
            grads.append(leaf.grad)
            values.append(value.detach())
        assert rel_err(values[0], values[1]) < 1e-10
        assert rel_err(grads[0], grads[1]) < 1e-10


def test_two_threads(backend, device):
    """A larger case with 2 intra-op threads (the rest of the suite runs single-threaded)."""
    if device != "cpu":
        pytest.skip("intra-op threads are a CPU setting")
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, labels = make_inputs((2, 3, 64, 57), 15, device=device)
        compare(backend, x, labels, stride=2, radius=3)
        compare(backend, x, labels, stride=1, radius=2, mode="sigmoid", lambda_way=0)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("lam,lambda_way", [(0.0, 1), (1.0, 1), (0.0, 0), (1.0, 0)])
def test_weight_lambda_edges(backend, device, mode, lam, lambda_way):
    """A zero weight on either term (its backward gets a zero scale)."""
    x, labels = make_inputs((2, 3, 13, 11), 16, mode=mode, device=device)
    compare(backend, x, labels, mode=mode, stride=2, radius=2, weight_lambda=lam,
            lambda_way=lambda_way)


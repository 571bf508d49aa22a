"""Volumes ``[N, C, D, H, W]`` and per-axis radius / stride / pool size (RMI_SPEC.md section 5):
the reference against the independent numpy oracle (``volume_oracle``), the options' checks, the
fused backends that compute them (``"torch"``, ``"cpu"``, ``"triton"``) against the reference
(values, the torch backend's row blocks and memory) and how the API routes such inputs to the
backends that support them (``supports_volumes``)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rmi_ext
import volume_oracle as vo
from conftest import compare, fast_backends, gradcheck_entries, gradcheck_max_elems, \
    peak_memory_ratio, rel_err, run
from rmi_ext._dispatch import warn_once
from rmi_ext.reference import region_vectors

VOLUME = (2, 3, 7, 9, 8)
#: The fused backends that compute volumes and per-axis options here.
VOLUME_BACKENDS = [b for b in fast_backends() if b in rmi_ext.backend_info("cpu")["volumes"]]


def volume_inputs(shape, seed, *, mode="sigmoid", ignore_frac=0.2, dtype=torch.float64):
    """Seeded ``logits [N, C, *S]`` (``2 randn``) and ``labels [N, *S]``: a fraction
    ``ignore_frac`` ignored (255; in sigmoid mode also labels ``C`` and ``-1``)."""
    gen = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    n, c, *spatial = shape
    labels = torch.randint(0, c, (n, *spatial), generator=gen)
    u = torch.rand(labels.shape, generator=gen)
    labels[u < ignore_frac] = 255
    if mode == "sigmoid":
        labels[u < ignore_frac / 3] = c
        labels[u < ignore_frac / 6] = -1
    return logits, labels


def ref_terms(x, labels, **opts):
    t = rmi_ext.rmi_loss_terms(x, labels, backend="reference", **opts)
    return t.loss.item(), t.base.item(), t.rmi.item()


def check_against_oracle(x, labels, *, lam=0.5, lambda_way=1, **opts):
    loss, base, rmi = ref_terms(x, labels, weight_lambda=lam, lambda_way=lambda_way, **opts)
    nb, nr = vo.terms(x.numpy(), labels.numpy(), **opts)
    want = lam * nb + (1 - lam) * nr if lambda_way == 1 else nb + lam * nr
    assert rel_err(base, nb) < 1e-12
    assert rel_err(rmi, nr) < 1e-10
    assert rel_err(loss, want) < 1e-10


# ---- the oracle's own helpers against torch's ops ------------------------------------------


def test_oracle_helpers_match_torch_ops():
    gen = torch.Generator().manual_seed(1)
    t = torch.rand(1, 2, 7, 9, 8, generator=gen, dtype=torch.float64)
    tn = t.numpy()
    for k, s in (((2, 2, 2), (2, 2, 2)), ((1, 3, 3), (1, 2, 2)), ((3, 1, 5), (2, 1, 3)),
                 ((3, 3, 3), (1, 2, 2))):
        pad = tuple(i // 2 for i in k)
        assert np.allclose(vo.pool(tn, "avg", k, s), F.avg_pool3d(t, k, s, pad).numpy(),
                           rtol=0, atol=1e-15)
        assert np.array_equal(vo.pool(tn, "max", k, s), F.max_pool3d(t, k, s, pad).numpy())
    for size in ((7, 4, 4), (3, 3, 2), (1, 4, 8), (2, 1, 5)):
        assert np.array_equal(vo.nearest(tn, size), F.interpolate(t, size=size).numpy())
        ref = F.interpolate(t, size=size, mode="trilinear", align_corners=True).numpy()
        assert np.allclose(vo.linear_ac(tn, size), ref, rtol=0, atol=1e-15)
    for n in range(1, 40):  # nearest indices, every output size
        for out in range(1, n + 1):
            idx = F.interpolate(torch.arange(n, dtype=torch.float64)[None, None], size=out)
            assert vo.nearest_index(n, out) == idx[0, 0].long().tolist()


def test_oracle_helpers_by_hand():
    t = np.arange(5.0).reshape(1, 1, 1, 1, 5) * np.ones((1, 1, 2, 3, 1))
    assert np.allclose(vo.linear_ac(t, (2, 3, 3))[0, 0, 1, 2], [0.0, 2.0, 4.0])
    assert np.array_equal(vo.nearest(t, (1, 3, 2))[0, 0, 0, 0], [0.0, 2.0])
    # avg 3x3x3 stride 2 pad 1 on a 1x1x1 volume of value 27: 27/27 = 1 (padding counted)
    assert np.allclose(vo.pool(np.full((1, 1, 1, 1, 1), 27.0), "avg", (3, 3, 3), (2, 2, 2)), 1.0)
    # region vectors: rows are the offsets (dz*Rh + dy)*Rw + dx, columns the windows
    t = np.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    rv = vo.region_vectors(t, (2, 2, 3))
    assert rv.shape == (12, 4) and list(rv[:, 0]) == [0, 1, 2, 4, 5, 6, 12, 13, 14, 16, 17, 18]
    for k, shift in enumerate((0, 1, 4, 5)):  # windows (0, 0, 0), (0, 0, 1), (0, 1, 0), ...
        assert list(rv[:, k]) == list(rv[:, 0] + shift)


@pytest.mark.parametrize("radius", [(2, 2, 3), (1, 3, 3), 2, (3, 2)])
def test_reference_region_offsets_row_major(radius):
    gen = torch.Generator().manual_seed(2)
    shape = (1, 1, 5, 6, 7) if radius != (3, 2) else (1, 1, 6, 7)
    t = torch.rand(shape, generator=gen, dtype=torch.float64)
    got = region_vectors(t, radius)[0, 0].numpy()
    assert np.array_equal(got, vo.region_vectors(t[0, 0].numpy(), vo.sides(radius, t.dim() - 2)))


# ---- reference vs oracle ---------------------------------------------------------------------


VOLUME_CASES = [  # (radius, stride, pool, pool_size)
    (2, 2, "avg", None),
    ((1, 3, 3), (1, 2, 2), "avg", None),
    ((1, 3, 3), (1, 2, 2), "max", (1, 3, 3)),
    ((2, 2, 3), (2, 1, 2), "avg", (3, 1, 3)),
    ((2, 3, 2), (1, 2, 2), "max", None),
    (2, 2, "max", 3),
    ((1, 3, 3), (1, 2, 2), "interp", None),
    ((2, 2, 2), (2, 3, 2), "interp", None),
    ((1, 3, 3), 1, "avg", None),  # DF 1
    (2, (1, 1, 1), "max", 3),  # every stride 1: no pooling, whatever the kernel
    ((1, 2, 2), (1, 2, 2), "avg", (3, 3, 3)),  # kernel > 1 on the stride-1 axis: smoothed
]


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("radius,stride,pool,pool_size", VOLUME_CASES)
def test_volume_reference_matches_oracle(mode, radius, stride, pool, pool_size):
    seed = VOLUME_CASES.index((radius, stride, pool, pool_size))
    x, labels = volume_inputs(VOLUME, seed, mode=mode)
    check_against_oracle(x, labels, radius=radius, stride=stride, pool=pool,
                         pool_size=pool_size, mode=mode, lam=(0.5, 0.3, 0.8)[seed % 3],
                         lambda_way=seed % 2)


PLANAR_CASES = [
    ((2, 3), 1, "avg", None),
    ((2, 3), (1, 2), "avg", None),
    ((3, 2), (2, 3), "max", (3, 5)),
    ((2, 3), (2, 2), "interp", None),
    ((1, 4), (3, 1), "avg", 3),
    (2, (1, 2), "max", None),
]


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("radius,stride,pool,pool_size", PLANAR_CASES)
def test_planar_per_axis_reference_matches_oracle(mode, radius, stride, pool, pool_size):
    seed = 20 + PLANAR_CASES.index((radius, stride, pool, pool_size))
    x, labels = volume_inputs((2, 3, 13, 11), seed, mode=mode)
    check_against_oracle(x, labels, radius=radius, stride=stride, pool=pool,
                         pool_size=pool_size, mode=mode, lambda_way=seed % 2)


def test_isotropic_tuples_equal_ints():
    x, labels = volume_inputs((2, 3, 11, 10), 3)
    for backend in ("reference", "torch"):  # the config is the same: every backend reads ints
        ints = rmi_ext.rmi_loss(x, labels, radius=3, stride=2, pool_size=3, backend=backend)
        sides = rmi_ext.rmi_loss(x, labels, radius=(3, 3), stride=[2, 2], pool_size=(3, 3),
                                 backend=backend)
        assert torch.equal(ints, sides)


@pytest.mark.parametrize("ignore_index", [255, 1])
def test_volume_ignore_index(ignore_index):
    x, labels = volume_inputs((2, 3, 5, 6, 6), 4, mode="softmax", ignore_frac=0.0)
    labels[:, 0] = ignore_index
    for mode in ("sigmoid", "softmax"):
        check_against_oracle(x, labels, radius=(1, 2, 2), stride=(1, 2, 2),
                             ignore_index=ignore_index, mode=mode)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_all_ignored_volume(mode):
    x, labels = volume_inputs((1, 2, 4, 6, 6), 5)
    labels.fill_(255)
    loss, base, rmi = ref_terms(x, labels, radius=(1, 2, 2), stride=(1, 2, 2), mode=mode)
    assert np.isfinite([loss, base, rmi]).all() and base == 0.0
    check_against_oracle(x, labels, radius=(1, 2, 2), stride=(1, 2, 2), mode=mode)
    x.requires_grad_(True)
    rmi_ext.rmi_loss(x, labels, radius=(1, 2, 2), stride=(1, 2, 2), mode=mode,
                     backend="reference").backward()
    assert torch.isfinite(x.grad).all()
    for backend in VOLUME_BACKENDS:  # torch: plane groups, row blocks
        for radius, stride in (((1, 2, 2), (1, 2, 2)), (2, 1)):
            compare(backend, x, labels, radius=radius, stride=stride, mode=mode)


@pytest.mark.parametrize("backend", ["reference", *VOLUME_BACKENDS])
@pytest.mark.parametrize("opts", [dict(radius=(1, 2, 2), stride=(1, 2, 1), pool="avg"),
                                  dict(radius=(2, 1, 2), stride=1, mode="softmax"),
                                  dict(radius=(1, 2, 2), stride=2, pool="interp"),
                                  dict(radius=(2, 2, 1), stride=(2, 1, 2), pool="max",
                                       pool_size=(3, 3, 1))], ids=str)
def test_volume_gradcheck(backend, opts):
    """gradcheck (float64) of the hand-written backward on a small volume, every pool mode and
    per-axis options (interpreted Triton: a seeded subset of the entries, both corners)."""
    x, labels = volume_inputs((1, 2, 3, 5, 4), 6)
    x.requires_grad_(True)
    valid = (labels >= 0) & (labels < 2)  # softmax: cross_entropy wants a class or 255
    lab = labels if opts.get("mode") != "softmax" else torch.where(valid, labels, 255)
    assert gradcheck_entries(lambda t: rmi_ext.rmi_loss(t, lab, backend=backend, **opts), (x,),
                             gradcheck_max_elems(backend))


# ---- the fused backends vs the reference ------------------------------------------------------


VOLUME_CASES_FUSED = [  # (radius, stride, pool, pool_size)
    ((1, 3, 3), (1, 2, 2), "avg", None),
    ((2, 2, 2), (2, 2, 2), "avg", None),
    (3, (1, 1, 1), "avg", None),  # DF 1, d = 27
    (3, (1, 2, 2), "max", None),
    ((1, 3, 3), 1, "max", None),
    ((2, 2, 2), (2, 2, 2), "max", 3),
    ((2, 2, 2), (1, 2, 2), "interp", None),
    (2, (2, 2, 2), "interp", None),
    ((2, 2, 3), (2, 1, 2), "max", (3, 1, 5)),
    ((1, 2, 2), (1, 2, 2), "avg", (3, 3, 3)),  # kernel 3 on the stride-1 axis D
    ((2, 2, 2), (1, 2, 2), "max", (2, 2, 2)),  # kernel 2 on the stride-1 axis D: D + 1 planes
]


@pytest.mark.parametrize("backend", VOLUME_BACKENDS)
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("radius,stride,pool,pool_size", VOLUME_CASES_FUSED)
def test_volume_matches_reference(backend, mode, radius, stride, pool, pool_size):
    """float64 volumes with ignored voxels (and labels outside ``[0, C)`` in sigmoid mode):
    loss and gradient within 1e-10 of the reference."""
    seed = 30 + VOLUME_CASES_FUSED.index((radius, stride, pool, pool_size))
    x, labels = volume_inputs(VOLUME, seed, mode=mode)
    compare(backend, x, labels, radius=radius, stride=stride, pool=pool, pool_size=pool_size,
            mode=mode, weight_lambda=(0.5, 0.3, 0.8)[seed % 3], lambda_way=seed % 2)


@pytest.mark.parametrize("backend", VOLUME_BACKENDS)
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("radius,stride,pool,pool_size", PLANAR_CASES)
def test_planar_per_axis_matches_reference(backend, mode, radius, stride, pool, pool_size):
    seed = 50 + PLANAR_CASES.index((radius, stride, pool, pool_size))
    x, labels = volume_inputs((2, 3, 13, 11), seed, mode=mode)
    compare(backend, x, labels, radius=radius, stride=stride, pool=pool, pool_size=pool_size,
            mode=mode, lambda_way=seed % 2)


TINY_BLOCK_CASES = [  # (shape, radius, stride, pool, pool_size)
    ((1, 2, 11, 9, 8), 3, 1, "avg", None),  # halos of 2 planes
    ((1, 2, 11, 9, 8), (2, 2, 2), (2, 2, 2), "avg", 3),  # windows across block edges
    ((1, 2, 11, 9, 8), (2, 3, 2), (3, 2, 2), "max", (2, 3, 3)),  # planes no window reaches
    ((1, 2, 11, 9, 8), (2, 2, 2), (1, 2, 2), "avg", (3, 3, 3)),
    ((1, 2, 11, 9, 8), (2, 2, 2), (2, 2, 2), "interp", None),
    ((1, 2, 23, 19), (3, 2), (2, 3), "max", (3, 5)),
    ((1, 2, 23, 19), (2, 4), (1, 2), "avg", None),
]


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("shape,radius,stride,pool,pool_size", TINY_BLOCK_CASES)
def test_torch_volume_tiny_blocks_match_reference(monkeypatch, mode, shape, radius, stride,
                                                  pool, pool_size):
    """Blocks of one row (a plane ``H x W`` of a volume) of one class, of a few rows, and small
    plane groups (DF > 1) against the reference in float64: halos along the first axis, pooling
    windows cut by a block edge."""
    from rmi_ext import torch_backend

    seed = 60 + TINY_BLOCK_CASES.index((shape, radius, stride, pool, pool_size))
    x, labels = volume_inputs(shape, seed, mode=mode)
    opts = dict(radius=radius, stride=stride, pool=pool, pool_size=pool_size, mode=mode)
    ref_loss, ref_grad = run(x, labels, "reference", **opts)
    for elements in (1, 150, 300, 1000):  # one row, 2-4 rows or planes groups, whole classes
        monkeypatch.setattr(torch_backend, "block_elements", lambda *args: elements)
        loss, grad = run(x, labels, "torch", **opts)
        assert rel_err(loss, ref_loss) <= 1e-10, elements
        assert rel_err(grad, ref_grad) <= 1e-10, elements


def test_torch_volume_blocks_cover_every_plane_once():
    """row_blocks / plane_groups on volumes: every (n, c, first-axis index) exactly once; plane
    groups only when pooling (avg / max) and when a pooled volume fits."""
    from rmi_ext._config import make_config
    from rmi_ext.torch_backend import plane_groups, row_blocks

    shape = (3, 4, 10, 9, 8)
    for elements in (1, 72, 500, 3000, 10**6):
        for flags in ({}, {"all_classes": True}, {"whole_planes": True}):
            seen = torch.zeros(shape[:3], dtype=torch.int64)
            for n0, n1, c0, c1, r0, r1 in row_blocks(shape, elements, **flags):
                seen[n0:n1, c0:c1, r0:r1] += 1
            assert bool((seen == 1).all()), (flags, elements)
    cfg = make_config(radius=(1, 2, 2), stride=(1, 2, 2))
    groups = plane_groups(shape, cfg, 3000)
    assert sum((n1 - n0) * (c1 - c0) for n0, n1, c0, c1 in groups) == 3 * 4 and len(groups) > 1
    assert plane_groups(shape, cfg, 10) is None
    assert plane_groups(shape, make_config(radius=2, stride=(1, 1, 1), pool_size=3), 10**6) is None
    assert plane_groups(shape, make_config(radius=2, stride=2, pool="interp"), 10**6) is None


@pytest.mark.parametrize("backend", VOLUME_BACKENDS)
@pytest.mark.parametrize("ignore_index", [255, 1])
def test_volume_ignore_index_fused(backend, ignore_index):
    x, labels = volume_inputs((2, 3, 5, 6, 6), 4, mode="softmax", ignore_frac=0.0)
    labels[:, 0] = ignore_index
    for mode in ("sigmoid", "softmax"):
        compare(backend, x, labels, radius=(1, 2, 2), stride=(1, 2, 2),
                ignore_index=ignore_index, mode=mode)


@pytest.mark.parametrize("backend", ["reference", *VOLUME_BACKENDS])
def test_volume_labels_with_a_channel_axis(backend):
    """``[N, 1, D, H, W]`` integer labels: the loss and gradient of the ``[N, D, H, W]`` map."""
    x, labels = volume_inputs((2, 3, 5, 6, 6), 6)
    opts = dict(radius=(1, 2, 2), stride=(1, 2, 2), pool="max")
    loss, grad = run(x, labels[:, None], backend, **opts)
    loss_map, grad_map = run(x, labels, backend, **opts)
    assert torch.equal(loss, loss_map) and torch.equal(grad, grad_map)


@pytest.mark.parametrize("backend", VOLUME_BACKENDS)
@pytest.mark.parametrize("mode,pool", [("sigmoid", "avg"), ("softmax", "max"),
                                       ("sigmoid", "interp")])
def test_volume_float32(backend, mode, pool):
    """float32 logits: loss within 1e-5, gradient within 1e-4 of the float32 reference."""
    x, labels = volume_inputs(VOLUME, 13, mode=mode, dtype=torch.float32)
    for radius, stride in (((1, 3, 3), (1, 2, 2)), (2, 1)):
        compare(backend, x, labels, radius=radius, stride=stride, pool=pool, mode=mode)


@pytest.mark.parametrize("backend", VOLUME_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,pool,radius,stride", [("sigmoid", "avg", (1, 3, 3), (1, 2, 2)),
                                                     ("softmax", "interp", 2, 2),
                                                     ("sigmoid", "max", (2, 2, 1), (2, 1, 2)),
                                                     ("softmax", "avg", 2, 1)])
def test_volume_half_precision(backend, dtype, mode, pool, radius, stride):
    """fp16 / bf16 volumes: loss float32 and gradient in the logits' dtype, within the 2-D
    half-precision tolerances of the float32 reference on the same rounded values."""
    x, labels = volume_inputs(VOLUME, 14, mode=mode, dtype=dtype)
    compare(backend, x, labels, radius=radius, stride=stride, pool=pool, mode=mode)


@pytest.mark.slow
@pytest.mark.parametrize("stride,mode,pool", [(1, "softmax", "max"), (2, "softmax", "max"),
                                              (2, "sigmoid", "avg")])
def test_torch_volume_peak_memory(stride, mode, pool):
    """Forward + backward of a float32 volume allocate at most 1.5x the logits in torch tensors,
    the gradient included: blocks of one plane of ``D`` (one class) with halos of ``R - 1``
    planes; the stencil writes only its block's rows."""
    torch.manual_seed(0)
    logits = (2 * torch.randn(1, 2, 64, 64, 64)).requires_grad_()  # 2 MiB: blocks of 1/8,
    labels = torch.randint(0, 2, (1, 64, 64, 64))  # see torch_backend.BLOCK_BYTES_FLOOR
    ratio = peak_memory_ratio(logits, labels, radius=2, stride=stride, pool=pool, mode=mode,
                              backend="torch")
    assert ratio <= 1.5, ratio


@pytest.mark.parametrize("backend", [b for b in VOLUME_BACKENDS if b == "triton"])
@pytest.mark.parametrize("stride,mode,pool", [(1, "sigmoid", "avg"), (2, "softmax", "max")])
def test_triton_volume_peak_memory(backend, stride, mode, pool):
    """The Triton kernels on a float32 volume of 8 planes allocate at most 1.25x the logits in
    torch tensors, forward + backward, the gradient included (as in 2-D): without pooling no
    map but the gradient; with pooling the forward's pooled maps (1/4 of the logits for ``P``
    and ``Y`` at stride 2) and, in the backward, the maps of one plane at a time, the arg-max
    and the softmax ``lse``. Regions ``1 x 2 x 2``: the ``[N, C, d, d]`` statistics stay small
    beside planes this small (the interpreter's cost)."""
    torch.manual_seed(0)
    logits = (2 * torch.randn(1, 8, 12, 40, 40)).requires_grad_()
    labels = torch.randint(0, 8, (1, 12, 40, 40))
    ratio = peak_memory_ratio(logits, labels, radius=(1, 2, 2), stride=stride, pool=pool,
                              mode=mode, backend=backend)
    assert ratio <= 1.25, ratio


# ---- memory formats and shapes -------------------------------------------------------------


@pytest.mark.parametrize("backend,tol,grad_tol", [("reference", 1e-13, 1e-12),
                                                  *((b, 1e-10, 1e-10) for b in VOLUME_BACKENDS)])
def test_volume_memory_formats_and_strides(backend, tol, grad_tol):
    """channels_last_3d logits and strided logits / labels: the reference's numbers on the
    contiguous tensors (the gradient keeps the logits' memory format)."""
    x, labels = volume_inputs(VOLUME, 7)
    opts = dict(radius=(1, 3, 3), stride=(1, 2, 2), backend=backend)
    x.requires_grad_(True)
    want = rmi_ext.rmi_loss(x, labels, **dict(opts, backend="reference"))
    (want_grad,) = torch.autograd.grad(want, x)
    channels_last = x.detach().to(memory_format=torch.channels_last_3d).requires_grad_(True)
    big = torch.zeros(2, 5, 9, 9, 16, dtype=torch.float64)
    big[:, 1:4, 1:8, :, ::2] = x.detach()
    strided = big[:, 1:4, 1:8, :, ::2].requires_grad_(True)
    labels_strided = torch.zeros(2, 14, 9, 8, dtype=labels.dtype)[:, ::2]
    labels_strided.copy_(labels)
    for logits, lab in ((channels_last, labels), (strided, labels_strided)):
        assert not logits.is_contiguous() or not lab.is_contiguous()
        got = rmi_ext.rmi_loss(logits, lab, **opts)
        (grad,) = torch.autograd.grad(got, logits)
        assert rel_err(got, want) < tol and rel_err(grad, want_grad) < grad_tol
        if logits is channels_last and backend != "reference":
            assert grad.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("shape,opts,sizes", [
    ((1, 2, 2, 9, 9), dict(radius=3, stride=1), "2x9x9"),
    ((1, 2, 5, 7, 7), dict(radius=(1, 3, 3), stride=(1, 4, 4)), "5x2x2"),
    ((1, 2, 6, 6, 6), dict(radius=2, stride=4, pool="interp"), "1x1x1"),
    ((1, 2, 6, 9), dict(radius=(2, 4), stride=(1, 3)), "6x3"),
])
def test_volume_smaller_than_region(shape, opts, sizes):
    x, labels = volume_inputs(shape, 8)
    with pytest.raises(ValueError, match=f"downsampled map is {sizes} .*radius"):
        rmi_ext.rmi_loss(x, labels, backend="reference", **opts)


# ---- options and routing -------------------------------------------------------------------


@pytest.mark.parametrize("opts,exc,match", [
    (dict(radius=(1, 3, 3)), ValueError, r"radius \(1, 3, 3\) has 3 sides .* 2 spatial axes"),
    (dict(stride=(1, 2, 2)), ValueError, r"stride \(1, 2, 2\) has 3 sides"),
    (dict(radius=(3, 3), stride=(1, 2, 2)), ValueError, "same number of sides"),
    (dict(radius=(3, 3, 3, 3)), ValueError, "radius must be an int or have one side per"),
    (dict(radius=(0, 3)), ValueError, r"radius \(0, 3\) side must be in \[1, 10\], got 0"),
    (dict(radius=(11, 1)), ValueError, "radius"),
    (dict(radius=(3.0, 3)), TypeError, "radius"),
    (dict(pool_size=(2, "2")), TypeError, "pool_size"),
    (dict(radius=2.5), TypeError, "radius must be an int or a tuple"),
    (dict(radius=(5, 5, 5)), ValueError, r"d = 125 entries, more than 100"),
])
def test_bad_per_axis_options(opts, exc, match):
    x, labels = volume_inputs((1, 2, 16, 16), 9)
    with pytest.raises(exc, match=match):
        rmi_ext.rmi_loss(x, labels, backend="reference", **opts)


def test_int_radius_too_large_for_a_volume():
    x, labels = volume_inputs((1, 2, 12, 12, 12), 9)
    rmi_ext.rmi_loss(x[:, :, 0], labels[:, 0], radius=5, stride=1)  # d = 25 in 2-D
    with pytest.raises(ValueError, match=r"radius 5 on 3 axes gives regions of d = 125"):
        rmi_ext.rmi_loss(x, labels, radius=5, stride=1, backend="reference")
    with pytest.raises(ValueError, match="radius"):
        rmi_ext.RMILoss(radius=(1, 3, 3), stride=(2, 2))


@pytest.mark.parametrize("shape,opts", [
    ((1, 2, 4, 8, 8), dict(radius=2, stride=2)),
    ((1, 2, 8, 8), dict(radius=(2, 3), stride=2)),
    ((1, 2, 8, 8), dict(radius=2, stride=(1, 2))),
])
def test_auto_uses_the_fastest_backend_that_computes_volumes(shape, opts):
    """"auto" for volumes / per-axis options: the first backend of the auto order that
    computes them ("cpu" when the C++ kernels are built, else "torch"), the reference's numbers,
    and no warning (the slow reference is never picked while a fused backend runs)."""
    x, labels = volume_inputs(shape, 10)
    info = rmi_ext.backend_info("cpu")
    assert info["auto_volumes"] == ("cpu" if info["available"]["cpu"] is True else "torch")
    warn_once.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = rmi_ext.rmi_loss_terms(x, labels, **opts)
    want = rmi_ext.rmi_loss_terms(x, labels, backend=info["auto_volumes"], **opts)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    compare(info["auto_volumes"], x, labels, **opts)


@pytest.mark.parametrize("backend", fast_backends())
def test_fast_backend_volume_routing(backend):
    """A named fast backend computes volumes and per-axis options when its module sets
    ``supports_volumes`` (every fused backend but "cuda": the reference's numbers), else raises
    ValueError naming the backends that do."""
    x, labels = volume_inputs((1, 2, 4, 8, 8), 11)
    supported = backend in rmi_ext.backend_info("cpu")["volumes"]
    assert supported == (backend != "cuda")  # the CUDA C++ kernels are planar
    for xs, lab, opts in ((x, labels, dict(radius=2, stride=2)),
                          (x[:, :, 0], labels[:, 0], dict(radius=(2, 3), stride=2))):
        if supported:
            compare(backend, xs, lab, **opts)
            continue
        with pytest.raises(ValueError, match=f"backend '{backend}' does not support .*'torch'.*"
                                             f"'reference', 'auto'"):
            rmi_ext.rmi_loss(xs, lab, backend=backend, **opts)


def test_volume_module_and_dtypes():
    x, labels = volume_inputs((2, 2, 4, 8, 8), 12, dtype=torch.float32)
    module = rmi_ext.RMILoss(radius=(1, 2, 2), stride=(1, 2, 2), backend="reference")
    x.requires_grad_(True)
    loss = module(x, labels.to(torch.uint8).clamp(max=2))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert module.last_terms is not None
    loss.backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


@pytest.mark.slow
@pytest.mark.parametrize("backend", VOLUME_BACKENDS)
def test_volume_compiles_fullgraph(backend):
    """``torch.compile(fullgraph=True)`` of the volume loss (the C++ ops through their fake
    kernels): one graph, the eager loss and gradient."""
    torch._dynamo.reset()
    x, labels = volume_inputs((1, 2, 5, 8, 9), 21, dtype=torch.float32)
    labels = labels[:, None]  # [N, 1, D, H, W]: the channel axis is dropped inside the graph
    step = lambda t: rmi_ext.rmi_loss(t, labels, radius=(1, 2, 2), stride=(1, 2, 2), pool="max",
                                      backend=backend)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (compiled, step):
        xx = x.clone().requires_grad_(True)
        loss = fn(xx)
        loss.backward()
        grads.append((loss.detach(), xx.grad))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-6, atol=0)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)

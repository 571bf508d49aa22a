"""Volumes ``[N, C, D, H, W]`` and per-axis radius / stride / pool size (RMI_SPEC.md section 5):
the reference against the independent numpy oracle (``volume_oracle``), the options' checks and
how the API routes such inputs while the fast backends are 2-D only."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rmi_ext
import volume_oracle as vo
from conftest import fast_backends, rel_err
from rmi_ext._dispatch import LOADED, warn_once, resolve_backend
from rmi_ext.reference import region_vectors

VOLUME = (2, 3, 7, 9, 8)


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


def test_volume_gradcheck():
    x, labels = volume_inputs((1, 2, 3, 5, 4), 6)
    x.requires_grad_(True)
    for opts in (dict(radius=(1, 2, 2), stride=(1, 2, 1), pool="avg"),
                 dict(radius=(2, 1, 2), stride=1), dict(radius=(1, 2, 2), stride=2, pool="interp")):
        assert torch.autograd.gradcheck(
            lambda t: rmi_ext.rmi_loss(t, labels, backend="reference", **opts), (x,))


# ---- memory formats and shapes -------------------------------------------------------------


def test_volume_memory_formats_and_strides():
    x, labels = volume_inputs(VOLUME, 7)
    opts = dict(radius=(1, 3, 3), stride=(1, 2, 2), backend="reference")
    x.requires_grad_(True)
    want = rmi_ext.rmi_loss(x, labels, **opts)
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
        assert rel_err(got, want) < 1e-13 and rel_err(grad, want_grad) < 1e-12


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


def _unsupported_fast_backends():
    return [b for b in fast_backends()
            if not getattr(LOADED.get(b), "supports_volumes", False)]


@pytest.mark.parametrize("shape,opts,why", [
    ((1, 2, 4, 8, 8), dict(radius=2, stride=2), "3-D logits"),
    ((1, 2, 8, 8), dict(radius=(2, 3), stride=2), "per-axis"),
    ((1, 2, 8, 8), dict(radius=2, stride=(1, 2)), "per-axis"),
])
def test_auto_uses_reference_with_one_warning(shape, opts, why):
    x, labels = volume_inputs(shape, 10)
    resolve_backend("auto", "cpu")  # loads the backend "auto" picks
    if not _unsupported_fast_backends():
        pytest.skip("every fast backend supports volumes")
    warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match=f"uses the slow 'reference' backend for {why}"):
        got = rmi_ext.rmi_loss_terms(x, labels, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = rmi_ext.RMILoss(**opts)(x, labels)  # the warning is shown once
    want = rmi_ext.rmi_loss_terms(x, labels, backend="reference", **opts)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and torch.equal(again, want.loss)


@pytest.mark.parametrize("backend", fast_backends())
def test_fast_backend_rejects_volumes_for_now(backend):
    x, labels = volume_inputs((1, 2, 4, 8, 8), 11)
    resolve_backend(backend, "cpu")  # loads it
    if backend not in _unsupported_fast_backends():
        pytest.skip(f"backend {backend!r} supports volumes")
    for xs, lab, opts in ((x, labels, dict(radius=2, stride=2)),
                          (x[:, :, 0], labels[:, 0], dict(radius=(2, 3), stride=2))):
        with pytest.raises(ValueError, match=f"backend '{backend}' does not support .* "
                                             f"backend='reference'"):
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

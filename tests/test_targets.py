"""Float targets of the loss and ``region_mi`` (RMI_SPEC.md section 6, issue 17).

The backends that compute them (``backend_info()["float_targets"]``, ``["region_mi"]``: every
backend; on CPU torch, cpu and the interpreted triton, on a GPU torch, triton and cuda) are
checked against the reference with the harness' tolerances (the CUDA kernels without a GPU: the
host emulation in test_cuda.py); the reference's float-target loss is checked against
the integer-label loss (one-hot targets) and against ``F.cross_entropy`` / BCE written out.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import rmi_ext
from conftest import (TOL, compare, fast_backends, feature_params, gradcheck_entries,
                      gradcheck_max_elems, make_inputs, rel_err)
from rmi_ext._config import CLIP_MIN

INFO = rmi_ext.backend_info("cpu")
FLOAT_BACKENDS = [b for b in fast_backends() if b in INFO["float_targets"]]
REGION_BACKENDS = [b for b in fast_backends() if b in INFO["region_mi"]]
#: (backend, device) of the comparisons with the reference: CUDA too on a GPU machine.
FLOAT_ON = feature_params("float_targets")
REGION_ON = feature_params("region_mi")
POOLS = [("avg", 1), ("avg", 2), ("avg", 3), ("max", 2), ("max", 3), ("interp", 2),
         ("interp", 3)]


def pool_id(case):
    return f"{case[0]}-s{case[1]}"


def one_hot_of(labels, num_classes, dtype=torch.float64):
    """``(one-hot [N, C, *S], mask [N, *S])`` of integer labels, ids outside [0, C) and 255
    ignored (the mask)."""
    valid = (labels >= 0) & (labels < num_classes) & (labels != 255)
    onehot = F.one_hot(torch.where(valid, labels.long(), 0), num_classes).movedim(-1, 1)
    return onehot.to(dtype) * valid.unsqueeze(1), valid


def targets(kind, shape, seed=1, dtype=torch.float64):
    """A float target of ``kind``: ``soft`` (rows summing to 1), ``multi`` (multi-label 0/1),
    ``smooth`` (label smoothing 0.1 of a one-hot), and a mask with a fifth of the pixels off."""
    gen = torch.Generator().manual_seed(seed)
    n, c, *spatial = shape
    if kind == "soft":
        target = torch.softmax(2 * torch.randn(shape, generator=gen, dtype=torch.float64), 1)
    elif kind == "multi":
        target = (torch.rand(shape, generator=gen, dtype=torch.float64) < 0.4).double()
    else:
        labels = torch.randint(0, c, (n, *spatial), generator=gen)
        target = F.one_hot(labels, c).movedim(-1, 1).double() * 0.9 + 0.1 / c
    mask = torch.rand((n, *spatial), generator=gen) > 0.2
    return target.to(dtype), mask


# ---- one-hot float targets are integer labels ------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", *FLOAT_BACKENDS])
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("pool,stride", POOLS, ids=map(pool_id, POOLS))
def test_one_hot_target_equals_integer_labels(backend, mode, pool, stride):
    x, labels = make_inputs((2, 3, 17, 15), 3, mode=mode)
    onehot, valid = one_hot_of(labels, 3)
    opts = dict(mode=mode, pool=pool, stride=stride, radius=3, backend=backend)
    want = rmi_ext.rmi_loss_terms(x, labels, **opts)
    got = rmi_ext.rmi_loss_terms(x, onehot, mask=valid, **opts)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-12
    grad_want, = torch.autograd.grad(want.loss, x)
    grad_got, = torch.autograd.grad(got.loss, x)
    assert rel_err(grad_got, grad_want) <= 1e-12


def test_reference_first_terms_written_out():
    """Sigmoid: BCE with the target over the counted pixels / (count + 1); softmax: the soft
    CE over the counted pixels / count (F.cross_entropy with probability targets)."""
    x, _ = make_inputs((2, 4, 9, 10), 5, requires_grad=False)
    target, mask = targets("soft", x.shape)
    base = rmi_ext.rmi_loss_terms(x, target, mask=mask, backend="reference").base
    m = mask.unsqueeze(1).double()
    bce = F.binary_cross_entropy_with_logits(x, target, reduction="none") * m
    assert rel_err(base, bce.sum() / (mask.sum() + 1)) <= 1e-14
    base = rmi_ext.rmi_loss_terms(x, target, mode="softmax", backend="reference").base
    assert rel_err(base, F.cross_entropy(x, target)) <= 1e-14
    base = rmi_ext.rmi_loss_terms(x, target, mask=mask, mode="softmax", backend="reference").base
    ce = -(target * torch.log_softmax(x, 1)).sum(1)[mask].sum() / mask.sum()
    assert rel_err(base, ce) <= 1e-14


# ---- the fast backends against the reference --------------------------------------------------


@pytest.mark.parametrize("backend,device", FLOAT_ON)
@pytest.mark.parametrize("kind", ["soft", "multi", "smooth"])
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("pool,stride", POOLS, ids=map(pool_id, POOLS))
def test_float_targets_match_reference(backend, device, kind, mode, pool, stride):
    x, _ = make_inputs((2, 3, 19, 16), 7, device=device)
    target, mask = (t.to(device) for t in targets(kind, x.shape))
    for m in (mask, None):
        compare(backend, x, target, mode=mode, pool=pool, stride=stride, radius=3, mask=m)


@pytest.mark.parametrize("backend,device", FLOAT_ON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_targets_low_precision(backend, device, dtype):
    """Logits and target in ``dtype`` (a float16 target beside bfloat16 logits too); the
    harness' tolerances."""
    x, _ = make_inputs((2, 3, 21, 18), 8, dtype=dtype, device=device)
    target, mask = (t.to(device) for t in targets("soft", x.shape, dtype=dtype))
    compare(backend, x, target, stride=2, mask=mask)
    compare(backend, x, target, stride=1, mode="softmax", mask=mask)
    compare(backend, x, target.half(), stride=3, pool="interp", mode="softmax")


@pytest.mark.parametrize("backend", FLOAT_BACKENDS)
def test_float_targets_layouts_and_grad_output(backend):
    """channels_last logits and target, a strided target and mask, ``grad_output != 1``."""
    x, _ = make_inputs((2, 4, 18, 17), 9)
    target, mask = targets("multi", x.shape)
    compare(backend, x.contiguous(memory_format=torch.channels_last),
            target.contiguous(memory_format=torch.channels_last), mask=mask, stride=2)
    wide = torch.cat([target, target], dim=3)[..., ::2]
    compare(backend, x, wide, torch.tensor(-1.7, dtype=torch.float64), mask=mask.mT.mT,
            stride=3, pool="max", mode="softmax")


@pytest.mark.parametrize("backend,device", FLOAT_ON)
@pytest.mark.parametrize("opts", [dict(radius=(1, 3, 3), stride=(1, 2, 2)),
                                  dict(radius=2, stride=1), dict(radius=2, stride=2, pool="max"),
                                  dict(radius=(2, 2, 1), stride=2, pool="interp")], ids=str)
def test_float_targets_on_volumes(backend, device, opts):
    if backend not in INFO["volumes"]:
        pytest.skip(f"{backend} computes no volumes")
    gen = torch.Generator().manual_seed(4)
    x = (2 * torch.randn((2, 3, 7, 11, 10), generator=gen, dtype=torch.float64)).to(device)
    target, mask = (t.to(device) for t in targets("soft", x.shape))
    for mode in ("sigmoid", "softmax"):
        compare(backend, x, target, mask=mask, mode=mode, **opts)


@pytest.mark.parametrize("backend", FLOAT_BACKENDS)
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("pool,stride", POOLS, ids=map(pool_id, POOLS))
def test_float_target_gradcheck(backend, mode, pool, stride):
    """The hand-written backward of the loss with a float target and a mask, in float64."""
    x, _ = make_inputs((1, 2, 3 * stride + 4, 3 * stride + 3), 2, scale=1.0)
    target, mask = targets("soft", x.shape, seed=3)
    fn = lambda t: rmi_ext.rmi_loss(t, target, mask=mask, mode=mode, pool=pool,  # noqa: E731
                                    stride=stride, radius=2, backend=backend)
    assert gradcheck_entries(fn, (x,), gradcheck_max_elems(backend), eps=1e-6, atol=1e-8,
                             rtol=1e-6)


# ---- region_mi ----------------------------------------------------------------------------------


def two_maps(shape, seed=5, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    target = torch.sigmoid(3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    mask = torch.rand((shape[0], *shape[2:]), generator=gen) > 0.15
    return pred, target, mask


def region_mi_and_grads(backend, pred, target, weights, **opts):
    """``region_mi(..., reduction="none")`` and the gradients of ``sum(weights * rmi)`` to both
    maps."""
    p, t = pred.detach().requires_grad_(), target.detach().requires_grad_()
    rmi = rmi_ext.region_mi(p, t, reduction="none", backend=backend, **opts)
    gp, gt = torch.autograd.grad((rmi * weights).sum(), (p, t))
    return rmi.detach(), gp, gt


@pytest.mark.parametrize("backend,device", REGION_ON)
@pytest.mark.parametrize("pool,stride", POOLS, ids=map(pool_id, POOLS))
def test_region_mi_matches_reference(backend, device, pool, stride):
    pred, target, mask = (t.to(device) for t in two_maps((2, 3, 17, 19)))
    weights = torch.randn((2, 3), generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64).to(device)
    for m in (mask, None):
        opts = dict(pool=pool, stride=stride, radius=3, mask=m)
        got = region_mi_and_grads(backend, pred, target, weights, **opts)
        want = region_mi_and_grads("reference", pred, target, weights, **opts)
        for a, b in zip(got, want):
            assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("backend,device", REGION_ON)
@pytest.mark.parametrize("stride", [2, 3])
def test_region_mi_signed_maps_max_pool(backend, device, stride):
    """region_mi's maps may be negative: max pooling pads with -inf (as max_pool), for the
    target's Y as for P (a zero start or zero padding rows gave wrong maxima)."""
    gen = torch.Generator().manual_seed(stride)
    pred, target = (torch.randn((2, 3, 19, 17), generator=gen, dtype=torch.float64) - 0.5
                    for _ in range(2))
    mask = torch.rand((2, 19, 17), generator=gen) > 0.2
    weights = torch.randn((2, 3), generator=gen, dtype=torch.float64)
    pred, target, mask, weights = (t.to(device) for t in (pred, target, mask, weights))
    for m in (mask, None):
        opts = dict(pool="max", stride=stride, radius=2, mask=m)
        got = region_mi_and_grads(backend, pred, target, weights, **opts)
        want = region_mi_and_grads("reference", pred, target, weights, **opts)
        for a, b in zip(got, want):
            assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("backend,device", REGION_ON)
def test_region_mi_float32_and_volumes(backend, device):
    pred, target, mask = (t.to(device) for t in two_maps((2, 3, 23, 21), dtype=torch.float32))
    weights = torch.ones((2, 3), dtype=torch.float32, device=device)
    got = region_mi_and_grads(backend, pred, target, weights, stride=2, mask=mask)
    want = region_mi_and_grads("reference", pred, target, weights, stride=2, mask=mask)
    tol_value, tol_grad = TOL[torch.float32]
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    assert rel_err(got[0], want[0]) <= tol_value
    assert rel_err(got[1], want[1]) <= tol_grad and rel_err(got[2], want[2]) <= tol_grad
    if backend not in INFO["volumes"]:
        return
    pred, target, mask = (t.to(device) for t in two_maps((1, 2, 6, 9, 8)))
    weights = torch.tensor([[0.5, -2.0]], dtype=torch.float64, device=device)
    opts = dict(radius=(1, 2, 3), stride=(1, 2, 1), pool="max", mask=mask)
    got = region_mi_and_grads(backend, pred, target, weights, **opts)
    want = region_mi_and_grads("reference", pred, target, weights, **opts)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("backend", ["reference", *REGION_BACKENDS])
@pytest.mark.parametrize("pool,stride", [("avg", 1), ("avg", 2), ("max", 2), ("interp", 2)])
def test_region_mi_gradcheck_both_maps(backend, pool, stride):
    pred, target, mask = two_maps((1, 2, 3 * stride + 4, 3 * stride + 5))
    pred.requires_grad_(), target.requires_grad_()
    fn = lambda p, t: rmi_ext.region_mi(p, t, mask=mask, pool=pool,  # noqa: E731
                                        stride=stride, radius=2, backend=backend)
    assert gradcheck_entries(fn, (pred, target), gradcheck_max_elems(backend), eps=1e-6,
                             atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", *REGION_BACKENDS])
def test_region_mi_is_the_loss_rmi_term(backend):
    """``region_mi(P, Y)`` with the loss's ``P = sigmoid(x) * m + 1e-6`` and one-hot ``Y`` is
    the loss's RMI term (reduction "mean"); "sum" and "none" agree with it."""
    x, labels = make_inputs((2, 3, 16, 18), 6, requires_grad=False)
    onehot, valid = one_hot_of(labels, 3)
    probs = torch.sigmoid(x) * valid.unsqueeze(1) + CLIP_MIN
    rmi = rmi_ext.rmi_loss_terms(x, labels, backend=backend).rmi
    assert rel_err(rmi_ext.region_mi(probs, onehot, backend=backend), rmi) <= 1e-12
    per = rmi_ext.region_mi(probs, onehot, backend=backend, reduction="none")
    assert per.shape == (2, 3)
    assert rel_err(per.mean(0).sum(), rmi) <= 1e-12
    assert rel_err(rmi_ext.region_mi(probs, onehot, backend=backend, reduction="sum"),
                   per.sum()) <= 1e-14


@pytest.mark.parametrize("backend", REGION_BACKENDS)
def test_no_target_gradient_work_unless_required(backend, monkeypatch):
    calls = []
    module = importlib.import_module(f"rmi_ext.{backend}_backend")
    real = module.target_grad
    monkeypatch.setattr(module, "target_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    pred, target, _ = two_maps((1, 2, 12, 12))
    p = pred.clone().requires_grad_()
    rmi_ext.region_mi(p, target, stride=2, backend=backend).backward()
    assert calls == [] and p.grad is not None
    t = target.clone().requires_grad_()
    rmi_ext.region_mi(pred, t, stride=2, backend=backend).backward()
    assert calls == [1] and t.grad is not None


@pytest.mark.slow
@pytest.mark.parametrize("backend", FLOAT_BACKENDS)
def test_compiles_fullgraph(backend):
    x, _ = make_inputs((2, 3, 12, 13), 2)
    target, mask = targets("soft", x.shape)
    pred, other, _ = two_maps((2, 3, 12, 13))

    region = backend if backend in REGION_BACKENDS else INFO["auto_region_mi"]

    def step(logits, target, mask, pred, other):
        return (rmi_ext.rmi_loss(logits, target, mask=mask, stride=2, backend=backend)
                + rmi_ext.region_mi(pred, other, stride=2, backend=region))

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    p = pred.clone().requires_grad_()
    want = step(x, target, mask, p, other)
    want_grads = torch.autograd.grad(want, (x, p))
    got = compiled(x, target, mask, p, other)
    got_grads = torch.autograd.grad(got, (x, p))
    assert rel_err(got, want) <= 1e-14
    for a, b in zip(got_grads, want_grads):
        assert rel_err(a, b) <= 1e-14


# ---- routing and bad inputs -------------------------------------------------------------------


def test_routing():
    """"auto" runs the fastest backend that computes the feature; a named backend that does not
    raises ValueError naming those that do."""
    for feature, want in (("float_targets", "cpu"), ("region_mi", "cpu")):
        assert "torch" in INFO[feature] and "reference" in INFO[feature]
        assert INFO[f"auto_{feature}"] == (want if INFO["available"][want] is True else "torch")
    x, _ = make_inputs((1, 2, 10, 10), 1, requires_grad=False)
    target, mask = targets("soft", x.shape)
    want = rmi_ext.rmi_loss(x, target, mask=mask, backend=INFO["auto_float_targets"])
    assert rel_err(rmi_ext.rmi_loss(x, target, mask=mask), want) == 0
    want = rmi_ext.region_mi(x, target, mask=mask, backend=INFO["auto_region_mi"])
    assert rel_err(rmi_ext.region_mi(x, target, mask=mask), want) == 0
    for feature, call in (("float_targets", lambda b: rmi_ext.rmi_loss(x, target, backend=b)),
                          ("region_mi", lambda b: rmi_ext.region_mi(x, target, backend=b))):
        for name in ("cpu", "cuda", "triton"):
            if name in INFO[feature]:
                continue
            with pytest.raises((ValueError, RuntimeError), match=rf"'{name}'"):
                call(name)
            if INFO["available"][name] is True:
                with pytest.raises(ValueError, match=r"does not support .*'torch'"):
                    call(name)


@pytest.mark.skipif(INFO["available"]["cpu"] is not True, reason="the C++ extension is not built")
def test_cpu_ops_take_a_float_target_and_check_it():
    """The C++ ops directly: a float target gives the one-hot labels' statistics; a float target
    of another shape, a mask beside integer labels or of another shape raise."""
    ops = torch.ops.rmi_ext
    x, labels = make_inputs((2, 3, 12, 11), 4, requires_grad=False)
    onehot, valid = one_hot_of(labels, 3)
    args = ([2, 2], [2, 2], "avg", [2, 2], 255, "sigmoid")
    want = ops.forward_stats(x, labels, *args)
    got = ops.forward_stats(x, onehot, *args, valid)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-13
    with pytest.raises(RuntimeError, match="float target must have the logits' shape"):
        ops.forward_stats(x, onehot[:, :2], *args, valid)
    with pytest.raises(RuntimeError, match="mask must be a bool"):
        ops.forward_stats(x, labels, *args, valid)
    with pytest.raises(RuntimeError, match="mask must be a bool"):
        ops.forward_stats(x, onehot, *args, valid[:, :5])
    torch.library.opcheck(ops.forward_stats.default, (x, onehot, *args, valid))
    _, _, _, means, cov = got
    coef = torch.randn((2, 3, 2, 4, 4), dtype=torch.float64)
    shift = torch.randn((2, 3, 4), dtype=torch.float64)
    scale = torch.tensor(0.3, dtype=torch.float64)
    bwd = (x, onehot, scale, coef, shift, *args, valid)
    assert rel_err(ops.backward_grad(*bwd), ops.backward_grad(x, labels, *bwd[2:-1])) <= 1e-13
    torch.library.opcheck(ops.backward_grad.default, bwd)
    region = (*args[:-1], "region")  # region_mi's mode: P = the map itself
    torch.library.opcheck(ops.forward_stats.default, (x, onehot, *region, valid))
    torch.library.opcheck(ops.backward_grad.default, (*bwd[:5], *region, valid))


def test_module_takes_a_mask():
    x, _ = make_inputs((2, 3, 11, 12), 3, requires_grad=False)
    target, mask = targets("multi", x.shape)
    loss = rmi_ext.RMILoss(stride=2, backend="torch")(x, target, mask)
    assert rel_err(loss, rmi_ext.rmi_loss(x, target, mask=mask, stride=2,
                                          backend="reference")) <= 1e-10


def test_bad_targets():
    x, labels = make_inputs((1, 2, 10, 10), 1, requires_grad=False)
    target, mask = targets("soft", x.shape)
    with pytest.raises(RuntimeError, match=r"values in \[0, 1\]"):
        rmi_ext.rmi_loss(x, target * 1.5)
    with pytest.raises(RuntimeError, match=r"values in \[0, 1\]"):
        rmi_ext.rmi_loss(x, target - 0.5, backend="reference")
    bad = target.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"values in \[0, 1\]"):
        rmi_ext.rmi_loss(x, bad)
    for backend in FLOAT_BACKENDS:  # policy "nan": the loss and its gradient are NaN
        xx = x.clone().requires_grad_()
        loss = rmi_ext.rmi_loss(xx, target * 1.5, nonfinite="nan", backend=backend)
        loss.backward()
        assert torch.isnan(loss) and torch.isnan(xx.grad).all(), backend
    with pytest.raises(ValueError, match=r"float target .*logits' shape \[1, 2, 10, 10\]"):
        rmi_ext.rmi_loss(x, target[:, :, :5])
    for float_ids in (labels.float(), labels[:, None].float()):
        with pytest.raises(TypeError, match=r"must be uint8, .* class ids of shape .*, got torch.float32"):
            rmi_ext.rmi_loss(x, float_ids)
    with pytest.raises(ValueError, match="mask is for float targets"):
        rmi_ext.rmi_loss(x, labels, mask=mask)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        rmi_ext.rmi_loss(x, target, mask=mask.float())
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        rmi_ext.rmi_loss(x, target, mask=mask[:, :5])
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        rmi_ext.rmi_loss(x, target, mask=[True])
    with pytest.raises(ValueError, match="detach it, or use rmi_ext.region_mi"):
        rmi_ext.rmi_loss(x, target.clone().requires_grad_())


def test_bad_region_mi_inputs():
    pred, target, mask = two_maps((1, 2, 10, 10))
    with pytest.raises(ValueError, match="pred and target must have one shape"):
        rmi_ext.region_mi(pred, target[:, :1])
    with pytest.raises(TypeError, match="target must be a float tensor"):
        rmi_ext.region_mi(pred, target.long())
    with pytest.raises(TypeError, match="pred must be a torch.Tensor"):
        rmi_ext.region_mi(pred.numpy(), target)
    with pytest.raises(ValueError, match="reduction must be one of"):
        rmi_ext.region_mi(pred, target, reduction="max")
    with pytest.raises(ValueError, match="smaller than the region"):
        rmi_ext.region_mi(pred, target, stride=5)
    bad = target.clone()
    bad[0, 0, 0, 0] = float("inf")
    for backend in REGION_BACKENDS:
        for a, b in ((pred, bad), (bad, target)):
            with pytest.raises(RuntimeError, match="region_mi: pred or target contain NaN or Inf"):
                rmi_ext.region_mi(a, b, stride=2, backend=backend)
            assert torch.isnan(rmi_ext.region_mi(a, b, stride=2, backend=backend,
                                                 nonfinite="nan"))

"""Public API: return dtypes, the module form, terms, backend selection, argument errors and
robustness on degenerate but finite inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rmi_ext
from conftest import fast_backends, make_inputs, rel_err

FAST = fast_backends()
ALL = FAST + ["reference"]


# ---- return types ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32),
                                             (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float64, torch.float64)])
def test_loss_dtype_and_shape(backend, dtype, out_dtype):
    x, labels = make_inputs((2, 3, 9, 9), 0, dtype=dtype)
    terms = rmi_ext.rmi_loss_terms(x, labels, radius=2, stride=2, backend=backend)
    for t in terms:
        assert t.dtype == out_dtype and t.shape == () and t.device == x.device
    loss = rmi_ext.rmi_loss(x, labels, radius=2, stride=2, backend=backend)
    assert loss.dtype == out_dtype and loss.dim() == 0
    loss.backward()
    assert x.grad.dtype == dtype and x.grad.shape == x.shape


@pytest.mark.parametrize("backend", ALL)
def test_no_grad_and_non_leaf(backend):
    x, labels = make_inputs((2, 3, 9, 9), 1, requires_grad=False)
    with torch.no_grad():
        loss = rmi_ext.rmi_loss(x, labels, radius=2, stride=2, backend=backend)
    assert not loss.requires_grad and torch.isfinite(loss)
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss2 = rmi_ext.rmi_loss(x * w, labels, radius=2, stride=2, backend=backend)
    loss2.backward()
    assert w.grad is not None and torch.isfinite(w.grad)


@pytest.mark.parametrize("backend", ALL)
def test_autocast_keeps_float64_stage(backend):
    """Under CPU autocast (bf16) the loss is float32 and equals the loss without autocast."""
    x, labels = make_inputs((2, 3, 9, 9), 2, dtype=torch.float32, requires_grad=False)
    plain = rmi_ext.rmi_loss(x, labels, radius=2, stride=2, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = x * 1.0
        auto = rmi_ext.rmi_loss(logits, labels, radius=2, stride=2, backend=backend)
    assert auto.dtype == torch.float32 and torch.isfinite(auto)
    assert rel_err(auto, plain) < 1e-6


# ---- module, terms -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_module_equals_function_and_records_terms(backend, mode):
    opts = dict(radius=2, stride=2, pool="max", weight_lambda=0.3, lambda_way=0, mode=mode)
    module = rmi_ext.RMILoss(backend=backend, **opts)
    assert module.last_terms is None
    assert "radius=2" in repr(module) and f"mode={mode!r}" in repr(module)
    x, labels = make_inputs((2, 3, 11, 9), 3, mode=mode)
    out = module(x, labels)
    expected = rmi_ext.rmi_loss(x, labels, backend=backend, **opts)
    assert torch.equal(out, expected)
    terms = module.last_terms
    assert isinstance(terms, rmi_ext.RMITerms)
    assert all(not t.requires_grad for t in terms)
    assert torch.equal(terms.loss, out.detach())
    full = rmi_ext.rmi_loss_terms(x, labels, backend=backend, **opts)
    assert torch.equal(terms.base, full.base.detach()) and torch.equal(terms.rmi, full.rmi.detach())
    out.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_module_validates_options_at_construction():
    with pytest.raises(ValueError, match="radius"):
        rmi_ext.RMILoss(radius=0)
    with pytest.raises(ValueError, match="pool"):
        rmi_ext.RMILoss(pool="median")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("lambda_way,lam", [(1, 0.5), (1, 0.2), (0, 0.5), (0, 0.9)])
def test_terms_combine_into_loss(backend, mode, lambda_way, lam):
    x, labels = make_inputs((2, 3, 9, 9), 4, mode=mode, requires_grad=False)
    opts = dict(radius=2, stride=2, weight_lambda=lam, lambda_way=lambda_way, mode=mode,
                backend=backend)
    loss, base, rmi = rmi_ext.rmi_loss_terms(x, labels, **opts)
    w_base, w_rmi = (lam, 1 - lam) if lambda_way == 1 else (1.0, lam)
    assert rel_err(loss, w_base * base + w_rmi * rmi) < 1e-15
    assert rel_err(rmi_ext.rmi_loss(x, labels, **opts), loss) < 1e-15


def test_rmi_term_may_be_negative():
    """The RMI lower-bound surrogate is negative for near-perfect predictions (expected)."""
    _, labels = make_inputs((2, 3, 9, 9), 5, invalid_labels=False, requires_grad=False)
    onehot = F.one_hot(labels.clamp(0, 2), 3).permute(0, 3, 1, 2).double()
    for backend in ALL:
        rmi = rmi_ext.rmi_loss_terms(6.0 * (2 * onehot - 1), labels, radius=2, stride=1,
                                     backend=backend).rmi
        assert rmi < 0


# ---- backend selection -------------------------------------------------------------------------


def test_backend_info_structure():
    info = rmi_ext.backend_info("cpu")
    features = ("volumes", "float_targets", "region_mi")
    assert set(info) == {"device", "auto", "available", *features,
                         *(f"auto_{feature}" for feature in features)}
    for feature in features:
        assert "reference" in info[feature] and set(info[feature]) <= set(info["available"])
        assert info[f"auto_{feature}"] in info[feature]
        assert info["available"][info[f"auto_{feature}"]] is True
    assert info["device"] == "cpu"
    assert set(info["available"]) == {"reference", "torch", "cpu", "cuda", "triton"}
    for name, value in info["available"].items():
        assert value is True or (isinstance(value, str) and value), name
    assert info["available"]["reference"] is True and info["available"]["torch"] is True
    assert isinstance(info["available"]["cuda"], str)  # CPU tensors never run on "cuda"
    assert info["auto"] in FAST and info["available"][info["auto"]] is True
    assert info["auto"] == rmi_ext.auto_backend("cpu")
    assert rmi_ext.backend_info(torch.device("cpu")) == info


def test_auto_uses_the_auto_backend():
    x, labels = make_inputs((2, 3, 9, 9), 6, requires_grad=False)
    auto = rmi_ext.backend_info("cpu")["auto"]
    a = rmi_ext.rmi_loss(x, labels, radius=2, stride=2)
    b = rmi_ext.rmi_loss(x, labels, radius=2, stride=2, backend=auto)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["cuda", "triton", "cpu"])
def test_unavailable_backend_raises_naming_it(name):
    reason = rmi_ext.backend_info("cpu")["available"][name]
    if reason is True:
        pytest.skip(f"backend {name!r} is available here")
    x, labels = make_inputs((1, 2, 9, 9), 7, requires_grad=False)
    with pytest.raises(RuntimeError, match=f"'{name}'"):
        rmi_ext.rmi_loss(x, labels, backend=name)


# ---- argument errors ---------------------------------------------------------------------------


BAD_OPTIONS = [
    (dict(radius=0), ValueError, "radius"),
    (dict(radius=11), ValueError, "radius"),
    (dict(radius=2.5), TypeError, "radius"),
    (dict(radius=True), TypeError, "radius"),
    (dict(stride=0), ValueError, "stride"),
    (dict(stride=2.0), TypeError, "stride"),
    (dict(pool_size=0), ValueError, "pool_size"),
    (dict(pool="median"), ValueError, "pool"),
    (dict(pool=None), TypeError, "pool"),
    (dict(mode="softmax2"), ValueError, "mode"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(weight_lambda=-0.1), ValueError, "weight_lambda"),
    (dict(weight_lambda=1.5), ValueError, "weight_lambda"),
    (dict(weight_lambda="0.5"), TypeError, "weight_lambda"),
    (dict(lambda_way=2), ValueError, "lambda_way"),
    (dict(ignore_index=255.0), TypeError, "ignore_index"),
]


@pytest.mark.parametrize("opts,exc,match", BAD_OPTIONS, ids=[str(o[0]) for o in BAD_OPTIONS])
def test_bad_options(opts, exc, match):
    x, labels = make_inputs((1, 2, 16, 16), 8, requires_grad=False)
    with pytest.raises(exc, match=match):
        rmi_ext.rmi_loss(x, labels, **opts)


def test_bad_tensors():
    x, labels = make_inputs((2, 3, 9, 9), 9, requires_grad=False)
    with pytest.raises(ValueError, match="logits"):
        rmi_ext.rmi_loss(x[0], labels, radius=2, stride=2)
    with pytest.raises(ValueError, match="logits"):
        rmi_ext.rmi_loss(x[None], labels, radius=2, stride=2)
    with pytest.raises(TypeError, match="logits"):
        rmi_ext.rmi_loss(x.long(), labels, radius=2, stride=2)
    with pytest.raises(TypeError, match="logits"):
        rmi_ext.rmi_loss(x.numpy(), labels, radius=2, stride=2)
    with pytest.raises(TypeError, match="labels"):
        rmi_ext.rmi_loss(x, labels.float(), radius=2, stride=2)
    with pytest.raises(TypeError, match="labels"):
        rmi_ext.rmi_loss(x, labels >= 0, radius=2, stride=2)
    with pytest.raises(TypeError, match=r"labels must be uint8, int8, int16, int32 or int64, "
                                        r"got torch.uint16"):
        rmi_ext.rmi_loss(x, labels.clamp(min=0).to(torch.uint16), radius=2, stride=2)
    with pytest.raises(ValueError, match="labels"):
        rmi_ext.rmi_loss(x, labels[:, :8], radius=2, stride=2)
    # a channel axis of 1 is accepted ([N, 1, H, W]); of 2, or on float labels, it is not
    with pytest.raises(ValueError, match=r"labels must have shape \[N, H, W\] = \[2, 9, 9\] "
                                         r"\(or \[2, 1, 9, 9\]\) .* got \[2, 2, 9, 9\]"):
        rmi_ext.rmi_loss(x, torch.stack([labels, labels], 1), radius=2, stride=2)
    with pytest.raises(TypeError, match="labels must be uint8"):
        rmi_ext.rmi_loss(x, labels[:, None].float(), radius=2, stride=2)
    with pytest.raises(ValueError, match="labels"):
        rmi_ext.rmi_loss(x, labels[0], radius=2, stride=2)
    with pytest.raises(ValueError, match="device"):
        rmi_ext.rmi_loss(x, labels.to("meta"), radius=2, stride=2)
    with pytest.raises(ValueError, match="N >= 1"):
        rmi_ext.rmi_loss(x[:0], labels[:0], radius=2, stride=2)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape,opts", [
    ((1, 2, 8, 8), dict(stride=4, radius=3, pool="interp")),  # pooled 2x2
    ((1, 2, 4, 4), dict(stride=4, radius=3, pool="avg")),  # pooled 2x2 (8x8 avg gives 3x3)
    ((1, 2, 7, 7), dict(stride=4, radius=3, pool="max")),  # pooled 2x2
    ((1, 2, 4, 9), dict(stride=1, radius=5)),
    ((1, 2, 3, 3), dict(stride=4, radius=1, pool="interp")),  # pooled 0x0
])
def test_pooled_map_smaller_than_region(backend, shape, opts):
    x, labels = make_inputs(shape, 10, requires_grad=False)
    with pytest.raises(ValueError, match="radius"):
        rmi_ext.rmi_loss(x, labels, backend=backend, **opts)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_non_finite_logits_raise(backend, value, dtype, mode):
    """Non-finite logits raise a RuntimeError naming NaN in both modes (fast backends; the
    reference, plain autograd code, fails inside its Cholesky instead)."""
    x, labels = make_inputs((2, 3, 9, 9), 11, dtype=dtype, requires_grad=False)
    labels[1, 4, 5] = 1
    x[1, 2, 4, 5] = value
    with pytest.raises(RuntimeError, match="NaN"):
        rmi_ext.rmi_loss(x, labels, radius=2, stride=2, mode=mode, backend=backend)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_non_finite_logits_poison_loss_and_gradient(backend, value, mode):
    """nonfinite="nan" (what "auto" does on CUDA): no error, no host sync; the loss and the
    gradient are NaN, so AMP's GradScaler skips the step. Finite logits are unaffected."""
    x, labels = make_inputs((2, 3, 9, 9), 11, dtype=torch.float32, requires_grad=False)
    clean = x.clone().requires_grad_()
    x[1, 2, 4, 5] = value
    x.requires_grad_()
    for logits, poisoned in ((x, True), (clean, False)):
        terms = rmi_ext.rmi_loss_terms(logits, labels, radius=2, stride=2, mode=mode,
                                       nonfinite="nan", backend=backend)
        (2.0 * terms.loss).backward()
        for t in (terms.loss, terms.base, terms.rmi):
            assert bool(torch.isnan(t)) is poisoned, (t, poisoned)
        assert bool(torch.isnan(logits.grad).any()) is poisoned
        assert bool(torch.isfinite(logits.grad).all()) is not poisoned
    with pytest.raises(RuntimeError, match="NaN or Inf"):  # the strict mode on any device
        rmi_ext.rmi_loss(x, labels, radius=2, stride=2, nonfinite="raise", backend=backend)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        rmi_ext.rmi_loss(x, labels, nonfinite="ignore", backend=backend)


@pytest.mark.parametrize("backend", FAST)
def test_no_host_sync_in_forward_backward(backend):
    """The profile of a forward+backward (policy "nan", as on CUDA) has no op that reads a
    device value on the host: no linalg error check, .item() or nonzero."""
    from torch.profiler import ProfilerActivity, profile

    x, labels = make_inputs((2, 3, 17, 15), 12, dtype=torch.float32)
    run = lambda: rmi_ext.rmi_loss(x, labels, radius=3, stride=2, nonfinite="nan",  # noqa: E731
                                   backend=backend).backward()
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    names = {e.name for e in prof.events()}
    assert "aten::mul" in names or "aten::add" in names, sorted(names)[:20]  # the profile works
    syncs = names & {"aten::_linalg_check_errors", "aten::item", "aten::_local_scalar_dense",
                     "aten::nonzero"}
    assert not syncs, syncs


# ---- robustness: degenerate but finite inputs --------------------------------------------------


def _degenerate(mode):
    x, labels = make_inputs((2, 3, 13, 11), 12, mode=mode, requires_grad=False)
    perfect = 2.0 * F.one_hot(labels.clamp(0, 2), 3).permute(0, 3, 1, 2).double() - 1.0
    return {
        "all ignored": (x, torch.full_like(labels, 255)),
        "single class": (x, torch.full_like(labels, 1)),
        "single class + ignored": (x, torch.where(labels == 255, labels, 2)),
        "constant logits": (torch.full_like(x, 0.3), labels),
        "zero logits": (torch.zeros_like(x), labels),
        "huge logits +-1e4": (1e4 * torch.sign(x), labels),
        "huge logits +1e4": (torch.full_like(x, 1e4), labels),
        "huge logits -1e4": (torch.full_like(x, -1e4), labels),
        "perfect 1e4": (1e4 * perfect, labels),
    }


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("opts", [dict(stride=2, radius=3), dict(stride=1, radius=2),
                                  dict(stride=4, radius=2, pool="max"),
                                  dict(stride=3, radius=2, pool="interp")], ids=str)
def test_degenerate_inputs_finite(backend, mode, dtype, opts):
    """Loss and gradient are finite (the reference too: all these cases are finite there)."""
    for name, (x, labels) in _degenerate(mode).items():
        xx = x.to(dtype).requires_grad_(True)
        loss = rmi_ext.rmi_loss(xx, labels, backend=backend, mode=mode, **opts)
        loss.backward()
        assert torch.isfinite(loss), (name, opts)
        assert torch.isfinite(xx.grad).all(), (name, opts)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_degenerate_inputs_match_reference(backend, mode):
    for name, (x, labels) in _degenerate(mode).items():
        opts = dict(stride=2, radius=3, mode=mode)
        losses, grads = [], []
        for b in (backend, "reference"):
            xx = x.clone().requires_grad_(True)
            loss = rmi_ext.rmi_loss(xx, labels, backend=b, **opts)
            loss.backward()
            losses.append(loss.detach())
            grads.append(xx.grad)
        assert rel_err(losses[0], losses[1]) < 1e-10, name
        assert rel_err(grads[0], grads[1]) < 1e-9, name


def test_all_ignored_values():
    """All pixels ignored: BCE 0 (0 / (0 + 1)), CE 0 (the authors' mean would be 0/0 = NaN)."""
    x, labels = make_inputs((2, 3, 9, 9), 13, requires_grad=False)
    labels = torch.full_like(labels, 255)
    for backend in ALL:
        for mode in ("sigmoid", "softmax"):
            t = rmi_ext.rmi_loss_terms(x, labels, radius=2, stride=2, mode=mode, backend=backend)
            assert t.base.item() == 0.0 and torch.isfinite(t.rmi)


def test_auto_skips_a_backend_whose_probe_fails(monkeypatch):
    """A backend that imports but cannot run here (its probe fails: e.g. Triton without a C
    compiler for its launcher) is skipped by "auto" with one warning naming the cause, shown in
    backend_info, and raises when named."""
    from rmi_ext import _dispatch, cpu_backend

    if rmi_ext.backend_info("cpu")["available"]["cpu"] is not True:
        pytest.skip("the C++ extension is not built")
    monkeypatch.setattr(cpu_backend, "probe", lambda device: "launcher cannot be built (test)",
                        raising=False)
    monkeypatch.delitem(_dispatch.LOADED, "cpu", raising=False)
    _dispatch._probe.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="skips 'cpu' on cpu: launcher cannot be built"):
            assert rmi_ext.auto_backend("cpu") == "torch"
        info = rmi_ext.backend_info("cpu")
        assert info["auto"] == "torch"
        assert info["available"]["cpu"] == "launcher cannot be built (test)"
        x, labels = make_inputs((1, 2, 9, 9), 3)
        with pytest.raises(RuntimeError, match="'cpu' cannot run on cpu: launcher cannot be"):
            rmi_ext.rmi_loss(x, labels, radius=2, stride=2, backend="cpu")
    finally:
        monkeypatch.undo()
        _dispatch._probe.cache_clear()
    assert rmi_ext.auto_backend("cpu") == "cpu"

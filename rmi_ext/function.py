"""The RMI loss as one ``torch.autograd.Function`` with a hand-written backward.

Every backend provides the same two entry points (see ``rmi_ext.torch_backend`` for the plain
torch version, ``rmi_ext.cpu_backend`` for the C++ one):

``forward_stats(logits, labels, cfg) -> (base_sum, base_count, nonfinite, means, cov)``
    stages (a)+(b): ``base_sum``/``base_count`` 0-d float64 sums of the first term (BCE or CE)
    and of the pixels it counts, ``nonfinite`` 0-d count of non-finite logits,
    ``means [N, C, 2, d]`` (``mu_y, mu_p``) and centred ``cov [N, C, 3, d, d]`` (``Sy, Sp, B``),
    float64.
``backward_grad(logits, labels, cfg, base_scale, coef, shift) -> grad_logits``
    stages (d)+(e): ``base_scale`` 0-d float64 (``grad_base / normaliser``), ``coef
    [N, C, 2, d, d]`` and ``shift [N, C, d]`` from :func:`rmi_ext.linalg.stencil_coefficients`.

Stage (c), the float64 tiny-matrix stage, is shared (:mod:`rmi_ext.linalg`).
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from . import linalg
from ._config import LABEL_DTYPES, MAX_RADIUS, RMIConfig
from ._dispatch import LOADED
from .targets import FLOAT_DTYPES, FloatTarget, as_target


def empty_stats(logits: torch.Tensor, dim: int):
    """Uninitialised outputs of ``forward_stats`` for regions of ``dim`` entries (shapes and
    dtypes: the ops' fake kernels)."""
    n, c = logits.shape[:2]
    f64 = dict(dtype=torch.float64, device=logits.device)
    return (logits.new_empty((), **f64), logits.new_empty((), **f64),
            logits.new_empty((), dtype=torch.int64, device=logits.device),
            logits.new_empty((n, c, 2, dim), **f64), logits.new_empty((n, c, 3, dim, dim), **f64))


def _check_op_inputs(logits, labels, radius, mask=None) -> int:
    """The checks of csrc/rmi_ops.h, for the fake kernels (``torch._check``: symbolic shapes);
    returns ``d``. ``radius``: one side per spatial axis; ``labels`` a label map, or a float
    target of the logits' shape with an optional ``mask``."""
    torch._check(logits.dim() in (4, 5),
                 lambda: f"logits must be [N, C, H, W] or [N, C, D, H, W], got {logits.shape}")
    torch._check(logits.dtype in FLOAT_DTYPES,
                 lambda: f"logits must be a float tensor, got {logits.dtype}")
    float_target = labels.dtype in FLOAT_DTYPES and labels.dim() == logits.dim()
    if float_target:  # its label-map axes are checked below
        torch._check(labels.shape[1] == logits.shape[1],
                     lambda: f"a float target must have the logits' shape, got {labels.shape}")
        labels = labels[:, 0]
    torch._check(mask is None or (float_target and mask.dtype == torch.bool
                                  and mask.shape == labels.shape),
                 lambda: f"mask must be a bool [N, *spatial] tensor beside a float target")
    torch._check(float_target or labels.dtype in LABEL_DTYPES,
                 lambda: f"labels must be uint8, int8, int16, int32 or int64, got {labels.dtype}")
    torch._check(labels.dim() == logits.dim() - 1,
                 lambda: f"labels must be [N, *spatial], got {labels.shape}")
    for i, j in ((0, 0), *((k, k + 1) for k in range(1, logits.dim() - 1))):
        torch._check(labels.shape[i] == logits.shape[j],
                     lambda: f"labels {labels.shape} do not match logits {logits.shape}")
    sides = list(radius)
    torch._check(len(sides) == logits.dim() - 2,
                 lambda: f"radius {radius} must have one side per spatial axis")
    for side in sides:
        torch._check(1 <= side <= MAX_RADIUS,
                     lambda: f"radius must be in [1, {MAX_RADIUS}], got {radius}")
    return math.prod(sides)


def op_sides(logits, cfg: RMIConfig) -> tuple[list[int], list[int], list[int]]:
    """``radius, stride, pool_size`` as every backend's ops take them: one side per spatial
    axis of ``logits``."""
    cfg = cfg.for_rank(logits.dim() - 2)
    return list(cfg.radii), list(cfg.strides), list(cfg.pool_sizes)


def fake_forward_stats(logits, labels, radius, stride, pool, pool_size, ignore_index, mode,
                       mask=None):
    """Fake (meta) kernel of every ``forward_stats`` op: checks, then :func:`empty_stats`."""
    return empty_stats(logits, _check_op_inputs(logits, labels, radius, mask))


def fake_backward_grad(logits, labels, base_scale, coef, shift, radius, stride, pool, pool_size,
                       ignore_index, mode, mask=None):
    """Fake (meta) kernel of every ``backward_grad`` op: checks, then ``empty_like(logits)``."""
    d = _check_op_inputs(logits, labels, radius, mask)
    n, c = logits.shape[0], logits.shape[1]
    for name, t, shape in (("base_scale", base_scale, ()), ("coef", coef, (n, c, 2, d, d)),
                           ("shift", shift, (n, c, d))):
        torch._check(t.dtype == torch.float64, lambda: f"{name} must be float64, got {t.dtype}")
        torch._check(t.dim() == len(shape), lambda: f"{name} must have shape {shape}")
        for size, want in zip(t.shape, shape):
            torch._check(size == want, lambda: f"{name} must have shape {shape}, got {t.shape}")
    return torch.empty_like(logits)


def base_normaliser(base_count: torch.Tensor, cfg: RMIConfig) -> torch.Tensor:
    """BCE divides by ``valid + 1`` (authors' code); CE by the counted pixels, at least 1."""
    return base_count + 1.0 if cfg.mode == "sigmoid" else base_count.clamp_min(1.0)


NONFINITE_MESSAGE = "rmi_loss: logits contain NaN or Inf values"


def nonfinite_poison(nonfinite: torch.Tensor, cfg: RMIConfig,
                     message: str = NONFINITE_MESSAGE) -> torch.Tensor:
    """0-d float64: 0, or NaN when the logits had NaN/Inf values and the policy is not to raise.

    Raising (``cfg.raises_on_nonfinite``): on CPU ``torch._assert_async`` raises at once (no
    device, no sync; it stays traceable by torch.compile); on CUDA it would be a device-side
    assert that kills the context, so the strict mode reads the count with a host sync.
    """
    if cfg.raises_on_nonfinite(nonfinite.device):
        if nonfinite.device.type == "cpu":
            torch._assert_async(nonfinite == 0, message)
        elif bool(nonfinite):  # opt-in strict mode on a GPU: one host sync
            raise RuntimeError(message)
    return torch.where(nonfinite > 0, float("nan"), 0.0).to(torch.float64)


class RMIFunction(torch.autograd.Function):
    """``(logits, labels, mask) -> (base_term, rmi_term)``, two 0-d float64 tensors; ``labels``
    an integer map (``mask`` None) or a float target with its ``mask`` (the backends get them
    as a :class:`rmi_ext.targets.FloatTarget`), which takes no gradient."""

    @staticmethod
    def forward(ctx, logits, labels, mask, cfg: RMIConfig, backend: str):
        target = as_target(labels, mask)
        base_sum, base_count, nonfinite, means, cov = LOADED[backend].forward_stats(
            logits, target, cfg)
        if isinstance(target, FloatTarget) and not cfg.raises_on_nonfinite(logits.device):
            nonfinite = nonfinite + target.out_of_range()  # else rmi_loss_terms raised
        poison = nonfinite_poison(nonfinite, cfg)
        norm = base_normaliser(base_count, cfg)
        rmi_nc, (a, chol) = linalg.rmi_from_moments(cov)
        rmi_term = rmi_nc.mean(dim=0).sum() / cfg.dim
        ctx.cfg, ctx.backend = cfg, backend
        ctx.save_for_backward(logits, labels, mask, norm, means, cov, a, chol, poison)
        return base_sum / norm + poison, rmi_term + poison

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx, grad_base, grad_rmi):
        logits, labels, mask, norm, means, cov, a, chol, poison = ctx.saved_tensors
        cfg = ctx.cfg
        grad_base = torch.zeros_like(norm) if grad_base is None else grad_base.double()
        grad_rmi = torch.zeros_like(norm) if grad_rmi is None else grad_rmi.double()
        scale = grad_rmi / (logits.shape[0] * cfg.dim)
        coef, shift = linalg.stencil_coefficients(cov, means, a, chol, scale)
        # NaN logits (policy "nan"): NaN coefficients make every gradient element NaN.
        coef, base_scale = coef + poison, grad_base / norm + poison
        grad = LOADED[ctx.backend].backward_grad(logits, as_target(labels, mask), cfg, base_scale,
                                                 coef, shift)
        return grad, None, None, None, None


REGION_NONFINITE_MESSAGE = "region_mi: pred or target contain NaN or Inf values"


class RegionMIFunction(torch.autograd.Function):
    """``(pred, target, mask) -> rmi [N, C]`` float64 (:func:`rmi_ext.region_mi`, ``cfg.mode
    == "region"``), with the hand-written backward to both maps: stages (d)+(e) of the backend
    for ``pred``, :func:`target_grad` for ``target`` (only when it requires grad)."""

    @staticmethod
    def forward(ctx, pred, target, mask, cfg: RMIConfig, backend: str):
        _, _, nonfinite, means, cov = LOADED[backend].forward_stats(
            pred, FloatTarget(target, mask), cfg)
        # The backends count the non-finite values of pred; the target's: one aminmax pass.
        nonfinite = nonfinite + (~torch.isfinite(torch.stack(torch.aminmax(target)))).any()
        poison = nonfinite_poison(nonfinite, cfg, REGION_NONFINITE_MESSAGE)
        rmi_nc, (a, chol) = linalg.rmi_from_moments(cov)
        ctx.cfg, ctx.backend = cfg, backend
        ctx.save_for_backward(pred, target, mask, means, cov, a, chol, poison)
        return rmi_nc + poison

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rmi):
        pred, target, mask, means, cov, a, chol, poison = ctx.saved_tensors
        backend, both = LOADED[ctx.backend], FloatTarget(target, mask)
        scale = grad_rmi.double()
        grad_pred = grad_target = None
        if ctx.needs_input_grad[0]:
            coef, shift = linalg.stencil_coefficients(cov, means, a, chol, scale)
            grad_pred = backend.backward_grad(pred, both, ctx.cfg, torch.zeros_like(poison),
                                              coef + poison, shift)
        if ctx.needs_input_grad[1]:
            coef, shift = linalg.target_stencil_coefficients(cov, means, a, chol, scale)
            grad_target = backend.target_grad(pred, both, ctx.cfg, coef + poison, shift)
        return grad_pred, grad_target, None, None, None

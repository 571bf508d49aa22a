"""Backend ``"torch"``: the five fused-plan stages written with plain torch ops.

Never builds the ``[N, C, R*R, K]`` region tensor: moments and the backward stencil loop over
offset pairs on shifted slices of the pooled maps. Stage names match the other backends:

(a) :func:`first_term_sums`, :func:`pooled_maps` (both: :func:`prepare_maps`)
(b) :func:`moment_sums`  (c) :mod:`rmi_ext.linalg`  (d) :func:`pooled_grad_stencil`
(e) :func:`full_res_grad`, :func:`base_grad`

:func:`forward_stats` and :func:`backward_grad` run them on chunks of (n, c) planes
(:data:`CHUNK_ELEMENTS`), so the extra memory stays near the gradient's own size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._config import CLIP_MIN, RMIConfig


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 for float64 logits, float32 for everything else."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _label_maps(labels: torch.Tensor, num_classes: int, ignore_index: int):
    labels = labels.long()
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    return labels, valid


def _onehot(labels, valid, num_classes, dtype, first=0):
    """``Y [N, num_classes, H, W]`` for classes ``first .. first + num_classes - 1``."""
    classes = torch.arange(first, first + num_classes, device=labels.device).view(1, -1, 1, 1)
    return ((labels.unsqueeze(1) == classes) & valid.unsqueeze(1)).to(dtype)


def _probs(x: torch.Tensor, valid: torch.Tensor, cfg: RMIConfig):
    """``P`` at full resolution and ``dP/dx`` (sigmoid mode: ``+1e-6``; softmax: clamp)."""
    sig = torch.sigmoid(x)
    m = valid.unsqueeze(1).to(x.dtype)
    pm = sig * m
    dpdx = pm * (1.0 - sig)
    if cfg.mode == "sigmoid":
        return pm + CLIP_MIN, dpdx
    inside = (pm >= CLIP_MIN) & (pm <= 1.0)
    return pm.clamp(CLIP_MIN, 1.0), dpdx * inside


def _pool(t: torch.Tensor, cfg: RMIConfig, *, nearest: bool) -> torch.Tensor:
    s, k = cfg.stride, cfg.pool_size
    if s == 1:
        return t
    if cfg.pool == "avg":
        return F.avg_pool2d(t, k, s, k // 2)
    if cfg.pool == "max":
        return F.max_pool2d(t, k, s, k // 2)
    size = (t.shape[2] // s, t.shape[3] // s)
    if nearest:
        return F.interpolate(t, size=size, mode="nearest")
    return F.interpolate(t, size=size, mode="bilinear", align_corners=True)


def _pool_adjoint(grad: torch.Tensor, p_full: torch.Tensor, cfg: RMIConfig) -> torch.Tensor:
    """Adjoint of the downsampling of ``P``: pooled-size ``grad`` -> full-size gradient."""
    s, k = cfg.stride, cfg.pool_size
    if s == 1:
        return grad
    if cfg.pool == "avg":
        return torch.ops.aten.avg_pool2d_backward(grad, p_full, [k, k], [s, s], [k // 2, k // 2],
                                                  False, True, None)
    if cfg.pool == "max":
        _, idx = F.max_pool2d(p_full, k, s, k // 2, return_indices=True)
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad, p_full, [k, k], [s, s], [k // 2, k // 2], [1, 1], False, idx)
    return torch.ops.aten.upsample_bilinear2d_backward(
        grad, list(grad.shape[2:]), list(p_full.shape), True, None, None)


def _base_loss(x, labels, valid, cfg: RMIConfig):
    """First-term loss summed over pixels (BCE summed over classes, or CE) and its pixel count.

    CE counts the pixels whose label is in [0, C) and not ignore_index (the authors'
    F.cross_entropy raises on any other label; the fused kernels cannot check without a sync).
    """
    if cfg.mode == "sigmoid":
        y = _onehot(labels, valid, x.shape[1], x.dtype)
        m = valid.unsqueeze(1).to(x.dtype)
        return (F.binary_cross_entropy_with_logits(x, y, reduction="none") * m).sum(), valid.sum()
    target = torch.where(valid, labels, 0)
    nll = -torch.log_softmax(x, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    return (nll * valid).sum(), valid.sum()


def _base_loss_grad(x, labels, valid, cfg: RMIConfig):
    """Per-pixel gradient of the summed first-term loss of :func:`_base_loss`."""
    if cfg.mode == "sigmoid":
        y = _onehot(labels, valid, x.shape[1], x.dtype)
        return (torch.sigmoid(x) - y) * valid.unsqueeze(1).to(x.dtype)
    target = torch.where(valid, labels, 0)
    grad = torch.softmax(x, dim=1) - _onehot(target, valid, x.shape[1], x.dtype)
    return grad * valid.unsqueeze(1)


#: Full-resolution elements handled at once, by device type: the stages run on chunks of
#: (n, c) planes so that temporaries stay small at every DF, DF 1 included. A GPU gets chunks of
#: many images (a few hundred launches a step, not one chunk per plane); a CPU, cache-sized ones.
CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 25}
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def plane_chunks(shape, device_type: str):
    """``(n0, n1, c0, c1)`` blocks of ``logits [N, C, H, W]`` of at most about the device's
    ``CHUNK_ELEMENTS``: whole images (all classes) when one fits, else class ranges of one."""
    n, c, h, w = shape
    budget = CHUNK_ELEMENTS.get(device_type, DEFAULT_CHUNK_ELEMENTS)
    if c * h * w <= budget:
        per = budget // (c * h * w)
        return [(n0, min(n, n0 + per), 0, c) for n0 in range(0, n, per)]
    per = max(1, budget // (h * w))
    return [(i, i + 1, c0, min(c, c0 + per)) for i in range(n) for c0 in range(0, c, per)]


def first_term_sums(logits: torch.Tensor, labels: torch.Tensor, cfg: RMIConfig):
    """Stage (a), first term: ``base_sum``, ``base_count`` (0-d float64) and ``nonfinite``
    (0-d int64, number of non-finite logits), a few images at a time (:func:`plane_chunks`)."""
    base_sum = logits.new_zeros((), dtype=torch.float64)
    base_count = logits.new_zeros((), dtype=torch.float64)
    nonfinite = logits.new_zeros((), dtype=torch.int64)
    images = sorted({(n0, n1) for n0, n1, _, _ in plane_chunks(logits.shape, logits.device.type)})
    for n0, n1 in images:
        x = logits[n0:n1].to(compute_dtype(logits))
        lab, valid = _label_maps(labels[n0:n1], x.shape[1], cfg.ignore_index)
        loss, count = _base_loss(x, lab, valid, cfg)
        base_sum += loss.double()
        base_count += count.double()
        nonfinite += (~torch.isfinite(x)).sum()
    return base_sum, base_count, nonfinite


def _full_res_maps(logits: torch.Tensor, labels: torch.Tensor, cfg: RMIConfig, first: int,
                   num_classes: int | None):
    """``Y``, ``P`` and ``dP/dx [N, c, H, W]`` (compute dtype) of ``logits [N, c, H, W]``, the
    planes of classes ``first .. first + c - 1`` out of ``num_classes`` (default ``c``)."""
    x = logits.to(compute_dtype(logits))
    num_classes = x.shape[1] if num_classes is None else num_classes
    labels, valid = _label_maps(labels, num_classes, cfg.ignore_index)
    p, dpdx = _probs(x, valid, cfg)
    return _onehot(labels, valid, x.shape[1], x.dtype, first), p, dpdx


def _pool_maps(y: torch.Tensor, p: torch.Tensor, cfg: RMIConfig):
    return _pool(y, cfg, nearest=True), _pool(p, cfg, nearest=False)


def pooled_maps(logits: torch.Tensor, labels: torch.Tensor, cfg: RMIConfig, first: int = 0,
                num_classes: int | None = None):
    """Stage (a), RMI part: pooled ``Y, P [N, c, h, w]`` (compute dtype) of ``logits [N, c, H, W]``,
    the planes of classes ``first .. first + c - 1`` out of ``num_classes``."""
    y, p, _ = _full_res_maps(logits, labels, cfg, first, num_classes)
    return _pool_maps(y, p, cfg)


def prepare_maps(logits: torch.Tensor, labels: torch.Tensor, cfg: RMIConfig):
    """Stage (a) on whole tensors: ``(base_sum, base_count, nonfinite, Y, P)`` (for stage tests)."""
    return (*first_term_sums(logits, labels, cfg), *pooled_maps(logits, labels, cfg))


def _shifted(t: torch.Tensor, radius: int):
    """The ``R*R`` shifted window views of ``t [..., h, w]``, offset ``i = dy*R + dx``."""
    nh, nw = t.shape[-2] - radius + 1, t.shape[-1] - radius + 1
    return [t[..., dy:dy + nh, dx:dx + nw] for dy in range(radius) for dx in range(radius)]


def moment_sums(y: torch.Tensor, p: torch.Tensor, radius: int):
    """Stage (b): pooled ``Y, P [N, C, h, w]`` -> ``means [N, C, 2, d]``, ``cov [N, C, 3, d, d]``.

    ``cov`` holds the centred ``Sy, Sp, B`` in float64. Each map is first shifted by its own
    plane mean (covariances do not change) so the raw-sum form loses no precision.
    """
    y, p = y.double(), p.double()
    y_off = y.mean(dim=(2, 3), keepdim=True)
    p_off = p.mean(dim=(2, 3), keepdim=True)
    ys, ps = _shifted(y - y_off, radius), _shifted(p - p_off, radius)
    d = radius * radius
    k = ys[0].shape[-1] * ys[0].shape[-2]
    mu_y = torch.stack([t.sum(dim=(2, 3)) for t in ys], dim=-1) / k
    mu_p = torch.stack([t.sum(dim=(2, 3)) for t in ps], dim=-1) / k
    n, c = y.shape[:2]
    cov = y.new_empty(n, c, 3, d, d)
    for i in range(d):
        for j in range(d):
            cov[:, :, 2, i, j] = (ys[i] * ps[j]).sum(dim=(2, 3))
            if j >= i:
                cov[:, :, 0, i, j] = cov[:, :, 0, j, i] = (ys[i] * ys[j]).sum(dim=(2, 3))
                cov[:, :, 1, i, j] = cov[:, :, 1, j, i] = (ps[i] * ps[j]).sum(dim=(2, 3))
    outer = lambda u, v: u.unsqueeze(-1) * v.unsqueeze(-2)
    cov -= k * torch.stack((outer(mu_y, mu_y), outer(mu_p, mu_p), outer(mu_y, mu_p)), dim=2)
    means = torch.stack((mu_y + y_off.view(n, c, 1), mu_p + p_off.view(n, c, 1)), dim=2)
    return means, cov


def pooled_grad_stencil(y, p, coef, shift, radius: int) -> torch.Tensor:
    """Stage (d): ``dloss/dP`` on the pooled map ``[N, C, h, w]`` (float64).

    Window ``k`` gets ``g_k = Cp p_k + Cy y_k + c``; entry ``i`` of ``g_k`` lands on pixel
    ``k + o_i``. ``coef [N, C, 2, d, d]``, ``shift [N, C, d]`` from :mod:`rmi_ext.linalg`.
    """
    y, p = y.double(), p.double()
    ys, ps = _shifted(y, radius), _shifted(p, radius)
    grad = torch.zeros_like(p)
    grads = _shifted(grad, radius)
    d = radius * radius
    for i in range(d):
        g_i = shift[:, :, i, None, None].expand_as(ps[0]).clone()
        for j in range(d):
            g_i += coef[:, :, 0, i, j, None, None] * ps[j] + coef[:, :, 1, i, j, None, None] * ys[j]
        grads[i] += g_i
    return grad


def full_res_grad(grad_pooled, p_full, dpdx, cfg: RMIConfig) -> torch.Tensor:
    """Stage (e), RMI part: pooling adjoint of ``grad_pooled [N, c, h, w]`` times ``dP/dx``
    (``P`` and ``dP/dx`` at full resolution, compute dtype)."""
    return _pool_adjoint(grad_pooled.to(p_full.dtype), p_full, cfg) * dpdx


def base_grad(logits, labels, cfg: RMIConfig, base_scale) -> torch.Tensor:
    """Stage (e), first term: ``base_scale`` times the BCE/CE gradient (compute dtype)."""
    x = logits.to(compute_dtype(logits))
    labels, valid = _label_maps(labels, x.shape[1], cfg.ignore_index)
    return base_scale.to(x.dtype) * _base_loss_grad(x, labels, valid, cfg)


# ---- the backend interface used by rmi_ext.function ---------------------------------------------

def forward_stats(logits, labels, cfg: RMIConfig):
    """Stages (a)+(b): ``(base_sum, base_count, nonfinite, means, cov)``, see :mod:`rmi_ext.function`."""
    n, c = logits.shape[:2]
    d = cfg.dim
    base_sum, base_count, nonfinite = first_term_sums(logits, labels, cfg)
    means = logits.new_empty((n, c, 2, d), dtype=torch.float64)
    cov = logits.new_empty((n, c, 3, d, d), dtype=torch.float64)
    for n0, n1, c0, c1 in plane_chunks(logits.shape, logits.device.type):
        y, p = pooled_maps(logits[n0:n1, c0:c1], labels[n0:n1], cfg, c0, c)
        means[n0:n1, c0:c1], cov[n0:n1, c0:c1] = moment_sums(y, p, cfg.radius)
    return base_sum, base_count, nonfinite, means, cov


def backward_grad(logits, labels, cfg: RMIConfig, base_scale, coef, shift):
    """Stages (d)+(e): ``grad_logits`` (recomputes the pooled maps rather than storing them),
    a few images at a time, summed in the compute dtype and cast to the logits' dtype once."""
    c = logits.shape[1]
    grad = torch.empty_like(logits)
    chunks = plane_chunks(logits.shape, logits.device.type)
    for n0, n1 in sorted({(n0, n1) for n0, n1, _, _ in chunks}):
        lab = labels[n0:n1]
        grad_i = base_grad(logits[n0:n1], lab, cfg, base_scale)
        for c0, c1 in [(c0, c1) for m0, _, c0, c1 in chunks if m0 == n0]:
            y, p, dpdx = _full_res_maps(logits[n0:n1, c0:c1], lab, cfg, c0, c)
            grad_pooled = pooled_grad_stencil(*_pool_maps(y, p, cfg), coef[n0:n1, c0:c1],
                                              shift[n0:n1, c0:c1], cfg.radius)
            grad_i[:, c0:c1] += full_res_grad(grad_pooled, p, dpdx, cfg)
        grad[n0:n1] = grad_i
    return grad

"""Backend ``"torch"``: the five fused-plan stages written with plain torch ops.

Maps are 2-D ``[N, C, H, W]`` or 3-D ``[N, C, D, H, W]`` (RMI_SPEC.md section 5), with per-axis
radius, stride and pool size (``cfg.for_rank``: ``radii``, ``strides``, ``pool_sizes``). Never
builds the ``[N, C, d, K]`` region tensor: moments and the backward stencil loop over offset
pairs on shifted slices of the pooled maps (offsets in row-major order, as
:func:`rmi_ext.reference.region_vectors`). Stage names match the other backends:

(a) :func:`first_term_sums`, :func:`pooled_maps` (both: :func:`prepare_maps`)
(b) :func:`moment_sums`  (c) :mod:`rmi_ext.linalg`  (d) :func:`pooled_grad_stencil`
(e) :func:`full_res_grad`, :func:`base_grad`

:func:`forward_stats` and :func:`backward_grad` run them on :func:`row_blocks`: row ranges of a
few images (all classes), sized so that the temporaries stay near ``logits_bytes / 8``; a
"row" is an index along the first spatial axis (``D`` for volumes, ``H`` for 2-D maps), the
inner axes are always whole. At stride > 1 (avg / max pool) stages (b) and (d) run once per
:func:`plane_groups` group of whole planes (pooled maps built from row blocks; the
full-resolution stage (e) reads the group's pooled gradient, row block by row block);
otherwise (and when one plane's pooled maps do not fit) a block of pooled rows recomputes its
halo (the ``R - 1`` rows a region reaches past it, ``R`` the first radius side, and the rows a
pooling window reaches past those); the avg / max pooling of a row slice pads its rows
explicitly (zeros, which both pools treat as the full map's padding: ``P, Y >= 0``) so that it
pools like the whole map. ``pool="interp"`` (bilinear / trilinear, ``align_corners=True``) is
not split into rows: its blocks are whole planes, class ranges of one image when an image is
too big.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from ._config import CLIP_MIN, RMIConfig
from .reference import POOL_OPS, RESIZE_MODES
from .targets import FloatTarget

#: Volumes, per-axis options, float targets and region_mi run here
#: (:func:`rmi_ext.loss._backend_for`).
supports_volumes = True
supports_float_targets = True
supports_region_mi = True

_POOL_BACKWARD = {("avg", 2): torch.ops.aten.avg_pool2d_backward,
                  ("avg", 3): torch.ops.aten.avg_pool3d_backward,
                  ("max", 2): torch.ops.aten.max_pool2d_with_indices_backward,
                  ("max", 3): torch.ops.aten.max_pool3d_with_indices_backward}
_RESIZE_BACKWARD = {2: torch.ops.aten.upsample_bilinear2d_backward,
                    3: torch.ops.aten.upsample_trilinear3d_backward}
_NEAREST_BACKWARD = {2: torch.ops.aten.upsample_nearest2d_backward,
                     3: torch.ops.aten.upsample_nearest3d_backward}


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 for float64 logits, float32 for everything else."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _resolved(cfg: RMIConfig, rank: int) -> RMIConfig:
    """``cfg`` with ``radii``, ``strides``, ``pool_sizes`` tuples of ``rank`` sides."""
    if all(t is not None and len(t) == rank for t in (cfg.radii, cfg.strides, cfg.pool_sizes)):
        return cfg
    return cfg.for_rank(rank)


def _spatial(t: torch.Tensor, rank: int) -> torch.Tensor:
    """``t [N, C, ...]`` with ``rank`` trailing unit axes (broadcasts over the spatial axes)."""
    return t[(..., *(None,) * rank)]


# ---- block sizes ---------------------------------------------------------------------------------

#: A block's temporaries may take ``logits_bytes // BLOCK_BYTES_DIVISOR`` bytes (forward +
#: backward then stay within 1.25x the logits, the gradient included), at least
#: ``BLOCK_BYTES_FLOOR`` and at most the device's cap: a GPU gets large blocks (few launches),
#: a CPU cache-sized ones. Under 2 MiB of logits the floor sets the block (4096 float32
#: elements: small inputs run in one block), as dozens of tiny blocks would cost more Python and
#: graph ops (``torch.compile``) than the math, for a few hundred KiB of temporaries.
BLOCK_BYTES_DIVISOR = 8
BLOCK_BYTES_FLOOR = 1 << 18
BLOCK_BYTES_CAP = {"cpu": 1 << 23, "cuda": 1 << 31}
DEFAULT_BLOCK_BYTES_CAP = 1 << 27
#: Live temporaries per full-resolution element of a block, in compute-dtype elements (measured
#: peak of :func:`backward_grad` at stride 1, where the pooled maps are full-size).
TEMPS_PER_ELEMENT = 16
#: Float64 temporaries per pooled element of a group of planes: about 5 live in stages (b), (d)
#: (the pooled maps, their offset float64 copies, one product; the gradient, one window's terms),
#: twice that leaves room for the row blocks that build the maps or read the gradient.
POOLED_TEMPS_PER_ELEMENT = 10


def block_elements(shape, dtype: torch.dtype, device_type: str) -> int:
    """Full-resolution elements one block of ``logits [N, C, *S]`` may hold (their
    temporaries: :data:`BLOCK_BYTES_DIVISOR`, :data:`TEMPS_PER_ELEMENT`)."""
    itemsize = torch.finfo(dtype).bits // 8
    budget = math.prod(shape) * itemsize // BLOCK_BYTES_DIVISOR
    cap = BLOCK_BYTES_CAP.get(device_type, DEFAULT_BLOCK_BYTES_CAP)
    budget = min(max(budget, BLOCK_BYTES_FLOOR), cap)
    compute_itemsize = 8 if dtype == torch.float64 else 4
    return max(1, budget // (TEMPS_PER_ELEMENT * compute_itemsize))


def row_blocks(shape, elements: int, *, all_classes: bool = False, whole_planes: bool = False):
    """``(n0, n1, c0, c1, r0, r1)`` blocks covering ``logits [N, C, H, *inner]`` once (rows:
    the first spatial axis; ``w`` below: the inner axes' size), of about
    ``elements`` elements (at least one row): several whole images when one fits, else blocks
    of one image, ordered by rows then classes: as many rows of one class as fit (long blocks:
    little halo to recompute), then as many classes as fit. ``all_classes``: rows of every class
    (the softmax); ``whole_planes``: never split rows (``interp``)."""
    n, c, h, *inner = shape
    w = math.prod(inner)
    if c * h * w <= elements:
        per = elements // (c * h * w)
        return [(n0, min(n, n0 + per), 0, c, 0, h) for n0 in range(0, n, per)]
    if all_classes:
        rows, per = max(1, elements // (c * w)), c
    else:
        rows = h if whole_planes else min(h, max(1, elements // w))
        per = max(1, elements // (rows * w))
    return [(i, i + 1, c0, min(c, c0 + per), r0, min(h, r0 + rows))
            for i in range(n) for r0 in range(0, h, rows) for c0 in range(0, c, per)]


def plane_groups(shape, cfg: RMIConfig, elements: int):
    """``(n0, n1, c0, c1)`` groups of whole planes of ``logits [N, C, *S]`` whose pooled maps
    (and the float64 temporaries of stages (b), (d) on them: :data:`POOLED_TEMPS_PER_ELEMENT`)
    take no more than a block of ``elements`` full-resolution elements (:func:`block_elements`,
    float32 temporaries): several whole images, or class ranges of one. ``None`` when the
    stages run on :func:`row_blocks` instead: at stride 1 (pooled maps as large as the logits),
    for ``interp`` (pooled from whole planes) and when one plane does not fit."""
    cfg = _resolved(cfg, len(shape) - 2)
    if not cfg.pools or cfg.pool == "interp":
        return None
    spatial = shape[2:]
    pooled = math.prod(cfg.pooled_size(*spatial))
    planes = elements * TEMPS_PER_ELEMENT // (2 * POOLED_TEMPS_PER_ELEMENT * pooled)
    if planes < 1:
        return None
    blocks = row_blocks(shape, planes * math.prod(spatial), whole_planes=True)
    return [block[:4] for block in blocks]


def _splits_rows(cfg: RMIConfig) -> bool:
    """Whether the RMI stages may work on row slices (not for bi/trilinear downsampling)."""
    return not cfg.pools or cfg.pool != "interp"


def _row_span(cfg: RMIConfig, i0: int, i1: int, height: int):
    """Full-resolution rows ``[a, b)`` pooled into the pooled rows ``[i0, i1)``, the pooling's
    padding included (rows outside ``[0, height)``); the whole map for ``interp`` (``cfg``
    resolved: rows are the first spatial axis)."""
    s, k = cfg.strides[0], cfg.pool_sizes[0]
    if not cfg.pools:
        return i0, i1
    if cfg.pool == "interp":
        return 0, height
    return i0 * s - k // 2, (i1 - 1) * s - k // 2 + k


def _pooled_rows_touching(cfg: RMIConfig, j0: int, j1: int, pooled_height: int):
    """Pooled rows ``[i0, i1)`` whose pooling windows touch the full-resolution rows ``[j0, j1)``
    (possibly empty when ``pool_size < stride``); every pooled row for ``interp``."""
    s, k = cfg.strides[0], cfg.pool_sizes[0]
    if not cfg.pools:
        return j0, j1
    if cfg.pool == "interp":
        return 0, pooled_height
    i0 = max(0, -((k - 1 - j0 - k // 2) // s))  # ceil((j0 + k // 2 - k + 1) / s)
    return i0, min(pooled_height, (j1 - 1 + k // 2) // s + 1)


# ---- (a) first term ------------------------------------------------------------------------------

def _label_maps(labels, num_classes: int, ignore_index: int):
    """``(labels, valid [N, *S] bool)``; a :class:`FloatTarget` stays as it is."""
    if isinstance(labels, FloatTarget):
        return labels, labels.valid()
    labels = labels.long()
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    return labels, valid


def _onehot(labels, valid, num_classes, dtype, first=0):
    """``Y [N, num_classes, *S]`` for classes ``first .. first + num_classes - 1``."""
    if isinstance(labels, FloatTarget):
        return labels.planes(valid, first, num_classes, dtype)
    classes = torch.arange(first, first + num_classes, device=labels.device)
    classes = _spatial(classes.unsqueeze(0), labels.dim() - 1)
    return ((labels.unsqueeze(1) == classes) & valid.unsqueeze(1)).to(dtype)


def _base_loss(x, labels, valid, cfg: RMIConfig):
    """First-term loss summed over pixels (BCE summed over classes, or CE) and its pixel count.

    CE counts the pixels whose label is in [0, C) and not ignore_index (the authors'
    F.cross_entropy raises on any other label; the fused kernels cannot check without a sync).
    """
    if cfg.mode == "region":
        return x.new_zeros(()), x.new_zeros(())
    if cfg.mode == "sigmoid":
        y = _onehot(labels, valid, x.shape[1], x.dtype)
        loss = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        return loss.mul_(valid.unsqueeze(1)).sum(), valid.sum()
    if isinstance(labels, FloatTarget):  # soft-target CE
        y = _onehot(labels, valid, x.shape[1], x.dtype)
        return -(torch.log_softmax(x, dim=1).mul_(y)).sum(), valid.sum()
    target = torch.where(valid, labels, 0)
    nll = -torch.log_softmax(x, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    return (nll * valid).sum(), valid.sum()


def _base_loss_grad(x, labels, valid, cfg: RMIConfig, first: int = 0, lse=None):
    """Per-pixel gradient of the summed first-term loss of :func:`_base_loss`, for the classes
    ``first .. first + c - 1`` of ``x [N, c, H, W]`` (softmax: all of them, or ``lse [N, 1, H,
    W]``, the log-sum-exp over all of them). A float target's soft CE: ``softmax * sum_c Y_c
    - Y`` (its classes need not sum to 1)."""
    if cfg.mode == "region":
        return torch.zeros_like(x)
    if cfg.mode == "sigmoid":
        grad = torch.sigmoid(x)
    elif isinstance(labels, FloatTarget):
        grad = torch.softmax(x, dim=1) if lse is None else torch.sub(x, lse).exp_()
        grad.mul_(labels.planes(valid, 0, labels.values.shape[1], x.dtype).sum(1, keepdim=True))
    else:
        labels = torch.where(valid, labels, 0)
        grad = torch.softmax(x, dim=1) if lse is None else torch.sub(x, lse).exp_()
    return grad.sub_(_onehot(labels, valid, x.shape[1], x.dtype, first)).mul_(valid.unsqueeze(1))


def _log_sum_exp(logits: torch.Tensor, elements: int) -> torch.Tensor:
    """``[N, 1, *S]`` log-sum-exp over the classes of ``logits [N, C, *S]`` (compute dtype),
    on blocks of rows of about ``elements`` elements."""
    n, c, h, *inner = logits.shape
    out = logits.new_empty((n, 1, h, *inner), dtype=compute_dtype(logits))
    rows = max(1, elements // (n * c * math.prod(inner)))
    for r0 in range(0, h, rows):
        out[:, :, r0:r0 + rows] = torch.logsumexp(logits[:, :, r0:r0 + rows].to(out.dtype), 1, True)
    return out


def first_term_sums(logits: torch.Tensor, labels: torch.Tensor, cfg: RMIConfig):
    """Stage (a), first term: ``base_sum``, ``base_count`` (0-d float64) and ``nonfinite``
    (0-d int64, number of non-finite logits), on row blocks of all classes (:func:`row_blocks`)."""
    base_sum = logits.new_zeros((), dtype=torch.float64)
    base_count = logits.new_zeros((), dtype=torch.float64)
    nonfinite = logits.new_zeros((), dtype=torch.int64)
    elements = block_elements(logits.shape, logits.dtype, logits.device.type)
    for n0, n1, _, _, r0, r1 in row_blocks(logits.shape, elements, all_classes=True):
        x = logits[n0:n1, :, r0:r1].to(compute_dtype(logits))
        lab, valid = _label_maps(labels[n0:n1, r0:r1], x.shape[1], cfg.ignore_index)
        loss, count = _base_loss(x, lab, valid, cfg)
        base_sum += loss.double()
        base_count += count.double()
        nonfinite += (~torch.isfinite(x)).sum()
    return base_sum, base_count, nonfinite


# ---- (a) pooled maps -----------------------------------------------------------------------------

def _probs(x: torch.Tensor, valid: torch.Tensor, cfg: RMIConfig, with_grad: bool = True):
    """``P`` at full resolution and ``dP/dx`` (``None`` unless ``with_grad``; sigmoid mode:
    ``+1e-6``; softmax: clamp; region_mi: ``P = x * valid``), written in place where that saves
    a temporary."""
    if cfg.mode == "region":
        mask = valid.unsqueeze(1).to(x.dtype)
        return x * mask, (mask if with_grad else None)
    p = torch.sigmoid(x)
    dpdx = (1.0 - p).mul_(p).mul_(valid.unsqueeze(1)) if with_grad else None
    p.mul_(valid.unsqueeze(1))
    if cfg.mode == "sigmoid":
        return p.add_(CLIP_MIN), dpdx
    if with_grad:
        dpdx.mul_((p >= CLIP_MIN) & (p <= 1.0))
    return p.clamp_(CLIP_MIN, 1.0), dpdx


def _full_res_maps(logits: torch.Tensor, labels: torch.Tensor, cfg: RMIConfig, first: int,
                   num_classes: int | None, rows=None, with_grad: bool = True):
    """``Y``, ``P`` and ``dP/dx [N, c, b - a, *inner]`` (compute dtype; ``dP/dx`` ``None``
    unless ``with_grad``) on the rows ``[a, b) = rows`` (default: all) of ``logits [N, c, H,
    *inner]``, the planes of classes ``first .. first + c - 1`` out of ``num_classes`` (default
    ``c``). Rows outside ``[0, H)`` are the pooling's padding: zeros, ``-inf`` in ``Y`` and ``P``
    for max pooling."""
    height = logits.shape[2]
    a, b = (0, height) if rows is None else rows
    lo, hi = max(a, 0), min(b, height)
    x = logits[:, :, lo:hi].to(compute_dtype(logits))
    num_classes = x.shape[1] if num_classes is None else num_classes
    labels, valid = _label_maps(labels[:, lo:hi], num_classes, cfg.ignore_index)
    p, dpdx = _probs(x, valid, cfg, with_grad)
    maps = [_onehot(labels, valid, x.shape[1], x.dtype, first), p, dpdx]
    if (lo - a) or (b - hi):
        pad = (0, 0) * (x.dim() - 3) + (lo - a, b - hi)
        # Max pooling pads with -inf, as max_pool's own padding (region_mi's maps may be < 0).
        fill = -math.inf if cfg.pool == "max" else 0.0
        maps = [t if t is None else F.pad(t, pad, value=fill if i < 2 else 0.0)
                for i, t in enumerate(maps)]
    return maps


def _pool_args(cfg: RMIConfig):
    """``(kernel, stride, padding)`` lists of avg / max pooling on row slices: the inner axes
    padded by ``k // 2``, the rows not (:func:`_row_span` includes their padding)."""
    k = list(cfg.pool_sizes)
    return k, list(cfg.strides), [0] + [i // 2 for i in k[1:]]


def _pool(t: torch.Tensor, cfg: RMIConfig, *, nearest: bool) -> torch.Tensor:
    """Downsampling of ``t [N, c, b - a, *inner]``, the rows of :func:`_row_span` (padding rows
    included: avg / max pool pad only the inner axes); ``cfg`` resolved."""
    if not cfg.pools:
        return t
    rank = t.dim() - 2
    if cfg.pool in ("avg", "max"):
        return POOL_OPS[cfg.pool, rank](t, *_pool_args(cfg))
    size = tuple([n // s for n, s in zip(t.shape[2:], cfg.strides)])
    if nearest:
        return F.interpolate(t, size=size, mode="nearest")
    return F.interpolate(t, size=size, mode=RESIZE_MODES[rank], align_corners=True)


def _pool_adjoint(grad: torch.Tensor, p_full: torch.Tensor, cfg: RMIConfig, *,
                  nearest: bool = False) -> torch.Tensor:
    """Adjoint of :func:`_pool` of ``P`` (``nearest``: of ``Y``): pooled-size ``grad`` ->
    gradient on the rows of ``p_full`` (those of :func:`_row_span`, padding rows included)."""
    if not cfg.pools:
        return grad
    rank = grad.dim() - 2
    if cfg.pool == "interp" and nearest:
        return _NEAREST_BACKWARD[rank](grad, list(grad.shape[2:]), list(p_full.shape),
                                       *(None,) * rank)
    if cfg.pool == "avg":
        return _POOL_BACKWARD["avg", rank](grad, p_full, *_pool_args(cfg), False, True, None)
    if cfg.pool == "max":
        _, idx = POOL_OPS["max", rank](p_full, *_pool_args(cfg), return_indices=True)
        return _POOL_BACKWARD["max", rank](grad, p_full, *_pool_args(cfg), [1] * rank, False, idx)
    return _RESIZE_BACKWARD[rank](grad, list(grad.shape[2:]), list(p_full.shape), True,
                            *(None,) * rank)


def pooled_maps(logits: torch.Tensor, labels: torch.Tensor, cfg: RMIConfig, first: int = 0,
                num_classes: int | None = None, rows=None, elements: int | None = None):
    """Stage (a), RMI part: pooled ``Y, P [N, c, i1 - i0, *inner]`` (compute dtype) of ``logits
    [N, c, *S]``, the planes of classes ``first .. first + c - 1`` out of ``num_classes``, on
    the pooled rows ``[i0, i1) = rows`` (default: all; only all for ``interp``), pooling about
    ``elements`` full-resolution elements at a time (default: all)."""
    cfg = _resolved(cfg, logits.dim() - 2)
    n, c, height, *inner = logits.shape
    i0, i1 = (0, cfg.pooled_size(height, *inner)[0]) if rows is None else rows
    per = i1 - i0
    if elements is not None and _splits_rows(cfg):
        rows_fit = elements // (n * c * math.prod(inner))
        per = max(1, (rows_fit - cfg.pool_sizes[0]) // cfg.strides[0] + 1)
    if per >= i1 - i0:
        span = _row_span(cfg, i0, i1, height)
        y, p, _ = _full_res_maps(logits, labels, cfg, first, num_classes, span, with_grad=False)
        return _pool(y, cfg, nearest=True), _pool(p, cfg, nearest=False)
    out = None
    for k0 in range(i0, i1, per):
        span = _row_span(cfg, k0, min(i1, k0 + per), height)
        y, p, _ = _full_res_maps(logits, labels, cfg, first, num_classes, span, with_grad=False)
        y, p = _pool(y, cfg, nearest=True), _pool(p, cfg, nearest=False)
        if out is None:
            shape = (n, c, i1 - i0, *y.shape[3:])
            out = [y.new_empty(shape), y.new_empty(shape)]  # no closure over y: see `del`
        out[0][:, :, k0 - i0:k0 - i0 + per], out[1][:, :, k0 - i0:k0 - i0 + per] = y, p
        del y, p
    return out


def prepare_maps(logits: torch.Tensor, labels: torch.Tensor, cfg: RMIConfig):
    """Stage (a) on whole tensors: ``(base_sum, base_count, nonfinite, Y, P)`` (for stage tests)."""
    return (*first_term_sums(logits, labels, cfg), *pooled_maps(logits, labels, cfg))


# ---- (b) moments ---------------------------------------------------------------------------------

def _radii(t: torch.Tensor, radius) -> tuple[int, ...]:
    """The radius sides for the spatial axes of ``t [N, C, *S]`` (an int: every axis)."""
    return (radius,) * (t.dim() - 2) if isinstance(radius, int) else tuple(radius)


def _shifted(t: torch.Tensor, radius):
    """The ``d`` shifted window views of ``t [..., *S]`` for the radius sides ``radius`` (an
    int: every axis of ``S``, the last ``len(radius)`` axes), offsets in row-major order
    (``i = dy*Rw + dx``, ``(dz*Rh + dy)*Rw + dx``: :func:`rmi_ext.reference.region_vectors`)."""
    radii = _radii(t, radius)
    counts = [n - r + 1 for n, r in zip(t.shape[t.dim() - len(radii):], radii)]
    return [t[(..., *(slice(o, o + m) for o, m in zip(offset, counts)))]
            for offset in itertools.product(*(range(r) for r in radii))]


def _window_sums(y: torch.Tensor, p: torch.Tensor, radius):
    """Raw sums over the regions of ``y, p [N, C, *S]`` (float64, already offset): ``sums
    [N, C, 2, d]`` of ``y_i, p_i``, ``prods [N, C, 3, d, d]`` of ``y_i y_j, p_i p_j, y_i p_j``."""
    ys, ps = _shifted(y, radius), _shifted(p, radius)
    d, dims = len(ys), tuple(range(2, y.dim()))
    n, c = y.shape[:2]
    sums = torch.stack([torch.stack([t.sum(dim=dims) for t in ts], dim=-1) for ts in (ys, ps)],
                       dim=2)
    prods = y.new_empty(n, c, 3, d, d)
    for i in range(d):
        for j in range(d):
            prods[:, :, 2, i, j] = (ys[i] * ps[j]).sum(dim=dims)
            if j >= i:
                prods[:, :, 0, i, j] = prods[:, :, 0, j, i] = (ys[i] * ys[j]).sum(dim=dims)
                prods[:, :, 1, i, j] = prods[:, :, 1, j, i] = (ps[i] * ps[j]).sum(dim=dims)
    return sums, prods


def _plane_means(y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``[N, C, 2]`` float64 means of ``y, p [N, C, *S]`` over their spatial axes."""
    dims = tuple(range(2, y.dim()))
    return torch.stack((y.double().mean(dim=dims), p.double().mean(dim=dims)), dim=2)


def _offset_window_sums(y: torch.Tensor, p: torch.Tensor, offsets: torch.Tensor, radius):
    """:func:`_window_sums` of ``y, p [N, C, *S]`` minus ``offsets [N, C, 2]`` (float64)."""
    rank = y.dim() - 2
    return _window_sums(y - _spatial(offsets[:, :, 0], rank),
                        p - _spatial(offsets[:, :, 1], rank), radius)


def _centred_moments(sums, prods, count: int, offsets):
    """``means [N, C, 2, d]``, centred ``cov [N, C, 3, d, d]`` from :func:`_window_sums` over
    ``count`` regions of maps offset by ``offsets [N, C, 2]`` (covariances do not change)."""
    mu = sums / count
    mu_y, mu_p = mu.unbind(dim=2)
    outer = lambda u, v: u.unsqueeze(-1) * v.unsqueeze(-2)
    cov = prods - count * torch.stack((outer(mu_y, mu_y), outer(mu_p, mu_p), outer(mu_y, mu_p)),
                                      dim=2)
    return mu + offsets.unsqueeze(-1), cov


def moment_sums(y: torch.Tensor, p: torch.Tensor, radius):
    """Stage (b): pooled ``Y, P [N, C, *S]`` -> ``means [N, C, 2, d]``, ``cov [N, C, 3, d, d]``
    (``radius``: an int or one side per spatial axis).

    ``cov`` holds the centred ``Sy, Sp, B`` in float64. Each map is first shifted by its own
    plane mean (covariances do not change) so the raw-sum form loses no precision.
    """
    offsets = _plane_means(y, p)
    sums, prods = _offset_window_sums(y, p, offsets, radius)
    count = math.prod([n - r + 1 for n, r in zip(y.shape[2:], _radii(y, radius))])
    return _centred_moments(sums, prods, count, offsets)


# ---- (d) pooled gradient, (e) full-resolution gradient -------------------------------------------

def pooled_grad_stencil(y, p, coef, shift, radius, rows=None) -> torch.Tensor:
    """Stage (d): ``dloss/dP`` on the rows ``[a, b) = rows`` (default: all) of the pooled map
    ``[N, C, *S]``: ``[N, C, b - a, *inner]`` float64 (``radius`` an int or one side per
    spatial axis).

    Window ``k`` gets ``g_k = Cp p_k + Cy y_k + c``; entry ``i`` of ``g_k`` lands on pixel
    ``k + o_i``; only the windows whose entry lands in ``[a, b)`` are computed (a block's halo
    rows hold no gradient). ``coef [N, C, 2, d, d]``, ``shift [N, C, d]`` from
    :mod:`rmi_ext.linalg`. ``y, p`` may be float32 (read as float64, no copy).
    """
    rank, radii = y.dim() - 2, _radii(y, radius)
    a, b = (0, y.shape[2]) if rows is None else rows
    ys, ps = _shifted(y, radii), _shifted(p, radii)
    windows, inner = ys[0].shape[2], ys[0].shape[3:]  # window rows, windows on the inner axes
    grad = p.new_zeros((*p.shape[:2], b - a, *p.shape[3:]), dtype=torch.float64)
    buffer = p.new_empty((*p.shape[:2], min(windows, b - a), *inner), dtype=torch.float64)
    span = None
    for i, offset in enumerate(itertools.product(*(range(r) for r in radii))):
        k0, k1 = max(0, a - offset[0]), min(windows, b - offset[0])  # windows landing in [a, b)
        if k0 >= k1:
            continue
        if span != (k0, k1):
            span = (k0, k1)
            ys_k, ps_k = [t[:, :, k0:k1] for t in ys], [t[:, :, k0:k1] for t in ps]
        g_i = buffer[:, :, :k1 - k0]
        g_i.copy_(_spatial(shift[:, :, i], rank).expand_as(g_i))
        for j in range(len(ys)):
            g_i.addcmul_(ps_k[j], _spatial(coef[:, :, 0, i, j], rank))
            g_i.addcmul_(ys_k[j], _spatial(coef[:, :, 1, i, j], rank))
        rows_i = slice(k0 + offset[0] - a, k1 + offset[0] - a)
        grad[(..., rows_i, *(slice(o, o + m) for o, m in zip(offset[1:], inner)))] += g_i
    return grad


def full_res_grad(grad_pooled, p_full, dpdx, cfg: RMIConfig) -> torch.Tensor:
    """Stage (e), RMI part: pooling adjoint of ``grad_pooled [N, c, *pooled]`` times ``dP/dx``
    (``P`` and ``dP/dx`` on the full-resolution rows of :func:`_row_span`, compute dtype)."""
    cfg = _resolved(cfg, p_full.dim() - 2)
    return _pool_adjoint(grad_pooled.to(p_full.dtype), p_full, cfg).mul_(dpdx)


def target_grad(pred: torch.Tensor, target: FloatTarget, cfg: RMIConfig, coef, shift):
    """Stages (d)+(e) of :func:`rmi_ext.region_mi` for the target map: ``dloss/dtarget`` in
    the target's dtype, from ``coef, shift`` of :func:`rmi_ext.linalg.target_stencil_coefficients`
    (the stencil of ``dloss/dP`` with the maps swapped), through the target's downsampling
    (nearest for ``interp``; max: the target's own arg-max) and the mask. Whole maps at once:
    about the target's size in temporaries (pooled maps, one full-resolution map)."""
    cfg = _resolved(cfg, pred.dim() - 2)
    height = pred.shape[2]
    a, b = _row_span(cfg, 0, cfg.pooled_size(*pred.shape[2:])[0], height)
    y_full, p_full, _ = _full_res_maps(pred, target, cfg, 0, None, (a, b), with_grad=False)
    y, p = _pool(y_full, cfg, nearest=True), _pool(p_full, cfg, nearest=False)
    del p_full
    grad_y = pooled_grad_stencil(p, y, coef, shift, cfg.radii)
    del y, p
    spread = _pool_adjoint(grad_y.to(y_full.dtype), y_full, cfg, nearest=True)
    grad = torch.zeros_like(target.values, dtype=y_full.dtype)
    lo, hi = max(a, 0), min(b, height)  # rows no pooling window reaches keep no gradient
    grad[:, :, lo:hi] = spread[:, :, lo - a:hi - a]
    return grad.mul_(target.valid().unsqueeze(1)).to(target.values.dtype)


def base_grad(logits, labels, cfg: RMIConfig, base_scale, first: int = 0,
              num_classes: int | None = None, lse=None) -> torch.Tensor:
    """Stage (e), first term: ``base_scale`` times the BCE/CE gradient (compute dtype) of
    ``logits [N, c, *S]``, classes ``first .. first + c - 1`` out of ``num_classes`` (default
    ``c``; softmax with fewer: ``lse``, see :func:`_base_loss_grad`)."""
    x = logits.to(compute_dtype(logits))
    num_classes = x.shape[1] if num_classes is None else num_classes
    labels, valid = _label_maps(labels, num_classes, cfg.ignore_index)
    return _base_loss_grad(x, labels, valid, cfg, first, lse).mul_(base_scale.to(x.dtype))


def _halo_pooled_grad(logits, labels, cfg: RMIConfig, coef, shift, first: int, num_classes: int,
                      elements: int):
    """``pooled_grad(i0, i1)``: stage (d) on the pooled rows ``[i0, i1)`` of ``logits [N, c,
    *S]`` (classes ``first ..``), from pooled maps recomputed ``R - 1`` rows further (``R``:
    the first radius side; pooled ``elements`` full-resolution elements at a time)."""
    radius = cfg.radii[0]
    h = cfg.pooled_size(*logits.shape[2:])[0]

    def pooled_grad(i0, i1):
        m0, m1 = max(0, i0 - radius + 1), min(h, i1 + radius - 1)  # pooled rows of the maps
        y, p = pooled_maps(logits, labels, cfg, first, num_classes, (m0, m1), elements)
        return pooled_grad_stencil(y, p, coef, shift, cfg.radii, (i0 - m0, i1 - m0))

    return pooled_grad


def _rmi_grad_rows(logits, labels, cfg: RMIConfig, pooled_grad, first: int, num_classes: int,
                   rows) -> torch.Tensor:
    """Stage (e) of the RMI term on the full-resolution rows ``[j0, j1) = rows`` of ``logits
    [N, c, H, *inner]`` (classes ``first ..``): ``[N, c, j1 - j0, *inner]``, compute dtype, from
    ``pooled_grad(i0, i1)``, the pooled gradient on the pooled rows touching them."""
    j0, j1 = rows
    height, inner = logits.shape[2], logits.shape[3:]
    i0, i1 = _pooled_rows_touching(cfg, j0, j1, cfg.pooled_size(height, *inner)[0])
    out = logits.new_zeros((*logits.shape[:2], j1 - j0, *inner), dtype=compute_dtype(logits))
    if i0 >= i1:  # rows no pooling window reaches (pool_size < stride)
        return out
    grad_pooled = pooled_grad(i0, i1)
    a, b = _row_span(cfg, i0, i1, height)  # the rows pooled into [i0, i1)
    lo, hi = min(a, j0), max(b, j1)
    _, p, dpdx = _full_res_maps(logits, labels, cfg, first, num_classes, (lo, hi))
    grad = full_res_grad(grad_pooled, p[:, :, a - lo:b - lo], dpdx[:, :, a - lo:b - lo], cfg)
    r0, r1 = max(a, j0), min(b, j1)
    out[:, :, r0 - j0:r1 - j0] = grad[:, :, r0 - a:r1 - a]
    return out


# ---- the backend interface used by rmi_ext.function ---------------------------------------------

def forward_stats(logits, labels, cfg: RMIConfig):
    """Stages (a)+(b): ``(base_sum, base_count, nonfinite, means, cov)``
    (:mod:`rmi_ext.function`).

    At stride > 1 (avg / max pool), stage (b) runs once per :func:`plane_groups` group, on its
    pooled maps built from row blocks. Otherwise the region sums run over blocks of region rows,
    on maps offset by the plane means of the first block (close to the plane's: the raw sums
    lose no precision)."""
    cfg = _resolved(cfg, logits.dim() - 2)
    n, c, *spatial = logits.shape
    radii, d = cfg.radii, cfg.dim
    base_sum, base_count, nonfinite = first_term_sums(logits, labels, cfg)
    means = logits.new_empty((n, c, 2, d), dtype=torch.float64)
    cov = logits.new_empty((n, c, 3, d, d), dtype=torch.float64)
    elements = block_elements(logits.shape, logits.dtype, logits.device.type)
    groups = plane_groups(logits.shape, cfg, elements)
    if groups is not None:
        for n0, n1, c0, c1 in groups:
            y, p = pooled_maps(logits[n0:n1, c0:c1], labels[n0:n1], cfg, c0, c, None, elements)
            means[n0:n1, c0:c1], cov[n0:n1, c0:c1] = moment_sums(y, p, radii)
            del y, p
        return base_sum, base_count, nonfinite, means, cov
    pooled = cfg.pooled_size(*spatial)
    regions = pooled[0] - radii[0] + 1  # region rows
    count = regions * math.prod([m - r + 1 for m, r in zip(pooled[1:], radii[1:])])
    splits = _splits_rows(cfg)
    blocks = row_blocks(logits.shape, elements, whole_planes=not splits)
    for n0, n1, c0, c1, r0, r1 in [block for block in blocks if block[4] == 0]:
        x, lab = logits[n0:n1, c0:c1], labels[n0:n1]
        # region rows per block (pooled rows hold 1 / prod(inner strides) of a full row)
        per = r1 * math.prod(cfg.strides[1:]) if splits else regions
        sums = prods = offsets = None
        for k0 in range(0, max(regions, 1), per):
            rows = (k0, min(pooled[0], k0 + per + radii[0] - 1)) if splits else None
            y, p = pooled_maps(x, lab, cfg, c0, c, rows, elements)
            if offsets is None:
                offsets = _plane_means(y, p)
            block = _offset_window_sums(y, p, offsets, radii)
            del y, p
            if sums is None:
                sums, prods = block
            else:
                sums += block[0]
                prods += block[1]
            del block
        means[n0:n1, c0:c1], cov[n0:n1, c0:c1] = _centred_moments(sums, prods, count, offsets)
    return base_sum, base_count, nonfinite, means, cov


def backward_grad(logits, labels, cfg: RMIConfig, base_scale, coef, shift):
    """Stages (d)+(e): ``grad_logits`` (recomputes the pooled maps rather than storing them) on
    row blocks, summed in the compute dtype and cast to the logits' dtype once per block. At
    stride > 1 (avg / max pool) stage (d) runs once per :func:`plane_groups` group and its row
    blocks read the group's pooled gradient; otherwise each row block recomputes its halo."""
    cfg = _resolved(cfg, logits.dim() - 2)
    c = logits.shape[1]
    grad = torch.empty_like(logits)
    elements = block_elements(logits.shape, logits.dtype, logits.device.type)
    groups = plane_groups(logits.shape, cfg, elements)
    for g_n0, g_n1, g_c0, g_c1 in groups or [(0, logits.shape[0], 0, c)]:
        x_g, lab_g = logits[g_n0:g_n1, g_c0:g_c1], labels[g_n0:g_n1]
        group_grad = None
        if groups is not None:
            y, p = pooled_maps(x_g, lab_g, cfg, g_c0, c, None, elements)
            group_grad = pooled_grad_stencil(y, p, coef[g_n0:g_n1, g_c0:g_c1],
                                             shift[g_n0:g_n1, g_c0:g_c1], cfg.radii)
            del y, p
        lse = None
        for n0, n1, c0, c1, r0, r1 in row_blocks(x_g.shape, elements,
                                                 whole_planes=not _splits_rows(cfg)):
            n0, n1, c0, c1 = n0 + g_n0, n1 + g_n0, c0 + g_c0, c1 + g_c0  # in the logits
            x, lab = logits[n0:n1, :, r0:r1], labels[n0:n1, r0:r1]
            if cfg.mode == "softmax" and c1 - c0 < c and c0 == g_c0:  # once per rows
                lse = _log_sum_exp(x, elements)
            grad_i = base_grad(x[:, c0:c1], lab, cfg, base_scale, c0, c,
                               None if c1 - c0 == c else lse)
            if group_grad is None:
                pooled_grad = _halo_pooled_grad(logits[n0:n1, c0:c1], labels[n0:n1], cfg,
                                                coef[n0:n1, c0:c1], shift[n0:n1, c0:c1], c0, c,
                                                elements)
            else:
                block_grad = group_grad[n0 - g_n0:n1 - g_n0, c0 - g_c0:c1 - g_c0]
                pooled_grad = lambda i0, i1, t=block_grad: t[:, :, i0:i1]
            grad_i += _rmi_grad_rows(logits[n0:n1, c0:c1], labels[n0:n1], cfg, pooled_grad, c0, c,
                                     (r0, r1))
            grad[n0:n1, c0:c1, r0:r1] = grad_i
    return grad

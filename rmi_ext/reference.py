"""The unfold-style reference: the paper authors' RMI loss, written plainly, autograd for gradients.

This is the oracle every fast backend is tested against. It follows the authors' code step by
step (stacked shifted copies in float64, ``torch.inverse``, Cholesky log-det), so it is slow and
memory hungry (about 8x the logits at DF 4, 70x at DF 1; 200x for volumes). Keep it readable,
not fast. Maps are 2-D ``[N, C, H, W]`` or 3-D ``[N, C, D, H, W]`` (RMI_SPEC.md section 5),
with per-axis radius, stride and pool size.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from ._config import CLIP_MIN, LOG_EPS, POS_ALPHA, RMIConfig
from .targets import is_float_target

#: Pooling op by ``(pool, rank)`` and resize mode of ``pool="interp"`` by rank (the torch
#: backend uses them too).
POOL_OPS = {("avg", 2): F.avg_pool2d, ("avg", 3): F.avg_pool3d,
            ("max", 2): F.max_pool2d, ("max", 3): F.max_pool3d}
RESIZE_MODES = {2: "bilinear", 3: "trilinear"}


def valid_mask_and_onehot(labels: torch.Tensor, num_classes: int, ignore_index: int):
    """``labels [N, *S]`` int -> ``mask [N, 1, *S]`` and one-hot ``Y [N, C, *S]`` (float64),
    ``S`` the spatial axes ``(H, W)`` or ``(D, H, W)``."""
    labels = labels.long()
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    onehot = F.one_hot(torch.where(valid, labels, 0), num_classes).movedim(-1, 1)
    mask = valid.unsqueeze(1).double()
    return mask, onehot.double() * mask


def downsample(y: torch.Tensor, p: torch.Tensor, cfg: RMIConfig):
    """Apply the authors' downsampling (when some stride is > 1) to ``Y`` and ``P``
    ``[N, C, *S]``: avg/max pooling with kernel ``k`` and padding ``k // 2`` per axis, or
    nearest (``Y``) and bi/trilinear ``align_corners=True`` (``P``) resize to ``n // s``."""
    rank = y.dim() - 2
    cfg = cfg.for_rank(rank)
    if not cfg.pools:
        return y, p
    s, k = cfg.strides, cfg.pool_sizes
    if cfg.pool in ("avg", "max"):
        pool_op = POOL_OPS[cfg.pool, rank]
        pool = lambda t: pool_op(t, kernel_size=k, stride=s, padding=tuple(i // 2 for i in k))  # noqa: E731
        return pool(y), pool(p)
    size = cfg.pooled_size(*y.shape[2:])
    return (F.interpolate(y, size=size, mode="nearest"),
            F.interpolate(p, size=size, mode=RESIZE_MODES[rank], align_corners=True))


def region_vectors(t: torch.Tensor, radius) -> torch.Tensor:
    """``[N, C, *S]`` -> ``[N, C, d, K]``: the region of every window, ``d`` = the product of
    the radius sides (an int: the same on every axis), offsets in row-major order
    (``dy*R + dx`` in 2-D, ``(dz*Rh + dy)*Rw + dx`` in 3-D), windows in row-major order."""
    n, c, *spatial = t.shape
    radii = (radius,) * len(spatial) if isinstance(radius, int) else tuple(radius)
    counts = [size - r + 1 for size, r in zip(spatial, radii)]
    shifted = [t[(..., *(slice(o, o + m) for o, m in zip(offset, counts)))]
               for offset in itertools.product(*(range(r) for r in radii))]
    return torch.stack(shifted, dim=2).reshape(n, c, math.prod(radii), -1)


def rmi_per_image_class(y: torch.Tensor, p: torch.Tensor, radius) -> torch.Tensor:
    """Pooled ``Y, P [N, C, *S]`` -> ``rmi [N, C]`` float64, half the log-det of ``M + aI``
    (``radius`` an int or per-axis sides)."""
    yv = region_vectors(y.double(), radius)
    pv = region_vectors(p.double(), radius)
    eye = torch.eye(yv.shape[2], dtype=torch.float64, device=y.device)
    yv = yv - yv.mean(dim=3, keepdim=True)
    pv = pv - pv.mean(dim=3, keepdim=True)
    sy = yv @ yv.transpose(2, 3)
    sp = pv @ pv.transpose(2, 3)
    b = yv @ pv.transpose(2, 3)
    a = torch.inverse(sp + POS_ALPHA * eye)
    m = sy - b @ a @ b.transpose(-2, -1)
    chol = torch.linalg.cholesky(m + POS_ALPHA * eye)
    return torch.log(torch.diagonal(chol, dim1=-2, dim2=-1) + LOG_EPS).sum(-1)


def reference_terms(logits: torch.Tensor, labels: torch.Tensor, cfg: RMIConfig,
                    target_mask: torch.Tensor | None = None):
    """Both terms of the loss: ``(base, rmi)``, 0-d tensors, for ``logits [N, C, *S]`` and
    ``labels [N, *S]`` (``S = (H, W)`` or ``(D, H, W)``), or a float target ``labels [N, C, *S]``
    with its bool ``target_mask [N, *S]`` (``None``: every pixel counted).

    ``base`` is the BCE (sigmoid mode) or CE (softmax mode) term, ``rmi`` the RMI lower-bound term
    ``sum_c mean_n rmi[n, c] / d``. Both are float64 for float64 logits and float32 otherwise
    (fp16/bf16 logits are computed in float32).
    """
    cfg = cfg.for_rank(logits.dim() - 2)
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(out_dtype)
    num_classes = x.shape[1]
    if is_float_target(labels):  # RMI_SPEC.md section 6: Y = target * mask
        mask = (torch.ones_like(x[:, :1]) if target_mask is None
                else target_mask.unsqueeze(1).to(out_dtype))
        onehot = labels.to(out_dtype) * mask
    else:
        mask, onehot = valid_mask_and_onehot(labels, num_classes, cfg.ignore_index)
        mask, onehot = mask.to(out_dtype), onehot.to(out_dtype)
    if cfg.mode == "sigmoid":
        bce = F.binary_cross_entropy_with_logits(x, onehot, weight=mask, reduction="sum")
        base = bce / (mask.sum() + 1.0)
        probs = torch.sigmoid(x) * mask + CLIP_MIN
    elif is_float_target(labels):  # soft-target cross entropy over the counted pixels
        base = -(onehot * torch.log_softmax(x, dim=1)).sum() / mask.sum().clamp_min(1.0)
        probs = (torch.sigmoid(x) * mask).clamp(min=CLIP_MIN, max=1.0)
    else:
        # The authors use reduction='mean', which is 0/0 = NaN when every pixel is ignored; we
        # divide by max(count, 1) instead so that case gives 0 (same value whenever count > 0).
        target = labels.long()
        ce = F.cross_entropy(x, target, ignore_index=cfg.ignore_index, reduction="sum")
        count = (target != cfg.ignore_index).sum().clamp_min(1)
        base = ce / count
        probs = (torch.sigmoid(x) * mask).clamp(min=CLIP_MIN, max=1.0)
    y, p = downsample(onehot, probs, cfg)
    rmi = rmi_per_image_class(y, p, cfg.radii)
    rmi_term = (rmi.mean(dim=0) / cfg.dim).sum().to(out_dtype)
    return base, rmi_term


def reference_region_mi(pred: torch.Tensor, target: torch.Tensor, cfg: RMIConfig,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """RMI between two float maps ``pred, target [N, C, *S]`` (RMI_SPEC.md section 6):
    ``rmi [N, C]`` float64 of ``P = pred * mask`` and ``Y = target * mask`` (no sigmoid),
    downsampled as the loss's ``P`` and ``Y``. Autograd gives the gradient to both."""
    cfg = cfg.for_rank(pred.dim() - 2)
    m = 1.0 if mask is None else mask.unsqueeze(1).double()
    y, p = downsample(target.double() * m, pred.double() * m, cfg)
    return rmi_per_image_class(y, p, cfg.radii)


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, cfg: RMIConfig,
                   target_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The total loss ``w_base * base + w_rmi * rmi`` (see :attr:`RMIConfig.term_weights`)."""
    base, rmi = reference_terms(logits, labels, cfg, target_mask)
    w_base, w_rmi = cfg.term_weights
    return w_base * base + w_rmi * rmi

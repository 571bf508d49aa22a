"""The unfold-style reference: the paper authors' RMI loss, written plainly, autograd for gradients.

This is the oracle every fast backend is tested against. It follows the authors' code step by
step (stacked shifted copies in float64, ``torch.inverse``, Cholesky log-det), so it is slow and
memory hungry (about 8x the logits at DF 4, 70x at DF 1). Keep it readable, not fast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._config import CLIP_MIN, LOG_EPS, POS_ALPHA, RMIConfig


def valid_mask_and_onehot(labels: torch.Tensor, num_classes: int, ignore_index: int):
    """``labels [N, H, W]`` int -> ``mask [N, 1, H, W]`` and one-hot ``Y [N, C, H, W]`` (float64)."""
    labels = labels.long()
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    onehot = F.one_hot(torch.where(valid, labels, 0), num_classes).permute(0, 3, 1, 2)
    mask = valid.unsqueeze(1).double()
    return mask, onehot.double() * mask


def downsample(y: torch.Tensor, p: torch.Tensor, cfg: RMIConfig):
    """Apply the authors' downsampling (``stride > 1`` only) to ``Y`` and ``P`` ``[N, C, H, W]``."""
    s, k = cfg.stride, cfg.pool_size
    if s == 1:
        return y, p
    if cfg.pool == "avg":
        pool = lambda t: F.avg_pool2d(t, kernel_size=k, stride=s, padding=k // 2)
        return pool(y), pool(p)
    if cfg.pool == "max":
        pool = lambda t: F.max_pool2d(t, kernel_size=k, stride=s, padding=k // 2)
        return pool(y), pool(p)
    size = (y.shape[2] // s, y.shape[3] // s)
    return (F.interpolate(y, size=size, mode="nearest"),
            F.interpolate(p, size=size, mode="bilinear", align_corners=True))


def region_vectors(t: torch.Tensor, radius: int) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N, C, R*R, K]``: the R x R region of every window, offset ``dy*R+dx``."""
    n, c, h, w = t.shape
    nh, nw = h - radius + 1, w - radius + 1
    shifted = [t[:, :, dy:dy + nh, dx:dx + nw] for dy in range(radius) for dx in range(radius)]
    return torch.stack(shifted, dim=2).reshape(n, c, radius * radius, -1)


def rmi_per_image_class(y: torch.Tensor, p: torch.Tensor, radius: int) -> torch.Tensor:
    """Pooled ``Y, P [N, C, h, w]`` -> ``rmi [N, C]`` float64, half the log-det of ``M + aI``."""
    d = radius * radius
    yv = region_vectors(y.double(), radius)
    pv = region_vectors(p.double(), radius)
    eye = torch.eye(d, dtype=torch.float64, device=y.device)
    yv = yv - yv.mean(dim=3, keepdim=True)
    pv = pv - pv.mean(dim=3, keepdim=True)
    sy = yv @ yv.transpose(2, 3)
    sp = pv @ pv.transpose(2, 3)
    b = yv @ pv.transpose(2, 3)
    a = torch.inverse(sp + POS_ALPHA * eye)
    m = sy - b @ a @ b.transpose(-2, -1)
    chol = torch.linalg.cholesky(m + POS_ALPHA * eye)
    return torch.log(torch.diagonal(chol, dim1=-2, dim2=-1) + LOG_EPS).sum(-1)


def reference_terms(logits: torch.Tensor, labels: torch.Tensor, cfg: RMIConfig):
    """Both terms of the loss: ``(base, rmi)``, 0-d tensors.

    ``base`` is the BCE (sigmoid mode) or CE (softmax mode) term, ``rmi`` the RMI lower-bound term
    ``sum_c mean_n rmi[n, c] / d``. Both are float64 for float64 logits and float32 otherwise
    (fp16/bf16 logits are computed in float32).
    """
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(out_dtype)
    num_classes = x.shape[1]
    mask, onehot = valid_mask_and_onehot(labels, num_classes, cfg.ignore_index)
    mask, onehot = mask.to(out_dtype), onehot.to(out_dtype)
    if cfg.mode == "sigmoid":
        bce = F.binary_cross_entropy_with_logits(x, onehot, weight=mask, reduction="sum")
        base = bce / (mask.sum() + 1.0)
        probs = torch.sigmoid(x) * mask + CLIP_MIN
    else:
        # The authors use reduction='mean', which is 0/0 = NaN when every pixel is ignored; we
        # divide by max(count, 1) instead so that case gives 0 (same value whenever count > 0).
        target = labels.long()
        ce = F.cross_entropy(x, target, ignore_index=cfg.ignore_index, reduction="sum")
        count = (target != cfg.ignore_index).sum().clamp_min(1)
        base = ce / count
        probs = (torch.sigmoid(x) * mask).clamp(min=CLIP_MIN, max=1.0)
    y, p = downsample(onehot, probs, cfg)
    rmi = rmi_per_image_class(y, p, cfg.radius)
    rmi_term = (rmi.mean(dim=0) / cfg.dim).sum().to(out_dtype)
    return base, rmi_term


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, cfg: RMIConfig) -> torch.Tensor:
    """The total loss ``w_base * base + w_rmi * rmi`` (see :attr:`RMIConfig.term_weights`)."""
    base, rmi = reference_terms(logits, labels, cfg)
    w_base, w_rmi = cfg.term_weights
    return w_base * base + w_rmi * rmi

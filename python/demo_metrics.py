"""The training demo's metrics, on integer label maps (uint8 or int64, 255 = ignored).

* ``confusion`` / ``iou_from_confusion``: per-class IoU, mIoU, pixel accuracy;
* ``boundary_counts`` / ``boundary_f``: boundary F-score with a pixel tolerance;
* ``near`` + ``confusion``: the thin-structure mIoU (pixels within 1 px of a thin structure);
* ``structure_identity``: foreground IoU (classes merged) and identity accuracy;
* ``evaluate``: all of them for a set of predictions, as a flat dict of floats.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = 255


def confusion(pred, target, num_classes, mask=None):
    """Confusion matrix int64 ``[C, C]`` (row: true class, column: predicted) of label maps of
    any equal shape; pixels whose target is 255, or where ``mask`` (bool) is False, are not
    counted."""
    valid = target != IGNORE
    if mask is not None:
        valid &= mask
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)


def iou_from_confusion(conf):
    """``(iou float64 [C], mIoU, pixel accuracy)``; a class absent from both target and
    prediction has IoU NaN and is left out of the mean."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    return iou, float(torch.nanmean(iou)), float(tp.sum() / conf.sum().clamp(min=1))


def near(mask, radius=1):
    """Bool ``[N, H, W]``: pixels within ``radius`` (Chebyshev distance) of a True pixel."""
    m = mask[:, None].float()
    return F.max_pool2d(m, 2 * radius + 1, 1, radius)[:, 0] > 0


def boundary(labels):
    """Bool ``[N, H, W]``: pixels with a 4-neighbour of a different label (the image edge does
    not count as a neighbour)."""
    lab = labels.long()
    b = torch.zeros(lab.shape, dtype=torch.bool, device=lab.device)
    dv = lab[:, 1:, :] != lab[:, :-1, :]
    dh = lab[:, :, 1:] != lab[:, :, :-1]
    b[:, 1:, :] |= dv
    b[:, :-1, :] |= dv
    b[:, :, 1:] |= dh
    b[:, :, :-1] |= dh
    return b


def boundary_counts(pred, target, tolerance=1):
    """``(precision hits, predicted boundary pixels, recall hits, true boundary pixels)``
    (ints) over ``[N, H, W]`` maps. Pixels within 1 px of an ignored pixel are left out; a
    boundary pixel is a hit when one of the other map is within ``tolerance`` px."""
    keep = ~near(target == IGNORE, 1)
    bp, bt = boundary(pred) & keep, boundary(target) & keep
    hit_p = bp & near(bt, tolerance)
    hit_t = bt & near(bp, tolerance)
    return int(hit_p.sum()), int(bp.sum()), int(hit_t.sum()), int(bt.sum())


def boundary_f(counts):
    """``(F, precision, recall)`` from ``boundary_counts``; 1.0 where there is nothing to find
    and nothing was found."""
    hp, npred, ht, ntrue = counts
    p = hp / npred if npred else float(ntrue == 0)
    r = ht / ntrue if ntrue else float(npred == 0)
    return (2 * p * r / (p + r) if p + r else 0.0), p, r


def structure_identity(pred, target):
    """``(foreground IoU, identity accuracy)``: the IoU of "not background" (class 0) between
    prediction and target, and, of the pixels foreground in both, the share of the right
    class. NaN where undefined."""
    valid = target != IGNORE
    fg_t, fg_p = (target > 0) & valid, (pred > 0) & valid
    inter, union = (fg_t & fg_p).sum(), (fg_t | fg_p).sum()
    fg_iou = float(inter / union) if union else float("nan")
    both = fg_t & fg_p
    ident = float((pred[both] == target[both]).double().mean()) if inter else float("nan")
    return fg_iou, ident


def evaluate(pred, target, thin, num_classes, tolerance=1) -> dict:
    """All metrics of predictions ``pred`` against ``target`` ([N, H, W] label maps) with the
    thin-structure mask ``thin`` (bool [N, H, W]): miou, pixel_acc, iou (list), boundary_f,
    boundary_p, boundary_r, thin_miou, fg_iou, identity_acc."""
    iou, miou, acc = iou_from_confusion(confusion(pred, target, num_classes))
    bf, bp, br = boundary_f(boundary_counts(pred, target, tolerance))
    _, thin_miou, _ = iou_from_confusion(confusion(pred, target, num_classes, near(thin, 1)))
    fg_iou, ident = structure_identity(pred, target)
    return {"miou": miou, "pixel_acc": acc, "iou": iou.tolist(), "boundary_f": bf,
            "boundary_p": bp, "boundary_r": br, "thin_miou": thin_miou, "fg_iou": fg_iou,
            "identity_acc": ident}

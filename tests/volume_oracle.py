"""An independent numpy float64 oracle of the RMI loss on 2-D and 3-D maps with per-axis options.

A direct transcription of RMI_SPEC.md sections 1 and 5, sharing no code with ``rmi_ext``: its own
mask / one-hot, BCE / CE, pooling (window by window), nearest and (bi/tri)linear
``align_corners=True`` resizes (axis by axis), region vectors (window by window, offsets
row-major), covariances, inverse, Cholesky and log-det. Maps are ``[N, C, *S]`` with
``S = (H, W)`` or ``(D, H, W)``; ``radius``, ``stride`` and ``pool_size`` are per-axis tuples.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

POS_ALPHA, CLIP_MIN, LOG_EPS = 5e-4, 1e-6, 1e-8


def sides(value, rank: int) -> tuple[int, ...]:
    """An int option or a per-axis tuple -> one side per spatial axis."""
    return (value,) * rank if isinstance(value, int) else tuple(value)


def sigmoid(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def mask_onehot(labels, num_classes, ignore_index):
    """``labels [N, *S]`` -> ``m [N, *S]`` and ``Y [N, C, *S]`` as float64."""
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    y = np.stack([((labels == c) & valid) for c in range(num_classes)], axis=1)
    return valid.astype(np.float64), y.astype(np.float64)


def bce_sum(x, y, m):
    """``sum m * BCEWithLogits(x, y)`` (stable form ``max(x,0) - x y + log(1 + e^-|x|)``)."""
    per = np.maximum(x, 0.0) - x * y + np.log1p(np.exp(-np.abs(x)))
    return float((per * m[:, None]).sum())


def ce_sum_count(x, labels, ignore_index):
    """Sum of ``-log softmax(x)[label]`` over voxels whose label is not ``ignore_index``, count."""
    keep = labels != ignore_index
    zmax = x.max(axis=1, keepdims=True)
    lse = (zmax + np.log(np.exp(x - zmax).sum(axis=1, keepdims=True)))[:, 0]
    picked = np.take_along_axis(x, np.where(keep, labels, 0)[:, None], axis=1)[:, 0]
    return float(((lse - picked) * keep).sum()), int(keep.sum())


def pool(t, kind, kernel, stride):
    """``t [N, C, *S]``: avg (zero padding ``k//2`` counted) or max (padding never wins),
    output position by output position."""
    spatial = t.shape[2:]
    pads = [k // 2 for k in kernel]
    out_size = [(n + 2 * p - k) // s + 1 for n, p, k, s in zip(spatial, pads, kernel, stride)]
    padded = np.full(t.shape[:2] + tuple(n + 2 * p for n, p in zip(spatial, pads)),
                     0.0 if kind == "avg" else -np.inf)
    padded[(..., *(slice(p, p + n) for p, n in zip(pads, spatial)))] = t
    out = np.empty(t.shape[:2] + tuple(out_size))
    axes = tuple(range(2, t.ndim))
    for pos in itertools.product(*(range(o) for o in out_size)):
        win = padded[(..., *(slice(i * s, i * s + k) for i, s, k in zip(pos, stride, kernel)))]
        out[(..., *pos)] = win.sum(axis=axes) / math.prod(kernel) if kind == "avg" \
            else win.max(axis=axes)
    return out


def nearest_index(size_in: int, size_out: int) -> list[int]:
    """Nearest resize source indices: ``floor(i * size_in / size_out)``, at most ``size_in - 1``."""
    return [min(i * size_in // size_out, size_in - 1) for i in range(size_out)]


def nearest(t, size):
    """Nearest resize of ``t [N, C, *S]`` to ``size``, axis by axis."""
    for axis, out in enumerate(size, start=2):
        t = np.take(t, nearest_index(t.shape[axis], out), axis=axis)
    return t


def linear_ac(t, size):
    """(Bi/tri)linear resize with ``align_corners=True`` of ``t [N, C, *S]`` to ``size``, axis
    by axis (source ``i (n-1)/(o-1)``, 0 when ``o == 1``)."""
    for axis, out in enumerate(size, start=2):
        n = t.shape[axis]
        moved = np.moveaxis(t, axis, 0)
        rows = []
        for i in range(out):
            pos = i * (n - 1) / (out - 1) if out > 1 else 0.0
            i0 = min(int(math.floor(pos)), n - 1)
            i1 = min(i0 + 1, n - 1)
            frac = pos - i0
            rows.append((1 - frac) * moved[i0] + frac * moved[i1])
        t = np.moveaxis(np.stack(rows), 0, axis)
    return t


def downsample(y, p, pool_mode, stride, kernel):
    """Section 5: pooled when some stride is > 1; interp resizes to ``n // s`` per axis."""
    if all(s == 1 for s in stride):
        return y, p
    if pool_mode in ("avg", "max"):
        return pool(y, pool_mode, kernel, stride), pool(p, pool_mode, kernel, stride)
    size = [n // s for n, s in zip(y.shape[2:], stride)]
    return nearest(y, size), linear_ac(p, size)


def region_vectors(t, radius):
    """``t [*S]`` -> ``[d, K]``: column k = a window (row-major), row i = the offset
    ``(dz*Rh + dy)*Rw + dx`` (row-major), element by element."""
    windows = itertools.product(*(range(n - r + 1) for n, r in zip(t.shape, radius)))
    offsets = list(itertools.product(*(range(r) for r in radius)))
    cols = [[t[tuple(w + o for w, o in zip(win, off))] for off in offsets] for win in windows]
    return np.array(cols).T


def rmi_one(y, p, radius):
    """Half the log-det of ``M + aI`` for one (n, c) map pair."""
    yv, pv = region_vectors(y, radius), region_vectors(p, radius)
    yc = yv - yv.mean(axis=1, keepdims=True)
    pc = pv - pv.mean(axis=1, keepdims=True)
    sy, sp, b = yc @ yc.T, pc @ pc.T, yc @ pc.T
    eye = np.eye(math.prod(radius))
    a = np.linalg.inv(sp + POS_ALPHA * eye)
    m = sy - b @ a @ b.T
    chol = np.linalg.cholesky(m + POS_ALPHA * eye)
    return float(np.log(np.diag(chol) + LOG_EPS).sum())


def terms(x, labels, *, radius=3, stride=4, pool="avg", pool_size=None, ignore_index=255,
          mode="sigmoid", probs_rule=None):
    """``(base, rmi)`` of sections 1 and 5 for ``x [N, C, *S]``, ``labels [N, *S]``.

    ``probs_rule`` overrides the rule for ``P`` (``"plus"``: ``sig*m + 1e-6``, ``"clamp"``:
    ``clamp(sig*m, 1e-6, 1)``); by default the spec's rule for ``mode``.
    """
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    n, c = x.shape[:2]
    rank = x.ndim - 2
    radius, stride = sides(radius, rank), sides(stride, rank)
    kernel = stride if pool_size is None else sides(pool_size, rank)
    m, y = mask_onehot(labels, c, ignore_index)
    if mode == "sigmoid":
        base = bce_sum(x, y, m) / (m.sum() + 1.0)
    else:
        total, count = ce_sum_count(x, labels, ignore_index)
        base = total / max(count, 1)
    pm = sigmoid(x) * m[:, None]
    if (probs_rule or ("plus" if mode == "sigmoid" else "clamp")) == "plus":
        p = pm + CLIP_MIN
    else:
        p = np.clip(pm, CLIP_MIN, 1.0)
    y, p = downsample(y, p, pool, stride, kernel)
    rmi = np.array([[rmi_one(y[i, k], p[i, k], radius) for k in range(c)] for i in range(n)])
    return base, float((rmi.mean(axis=0) / math.prod(radius)).sum())

"""A long-double (numpy ``longdouble``) oracle of the loss and its gradient, DF = 1, sigmoid mode.

For ill-conditioned cases (few windows for a large region, ``K < d``), autograd through the
float64 reference loses up to ~1e-4 of the gradient, so there the fast backends are checked
against this higher-precision computation of the spec's formulas instead (sections 1 and 2,
with its own Cholesky and triangular inverse, since ``np.linalg`` has no long-double kernels).
``AVAILABLE`` is False where ``longdouble`` is just ``double`` (e.g. MSVC, Apple arm64).
"""
from __future__ import annotations

import numpy as np

LD = np.longdouble
AVAILABLE = np.finfo(LD).eps < 1e-17
POS_ALPHA, CLIP_MIN, LOG_EPS = LD(5e-4), LD(1e-6), LD(1e-8)


def _chol(m):
    d = m.shape[0]
    low = np.zeros_like(m)
    for j in range(d):
        low[j, j] = np.sqrt(m[j, j] - (low[j, :j] ** 2).sum())
        low[j + 1:, j] = (m[j + 1:, j] - low[j + 1:, :j] @ low[j, :j]) / low[j, j]
    return low


def _tri_inv_lower(low):
    d = low.shape[0]
    inv = np.zeros_like(low)
    eye = np.eye(d, dtype=LD)
    for i in range(d):
        inv[i] = (eye[i] - low[i, :i] @ inv[:i]) / low[i, i]
    return inv


def _regions(t, radius):
    h, w = t.shape
    return np.stack([t[dy:dy + h - radius + 1, dx:dx + w - radius + 1].reshape(-1)
                     for dy in range(radius) for dx in range(radius)])


def loss_and_grad(x, labels, radius, lam=0.5, ignore_index=255):
    """DF 1, sigmoid mode, ``lambda_way = 1``: ``(loss, dloss/dx)`` as long-double arrays."""
    x = np.asarray(x).astype(LD)
    labels = np.asarray(labels).astype(np.int64)
    n, c, h, w = x.shape
    d = radius * radius
    valid = (labels >= 0) & (labels < c) & (labels != ignore_index)
    m = valid.astype(LD)[:, None]
    y = np.stack([((labels == k) & valid).astype(LD) for k in range(c)], 1)
    sig = 1 / (1 + np.exp(-x))
    p = sig * m + CLIP_MIN
    norm = m.sum() + 1
    base = ((np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))) * m).sum() / norm
    w_rmi = (1 - LD(lam)) / (n * d)
    eye = np.eye(d, dtype=LD)
    grad_p = np.zeros_like(p)
    rmi = LD(0)
    nh, nw = h - radius + 1, w - radius + 1
    for i in range(n):
        for k in range(c):
            yv, pv = _regions(y[i, k], radius), _regions(p[i, k], radius)
            yc, pc = yv - yv.mean(1, keepdims=True), pv - pv.mean(1, keepdims=True)
            sy, sp, b = yc @ yc.T, pc @ pc.T, yc @ pc.T
            sp_chol_inv = _tri_inv_lower(_chol(sp + POS_ALPHA * eye))
            a = sp_chol_inv.T @ sp_chol_inv
            mm = sy - b @ a @ b.T
            low = _chol(0.5 * (mm + mm.T) + POS_ALPHA * eye)
            diag = np.diag(low)
            rmi += np.log(diag + LOG_EPS).sum() / (n * d)
            low_inv = _tri_inv_lower(low)
            g = w_rmi * LD(0.5) * low_inv.T @ ((diag / (diag + LOG_EPS))[:, None] * low_inv)
            ba = b @ a
            g_windows = (2 * ba.T @ g @ ba) @ pc - 2 * (a @ b.T @ g) @ yc
            for j, (dy, dx) in enumerate((dy, dx) for dy in range(radius) for dx in range(radius)):
                grad_p[i, k, dy:dy + nh, dx:dx + nw] += g_windows[j].reshape(nh, nw)
    grad = grad_p * m * sig * (1 - sig) + LD(lam) * m * (sig - y) / norm
    return LD(lam) * base + (1 - LD(lam)) * rmi, grad

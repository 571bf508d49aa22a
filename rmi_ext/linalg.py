"""Stage (c): the float64 tiny-matrix stage, shared by every backend.

Inputs are the per-(n, c) centred moment matrices; outputs are the per-(n, c) RMI values and,
for the backward, the stencil coefficients that turn pooled maps into ``dloss/dP``.
"""
from __future__ import annotations

import torch

from ._config import LOG_EPS, POS_ALPHA


def _eye(d: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(d, dtype=like.dtype, device=like.device)


def lu_inverse(x: torch.Tensor) -> torch.Tensor:
    """``x^-1`` for a batch of invertible matrices, by the LU factorisation with partial
    pivoting that ``torch.inverse`` (the authors' code) uses: ``x^-1 = U^-1 L^-1 P^T``.

    Built from ops that never read a device value on the host: ``torch.linalg.inv``,
    ``inv_ex`` and ``lu_solve`` check their pivots or errors with ``.item()`` (a host sync on
    CUDA, and no CUDA-graph capture).
    """
    lu, pivots, _ = torch.linalg.lu_factor_ex(x)
    perm, lower, upper = torch.lu_unpack(lu, pivots)
    y = torch.linalg.solve_triangular(lower, perm.transpose(-2, -1), upper=False,
                                      unitriangular=True)
    return torch.linalg.solve_triangular(upper, y, upper=True)


def rmi_from_moments(cov: torch.Tensor):
    """``cov [N, C, 3, d, d]`` float64 (``Sy, Sp, B``) -> ``rmi [N, C]`` and saved ``(A, L)``.

    ``A = (Sp + aI)^-1``, ``M = Sy - B A B^T``, ``L = chol(M + aI)``, ``rmi = sum log(L_ii + 1e-8)``.
    Recovery (no host sync): where the Cholesky of ``M + aI`` fails (possible only through
    round-off on degenerate maps), it is retried with a ridge ``1e-6 * (mean |diag| + 1)`` more.
    """
    sy, sp, b = cov.unbind(dim=2)
    eye = _eye(cov.shape[-1], cov)
    a = lu_inverse(sp + POS_ALPHA * eye)
    m = sy - b @ a @ b.transpose(-2, -1)
    m = 0.5 * (m + m.transpose(-2, -1)) + POS_ALPHA * eye
    chol, info = torch.linalg.cholesky_ex(m)
    failed = (info > 0)[..., None, None]
    ridge = 1e-6 * (m.diagonal(dim1=-2, dim2=-1).abs().mean(-1) + 1.0)[..., None, None]
    chol_retry, _ = torch.linalg.cholesky_ex(m + ridge * eye)
    chol = torch.where(failed, chol_retry, chol)
    rmi = torch.log(chol.diagonal(dim1=-2, dim2=-1) + LOG_EPS).sum(-1)
    return rmi, (a, chol)


def stencil_coefficients(cov, means, a, chol, scale):
    """Backward of :func:`rmi_from_moments` down to one window's region vectors.

    With ``G = dloss/dM = scale * 0.5 * L^-T D L^-1`` (``D = diag(L_ii / (L_ii + 1e-8))``),
    ``dloss/dp_k = Cp p_k + Cy y_k + c`` where ``Cp = 2 A B^T G B A``, ``Cy = -2 A B^T G`` and
    ``c = -Cp mu_p - Cy mu_y``.

    Args: ``cov [N, C, 3, d, d]``, ``means [N, C, 2, d]`` (``mu_y, mu_p``), saved ``a, chol``
    ``[N, C, d, d]``, ``scale`` broadcastable to ``[N, C]`` (e.g. ``grad_rmi / (N d)``).
    Returns ``coef [N, C, 2, d, d]`` (``Cp, Cy``) and ``shift [N, C, d]``, float64.
    """
    g, ba = _dloss_dm(chol, scale), cov[:, :, 2] @ a
    h = g @ ba  # G B A
    cp = 2.0 * ba.transpose(-2, -1) @ h
    cy = -2.0 * h.transpose(-2, -1)
    mu_y, mu_p = means.unbind(dim=2)
    shift = -(cp @ mu_p.unsqueeze(-1) + cy @ mu_y.unsqueeze(-1)).squeeze(-1)
    return torch.stack((cp, cy), dim=2), shift


def _dloss_dm(chol, scale):
    """``G = dloss/dM = scale * 0.5 * L^-T D L^-1``, ``D = diag(L_ii / (L_ii + 1e-8))``."""
    eye = _eye(chol.shape[-1], chol)
    diag = chol.diagonal(dim1=-2, dim2=-1)
    linv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
    d_scale = (diag / (diag + LOG_EPS)).unsqueeze(-1)
    return (0.5 * scale)[..., None, None] * (linv.transpose(-2, -1) @ (d_scale * linv))


def target_stencil_coefficients(cov, means, a, chol, scale):
    """Backward of :func:`rmi_from_moments` to the target map's region vectors (RMI_SPEC.md
    section 6): ``dloss/dy_k = Dy y_k + Dp p_k + c`` with ``Dy = 2 G``, ``Dp = -2 G B A`` and
    ``c = -Dy mu_y - Dp mu_p``. Same arguments as :func:`stencil_coefficients`; returns
    ``coef [N, C, 2, d, d]`` (``Dy, Dp``) and ``shift [N, C, d]``, float64: the stencil of
    ``dloss/dP`` computes ``dloss/dY`` from them with the two maps swapped."""
    g = _dloss_dm(chol, scale)
    dy, dp = 2.0 * g, -2.0 * g @ cov[:, :, 2] @ a
    mu_y, mu_p = means.unbind(dim=2)
    shift = -(dy @ mu_y.unsqueeze(-1) + dp @ mu_p.unsqueeze(-1)).squeeze(-1)
    return torch.stack((dy, dp), dim=2), shift

"""Public entry points: :func:`rmi_loss`, :func:`rmi_loss_terms` and :class:`RMILoss`."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ._config import RMIConfig, check_inputs, label_map, make_config
from ._dispatch import (auto_volume_backend, backend_info, resolve_backend, supports_volumes,
                        warn_once)
from .function import RMIFunction
from .reference import reference_terms


class RMITerms(NamedTuple):
    """The loss and its two parts (0-d tensors). ``base`` is the BCE (sigmoid mode) or CE
    (softmax mode) term, ``rmi`` the RMI lower-bound term (may be negative, see the README)."""

    loss: torch.Tensor
    base: torch.Tensor
    rmi: torch.Tensor


def _backend_for(backend: str, cfg: RMIConfig, device: torch.device) -> str:
    """The backend that runs: :func:`resolve_backend`, except for volumes and per-axis options
    (``cfg`` resolved, not :attr:`~RMIConfig.is_planar_isotropic`), which run on the backends
    that :func:`supports_volumes`: ``"auto"`` takes the fastest of them
    (:func:`auto_volume_backend`), a named backend without them raises ValueError."""
    if cfg.is_planar_isotropic:
        return resolve_backend(backend, str(device))
    name = auto_volume_backend(str(device)) if backend == "auto" else backend
    name = resolve_backend(name, str(device))
    if supports_volumes(name):
        if name == "reference" and backend == "auto":
            warn_once("rmi_ext: backend 'auto' uses the slow 'reference' backend for volumes "
                      "and per-axis options: no fused backend that computes them runs here")
        return name
    why = "3-D logits [N, C, D, H, W]" if cfg.rank == 3 else "per-axis radius/stride/pool_size"
    able = [b for b in backend_info(device)["volumes"] if b != "reference"]
    raise ValueError(f"rmi_loss backend {name!r} does not support {why} yet; use one of "
                     f"{able + ['reference', 'auto']}")


def rmi_loss_terms(logits, labels, *, radius=3, stride=4, pool="avg", pool_size=None,
                   weight_lambda=0.5, lambda_way=1, ignore_index=255, mode="sigmoid",
                   nonfinite="auto", backend="auto") -> RMITerms:
    """Like :func:`rmi_loss`, but returns ``RMITerms(loss, base, rmi)`` for logging."""
    cfg = make_config(radius, stride, pool, pool_size, weight_lambda, lambda_way, ignore_index,
                      mode, nonfinite)
    labels = label_map(logits, labels)
    cfg = check_inputs(logits, labels, cfg)
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    name = _backend_for(backend, cfg, logits.device)
    # The float64 matrix stage must not be autocast; the kernels choose their own precision.
    with torch.autocast(logits.device.type, enabled=False):
        if name == "reference":
            base, rmi = reference_terms(logits, labels, cfg)
        else:
            base, rmi = RMIFunction.apply(logits, labels, cfg, name)
        base, rmi = base.to(out_dtype), rmi.to(out_dtype)
        w_base, w_rmi = cfg.term_weights
        return RMITerms(w_base * base + w_rmi * rmi, base, rmi)


def rmi_loss(logits, labels, *, radius=3, stride=4, pool="avg", pool_size=None,
             weight_lambda=0.5, lambda_way=1, ignore_index=255, mode="sigmoid",
             nonfinite="auto", backend="auto") -> torch.Tensor:
    """Region Mutual Information loss (Zhao et al., NeurIPS 2019), the authors' exact numbers.

    Args:
        logits: ``[N, C, H, W]`` or, for volumes, ``[N, C, D, H, W]``;
            float16/bfloat16/float32/float64, any memory format (channels_last(_3d) too).
        labels: ``[N, H, W]`` (``[N, D, H, W]``) integer class ids, or the same with a
            channel axis of 1, ``[N, 1, H, W]`` (``[N, 1, D, H, W]``); ``ignore_index`` and ids
            outside ``[0, C)`` are ignored.
        radius: side ``R`` of the region (1..10), an int (every axis) or one side per spatial
            axis, e.g. ``(1, 3, 3)``; region vectors have ``d`` = the product of the sides
            entries (at most 100).
        stride: downsampling factor DF (1 = no downsampling), an int or one per axis, e.g.
            ``(1, 4, 4)`` for thick slices; the maps are downsampled when some stride is > 1.
        pool: ``"avg"`` (paper's best), ``"max"`` or ``"interp"`` (nearest for labels,
            bilinear / trilinear for probabilities, to ``size // stride`` per axis).
        pool_size: pooling kernel size (int or per axis), defaults to ``stride`` (padding
            ``pool_size // 2`` per axis).
        weight_lambda, lambda_way: total is ``lam*base + (1-lam)*rmi`` (``lambda_way=1``) or
            ``base + lam*rmi`` (``lambda_way=0``).
        ignore_index: label value to ignore (default 255).
        mode: ``"sigmoid"`` (BCE + RMI) or ``"softmax"`` (CE + RMI on sigmoid probabilities).
        nonfinite: what NaN/Inf logits do (fast backends): ``"raise"`` a RuntimeError (a host
            sync on CUDA), ``"nan"`` make the loss and the gradient NaN (no sync: AMP's
            GradScaler then skips the step), ``"auto"`` (default) raise on CPU, NaN on CUDA.
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"``.
            Volumes and per-axis options (unequal sides) run on ``"cpu"`` (C++, CPU tensors),
            ``"torch"`` (fused, any device) and ``"reference"``: ``"auto"`` picks the fastest
            (``backend_info(device)["auto_volumes"]``), a planar-only backend (``"cuda"``,
            ``"triton"``) raises ValueError.

    Returns:
        0-d tensor, float32 (float64 for float64 logits). Gradients flow to ``logits``.
    """
    return rmi_loss_terms(logits, labels, radius=radius, stride=stride, pool=pool,
                          pool_size=pool_size, weight_lambda=weight_lambda,
                          lambda_way=lambda_way, ignore_index=ignore_index, mode=mode,
                          nonfinite=nonfinite, backend=backend).loss


class RMILoss(nn.Module):
    """Module form of :func:`rmi_loss`; ``forward(logits, labels)`` returns the total loss
    (``logits [N, C, H, W]`` or ``[N, C, D, H, W]``, the options as in :func:`rmi_loss`).

    ``last_terms`` holds the detached ``RMITerms`` of the latest call (no host sync), for logging.
    """

    def __init__(self, *, radius=3, stride=4, pool="avg", pool_size=None, weight_lambda=0.5,
                 lambda_way=1, ignore_index=255, mode="sigmoid", nonfinite="auto",
                 backend="auto"):
        super().__init__()
        make_config(radius, stride, pool, pool_size, weight_lambda, lambda_way, ignore_index,
                    mode, nonfinite)  # fail at construction, not at the first batch
        self.options = dict(radius=radius, stride=stride, pool=pool, pool_size=pool_size,
                            weight_lambda=weight_lambda, lambda_way=lambda_way,
                            ignore_index=ignore_index, mode=mode, nonfinite=nonfinite,
                            backend=backend)
        self.last_terms: RMITerms | None = None

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        terms = rmi_loss_terms(logits, labels, **self.options)
        self.last_terms = RMITerms(*(t.detach() for t in terms))
        return terms.loss

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

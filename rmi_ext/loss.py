"""Public entry points: :func:`rmi_loss`, :func:`rmi_loss_terms` and :class:`RMILoss`."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ._config import BACKENDS, RMIConfig, check_inputs, label_map, make_config, _check_choice
from ._dispatch import FEATURE_NAMES, auto_backend_for, backend_info, resolve_backend, supports, \
    warn_once
from .function import RegionMIFunction, RMIFunction, nonfinite_poison
from .reference import reference_region_mi, reference_terms
from .targets import FLOAT_DTYPES, RANGE_MESSAGE, FloatTarget, is_float_target

REDUCTIONS = ("mean", "sum", "none")


class RMITerms(NamedTuple):
    """The loss and its two parts (0-d tensors). ``base`` is the BCE (sigmoid mode) or CE
    (softmax mode) term, ``rmi`` the RMI lower-bound term (may be negative, see the README)."""

    loss: torch.Tensor
    base: torch.Tensor
    rmi: torch.Tensor


def _backend_for(backend: str, cfg: RMIConfig, device: torch.device,
                 feature: str | None = None) -> str:
    """The backend that runs: :func:`resolve_backend`, except for volumes and per-axis options
    (``cfg`` resolved, not :attr:`~RMIConfig.is_planar_isotropic`) and ``feature``
    (``"float_targets"``, ``"region_mi"``), which run on the backends that :func:`supports`
    them: ``"auto"`` takes the fastest of those (:func:`auto_backend_for`), a named backend
    without them raises ValueError."""
    features = ("volumes",) * (not cfg.is_planar_isotropic) + ((feature,) if feature else ())
    if not features:
        return resolve_backend(backend, str(device))
    name = auto_backend_for(str(device), features) if backend == "auto" else backend
    name = resolve_backend(name, str(device))
    missing = [f for f in features if not supports(name, f)]
    if not missing:
        if name == "reference" and backend == "auto":
            warn_once(f"rmi_ext: backend 'auto' uses the slow 'reference' backend for "
                      f"{' and '.join(FEATURE_NAMES[f] for f in features)}: no fused backend "
                      f"that computes them runs here")
        return name
    info = backend_info(device)
    able = [b for b in BACKENDS[1:] if b != "reference" and all(b in info[f] for f in features)]
    why = ("3-D logits [N, C, D, H, W]" if missing == ["volumes"] and cfg.rank == 3
           else " and ".join(FEATURE_NAMES[f] for f in missing))
    raise ValueError(f"rmi_ext backend {name!r} does not support {why} yet; use one of "
                     f"{able + ['reference', 'auto']}")


def rmi_loss_terms(logits, labels, *, radius=3, stride=4, pool="avg", pool_size=None,
                   weight_lambda=0.5, lambda_way=1, ignore_index=255, mode="sigmoid",
                   nonfinite="auto", backend="auto", mask=None) -> RMITerms:
    """Like :func:`rmi_loss`, but returns ``RMITerms(loss, base, rmi)`` for logging."""
    cfg = make_config(radius, stride, pool, pool_size, weight_lambda, lambda_way, ignore_index,
                      mode, nonfinite)
    labels = label_map(logits, labels)
    cfg = check_inputs(logits, labels, cfg, mask)
    float_target = is_float_target(labels)
    if float_target:
        if labels.requires_grad:
            raise ValueError("rmi_loss takes no gradient to a float target (labels requires "
                             "grad): detach it, or use rmi_ext.region_mi for RMI between two "
                             "maps with gradients to both")
        if cfg.raises_on_nonfinite(labels.device):  # else RMIFunction poisons the loss
            nonfinite_poison(FloatTarget(labels).out_of_range(), cfg, RANGE_MESSAGE)
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    name = _backend_for(backend, cfg, logits.device, "float_targets" if float_target else None)
    # The float64 matrix stage must not be autocast; the kernels choose their own precision.
    with torch.autocast(logits.device.type, enabled=False):
        if name == "reference":
            base, rmi = reference_terms(logits, labels, cfg, mask)
        else:
            base, rmi = RMIFunction.apply(logits, labels, mask, cfg, name)
        base, rmi = base.to(out_dtype), rmi.to(out_dtype)
        w_base, w_rmi = cfg.term_weights
        return RMITerms(w_base * base + w_rmi * rmi, base, rmi)


def rmi_loss(logits, labels, *, radius=3, stride=4, pool="avg", pool_size=None,
             weight_lambda=0.5, lambda_way=1, ignore_index=255, mode="sigmoid",
             nonfinite="auto", backend="auto", mask=None) -> torch.Tensor:
    """Region Mutual Information loss (Zhao et al., NeurIPS 2019), the authors' exact numbers.

    Args:
        logits: ``[N, C, H, W]`` or, for volumes, ``[N, C, D, H, W]``;
            float16/bfloat16/float32/float64, any memory format (channels_last(_3d) too).
        labels: ``[N, H, W]`` (``[N, D, H, W]``) integer class ids, or the same with a
            channel axis of 1, ``[N, 1, H, W]`` (``[N, 1, D, H, W]``); ``ignore_index`` and ids
            outside ``[0, C)`` are ignored. Or a float target of the logits' shape with values
            in ``[0, 1]`` (one-hot, multi-label, soft probabilities; no gradient): BCE with it
            (sigmoid mode) or soft-target CE (softmax mode), and ``Y = target`` in the RMI.
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
        mask: with a float target only, ``[N, H, W]`` (``[N, D, H, W]``) bool, True = counted
            (the float target's ``ignore_index``); ``None``: every pixel counted.

    Returns:
        0-d tensor, float32 (float64 for float64 logits). Gradients flow to ``logits``.
    """
    return rmi_loss_terms(logits, labels, radius=radius, stride=stride, pool=pool,
                          pool_size=pool_size, weight_lambda=weight_lambda,
                          lambda_way=lambda_way, ignore_index=ignore_index, mode=mode,
                          nonfinite=nonfinite, backend=backend, mask=mask).loss


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

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        terms = rmi_loss_terms(logits, labels, mask=mask, **self.options)
        self.last_terms = RMITerms(*(t.detach() for t in terms))
        return terms.loss

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def _check_maps(pred, target) -> None:
    """``pred`` and ``target``: float tensors of one shape ``[N, C, *spatial]``."""
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"region_mi: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"region_mi: {name} must be a float tensor, got {t.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"region_mi: pred and target must have one shape, got "
                         f"{list(pred.shape)} and {list(target.shape)}")


def region_mi(pred, target, *, radius=3, stride=4, pool="avg", pool_size=None, mask=None,
              reduction="mean", nonfinite="auto", backend="auto") -> torch.Tensor:
    """RMI between two float maps (RMI_SPEC.md section 6): the RMI term of the loss with
    ``P = pred`` and ``Y = target`` (no sigmoid, no BCE/CE), differentiable with respect to both.

    Args:
        pred, target: ``[N, C, H, W]`` or ``[N, C, D, H, W]`` float maps of one shape (any
            values; e.g. a student's and a teacher's probabilities). ``pred`` is downsampled as
            the loss's ``P`` (bilinear / trilinear for ``interp``), ``target`` as its ``Y``
            (nearest for ``interp``).
        radius, stride, pool, pool_size, nonfinite, backend: as in :func:`rmi_loss`.
        mask: ``[N, *spatial]`` bool, True = counted (both maps are zero elsewhere), or None.
        reduction: ``"mean"`` (default): ``sum_c mean_n rmi[n, c] / d``, the loss's RMI term;
            ``"sum"``: the sum over ``n`` and ``c`` of ``rmi[n, c] / d``; ``"none"``: the
            ``[N, C]`` tensor of ``rmi[n, c] / d``.

    ``rmi[n, c]`` is half the log-determinant of the conditional covariance of ``Y``'s regions
    given ``P``'s, in float64: lower means more mutual information (it can be negative).
    Returns float32 (float64 when an input is float64).
    """
    _check_maps(pred, target)
    _check_choice("reduction", reduction, REDUCTIONS)
    cfg = check_inputs(pred, target, make_config(radius, stride, pool, pool_size,
                                                 nonfinite=nonfinite), mask)
    cfg = cfg._replace(mode="region")
    out_dtype = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    name = _backend_for(backend, cfg, pred.device, "region_mi")
    with torch.autocast(pred.device.type, enabled=False):
        if name == "reference":
            rmi = reference_region_mi(pred, target, cfg, mask)
        else:
            rmi = RegionMIFunction.apply(pred, target, mask, cfg, name)
        rmi = rmi.to(out_dtype) / cfg.dim
    if reduction == "none":
        return rmi
    return rmi.mean(dim=0).sum() if reduction == "mean" else rmi.sum()

"""Options of the RMI loss and their validation (shared by every backend)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .targets import FLOAT_DTYPES

POOL_MODES = ("avg", "max", "interp")
LOSS_MODES = ("sigmoid", "softmax")
BACKENDS = ("auto", "reference", "torch", "cpu", "cuda", "triton")
NONFINITE_POLICIES = ("auto", "raise", "nan")

#: Constants of the authors' implementation.
POS_ALPHA = 5e-4  # ridge added to Sp and to M before inverse / Cholesky
CLIP_MIN = 1e-6  # added to P (sigmoid mode) or clamp floor (softmax mode)
LOG_EPS = 1e-8  # added to the Cholesky diagonal before the log
MAX_RADIUS = 10  # per side
MAX_DIM = 100  # d, the length of a region vector


class RMIConfig(NamedTuple):
    """Validated options. ``pool_size`` is already resolved (defaults to ``stride``).

    ``radii``, ``strides`` and ``pool_sizes`` are the per-axis values, one per spatial axis
    (``(h, w)`` or ``(d, h, w)``); ``None`` means the int option applies to every axis and the
    map's rank is not known yet (:meth:`for_rank` fixes it; unresolved, the 2-D meaning).
    ``radius``, ``stride`` and ``pool_size`` are the ints when every axis agrees, else ``None``:
    the 2-D backends read only those ints (see :attr:`is_planar_isotropic`).
    """

    radius: int | None = 3
    stride: int | None = 4
    pool: str = "avg"
    pool_size: int | None = 4
    weight_lambda: float = 0.5
    lambda_way: int = 1
    ignore_index: int = 255
    mode: str = "sigmoid"
    nonfinite: str = "auto"
    radii: tuple[int, ...] | None = None
    strides: tuple[int, ...] | None = None
    pool_sizes: tuple[int, ...] | None = None

    def raises_on_nonfinite(self, device: torch.device) -> bool:
        """``True``: NaN/Inf logits raise; ``False``: they make the loss and gradient NaN.
        ``"auto"`` raises on CPU (no cost) and poisons on CUDA, where raising needs a host sync
        and a device-side assert would kill the CUDA context (see the README, Robustness)."""
        return self.nonfinite == "raise" or (self.nonfinite == "auto" and device.type == "cpu")

    @property
    def rank(self) -> int:
        """Number of spatial axes the options are for (2 until resolved for volumes)."""
        given = [len(t) for t in (self.radii, self.strides, self.pool_sizes) if t is not None]
        return given[0] if given else 2

    def for_rank(self, rank: int) -> "RMIConfig":
        """The config with every per-axis field a tuple of ``rank`` sides (2: ``[N, C, H, W]``
        logits, 3: ``[N, C, D, H, W]``). Raises ValueError if a tuple option has another length
        or ``d`` exceeds :data:`MAX_DIM`."""
        sides = {}
        for name, ints, axes in (("radius", self.radius, self.radii),
                                 ("stride", self.stride, self.strides),
                                 ("pool_size", self.pool_size, self.pool_sizes)):
            if axes is None:
                axes = (ints,) * rank
            elif len(axes) != rank:
                raise ValueError(
                    f"{name} {axes} has {len(axes)} sides but the logits have {rank} spatial "
                    f"axes ({_LAYOUTS.get(rank, rank)}): give one side per axis or an int")
            sides[name] = axes
        dim = math.prod(sides["radius"])
        if dim > MAX_DIM:
            raise ValueError(
                f"radius {self.radii or self.radius} on {rank} axes gives regions of "
                f"d = {dim} entries, more than {MAX_DIM}: use a smaller radius")
        return self._replace(radii=sides["radius"], strides=sides["stride"],
                             pool_sizes=sides["pool_size"])

    @property
    def is_planar_isotropic(self) -> bool:
        """``True`` for 2-D maps with the same radius, stride and pool size on both axes: what
        the 2-D backends compute from the int fields alone."""
        return (self.rank == 2 and None not in (self.radius, self.stride, self.pool_size))

    @property
    def dim(self) -> int:
        """Length of a region vector, ``d`` = the product of the radius sides (``R * R`` in 2-D)."""
        return math.prod(self.for_rank(self.rank).radii)

    @property
    def term_weights(self) -> tuple[float, float]:
        """Weights ``(w_base, w_rmi)`` of the BCE/CE term and of the RMI term in the total."""
        lam = self.weight_lambda
        return (lam, 1.0 - lam) if self.lambda_way == 1 else (1.0, lam)

    @property
    def pools(self) -> bool:
        """Whether the maps are downsampled (some stride > 1; spec section 5)."""
        return any(s > 1 for s in self.for_rank(self.rank).strides)

    def pooled_size(self, *spatial: int) -> tuple[int, ...]:
        """Size of the maps after downsampling a map of size ``spatial`` (``(H, W)`` or
        ``(D, H, W)``): ``n // s`` per axis for ``interp``, else the pooling output size."""
        cfg = self.for_rank(len(spatial))
        if not cfg.pools:
            return tuple(spatial)
        if self.pool == "interp":
            return tuple(n // s for n, s in zip(spatial, cfg.strides))
        return tuple((n + 2 * (k // 2) - k) // s + 1
                     for n, s, k in zip(spatial, cfg.strides, cfg.pool_sizes))


_LAYOUTS = {2: "[N, C, H, W]", 3: "[N, C, D, H, W]"}


def _show(ints: int | None, axes: tuple[int, ...] | None):
    """An option as the user gave it: the int when every axis agrees, else the tuple."""
    return ints if ints is not None else axes


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _check_sides(name: str, value, low: int, high: int | None = None):
    """An int or a per-axis tuple/list of 2 or 3 ints -> ``(int or None, tuple or None)``:
    ``(v, None)`` for an int (every axis), ``(v, sides)`` when the sides agree, else
    ``(None, sides)``."""
    if isinstance(value, (tuple, list)):
        if len(value) not in _LAYOUTS:
            raise ValueError(f"{name} must be an int or have one side per spatial axis (2 or 3), "
                             f"got {value!r}")
        sides = tuple(_check_int(f"{name} {tuple(value)} side", v, low, high) for v in value)
        return (sides[0] if len(set(sides)) == 1 else None), sides
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or a tuple of ints, got "
                        f"{type(value).__name__} ({value!r})")
    return _check_int(name, value, low, high), None


def _check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def make_config(
    radius=3,
    stride=4,
    pool="avg",
    pool_size=None,
    weight_lambda=0.5,
    lambda_way=1,
    ignore_index=255,
    mode="sigmoid",
    nonfinite="auto",
) -> RMIConfig:
    """Check every option once and return an :class:`RMIConfig` (raises TypeError/ValueError).

    ``radius``, ``stride`` and ``pool_size`` are ints or per-axis tuples (2 or 3 sides, all
    tuples of the same length); each radius side is in ``[1, MAX_RADIUS]``.
    """
    radius, radii = _check_sides("radius", radius, 1, MAX_RADIUS)
    stride, strides = _check_sides("stride", stride, 1)
    pool = _check_choice("pool", pool, POOL_MODES)
    if pool_size is None:
        pool_size, pool_sizes = stride, strides
    else:
        pool_size, pool_sizes = _check_sides("pool_size", pool_size, 1)
    lengths = {f"{n} {t}": len(t) for n, t in (("radius", radii), ("stride", strides),
                                                ("pool_size", pool_sizes)) if t is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-axis options must have the same number of sides, got "
                         f"{', '.join(lengths)}")
    if isinstance(weight_lambda, bool) or not isinstance(weight_lambda, (int, float)):
        raise TypeError(f"weight_lambda must be a float, got {type(weight_lambda).__name__}")
    if not 0.0 <= float(weight_lambda) <= 1.0:
        raise ValueError(f"weight_lambda must be in [0, 1], got {weight_lambda}")
    lambda_way = _check_int("lambda_way", lambda_way, 0, 1)
    ignore_index = _check_int("ignore_index", ignore_index, -(2**62))
    mode = _check_choice("mode", mode, LOSS_MODES)
    nonfinite = _check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    cfg = RMIConfig(radius, stride, pool, pool_size, float(weight_lambda), lambda_way,
                    ignore_index, mode, nonfinite, radii, strides, pool_sizes)
    if lengths:
        cfg.for_rank(cfg.rank)  # d <= MAX_DIM, as soon as the rank is known
    return cfg


#: Label dtypes accepted by every backend (the same rule as csrc/rmi_ops.h is_label_dtype).
LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def label_map(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``labels`` as the ``[N, *spatial]`` map the backends take: integer labels
    ``[N, 1, *spatial]`` (segmentation_models_pytorch, MONAI) become a view without their
    channel axis; anything else is returned as given, for :func:`check_inputs` to judge."""
    if (isinstance(logits, torch.Tensor) and isinstance(labels, torch.Tensor)
            and labels.dim() == logits.dim() >= 2 and labels.shape[1] == 1
            and labels.dtype in LABEL_DTYPES):
        return labels[:, 0]
    return labels


def _check_mask(logits: torch.Tensor, labels: torch.Tensor, mask) -> None:
    """``mask``: ``None``, or ``[N, *spatial]`` bool beside a float target."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if labels.dtype not in FLOAT_DTYPES:
        raise ValueError("mask is for float targets; integer labels mark ignored pixels with "
                         "ignore_index")
    n, _, *spatial = logits.shape
    if mask.dtype != torch.bool or list(mask.shape) != [n, *spatial]:
        raise ValueError(f"mask must be a bool tensor of shape {[n, *spatial]} (True = counted), "
                         f"got {mask.dtype} {list(mask.shape)}")
    if mask.device != logits.device:
        raise ValueError(f"mask must be on the logits' device {logits.device}, got {mask.device}")


def check_inputs(logits: torch.Tensor, labels: torch.Tensor, cfg: RMIConfig,
                 mask: torch.Tensor | None = None) -> RMIConfig:
    """Check ``logits [N, C, H, W]`` / ``[N, C, D, H, W]`` and ``labels`` (integer ``[N, H, W]``
    / ``[N, D, H, W]``, or a float target of the logits' shape with an optional bool ``mask``
    ``[N, *spatial]``: shapes, dtypes, devices) against ``cfg``; returns
    ``cfg.for_rank(logits.dim() - 2)``.

    Never reads tensor values (no host sync); non-finite logits are caught in the forward pass.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if logits.dim() not in (4, 5):
        raise ValueError(f"logits must be 4-D [N, C, H, W] or 5-D [N, C, D, H, W], got shape "
                         f"{tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    n, c, *spatial = logits.shape
    _check_mask(logits, labels, mask)
    if labels.dtype in FLOAT_DTYPES:
        if list(labels.shape) in ([n, *spatial], [n, 1, *spatial]) and c > 1:
            raise TypeError(f"labels must be uint8, int8, int16, int32 or int64 class ids of "
                            f"shape {list(labels.shape)}, got {labels.dtype} (a float target "
                            f"must have the logits' shape {list(logits.shape)})")
        if labels.shape != logits.shape:
            raise ValueError(f"a float target (labels, {labels.dtype}) must have the logits' "
                             f"shape {list(logits.shape)}, got {list(labels.shape)}")
    elif labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be uint8, int8, int16, int32 or int64, got {labels.dtype} "
                        f"(or a float target of the logits' shape)")
    elif list(labels.shape) != [n, *spatial]:
        axes = "[N, H, W]" if len(spatial) == 2 else "[N, D, H, W]"
        raise ValueError(
            f"labels must have shape {axes} = {[n, *spatial]} (or {[n, 1, *spatial]}) to "
            f"match logits {list(logits.shape)}, got {list(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"logits and labels must be on the same device, got {logits.device} "
                         f"and {labels.device}")
    if n == 0 or c == 0:
        raise ValueError(f"logits must have N >= 1 and C >= 1, got shape {tuple(logits.shape)}")
    cfg = cfg.for_rank(len(spatial))
    pooled = cfg.pooled_size(*spatial)
    if any(p < r for p, r in zip(pooled, cfg.radii)):
        size = lambda sides: "x".join(map(str, sides))  # noqa: E731
        raise ValueError(
            f"the downsampled map is {size(pooled)} (input {size(spatial)}, stride "
            f"{_show(cfg.stride, cfg.strides)}, pool {cfg.pool!r}), smaller than the region "
            f"radius {_show(cfg.radius, cfg.radii)}: no {size(cfg.radii)} region fits; use a "
            f"smaller stride or radius")
    return cfg

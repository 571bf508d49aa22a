"""Options of the RMI loss and their validation (shared by every backend)."""
from __future__ import annotations

from typing import NamedTuple

import torch

POOL_MODES = ("avg", "max", "interp")
LOSS_MODES = ("sigmoid", "softmax")
BACKENDS = ("auto", "reference", "torch", "cpu", "cuda", "triton")
NONFINITE_POLICIES = ("auto", "raise", "nan")

#: Constants of the authors' implementation.
POS_ALPHA = 5e-4  # ridge added to Sp and to M before inverse / Cholesky
CLIP_MIN = 1e-6  # added to P (sigmoid mode) or clamp floor (softmax mode)
LOG_EPS = 1e-8  # added to the Cholesky diagonal before the log
MAX_RADIUS = 10


class RMIConfig(NamedTuple):
    """Validated options. ``pool_size`` is already resolved (defaults to ``stride``)."""

    radius: int = 3
    stride: int = 4
    pool: str = "avg"
    pool_size: int = 4
    weight_lambda: float = 0.5
    lambda_way: int = 1
    ignore_index: int = 255
    mode: str = "sigmoid"
    nonfinite: str = "auto"

    def raises_on_nonfinite(self, device: torch.device) -> bool:
        """``True``: NaN/Inf logits raise; ``False``: they make the loss and gradient NaN.
        ``"auto"`` raises on CPU (no cost) and poisons on CUDA, where raising needs a host sync
        and a device-side assert would kill the CUDA context (see the README, Robustness)."""
        return self.nonfinite == "raise" or (self.nonfinite == "auto" and device.type == "cpu")

    @property
    def dim(self) -> int:
        """Length of a region vector, ``d = R * R``."""
        return self.radius * self.radius

    @property
    def term_weights(self) -> tuple[float, float]:
        """Weights ``(w_base, w_rmi)`` of the BCE/CE term and of the RMI term in the total."""
        lam = self.weight_lambda
        return (lam, 1.0 - lam) if self.lambda_way == 1 else (1.0, lam)

    def pooled_size(self, height: int, width: int) -> tuple[int, int]:
        """Size ``(h, w)`` of the maps after downsampling a ``H x W`` map."""
        s = self.stride
        if s == 1:
            return height, width
        if self.pool == "interp":
            return height // s, width // s
        k, pad = self.pool_size, self.pool_size // 2
        return (height + 2 * pad - k) // s + 1, (width + 2 * pad - k) // s + 1


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


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
    """Check every option once and return an :class:`RMIConfig` (raises TypeError/ValueError)."""
    radius = _check_int("radius", radius, 1, MAX_RADIUS)
    stride = _check_int("stride", stride, 1)
    pool = _check_choice("pool", pool, POOL_MODES)
    pool_size = stride if pool_size is None else _check_int("pool_size", pool_size, 1)
    if isinstance(weight_lambda, bool) or not isinstance(weight_lambda, (int, float)):
        raise TypeError(f"weight_lambda must be a float, got {type(weight_lambda).__name__}")
    if not 0.0 <= float(weight_lambda) <= 1.0:
        raise ValueError(f"weight_lambda must be in [0, 1], got {weight_lambda}")
    lambda_way = _check_int("lambda_way", lambda_way, 0, 1)
    ignore_index = _check_int("ignore_index", ignore_index, -(2**62))
    mode = _check_choice("mode", mode, LOSS_MODES)
    nonfinite = _check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    return RMIConfig(radius, stride, pool, pool_size, float(weight_lambda), lambda_way,
                     ignore_index, mode, nonfinite)


#: Label dtypes accepted by every backend (the same rule as csrc/rmi_ops.h is_label_dtype).
LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_inputs(logits: torch.Tensor, labels: torch.Tensor, cfg: RMIConfig) -> None:
    """Check shapes, dtypes and devices of ``logits [N, C, H, W]`` and ``labels [N, H, W]``.

    Never reads tensor values (no host sync); non-finite logits are caught in the forward pass.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if logits.dim() != 4:
        raise ValueError(f"logits must be 4-D [N, C, H, W], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be uint8, int8, int16, int32 or int64, got {labels.dtype}")
    n, c, h, w = logits.shape
    if tuple(labels.shape) != (n, h, w):
        raise ValueError(
            f"labels must have shape [N, H, W] = {[n, h, w]} to match logits {list(logits.shape)}, "
            f"got {list(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"logits and labels must be on the same device, got {logits.device} "
                         f"and {labels.device}")
    if n == 0 or c == 0:
        raise ValueError(f"logits must have N >= 1 and C >= 1, got shape {tuple(logits.shape)}")
    ph, pw = cfg.pooled_size(h, w)
    if ph < cfg.radius or pw < cfg.radius:
        raise ValueError(
            f"the downsampled map is {ph}x{pw} (input {h}x{w}, stride {cfg.stride}, pool "
            f"{cfg.pool!r}), smaller than the region radius {cfg.radius}: no {cfg.radius}x"
            f"{cfg.radius} region fits; use a smaller stride or radius")

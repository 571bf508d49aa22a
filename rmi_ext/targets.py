"""Float targets (RMI_SPEC.md section 6): a float map of the logits' shape and its mask.

Integer label maps ``[N, *S]`` stay plain tensors; a float target (one-hot, multi-label, soft
probabilities, or the second map of :func:`rmi_ext.region_mi`) travels through the backends as
a :class:`FloatTarget`, which indexes like a label map so that a backend slices both alike.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
RANGE_MESSAGE = ("rmi_loss: the float target (labels) must hold values in [0, 1]; it has values "
                 "outside [0, 1] or NaN")


class FloatTarget:
    """``values [N, C, *S]`` float and ``mask [N, *S]`` bool (True = counted) or ``None``
    (every pixel counted). ``target[i]`` indexes the label-map axes ``[N, *S]`` of both: the
    class axis of ``values`` stays whole."""

    __slots__ = ("values", "mask")

    def __init__(self, values: torch.Tensor, mask: torch.Tensor | None = None):
        self.values, self.mask = values, mask

    def __getitem__(self, index) -> "FloatTarget":
        index = index if isinstance(index, tuple) else (index,)
        values = self.values[(index[0], slice(None), *index[1:])]
        return FloatTarget(values, None if self.mask is None else self.mask[index])

    def valid(self) -> torch.Tensor:
        """``[N, *S]`` bool: the pixels counted."""
        if self.mask is not None:
            return self.mask
        n, _, *spatial = self.values.shape
        return torch.ones((n, *spatial), dtype=torch.bool, device=self.values.device)

    def planes(self, valid: torch.Tensor, first: int, count: int, dtype) -> torch.Tensor:
        """``Y [N, count, *S]`` in ``dtype``: the classes ``first .. first + count - 1`` of the
        target, zero where ``valid`` is False."""
        return self.values[:, first:first + count].to(dtype) * valid.unsqueeze(1)

    def out_of_range(self) -> torch.Tensor:
        """0-d int64: 1 when some value is outside ``[0, 1]`` or NaN, else 0 (one ``aminmax``
        pass, no temporaries; NaN gives NaN)."""
        low, high = torch.aminmax(self.values)
        return (~((low >= 0) & (high <= 1))).long()


def labels_and_mask(labels):
    """The ops' ``labels`` and ``mask``: a label map and None, or a :class:`FloatTarget`'s
    values and mask."""
    return (labels.values, labels.mask) if isinstance(labels, FloatTarget) else (labels, None)


def is_float_target(labels: torch.Tensor) -> bool:
    return isinstance(labels, torch.Tensor) and labels.dtype in FLOAT_DTYPES


def as_target(labels: torch.Tensor, mask: torch.Tensor | None):
    """What the backends take: the integer label map itself, or a :class:`FloatTarget`."""
    return FloatTarget(labels, mask) if is_float_target(labels) else labels


"""Python side of the ``torch.ops.rmi_ext`` custom ops: loading and fake (meta) kernels.

The fake kernels (:mod:`rmi_ext.function`) check the inputs and give the outputs' shapes and
dtypes, so ``torch.compile`` can trace through the ops.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the schemas and the CPU/CUDA kernels)
from .function import fake_backward_grad, fake_forward_stats, op_sides
from .targets import labels_and_mask as _labels_and_mask

ops = torch.ops.rmi_ext
torch.library.register_fake("rmi_ext::forward_stats")(fake_forward_stats)
torch.library.register_fake("rmi_ext::backward_grad")(fake_backward_grad)


def forward_stats(logits, labels, cfg):
    """Stages (a)+(b) through the compiled kernels; see :mod:`rmi_ext.function`."""
    radius, stride, pool_size = op_sides(logits, cfg)
    labels, mask = _labels_and_mask(labels)
    return ops.forward_stats(logits, labels, radius, stride, cfg.pool, pool_size,
                             cfg.ignore_index, cfg.mode, mask)


def backward_grad(logits, labels, cfg, base_scale, coef, shift):
    """Stages (d)+(e) through the compiled kernels; see :mod:`rmi_ext.function`."""
    radius, stride, pool_size = op_sides(logits, cfg)
    labels, mask = _labels_and_mask(labels)
    return ops.backward_grad(logits, labels, base_scale, coef, shift, radius, stride, cfg.pool,
                             pool_size, cfg.ignore_index, cfg.mode, mask)

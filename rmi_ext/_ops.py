"""Python side of the ``torch.ops.rmi_ext`` custom ops: loading and fake (meta) kernels.

The fake kernels give shapes/dtypes only, so ``torch.compile`` can trace through the ops.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the schemas and the CPU/CUDA kernels)
from .function import empty_stats

ops = torch.ops.rmi_ext


@torch.library.register_fake("rmi_ext::forward_stats")
def _forward_stats_fake(logits, labels, radius, stride, pool, pool_size, ignore_index, mode):
    return empty_stats(logits, radius)


@torch.library.register_fake("rmi_ext::backward_grad")
def _backward_grad_fake(logits, labels, base_scale, coef, shift, radius, stride, pool,
                        pool_size, ignore_index, mode):
    return torch.empty_like(logits)


def forward_stats(logits, labels, cfg):
    """Stages (a)+(b) through the compiled kernels; see :mod:`rmi_ext.function`."""
    return ops.forward_stats(logits, labels, cfg.radius, cfg.stride, cfg.pool, cfg.pool_size,
                             cfg.ignore_index, cfg.mode)


def backward_grad(logits, labels, cfg, base_scale, coef, shift):
    """Stages (d)+(e) through the compiled kernels; see :mod:`rmi_ext.function`."""
    return ops.backward_grad(logits, labels, base_scale, coef, shift, cfg.radius, cfg.stride,
                             cfg.pool, cfg.pool_size, cfg.ignore_index, cfg.mode)

"""The two losses the training demo compares: the base term alone, and base + RMI.

Both take ``logits`` float ``[N, C, H, W]`` and ``labels`` integer ``[N, H, W]`` (255 =
ignored), return a 0-d loss, and keep ``last_terms = (total, base, rmi or None)`` (detached 0-d
tensors) for the training log. The base term is BCE in sigmoid mode (the paper's RMI
experiments) and CE in softmax mode; the RMI run adds ``rmi_ext.RMILoss``'s RMI term.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import rmi_ext
import synthetic_shapes as shapes

IGNORE = shapes.IGNORE_INDEX
#: How the reports name the two runs, per mode.
RUN_LABEL = {"softmax": {"base": "CE", "rmi": "CE+RMI"},
             "sigmoid": {"base": "BCE", "rmi": "BCE+RMI"}}
#: The command-line options that configure a loss (the keyword arguments of make_criterion).
CRITERION_OPTIONS = ("mode", "backend", "radius", "stride", "pool", "weight_lambda")


def bce_loss(logits, labels):
    """The BCE term of the RMI loss in sigmoid mode (spec section 1.3): per-class BCE with
    logits, summed over classes, divided by (number of valid pixels + 1). 0-d, logits' dtype."""
    valid = (labels >= 0) & (labels < logits.shape[1]) & (labels != IGNORE)
    onehot = F.one_hot(torch.where(valid, labels, 0).long(), logits.shape[1])
    onehot = onehot.permute(0, 3, 1, 2).to(logits.dtype) * valid[:, None]
    per = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none") * valid[:, None]
    return per.sum() / (valid.sum() + 1)


class BaseLoss(nn.Module):
    """CE (softmax mode) or BCE (sigmoid mode) alone, with the same ``last_terms`` as RMILoss."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.last_terms = None

    def forward(self, logits, labels):
        if self.mode == "softmax":
            loss = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE)
        else:
            loss = bce_loss(logits, labels)
        self.last_terms = (loss.detach(), loss.detach(), None)
        return loss


def make_criterion(run, mode, backend="auto", radius=3, stride=4, pool="avg",
                   weight_lambda=0.5):
    """The loss of ``run``: ``"base"`` (BaseLoss) or ``"rmi"`` (RMILoss, lambda_way 1: total =
    weight_lambda * base + (1 - weight_lambda) * RMI)."""
    if run == "base":
        return BaseLoss(mode)
    return rmi_ext.RMILoss(radius=radius, stride=stride, pool=pool, weight_lambda=weight_lambda,
                           lambda_way=1, ignore_index=IGNORE, mode=mode, backend=backend)


def criterion_options(args, **overrides) -> dict:
    """make_criterion's keyword arguments from the parsed command line, with ``overrides``
    (e.g. ``backend="reference"``); a plain dict, so it also travels as JSON."""
    return {**{name: getattr(args, name) for name in CRITERION_OPTIONS}, **overrides}

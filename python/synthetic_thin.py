"""A procedural segmentation data set built around RMI's mechanism ("thin, weak evidence").

Every image is built from a fixed seed with a ``torch.Generator`` (no downloads, no files).
Class identity is decidable from local evidence, a colour tint and a stripe texture, but that
evidence is weak: low contrast against a textured background, a blur, pixel noise and grey
occluders drawn over the objects (labelled background). Most structures are thin or small:
1-2 px lines, thin rings and small blobs, so that the dependency between neighbouring pixels
(what a region-level loss such as RMI models) should matter.

Classes (``NUM_CLASSES = 5``): background (0) and 4 tints (``TINTS``), class ``1 + tint``.
``make_dataset`` also returns the mask of the pixels that belong to a visible thin structure
(a line or a ring), for the thin-structure metric.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from synthetic_shapes import _smooth_noise, _uniform

TINTS = ("red", "green", "blue", "yellow")
KINDS = ("line", "ring", "blob")
THIN_KINDS = ("line", "ring")
NUM_CLASSES = 1 + len(TINTS)
IGNORE_INDEX = 255
CLASS_NAMES = ("background",) + TINTS

# Unit colour directions added to the local grey (low contrast: scaled by 0.18-0.32).
_TINT = torch.tensor([[1.0, -0.5, -0.5], [-0.5, 1.0, -0.5], [-0.5, -0.5, 1.0], [0.7, 0.7, -1.0]])
_TINT = _TINT / _TINT.norm(dim=1, keepdim=True)
# Stripe orientation of each class's texture (radians): a second, texture cue.
_STRIPE_ANGLE = torch.tensor([0.0, 0.5, 1.0, 1.5]) * math.pi / 2


def _object_masks(g, n, size, yy, xx, present):
    """One random object per image where ``present`` (bool [n]): ``(kind [n], mask [n, S, S]
    bool)``."""
    s = float(size)
    kind = torch.multinomial(torch.tensor([0.45, 0.3, 0.25]), n, replacement=True, generator=g)
    cy, cx = _uniform(g, n, 0.1 * s, 0.9 * s), _uniform(g, n, 0.1 * s, 0.9 * s)
    angle = _uniform(g, n, 0.0, math.pi)
    cy3, cx3 = cy[:, None, None], cx[:, None, None]
    dy, dx = yy - cy3, xx - cx3
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    dist = torch.sqrt(dy * dy + dx * dx)
    width = _uniform(g, n, 1.0, 2.2)[:, None, None]   # lines and rings: 1-2 px
    half_len = _uniform(g, n, 0.12 * s, 0.35 * s)[:, None, None]
    line = (v.abs() <= width / 2) & (u.abs() <= half_len)
    radius = _uniform(g, n, 0.08 * s, 0.2 * s)[:, None, None]
    ring = (dist - radius).abs() <= width / 2
    blob_r = _uniform(g, n, 1.5, 0.09 * s)[:, None, None]
    aspect = _uniform(g, n, 0.5, 1.0)[:, None, None]
    blob = (u / blob_r) ** 2 + (v / (blob_r * aspect)) ** 2 <= 1.0
    masks = torch.stack([line, ring, blob], 1)
    return kind, masks[torch.arange(n), kind] & present[:, None, None]


def make_dataset(num_images: int, size: int = 48, *, seed: int = 0, min_objects: int = 4,
                 max_objects: int = 8, occluders: int = 2, noise: float = 0.06,
                 contrast=(0.18, 0.32)):
    """``(images float32 [N, 3, S, S] in [0, 1], labels uint8 [N, S, S], thin bool [N, S, S])``,
    deterministic in ``seed``. ``thin`` marks the visible pixels of lines and rings."""
    g = torch.Generator().manual_seed(seed)
    n, s = num_images, size
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32) + 0.5,
                            torch.arange(s, dtype=torch.float32) + 0.5, indexing="ij")
    grey = (_uniform(g, n, 0.35, 0.65)[:, None, None, None]
            + 0.2 * (_smooth_noise(g, n, s, 3) - 0.5)
            + 0.08 * (_smooth_noise(g, n, s, max(4, s // 4)) - 0.5))
    images = grey.expand(n, 3, s, s).clone()
    labels = torch.zeros(n, s, s, dtype=torch.uint8)
    thin = torch.zeros(n, s, s, dtype=torch.bool)
    count = torch.randint(min_objects, max_objects + 1, (n,), generator=g)
    for slot in range(max_objects):
        kind, mask = _object_masks(g, n, s, yy, xx, present=slot < count)
        tint = torch.randint(0, len(TINTS), (n,), generator=g)
        amp = _uniform(g, n, *contrast)[:, None, None, None]
        phase = _uniform(g, n, 0.0, 2 * math.pi)[:, None, None]
        theta = _STRIPE_ANGLE[tint][:, None, None]
        stripe = torch.sin(2 * math.pi * (xx * torch.cos(theta) + yy * torch.sin(theta)) / 4
                           + phase)
        paint = grey + amp * _TINT[tint][:, :, None, None] + 0.05 * stripe[:, None]
        images = torch.where(mask[:, None], paint, images)
        labels = torch.where(mask, (1 + tint).to(torch.uint8)[:, None, None], labels)
        is_thin = (kind < len(THIN_KINDS))[:, None, None]
        thin = torch.where(mask, is_thin, thin)
    # Occluders: grey bars in the background's tone, drawn over objects, labelled background.
    for _ in range(occluders):
        cy, cx = _uniform(g, n, 0, s), _uniform(g, n, 0, s)
        angle = _uniform(g, n, 0.0, math.pi)[:, None, None]
        v = (torch.cos(angle) * (yy - cy[:, None, None])
             - torch.sin(angle) * (xx - cx[:, None, None]))
        bar = v.abs() <= _uniform(g, n, 1.0, 2.5)[:, None, None]
        images = torch.where(bar[:, None], grey + 0.03, images)
        labels = torch.where(bar, torch.zeros_like(labels), labels)
        thin &= ~bar
    # Blur (3x3 binomial kernel), then noise.
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    images = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    images = images + noise * torch.randn(images.shape, generator=g)
    return images.clamp_(0.0, 1.0).contiguous(), labels, thin


def palette() -> torch.Tensor:
    """Fixed colours for the 5 classes (uint8 ``[256, 3]``; 255 = ignore, drawn white)."""
    pal = torch.zeros(256, 3, dtype=torch.uint8)
    pal[:NUM_CLASSES] = torch.tensor([[30, 30, 30], [228, 26, 28], [77, 175, 74],
                                      [55, 126, 184], [255, 217, 47]], dtype=torch.uint8)
    pal[IGNORE_INDEX] = torch.tensor([255, 255, 255])
    return pal

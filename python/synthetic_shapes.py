"""A procedurally generated semantic-segmentation data set ("synthetic shapes").

Every image is built from a fixed seed with a ``torch.Generator`` (no downloads, no files):
a textured, low-saturation background (class 0) with several overlapping shapes painted on top,
later shapes occluding earlier ones, then pixel noise.

Classes (``NUM_CLASSES = 21``): background plus 5 shape kinds x 4 colours, class
``1 + kind * 4 + colour``:

* kinds: ``disc``, ``box`` (rotated rectangle), ``triangle``, ``ring`` (thin, 2-3 px wide)
  and ``line`` (thin, 1.5-3 px wide segment);
* colours: red, green, blue, yellow, each with per-shape jitter.

The colour is readable from a pixel, but the kind is not: telling a disc from a box or a
triangle of the same colour needs the shape's outline, which is what a region-level loss such
as RMI is about. Rings and lines are thin structures. The outer ``IGNORE_BORDER`` pixels of every
label map are ``IGNORE_INDEX`` (255), as in VOC-style data.
"""
from __future__ import annotations

import math

import torch

KINDS = ("disc", "box", "triangle", "ring", "line")
COLOURS = ("red", "green", "blue", "yellow")
NUM_CLASSES = 1 + len(KINDS) * len(COLOURS)
IGNORE_INDEX = 255
IGNORE_BORDER = 2
CLASS_NAMES = ("background",) + tuple(f"{c}-{k}" for k in KINDS for c in COLOURS)

_RGB = torch.tensor([[0.85, 0.20, 0.20],   # red
                     [0.20, 0.75, 0.25],   # green
                     [0.20, 0.35, 0.90],   # blue
                     [0.90, 0.80, 0.15]])  # yellow


def class_of(kind: int, colour: int) -> int:
    return 1 + kind * len(COLOURS) + colour


def _uniform(g, n, low, high):
    return low + (high - low) * torch.rand(n, generator=g)


def _smooth_noise(g, n, size, cells):
    """Low-frequency noise in [0, 1], float32 ``[n, 1, S, S]``: a coarse random grid upsampled
    bilinearly."""
    coarse = torch.rand(n, 1, cells, cells, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                           align_corners=True)


def _shape_masks(g, n, size, yy, xx):
    """One random shape per image: ``(kind [n], mask [n, S, S] bool)``."""
    kind = torch.randint(0, len(KINDS), (n,), generator=g)
    s = float(size)
    cy, cx = _uniform(g, n, 0.1 * s, 0.9 * s), _uniform(g, n, 0.1 * s, 0.9 * s)
    radius = _uniform(g, n, 0.1 * s, 0.22 * s)
    angle = _uniform(g, n, 0.0, math.pi)
    cy3, cx3, r3 = cy[:, None, None], cx[:, None, None], radius[:, None, None]
    dy, dx = yy - cy3, xx - cx3
    dist = torch.sqrt(dy * dy + dx * dx)
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy

    disc = dist <= r3
    aspect = _uniform(g, n, 0.45, 1.0)[:, None, None]
    box = (u.abs() <= r3) & (v.abs() <= r3 * aspect)
    # Triangle: three vertices at jittered angles on the circle of radius r, edge-function test.
    base = (angle[:, None] + torch.tensor([0.0, 2.1, 4.2])
            + _uniform(g, 3 * n, -0.35, 0.35).view(n, 3))
    vy = cy[:, None] + radius[:, None] * torch.sin(base)
    vx = cx[:, None] + radius[:, None] * torch.cos(base)
    edges = []
    for i in range(3):
        j = (i + 1) % 3
        ay, ax = vy[:, i, None, None], vx[:, i, None, None]
        by, bx = vy[:, j, None, None], vx[:, j, None, None]
        edges.append((bx - ax) * (yy - ay) - (by - ay) * (xx - ax))
    e = torch.stack(edges)
    triangle = (e >= 0).all(0) | (e <= 0).all(0)
    ring_w = _uniform(g, n, 2.0, 3.0)[:, None, None]
    ring = (dist - r3 * 1.1).abs() <= ring_w / 2
    # Line: a segment through the centre, length 2.5r..5r, width 1.5..3 px.
    half_len = r3 * _uniform(g, n, 1.25, 2.5)[:, None, None]
    line_w = _uniform(g, n, 1.5, 3.0)[:, None, None]
    line = (v.abs() <= line_w / 2) & (u.abs() <= half_len)

    masks = torch.stack([disc, box, triangle, ring, line], 1)  # [n, 5, S, S]
    return kind, masks[torch.arange(n), kind]


def make_dataset(num_images: int, size: int = 64, *, seed: int = 0, min_shapes: int = 4,
                 max_shapes: int = 8, noise: float = 0.06):
    """``(images float32 [N, 3, S, S] in about [0, 1], labels uint8 [N, S, S])``, deterministic."""
    g = torch.Generator().manual_seed(seed)
    n, s = num_images, size
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32) + 0.5,
                            torch.arange(s, dtype=torch.float32) + 0.5, indexing="ij")
    # Background: grey-ish colour, a smooth illumination gradient and a fine texture.
    grey = _uniform(g, n, 0.3, 0.6)[:, None, None, None]
    tint = 0.08 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    images = (grey + tint + 0.25 * (_smooth_noise(g, n, s, 3) - 0.5)
              + 0.12 * (_smooth_noise(g, n, s, max(4, s // 6)) - 0.5)).expand(n, 3, s, s).clone()
    labels = torch.zeros(n, s, s, dtype=torch.uint8)

    count = torch.randint(min_shapes, max_shapes + 1, (n,), generator=g)
    for slot in range(max_shapes):
        kind, mask = _shape_masks(g, n, s, yy, xx)
        colour = torch.randint(0, len(COLOURS), (n,), generator=g)
        mask &= (slot < count)[:, None, None]
        rgb = _RGB[colour] + 0.12 * (torch.rand(n, 3, generator=g) - 0.5)
        # Shading across the shape so flat colour is not the only cue.
        shade = 1.0 + 0.2 * (_smooth_noise(g, n, s, 4) - 0.5)
        paint = rgb[:, :, None, None] * shade
        images = torch.where(mask[:, None], paint, images)
        cls = (1 + kind * len(COLOURS) + colour).to(torch.uint8)  # class_of, per image
        labels = torch.where(mask, cls[:, None, None], labels)

    images = images + noise * torch.randn(images.shape, generator=g)
    b = IGNORE_BORDER
    if b:
        labels[:, :b, :] = IGNORE_INDEX
        labels[:, -b:, :] = IGNORE_INDEX
        labels[:, :, :b] = IGNORE_INDEX
        labels[:, :, -b:] = IGNORE_INDEX
    return images.clamp_(0.0, 1.0).contiguous(), labels


def palette() -> torch.Tensor:
    """Fixed colours for the 21 classes (uint8 ``[256, 3]``; 255 = ignore, drawn white)."""
    pal = torch.zeros(256, 3, dtype=torch.uint8)
    pal[0] = torch.tensor([30, 30, 30])
    # Each kind gets its own hue family, each colour a lightness step, so both are readable.
    base = torch.tensor([[228, 26, 28], [55, 126, 184], [77, 175, 74], [152, 78, 163],
                         [255, 127, 0]], dtype=torch.float32)
    for k in range(len(KINDS)):
        shades = (base[k], base[k] * 0.55, base[k] + (255 - base[k]) * 0.45,
                  base[k] + (255 - base[k]) * 0.75)
        for c in range(len(COLOURS)):
            pal[class_of(k, c)] = shades[c].round().clamp(0, 255).to(torch.uint8)
    pal[IGNORE_INDEX] = torch.tensor([255, 255, 255])
    return pal

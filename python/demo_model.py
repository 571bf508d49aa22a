"""The training demo's network: a small U-Net-like fully convolutional segmenter.

``SmallSegNet`` maps images float32 ``[N, 3, H, W]`` (H and W multiples of 4) to class logits
float32 ``[N, num_classes, H, W]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import synthetic_shapes as shapes


def conv_bn_relu(cin, cout, stride=1, dilation=1):
    """3x3 convolution (no bias), batch norm, ReLU: ``[N, cin, H, W] -> [N, cout, H/s, W/s]``."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallSegNet(nn.Module):
    """Encoder at 1, 1/2 and 1/4 resolution (dilations 2 and 4 at 1/4 for context), a decoder
    with skip connections back to full resolution, and a 1x1 classifier. ~0.2 GFLOP per 64x64
    image at ``width=16``."""

    def __init__(self, num_classes=shapes.NUM_CLASSES, width=16):
        super().__init__()
        c = width
        self.enc1 = nn.Sequential(conv_bn_relu(3, c), conv_bn_relu(c, c))
        self.enc2 = nn.Sequential(conv_bn_relu(c, 2 * c, stride=2), conv_bn_relu(2 * c, 2 * c))
        self.enc3 = nn.Sequential(conv_bn_relu(2 * c, 4 * c, stride=2),
                                  conv_bn_relu(4 * c, 4 * c, dilation=2),
                                  conv_bn_relu(4 * c, 4 * c, dilation=4))
        self.dec2 = conv_bn_relu(6 * c, 2 * c)
        self.dec1 = conv_bn_relu(3 * c, c)
        self.head = nn.Conv2d(c, num_classes, 1)

    def forward(self, x):
        a = self.enc1(x)
        b = self.enc2(a)
        z = self.enc3(b)
        z = F.interpolate(z, size=b.shape[-2:], mode="bilinear", align_corners=False)
        z = self.dec2(torch.cat([z, b], 1))
        z = F.interpolate(z, size=a.shape[-2:], mode="bilinear", align_corners=False)
        z = self.dec1(torch.cat([z, a], 1))
        return self.head(z)

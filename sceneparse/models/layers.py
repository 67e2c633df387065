"""Small building blocks shared by the decoders."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv (no bias) + BN + ReLU, as CSAIL's `conv3x3_bn_relu` (indices 0, 1, 2)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def conv1x1_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """1x1 conv (no bias) + BN + ReLU, as a list so callers can prepend a pooling layer."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def resize(x: Tensor, size) -> Tensor:
    """Bilinear resize with align_corners=False, the one interpolation CSAIL's models use."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)

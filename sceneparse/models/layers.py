"""Small building blocks shared by the decoders."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3_bn_relu(in_channels: int, out_channels: int, dilation: int = 1) -> nn.Sequential:
    """3x3 conv (no bias) + BN + ReLU, as CSAIL's `conv3x3_bn_relu` (indices 0, 1, 2); `dilation`
    for ASPP's atrous branches (padded to keep the size)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=dilation, dilation=dilation, bias=False),
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


class ASPP(nn.Module):
    """DeepLabv3's atrous spatial pyramid pooling, laid out as torchvision's `ASPP` (same submodule
    names and order, so its weights load by name): a 1x1 branch, a 3x3 branch per atrous rate and
    an image-pooling branch (global average, 1x1, spread back over the map), concatenated, then
    projected to `out_channels` by 1x1-BN-ReLU and Dropout(0.5) as torchvision does."""

    def __init__(self, in_channels: int, rates, out_channels: int = 256):
        super().__init__()
        self.convs = nn.ModuleList([
            nn.Sequential(*conv1x1_bn_relu(in_channels, out_channels)),
            *(conv3x3_bn_relu(in_channels, out_channels, dilation=rate) for rate in rates),
            nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv1x1_bn_relu(in_channels, out_channels)),
        ])
        self.project = nn.Sequential(
            *conv1x1_bn_relu(len(self.convs) * out_channels, out_channels), nn.Dropout(0.5)
        )

    def forward(self, x: Tensor) -> Tensor:
        *same_size, pooling = self.convs
        branches = [branch(x) for branch in same_size] + [resize(pooling(x), x.shape[-2:])]
        return self.project(torch.cat(branches, 1))

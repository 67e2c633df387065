"""Decoders with CSAIL's semantics and CSAIL's exact submodule names.

Every decoder is built from the encoder's channel list (`channels`, shallow to deep) and returns
raw logits at the resolution of the feature maps it reads; the Segmenter upsamples them. Because
the submodule names are CSAIL's, a CSAIL `decoder_epoch_N.pth` loads with no renaming.

CSAIL's decoders read `features[-1]` (their `conv5`); deep-supervision heads read `features[-2]`
(`conv4`). With CSAIL's encoders `channels[-2] == channels[-1] // 2`; we use `channels[-2]` so any
encoder can be paired with any decoder.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from sceneparse.errors import SceneparseError
from sceneparse.models.layers import conv1x1_bn_relu, conv3x3_bn_relu, resize

PPM_DIM = 512  # CSAIL's width of each pyramid-pooling branch


class C1(nn.Module):
    """One 3x3 conv-BN-ReLU (fc -> fc/4) and a 1x1 classifier on the deepest map."""

    classifier = "conv_last"  # the module whose output channels are the classes
    min_features = 1

    def __init__(self, channels: list[int], num_classes: int):
        super().__init__()
        fc_dim = channels[-1]
        self.num_classes = num_classes
        self.cbr = conv3x3_bn_relu(fc_dim, fc_dim // 4)
        self.conv_last = nn.Conv2d(fc_dim // 4, num_classes, kernel_size=1)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.conv_last(self.cbr(features[-1]))


class C1DeepSup(C1):
    """C1 plus an auxiliary C1-like head on the second-deepest map (training only)."""

    min_features = 2

    def __init__(self, channels: list[int], num_classes: int):
        super().__init__(channels, num_classes)
        fc_dim = channels[-1]
        self.cbr_deepsup = conv3x3_bn_relu(channels[-2], fc_dim // 4)
        self.conv_last_deepsup = nn.Conv2d(fc_dim // 4, num_classes, kernel_size=1)

    def forward_aux(self, features: list[Tensor]) -> Tensor:
        return self.conv_last_deepsup(self.cbr_deepsup(features[-2]))


def _ppm_branches(in_channels: int, pool_scales) -> nn.ModuleList:
    """`ppm.i` = AdaptiveAvgPool(scale), 1x1 conv, BN, ReLU (pool first, then conv)."""
    return nn.ModuleList(
        nn.Sequential(nn.AdaptiveAvgPool2d(scale), *conv1x1_bn_relu(in_channels, PPM_DIM))
        for scale in pool_scales
    )


class PPM(nn.Module):
    """PSPNet's pyramid pooling on the deepest map, then conv3x3-BN-ReLU, Dropout2d, 1x1 classifier."""

    classifier = "conv_last.4"
    min_features = 1

    def __init__(self, channels: list[int], num_classes: int, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        fc_dim = channels[-1]
        self.num_classes = num_classes
        self.ppm = _ppm_branches(fc_dim, pool_scales)
        self.conv_last = nn.Sequential(
            *conv3x3_bn_relu(fc_dim + len(pool_scales) * PPM_DIM, PPM_DIM),
            nn.Dropout2d(0.1),
            nn.Conv2d(PPM_DIM, num_classes, kernel_size=1),
        )

    def forward(self, features: list[Tensor]) -> Tensor:
        conv5 = features[-1]
        size = conv5.shape[-2:]
        pyramid = [conv5] + [resize(branch(conv5), size) for branch in self.ppm]
        return self.conv_last(torch.cat(pyramid, 1))


class PPMDeepSup(PPM):
    """PPM plus CSAIL's auxiliary head: conv3x3-BN-ReLU (-> fc/4), Dropout2d, 1x1 classifier."""

    min_features = 2

    def __init__(self, channels: list[int], num_classes: int, pool_scales=(1, 2, 3, 6)):
        super().__init__(channels, num_classes, pool_scales)
        fc_dim = channels[-1]
        self.cbr_deepsup = conv3x3_bn_relu(channels[-2], fc_dim // 4)
        self.dropout_deepsup = nn.Dropout2d(0.1)
        self.conv_last_deepsup = nn.Conv2d(fc_dim // 4, num_classes, kernel_size=1)

    def forward_aux(self, features: list[Tensor]) -> Tensor:
        return self.conv_last_deepsup(self.dropout_deepsup(self.cbr_deepsup(features[-2])))


class UPerNet(nn.Module):
    """UPerNet: pyramid pooling on the deepest map + FPN over all maps, fused at the finest one."""

    classifier = "conv_last.1"
    min_features = 2

    def __init__(self, channels: list[int], num_classes: int, pool_scales=(1, 2, 3, 6), fpn_dim: int = 512):
        super().__init__()
        fc_dim = channels[-1]
        self.num_classes = num_classes
        # Unlike PPM, CSAIL's UPerNet upsamples the pooled map first and convolves afterwards.
        self.ppm_pooling = nn.ModuleList(nn.AdaptiveAvgPool2d(scale) for scale in pool_scales)
        self.ppm_conv = nn.ModuleList(nn.Sequential(*conv1x1_bn_relu(fc_dim, PPM_DIM)) for _ in pool_scales)
        self.ppm_last_conv = conv3x3_bn_relu(fc_dim + len(pool_scales) * PPM_DIM, fpn_dim)
        self.fpn_in = nn.ModuleList(nn.Sequential(*conv1x1_bn_relu(c, fpn_dim)) for c in channels[:-1])
        self.fpn_out = nn.ModuleList(nn.Sequential(conv3x3_bn_relu(fpn_dim, fpn_dim)) for _ in channels[:-1])
        self.conv_last = nn.Sequential(
            conv3x3_bn_relu(len(channels) * fpn_dim, fpn_dim),
            nn.Conv2d(fpn_dim, num_classes, kernel_size=1),
        )

    def forward(self, features: list[Tensor]) -> Tensor:
        conv5 = features[-1]
        size = conv5.shape[-2:]
        pyramid = [conv5] + [
            conv(resize(pool(conv5), size)) for pool, conv in zip(self.ppm_pooling, self.ppm_conv)
        ]
        f = self.ppm_last_conv(torch.cat(pyramid, 1))

        fpn = [f]  # top-down: deepest first
        for i in reversed(range(len(features) - 1)):
            lateral = self.fpn_in[i](features[i])
            f = lateral + resize(f, lateral.shape[-2:])
            fpn.append(self.fpn_out[i](f))
        fpn.reverse()

        out_size = fpn[0].shape[-2:]
        fused = torch.cat([fpn[0]] + [resize(p, out_size) for p in fpn[1:]], 1)
        return self.conv_last(fused)


DECODERS: dict[str, type[nn.Module]] = {
    "c1": C1,
    "c1_deepsup": C1DeepSup,
    "ppm": PPM,
    "ppm_deepsup": PPMDeepSup,
    "upernet": UPerNet,
}


def build_decoder(name: str, channels: list[int], num_classes: int, **options) -> nn.Module:
    """Decoder `name` for an encoder with these `channels`; options go to its constructor."""
    if name not in DECODERS:
        raise SceneparseError(
            f"unknown decoder {name!r}", hint=f"use one of: {', '.join(sorted(DECODERS))}"
        )
    cls = DECODERS[name]
    if len(channels) < cls.min_features:
        raise SceneparseError(
            f"decoder {name!r} needs at least {cls.min_features} feature maps, the encoder gives {len(channels)}"
        )
    if num_classes < 1:
        raise SceneparseError(f"num_classes must be at least 1, got {num_classes}")
    try:
        inspect.signature(cls).bind(channels, num_classes, **options)
    except TypeError as err:  # an unknown option name
        raise SceneparseError(f"bad options for decoder {name!r}: {err}") from None
    return cls(list(channels), num_classes, **options)

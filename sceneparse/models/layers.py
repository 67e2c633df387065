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


class PositionAttention(nn.Module):
    """DANet's position attention module (Fu et al., CVPR 2019): every position j gathers the value
    map from all positions i, weighted by softmax over i of query(x)_j . key(x)_i (1x1 convs to
    `channels // 8`; the value conv keeps `channels`), scaled by `gamma` and added to x. `gamma`
    starts at 0, so the module starts as the identity. The (H*W)^2 attention map is stored, twice
    while the softmax runs: 4 (H*W)^2 bytes per image and copy in float32, e.g. 4.3 GB for a
    1024x2048 frame at output stride 8 (128x256 positions). A fused attention kernel cannot help:
    its query/key and value widths differ. Evaluate DANet on large frames with `--window`. Plain matrix
    products rather than `scaled_dot_product_attention`: torch.export keeps H and W dynamic."""

    def __init__(self, channels: int):
        super().__init__()
        self.query = nn.Conv2d(channels, max(channels // 8, 1), kernel_size=1)
        self.key = nn.Conv2d(channels, max(channels // 8, 1), kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (conv(x).flatten(2) for conv in (self.query, self.key, self.value))  # N x C' x HW
        attention = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # N x HW (j) x HW (i), softmax over i
        out = v @ attention.transpose(1, 2)  # out_j = sum_i attention_ji v_i: N x C x HW
        return self.gamma * out.view_as(x) + x


class ChannelAttention(nn.Module):
    """DANet's channel attention module: channel j gathers all channels i weighted by softmax over i
    of x_j . x_i (dot products over positions, no convs), scaled by `gamma` (starts at 0) and added
    to x. As the paper's equations; the authors' code takes the softmax of (row max - x_j . x_i)
    instead, which we do not follow."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        # float32 even under autocast: the dot products sum over every position, and on a large map
        # they pass float16's 65504 (inf, then NaN from the softmax)
        with torch.autocast(x.device.type, enabled=False):
            a = x.float().flatten(2)  # N x C x HW
            attention = torch.softmax(a @ a.transpose(1, 2), dim=-1)  # N x C (j) x C (i)
            out = (attention @ a).view_as(x)
        return self.gamma * out.to(x.dtype) + x


class Encoding(nn.Module):
    """EncNet's encoding layer (Zhang et al., CVPR 2018): K learned codewords d_k and smoothing
    factors s_k; each position's feature x_i is soft-assigned to the codewords by
    softmax over k of (-s_k * ||x_i - d_k||^2), and codeword k's output is the assignment-weighted
    sum over positions of the residuals x_i - d_k: `N x C x H x W -> N x K x C`. Summed, not
    averaged, over positions, as the paper. Initialised as the authors do (codewords uniform in
    +-1/sqrt(K*C), s_k uniform in (0, 1))."""

    def __init__(self, channels: int, codes: int):
        super().__init__()
        self.codewords = nn.Parameter(torch.empty(codes, channels))
        self.smoothing = nn.Parameter(torch.empty(codes))
        bound = 1.0 / (codes * channels) ** 0.5
        nn.init.uniform_(self.codewords, -bound, bound)
        nn.init.uniform_(self.smoothing, 0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2).transpose(1, 2)  # N x HW x C
        d = self.codewords  # K x C
        # ||x_i - d_k||^2 expanded, so that no N x HW x K x C tensor of residuals is built
        distances = (x * x).sum(-1, keepdim=True) - 2 * (x @ d.t()) + (d * d).sum(-1)  # N x HW x K
        assignment = torch.softmax(-self.smoothing * distances, dim=-1)
        # sum_i a_ik (x_i - d_k) = sum_i a_ik x_i - (sum_i a_ik) d_k
        return assignment.transpose(1, 2) @ x - assignment.sum(1).unsqueeze(-1) * d  # N x K x C


class ObjectAttention(nn.Module):
    """OCRNet's object-contextual attention (Yuan et al., "Object-Contextual Representations for
    Semantic Segmentation", ECCV 2020; the authors' `ObjectAttentionBlock2D`): each pixel attends
    over the K object-region representations. Query: two 1x1 conv-BN-ReLU of the pixel map to
    `key_dim`; key: the same on the object representations; value: one 1x1 conv-BN-ReLU of them;
    softmax over the K regions of query . key / sqrt(key_dim); the weighted values go back to the
    pixel map's width by a 1x1 conv-BN-ReLU. `objects` is N x C x K (one C-vector per region)."""

    def __init__(self, channels: int, key_dim: int):
        super().__init__()

        def two(c_in):  # 1x1 conv-BN-ReLU twice
            return nn.Sequential(*conv1x1_bn_relu(c_in, key_dim), *conv1x1_bn_relu(key_dim, key_dim))

        self.key_dim = key_dim
        self.query = two(channels)
        self.key = two(channels)
        self.value = nn.Sequential(*conv1x1_bn_relu(channels, key_dim))
        self.out = nn.Sequential(*conv1x1_bn_relu(key_dim, channels))

    def forward(self, x: Tensor, objects: Tensor) -> Tensor:
        objects = objects.unsqueeze(-1)  # N x C x K x 1: BatchNorm2d sees the K regions as positions
        q = self.query(x).flatten(2)  # N x key x HW
        k = self.key(objects).flatten(2)  # N x key x K
        v = self.value(objects).flatten(2)  # N x key x K
        attention = torch.softmax(q.transpose(1, 2) @ k * self.key_dim ** -0.5, dim=-1)  # N x HW x K
        # N x key x HW straight from the product, then a view (a reshape of a transposed product
        # makes torch.export guard on the sizes: no dynamic H and W). torch.compile's layout pass
        # fails on a conv over that view once H and W are symbolic (torch 2.11 to 2.14); a copy to
        # channels-last avoids it, but torch.export guards on the copy: so no copy under
        # torch.export's own tracing alone (torch 2.11 also says "exporting" inside torch.compile).
        # tests/test_decoders.py compiles and exports it.
        context = (v @ attention.transpose(1, 2)).view(x.shape[0], self.key_dim, *x.shape[-2:])
        if torch.compiler.is_dynamo_compiling() or not torch.compiler.is_exporting():
            context = context.contiguous(memory_format=torch.channels_last)
        return self.out(context)

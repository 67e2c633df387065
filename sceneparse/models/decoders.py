"""Decoders: CSAIL's (with CSAIL's semantics and exact submodule names), FCN, DeepLab, DANet,
DenseASPP, EncNet, BiSeNet, U-Net, UNet++, LinkNet, FPN, SegFormer's head and OCRNet.

Every decoder is built from the encoder's channel list (`channels`, shallow to deep) and returns
raw logits at the resolution of the feature maps it reads; the Segmenter upsamples them. Because
the submodule names are CSAIL's, a CSAIL `decoder_epoch_N.pth` loads with no renaming.

CSAIL's decoders read `features[-1]` (their `conv5`); deep-supervision heads read `features[-2]`
(`conv4`). With CSAIL's encoders `channels[-2] == channels[-1] // 2`; we use `channels[-2]` so any
encoder can be paired with any decoder.

FCN (fcn32s/16s/8s) and DeepLab (deeplabv3, deeplabv3plus) are not CSAIL's; deeplabv3's head
is laid out as torchvision's `DeepLabHead`, fcn32s's as torchvision's `FCNHead`. DANet, DenseASPP,
EncNet, BiSeNet and OCRNet are written from their papers; U-Net, UNet++, LinkNet, FPN and
SegFormer's head follow segmentation_models.pytorch's any-encoder versions. Each docstring says where and why they differ.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor, nn

from sceneparse.errors import SceneparseError
from sceneparse.models.layers import (
    ASPP,
    ChannelAttention,
    Encoding,
    ObjectAttention,
    PositionAttention,
    conv1x1_bn_relu,
    conv3x3_bn_relu,
    resize,
)

PPM_DIM = 512  # CSAIL's width of each pyramid-pooling branch
ASPP_DIM = 256  # DeepLab's width of ASPP and of its heads
LOW_LEVEL_DIM = 48  # DeepLabv3+'s projection of the low-level map (few, so it does not drown ASPP's 256)


class Decoder(nn.Module):
    """Base class: subclasses set `classifier` (the module whose output channels are the classes)
    and `min_features`, and implement `forward(features)` (plus `forward_aux` for deep supervision)."""

    classifier: str
    min_features = 1

    def forward_train(self, features: list[Tensor]) -> tuple[Tensor, ...]:
        """(logits, auxiliary logits) of a training step, for decoders with `forward_aux`; a decoder
        whose two heads share work overrides it to do that work once. A third item, if any, is
        per-image class-presence logits (N x classes: EncNet's SE-loss)."""
        return self(features), self.forward_aux(features)

    @classmethod
    def pools_to_1x1(cls, options) -> bool:
        """Whether a branch pools each map to 1x1 with these constructor options: BatchNorm then sees
        one value per channel and image, so training needs more than one image per BatchNorm.
        By default: whether the decoder's `pool_scales` (given or default) holds 1."""
        param = inspect.signature(cls).parameters.get("pool_scales")
        return param is not None and 1 in options.get("pool_scales", param.default)


class C1(Decoder):
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


class PPM(Decoder):
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


class _DeepSupOnConv4:
    """Mixin: CSAIL's (PSPNet's) auxiliary head on features[-2] (conv3x3-BN-ReLU to fc/4,
    Dropout2d(0.1), 1x1 classifier, with ppm_deepsup's submodule names), used in training only,
    weighted by `train.deepsup_weight`. A decoder's __init__ calls `_add_deepsup` last."""

    min_features = 2

    def _add_deepsup(self, channels: list[int], num_classes: int) -> None:
        self.cbr_deepsup = conv3x3_bn_relu(channels[-2], channels[-1] // 4)
        self.dropout_deepsup = nn.Dropout2d(0.1)
        self.conv_last_deepsup = nn.Conv2d(channels[-1] // 4, num_classes, kernel_size=1)

    def forward_aux(self, features: list[Tensor]) -> Tensor:
        return self.conv_last_deepsup(self.dropout_deepsup(self.cbr_deepsup(features[-2])))


class PPMDeepSup(_DeepSupOnConv4, PPM):
    """PPM plus CSAIL's auxiliary head (`_DeepSupOnConv4`)."""

    def __init__(self, channels: list[int], num_classes: int, pool_scales=(1, 2, 3, 6)):
        super().__init__(channels, num_classes, pool_scales)
        self._add_deepsup(channels, num_classes)


class UPerNet(Decoder):
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


def _finest(maps: list[Tensor]) -> tuple[int, int]:
    """The largest height x width among `maps` (the finest resolution)."""
    return tuple(max((m.shape[-2:] for m in maps), key=lambda size: size[0] * size[1]))


def _at_finer(x: Tensor, size) -> Tensor:
    """x resized to `size` if that is finer than x's own size; never shrunk."""
    return resize(x, size) if size[0] * size[1] > x.shape[-2] * x.shape[-1] else x


def _concat_at_finer(a: Tensor, b: Tensor) -> Tensor:
    """[a, b] concatenated at the finer of their two sizes, the coarser one resized bilinearly."""
    size = _finest([a, b])
    return torch.cat([_at_finer(a, size), _at_finer(b, size)], 1)



def _add_at_finer(a: Tensor, b: Tensor) -> Tensor:
    """a + b at the finer of their two sizes, the coarser one resized bilinearly."""
    size = _finest([a, b])
    return _at_finer(a, size) + _at_finer(b, size)


class FCN32s(Decoder):
    """FCN (Long, Shelhamer, Darrell, CVPR 2015), the coarse variant: a head and a 1x1 score conv
    on the deepest map.

    FCN's fc6/fc7 were VGG's ImageNet classifier recast as 7x7 and 1x1 convs of 4096 channels; our
    encoders end in global pooling and a linear classifier with no such conv to reuse, and two
    fresh 4096-wide convs would outweigh most encoders. Their role (a non-linearity and more
    receptive field before scoring) is taken by a 3x3 conv-BN-ReLU (fc -> fc/4) and Dropout(0.1),
    exactly torchvision's `FCNHead`; fcn32s is that head, fcn16s and fcn8s add the skips.
    """

    classifier = "score"
    skips = 0  # score convs on features[-2], features[-3], ...

    def __init__(self, channels: list[int], num_classes: int):
        super().__init__()
        fc_dim = channels[-1]
        self.num_classes = num_classes
        self.head = nn.Sequential(*conv3x3_bn_relu(fc_dim, fc_dim // 4), nn.Dropout(0.1))
        self.score = nn.Conv2d(fc_dim // 4, num_classes, kernel_size=1)
        self.score_skip = nn.ModuleList(
            nn.Conv2d(channels[-2 - i], num_classes, kernel_size=1) for i in range(self.skips)
        )
        for conv in self.score_skip:  # as the paper: training starts from the coarser net's output
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, features: list[Tensor]) -> Tensor:
        logits = self.score(self.head(features[-1]))
        for i, score in enumerate(self.score_skip):
            logits = _add_at_finer(logits, score(features[-2 - i]))
        return logits


class FCN16s(FCN32s):
    """FCN-16s: FCN-32s's scores plus a 1x1 score conv on features[-2] (FCN's pool4), added at the
    finer size (the paper's 2x deconvolution, initialised bilinear and learned, is a fixed bilinear
    resize here: our encoders may be dilated, then the sizes already match). Skip scores start at
    zero, as in the paper, so that training starts from the coarse prediction. With hrnetv2 the
    deepest map is the 1/4 concatenation, the finest: the skips' scores are resized up to it."""

    skips = 1
    min_features = 2


class FCN8s(FCN32s):
    """FCN-8s: FCN-16s plus a 1x1 score conv on features[-3] (FCN's pool3), fused the same way."""

    skips = 2
    min_features = 3


class DeepLabV3(Decoder):
    """DeepLabv3 (Chen et al., "Rethinking Atrous Convolution", 2017): ASPP on the deepest map,
    then a 3x3 conv-BN-ReLU and the 1x1 classifier, as torchvision's `DeepLabHead` (same layout).

    `atrous_rates` (12, 24, 36) are the paper's for output stride 8 (the dilated encoders); at
    output stride 16 the paper uses (6, 12, 18). ASPP's image pooling is a 1x1 map per image.
    """

    classifier = "conv_last.1"

    def __init__(self, channels: list[int], num_classes: int, atrous_rates=(12, 24, 36)):
        super().__init__()
        self.num_classes = num_classes
        self.aspp = ASPP(channels[-1], atrous_rates, ASPP_DIM)
        self.conv_last = nn.Sequential(
            conv3x3_bn_relu(ASPP_DIM, ASPP_DIM), nn.Conv2d(ASPP_DIM, num_classes, kernel_size=1)
        )

    @classmethod
    def pools_to_1x1(cls, options) -> bool:
        return True  # ASPP's image pooling

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.conv_last(self.aspp(features[-1]))


class DeepLabV3Plus(Decoder):
    """DeepLabv3+ (Chen et al., ECCV 2018): ASPP on the deepest map, upsampled to the low-level map
    features[0] (1/4 with CSAIL's encoders) and concatenated with its 1x1 projection to 48
    channels, then two 3x3 conv-BN-ReLU of 256 and the 1x1 classifier: the encoder's fine detail
    sharpens ASPP's coarse boundaries. The convs are plain 3x3, as in the paper's ResNet-101
    experiments (its Xception model makes them depthwise-separable). `atrous_rates`: (12, 24, 36)
    at output stride 8, the default here as our dilated encoders run at 8; the paper trains at 16
    with (6, 12, 18).
    """

    classifier = "conv_last.2"
    min_features = 2

    def __init__(self, channels: list[int], num_classes: int, atrous_rates=(12, 24, 36)):
        super().__init__()
        self.num_classes = num_classes
        self.aspp = ASPP(channels[-1], atrous_rates, ASPP_DIM)
        self.low_level = nn.Sequential(*conv1x1_bn_relu(channels[0], LOW_LEVEL_DIM))
        self.conv_last = nn.Sequential(
            conv3x3_bn_relu(ASPP_DIM + LOW_LEVEL_DIM, ASPP_DIM),
            conv3x3_bn_relu(ASPP_DIM, ASPP_DIM),
            nn.Conv2d(ASPP_DIM, num_classes, kernel_size=1),
        )

    @classmethod
    def pools_to_1x1(cls, options) -> bool:
        return True  # ASPP's image pooling

    def forward(self, features: list[Tensor]) -> Tensor:
        low = self.low_level(features[0])
        context = resize(self.aspp(features[-1]), low.shape[-2:])
        return self.conv_last(torch.cat([context, low], 1))


class DANet(_DeepSupOnConv4, Decoder):
    """DANet (Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019): two parallel
    branches on the deepest map, each a 3x3 conv-BN-ReLU to `dim` (fc/4 by default, the paper's
    512 for 2048-channel encoders), then position attention (`layers.PositionAttention`) or
    channel attention (`layers.ChannelAttention`), then a 3x3 conv-BN-ReLU; the two are summed,
    then Dropout2d(0.1) and the 1x1 classifier. Both attention scales (gamma) start at 0.

    The paper also trains the PAM-only and CAM-only predictions as extra losses. The Segmenter has
    one auxiliary output, and computing the branch predictions there would run both attentions
    twice: instead danet has ppm_deepsup's auxiliary head on features[-2] (`forward_aux`), as the
    other dilated-ResNet heads here; the branch-only losses are left out. Attention over positions
    is (H*W)^2 per image at the deepest map's size (1/8 with dilated encoders): time everywhere,
    memory too where no fused attention kernel runs (CPU).
    """

    classifier = "conv_last.1"

    def __init__(self, channels: list[int], num_classes: int, dim: int | None = None):
        super().__init__()
        fc_dim = channels[-1]
        dim = fc_dim // 4 if dim is None else dim
        self.num_classes = num_classes
        self.pam_in = conv3x3_bn_relu(fc_dim, dim)
        self.pam = PositionAttention(dim)
        self.pam_out = conv3x3_bn_relu(dim, dim)
        self.cam_in = conv3x3_bn_relu(fc_dim, dim)
        self.cam = ChannelAttention()
        self.cam_out = conv3x3_bn_relu(dim, dim)
        self.conv_last = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(dim, num_classes, kernel_size=1))
        self._add_deepsup(channels, num_classes)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        position = self.pam_out(self.pam(self.pam_in(x)))
        channel = self.cam_out(self.cam(self.cam_in(x)))
        return self.conv_last(position + channel)


class _DenseASPPLayer(nn.Sequential):
    """One DenseASPP layer: [BN-ReLU] 1x1 conv to `bottleneck`, BN-ReLU, 3x3 conv to `growth`
    dilated by `rate` (padded to keep the size). The first layer skips the leading BN-ReLU: its
    input is the already activated reduction (as the authors' first layer, whose input is the
    DenseNet's final BN-ReLU)."""

    def __init__(self, in_channels: int, bottleneck: int, growth: int, rate: int, preactivate: bool):
        pre = [nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True)] if preactivate else []
        super().__init__(
            *pre,
            nn.Conv2d(in_channels, bottleneck, kernel_size=1, bias=False),
            nn.BatchNorm2d(bottleneck),
            nn.ReLU(inplace=True),
            nn.Conv2d(bottleneck, growth, kernel_size=3, padding=rate, dilation=rate, bias=False),
        )


class DenseASPP(Decoder):
    """DenseASPP (Yang et al., "DenseASPP for Semantic Segmentation in Street Scenes", CVPR 2018):
    a 1x1 conv-BN-ReLU reduces the deepest map to `dim` channels (fc/2 by default: the halving of
    the DenseNet's last transition layer, which our encoders do not have), then one dense layer per
    atrous rate, each reading the reduction and every earlier layer's output concatenated (layer i
    reads dim + i*growth channels; see `_DenseASPPLayer`), then Dropout2d(0.1) and the 1x1
    classifier on everything concatenated (dim + len(rates)*growth channels).

    Widths: `bottleneck` 256 and `growth` 64 (the paper's d0 and d1 vary with the DenseNet; the
    authors' configurations use d0 128 to 512, d1 64 to 128). `rates` (3, 6, 12, 18, 24): the
    paper's, at output stride 8 (our dilated encoders). The authors also drop out (0.1) after each
    layer; here only before the classifier. No pooling: batches of one image train.
    """

    classifier = "conv_last.1"

    def __init__(self, channels: list[int], num_classes: int, rates=(3, 6, 12, 18, 24),
                 dim: int | None = None, bottleneck: int = 256, growth: int = 64):
        super().__init__()
        fc_dim = channels[-1]
        dim = fc_dim // 2 if dim is None else dim
        self.num_classes = num_classes
        self.reduce = nn.Sequential(*conv1x1_bn_relu(fc_dim, dim))
        self.layers = nn.ModuleList(
            _DenseASPPLayer(dim + i * growth, bottleneck, growth, rate, preactivate=i > 0)
            for i, rate in enumerate(rates)
        )
        self.conv_last = nn.Sequential(
            nn.Dropout2d(0.1), nn.Conv2d(dim + len(rates) * growth, num_classes, kernel_size=1)
        )

    def forward(self, features: list[Tensor]) -> Tensor:
        x = self.reduce(features[-1])
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.conv_last(x)


class EncNet(_DeepSupOnConv4, Decoder):
    """EncNet (Zhang et al., "Context Encoding for Semantic Segmentation", CVPR 2018): a 3x3
    conv-BN-ReLU to `dim` (fc/4 by default: 512 for 2048-channel encoders, as the authors' head)
    makes X; the context encoding module (1x1 conv-BN-ReLU, `layers.Encoding` with `codes`
    codewords, BatchNorm1d over the codewords, ReLU, mean over the codewords) gives one encoded
    vector per image; a fully connected layer and a sigmoid turn it into channel weights gamma;
    X * gamma goes through Dropout2d(0.1) to the 1x1 classifier. (The authors' code uses
    ReLU(X + X * gamma) = X * (1 + gamma); we keep the paper's X * gamma.)

    The Semantic Encoding Loss (`se_loss`, on by default as in the paper): a linear layer of the
    encoded vector predicts which classes each image holds (`se_head`); a training step returns
    those per-image logits as a third output (`forward_train`), trained with binary cross-entropy
    against the classes present in the label map, weighted by `train.se_weight` (the authors'
    0.2). Only training uses it. The auxiliary FCN-style head on stage 3 that the authors also
    train is here ppm_deepsup's on features[-2] (`forward_aux`). BatchNorm1d normalises each codeword's output
    over the images and the channels (as the authors'), so one image still gives it many values:
    no 1x1 pooling for BatchNorm. The encoding sums over positions, as the paper: its scale
    follows the map's area, which BatchNorm's running statistics fix at the training crop size.
    """

    classifier = "conv_last.1"

    def __init__(self, channels: list[int], num_classes: int, codes: int = 32, dim: int | None = None,
                 se_loss: bool = True):
        super().__init__()
        fc_dim = channels[-1]
        dim = fc_dim // 4 if dim is None else dim
        self.num_classes = num_classes
        self.cbr = conv3x3_bn_relu(fc_dim, dim)
        self.encoding = nn.Sequential(
            *conv1x1_bn_relu(dim, dim), Encoding(dim, codes), nn.BatchNorm1d(codes), nn.ReLU(inplace=True)
        )
        self.attention = nn.Sequential(nn.Linear(dim, dim), nn.Sigmoid())
        self.conv_last = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(dim, num_classes, kernel_size=1))
        self.se_head = nn.Linear(dim, num_classes) if se_loss else None
        self._add_deepsup(channels, num_classes)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self._encoded(features)[0]

    def forward_train(self, features: list[Tensor]) -> tuple[Tensor, ...]:
        """(logits, auxiliary logits) and, with `se_loss`, the per-image class-presence logits."""
        logits, encoded = self._encoded(features)
        presence = () if self.se_head is None else (self.se_head(encoded),)
        return (logits, self.forward_aux(features), *presence)

    def _encoded(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The logits and the encoded vector (N x dim) they were scaled by."""
        x = self.cbr(features[-1])
        encoded = self.encoding(x).mean(1)  # N x dim
        gamma = self.attention(encoded)
        return self.conv_last(x * gamma[:, :, None, None]), encoded


class _AttentionRefinement(nn.Module):
    """BiSeNet's attention refinement module, after a 3x3 conv-BN-ReLU to `dim` (so that the two
    stages can be added): global average pool, 1x1 conv, BN, sigmoid, times the map."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.conv = conv3x3_bn_relu(in_channels, dim)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim, kernel_size=1, bias=False), nn.BatchNorm2d(dim), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return x * self.attention(x)


class _FeatureFusion(nn.Module):
    """BiSeNet's feature fusion module: concatenation, 1x1 conv-BN-ReLU to `out_channels` (F), then
    F + F * sigmoid(1x1 conv(ReLU(1x1 conv(global average of F)))) (squeeze to out/4)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.fuse = nn.Sequential(*conv1x1_bn_relu(in_channels, out_channels))
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(out_channels, max(out_channels // 4, 1), kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(max(out_channels // 4, 1), out_channels, kernel_size=1),
            nn.Sigmoid(),
        )

    def forward(self, spatial: Tensor, context: Tensor) -> Tensor:
        f = self.fuse(torch.cat([spatial, context], 1))
        return f + f * self.attention(f)


class BiSeNet(Decoder):
    """BiSeNet V1 (Yu et al., "BiSeNet: Bilateral Segmentation Network", ECCV 2018), as a decoder.

    Difference from the paper: its spatial path is three stride-2 conv-BN-ReLU on the *image*
    (to 1/8, 128 channels); a decoder here only sees the encoder's maps, so the spatial path is a
    3x3 conv-BN-ReLU to `dim` (128) on features[0], the encoder's finest map (1/4 with CSAIL's
    encoders: finer than the paper's 1/8, but through the encoder's stem rather than three
    dedicated convs). The context path is the paper's: an attention refinement module
    (`_AttentionRefinement`) on features[-1] plus the global average context (pool, 1x1
    conv-BN-ReLU) broadcast over it, resized to features[-2] and smoothed by a 3x3 conv-BN-ReLU,
    plus the attention refinement of features[-2], resized to features[0] and smoothed again (the
    smoothing convs as common implementations). The feature fusion module (`_FeatureFusion`, to
    `fuse_dim` 256) joins both paths at features[0]'s size, then the 1x1 classifier.

    With a non-dilated resnet18 the context path reads 1/32 and 1/16 maps: the paper's real-time
    setting (ResNet-18 context path). Dilated encoders give 1/8 for both; with hrnetv2 features[-1]
    is the 1/4 concatenation, taken through features[-2]'s 1/32 in the context path.

    The paper's two auxiliary losses supervise the context path's stages; here `forward_aux` is one
    auxiliary head (3x3 conv-BN-ReLU, 1x1) on the context path's output (the paper weights it 1,
    `train.deepsup_weight` here). A training step computes the context path once for both heads
    (`forward_train`), so its BatchNorm statistics update once per step.
    The global context and the attention modules pool to 1x1 with BatchNorm: not for one image.
    """

    classifier = "conv_last"
    min_features = 3

    def __init__(self, channels: list[int], num_classes: int, dim: int = 128, fuse_dim: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.spatial = conv3x3_bn_relu(channels[0], dim)
        self.global_context = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv1x1_bn_relu(channels[-1], dim))
        self.arm_deep = _AttentionRefinement(channels[-1], dim)
        self.refine_deep = conv3x3_bn_relu(dim, dim)
        self.arm_mid = _AttentionRefinement(channels[-2], dim)
        self.refine_mid = conv3x3_bn_relu(dim, dim)
        self.ffm = _FeatureFusion(2 * dim, fuse_dim)
        self.conv_last = nn.Conv2d(fuse_dim, num_classes, kernel_size=1)
        self.cbr_aux = conv3x3_bn_relu(dim, dim // 2)
        self.conv_last_aux = nn.Conv2d(dim // 2, num_classes, kernel_size=1)

    @classmethod
    def pools_to_1x1(cls, options) -> bool:
        return True  # global context and attention refinement: 1x1 conv + BN after global pooling

    def context(self, features: list[Tensor]) -> Tensor:
        """The context path's output at features[0]'s size."""
        deep, mid = features[-1], features[-2]
        x = self.arm_deep(deep) + self.global_context(deep)  # the 1x1 context broadcast
        x = self.arm_mid(mid) + self.refine_deep(resize(x, mid.shape[-2:]))
        return self.refine_mid(resize(x, features[0].shape[-2:]))

    def forward(self, features: list[Tensor]) -> Tensor:
        return self._fused(features, self.context(features))

    def forward_aux(self, features: list[Tensor]) -> Tensor:
        return self._aux(self.context(features))

    def forward_train(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        context = self.context(features)
        return self._fused(features, context), self._aux(context)

    def _fused(self, features: list[Tensor], context: Tensor) -> Tensor:
        return self.conv_last(self.ffm(self.spatial(features[0]), context))

    def _aux(self, context: Tensor) -> Tensor:
        return self.conv_last_aux(self.cbr_aux(context))


def _skip_widths(name: str, channels: list[int], decoder_channels) -> list[int]:
    """unet's and unetplusplus's widths, one per skip map (deepest first): `decoder_channels`, or
    halving from 256 (not below 16)."""
    skips = len(channels) - 1
    default = [max(256 >> i, 16) for i in range(skips)]
    if decoder_channels is None:
        return default
    if not isinstance(decoder_channels, (list, tuple)) or not all(
            isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in decoder_channels):
        raise SceneparseError(f"{name}'s decoder_channels must be a list of {skips} positive widths, "
                              f"got {decoder_channels!r}", hint=f"e.g. decoder_options.decoder_channels={default}")
    if len(decoder_channels) != skips:
        raise SceneparseError(
            f"{name} has one block width per skip map: {skips} for this encoder's {len(channels)} maps, "
            f"but decoder_channels has {len(decoder_channels)} widths",
            hint=f"give {skips} widths, deepest first, e.g. decoder_options.decoder_channels={default}, or leave it out",
        )
    return [int(w) for w in decoder_channels]


class UNet(Decoder):
    """U-Net's expanding path (Ronneberger et al., MICCAI 2015) on any encoder, laid out as
    segmentation_models.pytorch's `Unet` decoder: from the deepest map toward the finest, each
    block brings the running map to the next shallower map's size, concatenates the two (the skip
    connection) and applies two 3x3 conv-BN-ReLU; then the 1x1 classifier.

    One block per skip map (len(channels) - 1); `decoder_channels` gives their widths, deepest
    first, halving from 256 by default (256, 128, 64 for CSAIL's four-map encoders). Differences:
    the up-sampling is bilinear (the paper's is a learned 2x2 up-convolution, SMP's nearest), so a
    dilated encoder's equal-sized maps and hrnetv2's order (its deepest map is the 1/4
    concatenation) merge at the finer size, never shrinking either; and the path ends at the
    encoder's finest map (1/4 with CSAIL's encoders; `timm:` encoders with `out_indices` starting
    at 0 give a 1/2 map to end at), the Segmenter's bilinear resize doing the rest. No pooling:
    batches of one image train.
    """

    classifier = "conv_last"
    min_features = 2

    def __init__(self, channels: list[int], num_classes: int, decoder_channels=None):
        super().__init__()
        skips = channels[-2::-1]  # shallower maps, deepest first
        self.num_classes = num_classes
        widths = [channels[-1], *_skip_widths("unet", channels, decoder_channels)]
        self.blocks = nn.ModuleList(
            nn.Sequential(conv3x3_bn_relu(w_in + skip, w_out), conv3x3_bn_relu(w_out, w_out))
            for w_in, skip, w_out in zip(widths, skips, widths[1:])
        )
        self.conv_last = nn.Conv2d(widths[-1], num_classes, kernel_size=1)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, features[-2::-1]):
            x = block(_concat_at_finer(x, skip))
        return self.conv_last(x)


class UNetPlusPlus(Decoder):
    """UNet++ (Zhou et al., "UNet++: A Nested U-Net Architecture", DLMIA 2018), as
    segmentation_models.pytorch's `UnetPlusPlus` decoder on any encoder: the skip connections
    become nested dense paths. With x(i, 0) = features[i] (0 the finest), node x(i, j), j >= 1,
    i + j < len(features), is two 3x3 conv-BN-ReLU of the concatenation of x(i+1, j-1) (brought to
    the finer size, as in `unet`) and every earlier node of its row, x(i, 0) ... x(i, j-1); the
    classifier reads x(0, len(features) - 1). Row i's nodes are `decoder_channels` wide as unet's
    block for skip map i (deepest first, halving from 256 by default), so with two maps UNet++ is
    unet. Difference: SMP's inner nodes (all but the last column) take the encoder's width at
    their row, the paper's a fixed width per row; here every node of a row has the row's decoder
    width, which is cheaper on wide encoders (ResNet-50's 256 to 1024). No deep supervision over
    the top row's nodes (the paper's optional pruning mode). Resizes as `unet` does (bilinear, at
    the finer size, never shrinking). No pooling.
    """

    classifier = "conv_last"
    min_features = 2

    def __init__(self, channels: list[int], num_classes: int, decoder_channels=None):
        super().__init__()
        rows = len(channels) - 1  # rows 0 .. n-2 hold nodes; row n-1 is the deepest map alone
        widths = _skip_widths("unetplusplus", channels, decoder_channels)[::-1]  # row i's width, finest first
        self.num_classes = num_classes

        def width(i, j):
            return channels[i] if j == 0 else widths[i]

        # nodes[f"{i}_{j}"]: the block making x(i, j)
        self.nodes = nn.ModuleDict({
            f"{i}_{j}": nn.Sequential(
                conv3x3_bn_relu(width(i + 1, j - 1) + sum(width(i, k) for k in range(j)), widths[i]),
                conv3x3_bn_relu(widths[i], widths[i]),
            )
            for j in range(1, rows + 1) for i in range(rows + 1 - j)
        })
        self.conv_last = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, features: list[Tensor]) -> Tensor:
        grid = {(i, 0): f for i, f in enumerate(features)}
        rows = len(features) - 1
        for j in range(1, rows + 1):  # column by column: x(i, j) needs column j-1 only
            for i in range(rows + 1 - j):
                inputs = [grid[i + 1, j - 1]] + [grid[i, k] for k in range(j)]
                size = _finest(inputs)
                grid[i, j] = self.nodes[f"{i}_{j}"](torch.cat([_at_finer(x, size) for x in inputs], 1))
        return self.conv_last(grid[0, rows])


class LinkNet(Decoder):
    """LinkNet's decoder (Chaurasia and Culurciello, "LinkNet: Exploiting Encoder Representations
    for Efficient Semantic Segmentation", VCIP 2017), as segmentation_models.pytorch's `Linknet` on
    any encoder: from the deepest map toward the finest, a block (1x1 conv-BN-ReLU to a quarter of
    its input's channels, up-sampling, 3x3 conv-BN-ReLU, 1x1 conv-BN-ReLU to the next shallower
    map's channels) whose output is *added* to that map (the link: no concatenation, so the decoder
    stays as light as the paper's); then one more block on the finest map and the 1x1 classifier.

    Difference: the paper's up-sampling is a learned stride-2 3x3 transposed convolution; here a
    bilinear resize to the next map's size followed by the 3x3 conv, so that a dilated encoder's
    equal-sized maps need no special case (hrnetv2's deepest map, the 1/4 concatenation, is added
    at the finer size, as in `fpn`). Like `unet`, it ends at the encoder's finest map. No pooling.
    """

    classifier = "conv_last"
    min_features = 2

    def __init__(self, channels: list[int], num_classes: int, final_dim: int = 32):
        super().__init__()
        self.num_classes = num_classes

        def block(c_in, c_out):
            return nn.ModuleDict({
                "reduce": nn.Sequential(*conv1x1_bn_relu(c_in, max(c_in // 4, 1))),
                "conv": conv3x3_bn_relu(max(c_in // 4, 1), max(c_in // 4, 1)),
                "expand": nn.Sequential(*conv1x1_bn_relu(max(c_in // 4, 1), c_out)),
            })

        # one block per skip map, deepest first, each out to its skip's channels; then the final one
        self.blocks = nn.ModuleList(block(c_in, c_out) for c_in, c_out in zip(channels[:0:-1], channels[-2::-1]))
        self.final = block(channels[0], final_dim)
        self.conv_last = nn.Conv2d(final_dim, num_classes, kernel_size=1)

    @staticmethod
    def _run(block: nn.ModuleDict, x: Tensor, size) -> Tensor:
        return block["expand"](block["conv"](_at_finer(block["reduce"](x), size)))

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, features[-2::-1]):
            size = _finest([x, skip])
            x = self._run(block, x, size) + _at_finer(skip, size)
        return self.conv_last(self._run(self.final, x, x.shape[-2:]))


class FPN(Decoder):
    """The semantic-segmentation branch of Panoptic FPN (Kirillov et al., CVPR 2019), as
    segmentation_models.pytorch's `FPN`: a feature pyramid (1x1 lateral convs to `pyramid_dim`
    256, top-down, each coarser level resized and added), then each level through 3x3
    conv-GroupNorm-ReLU blocks to `segmentation_dim` 128, each block followed by a 2x bilinear
    up-sampling, as many blocks as it takes to reach the finest level (at least one); the levels
    are summed, then Dropout2d(0.2) and the 1x1 classifier.

    Level i (0 = features[0]) has max(1, i) blocks, fixed when built, and block k resizes to
    features[i - k]'s size when that is finer: with a plain encoder exactly the paper's 2x steps;
    with a dilated one's equal-sized maps some blocks keep the size; hrnetv2's deepest map (its
    1/4 concatenation) is summed at the finer size in the top-down path, never shrunk. Additions
    and up-sampling are bilinear (the paper's top-down is nearest). GroupNorm has 32 groups (the
    paper's), or fewer when `segmentation_dim` is not a multiple of 32. No BatchNorm, no pooling.
    """

    classifier = "conv_last.1"
    min_features = 1

    def __init__(self, channels: list[int], num_classes: int, pyramid_dim: int = 256,
                 segmentation_dim: int = 128):
        super().__init__()
        self.num_classes = num_classes
        self.lateral = nn.ModuleList(nn.Conv2d(c, pyramid_dim, kernel_size=1) for c in channels)

        def block(c_in):
            return nn.Sequential(
                nn.Conv2d(c_in, segmentation_dim, kernel_size=3, padding=1, bias=False),
                nn.GroupNorm(math.gcd(32, segmentation_dim), segmentation_dim),
                nn.ReLU(inplace=True),
            )

        self.levels = nn.ModuleList(
            nn.ModuleList(block(pyramid_dim if k == 0 else segmentation_dim) for k in range(max(1, i)))
            for i in range(len(channels))
        )
        self.conv_last = nn.Sequential(nn.Dropout2d(0.2), nn.Conv2d(segmentation_dim, num_classes, kernel_size=1))

    def forward(self, features: list[Tensor]) -> Tensor:
        p = self.lateral[-1](features[-1])
        pyramid = [p]  # top-down: deepest first
        for i in reversed(range(len(features) - 1)):
            p = _add_at_finer(self.lateral[i](features[i]), p)
            pyramid.append(p)
        pyramid.reverse()

        out = []
        for i, (x, blocks) in enumerate(zip(pyramid, self.levels)):
            for k, block in enumerate(blocks, start=1):
                x = _at_finer(block(x), features[max(i - k, 0)].shape[-2:])
            out.append(x)
        size = _finest(out)
        return self.conv_last(sum(_at_finer(x, size) for x in out))


class SegFormerHead(Decoder):
    """SegFormer's all-MLP decoder (Xie et al., NeurIPS 2021) on any encoder, as
    segmentation_models.pytorch's `Segformer` decoder does: each map's channels are projected to
    `embed_dim` (a per-pixel linear layer, i.e. a 1x1 conv), resized to the finest map's size,
    concatenated (deepest first, as the authors'), fused by a 1x1 conv-BN-ReLU, then Dropout2d(0.1)
    and the 1x1 classifier. `embed_dim` 256 is the paper's for MiT-B0/B1, 768 for B2 to B5. The
    paper pairs it with its Mix Transformer encoder; here it reads any encoder's maps (e.g. a
    `timm:` transformer). No pooling: batches of one image train."""

    classifier = "conv_last.1"
    min_features = 1

    def __init__(self, channels: list[int], num_classes: int, embed_dim: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.project = nn.ModuleList(nn.Conv2d(c, embed_dim, kernel_size=1) for c in channels)
        self.fuse = nn.Sequential(*conv1x1_bn_relu(len(channels) * embed_dim, embed_dim))
        self.conv_last = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(embed_dim, num_classes, kernel_size=1))

    def forward(self, features: list[Tensor]) -> Tensor:
        size = _finest(features)
        projected = [_at_finer(proj(f), size) for proj, f in zip(self.project, features)]
        return self.conv_last(self.fuse(torch.cat(projected[::-1], 1)))


class OCRNet(Decoder):
    """OCRNet (Yuan et al., "Object-Contextual Representations for Semantic Segmentation", ECCV
    2020), as the authors' HRNet-OCR head, on features[-1] (hrnetv2's concatenation, as theirs):
    1. soft object regions: a 1x1 conv-BN-ReLU and a 1x1 classifier give coarse class logits (the
       auxiliary output, trained by the auxiliary loss: the authors weight it 0.4, as
       `train.deepsup_weight`'s default);
    2. the pixel representation: a 3x3 conv-BN-ReLU to `ocr_dim` 512;
    3. one representation per class: the pixel representations averaged with each class's region
       logits softmaxed over the positions as weights;
    4. each pixel attends over those K representations (`layers.ObjectAttention`, keys `key_dim`
       256), and the context it gathers is concatenated with its own representation, fused by a
       1x1 conv-BN-ReLU to `ocr_dim` and Dropout2d(0.05), then the 1x1 classifier.
    The main output needs the regions, so inference computes both heads; a training step computes
    the regions once for both outputs (`forward_train`). MMSegmentation's ResNet variant takes the
    regions from stage 3 (an FCN head on features[-2]); here both heads read features[-1] for
    every encoder. The object representations pass BatchNorm as K values per image: batches of
    one image train (with at least two classes).
    """

    classifier = "conv_last"

    def __init__(self, channels: list[int], num_classes: int, ocr_dim: int = 512, key_dim: int = 256):
        super().__init__()
        if num_classes < 2:  # one object region: BatchNorm over the regions sees one value per image
            raise SceneparseError(f"ocrnet needs at least 2 classes (one object region each), got {num_classes}",
                                  hint="for one class against the rest, use 2 classes (background and the class)")
        fc_dim = channels[-1]
        self.num_classes = num_classes
        self.regions = nn.Sequential(*conv1x1_bn_relu(fc_dim, fc_dim), nn.Conv2d(fc_dim, num_classes, kernel_size=1))
        self.pixels = conv3x3_bn_relu(fc_dim, ocr_dim)
        self.object_attention = ObjectAttention(ocr_dim, key_dim)
        self.fuse = nn.Sequential(*conv1x1_bn_relu(2 * ocr_dim, ocr_dim), nn.Dropout2d(0.05))
        self.conv_last = nn.Conv2d(ocr_dim, num_classes, kernel_size=1)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self._ocr(features, self.regions(features[-1]))

    def forward_aux(self, features: list[Tensor]) -> Tensor:
        return self.regions(features[-1])

    def forward_train(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        regions = self.regions(features[-1])
        return self._ocr(features, regions), regions

    def _ocr(self, features: list[Tensor], regions: Tensor) -> Tensor:
        pixels = self.pixels(features[-1])
        weights = torch.softmax(regions.flatten(2), dim=-1)  # N x K x HW: each class over the positions
        objects = pixels.flatten(2) @ weights.transpose(1, 2)  # N x C x K
        context = self.object_attention(pixels, objects)
        return self.conv_last(self.fuse(torch.cat([context, pixels], 1)))


DECODERS: dict[str, type[Decoder]] = {
    "c1": C1,
    "c1_deepsup": C1DeepSup,
    "ppm": PPM,
    "ppm_deepsup": PPMDeepSup,
    "upernet": UPerNet,
    "fcn32s": FCN32s,
    "fcn16s": FCN16s,
    "fcn8s": FCN8s,
    "deeplabv3": DeepLabV3,
    "deeplabv3plus": DeepLabV3Plus,
    "danet": DANet,
    "denseaspp": DenseASPP,
    "encnet": EncNet,
    "bisenet": BiSeNet,
    "unet": UNet,
    "unetplusplus": UNetPlusPlus,
    "linknet": LinkNet,
    "fpn": FPN,
    "segformer": SegFormerHead,
    "ocrnet": OCRNet,
}


def build_decoder(name: str, channels: list[int], num_classes: int, **options) -> Decoder:
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

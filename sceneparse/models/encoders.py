"""Encoders (backbones) built from timm, named as CSAIL names them, plus any timm model as `timm:<name>`.

An encoder returns a list of feature maps, shallow to deep, and tells the decoders and the
Segmenter what it returns: `channels`, `reductions` (input size / map size) and `pad_multiple`.

Each encoder also knows how to read other layouts of its own weights (`adapt_state_dict`: CSAIL's
names, timm's names) and which keys of a classification checkpoint form the classifier head
(`head_prefixes`), so `sceneparse.models.pretrained` and `sceneparse.zoo.csail` can load strictly.
"""
from __future__ import annotations

import inspect
import math
import re
from functools import cached_property, partial

import timm
import torch
from timm.models import hrnet as timm_hrnet
from timm.models import resnet as timm_resnet
from timm.models._efficientnet_blocks import DepthwiseSeparableConv
from timm.models._features import FeatureGetterNet
from torch import Tensor, nn

from sceneparse.errors import SceneparseError
from sceneparse.models.layers import resize


class Encoder(nn.Module):
    """Base class: subclasses set `channels`, `reductions`, `pad_multiple` and implement forward."""

    channels: list[int]
    reductions: list[int]
    pad_multiple: int
    # Key prefixes of a classification checkpoint that are the classifier head (never loaded).
    head_prefixes: tuple[str, ...] = ()
    # Our names of parameters that take no weight decay beyond norms and biases (which never do):
    # position embeddings and relative position tables of transformers, as their model declares.
    no_weight_decay: frozenset[str] = frozenset()

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rename a state_dict in another known layout (CSAIL's, timm's) to ours."""
        return dict(state)


# --- ResNets with CSAIL's deep stem -----------------------------------------------------------

# CSAIL's stem is three separate conv/BN pairs; timm's deep stem holds the same layers as
# `conv1` = Sequential(conv, bn, relu, conv, bn, relu, conv) followed by `bn1`.
_CSAIL_RESNET_STEM = {
    "conv1": "conv1.0",
    "bn1": "conv1.1",
    "conv2": "conv1.3",
    "bn2": "conv1.4",
    "conv3": "conv1.6",
    "bn3": "bn1",
}

_RESNET_LAYOUTS = {
    18: (timm_resnet.BasicBlock, (2, 2, 2, 2)),
    50: (timm_resnet.Bottleneck, (3, 4, 6, 3)),
    101: (timm_resnet.Bottleneck, (3, 4, 23, 3)),
}


class ResNetEncoder(Encoder):
    """CSAIL's ResNet (deep 3x3 stem 64-64-128, like timm's `resnet50s`), tapping layer1..layer4.

    `dilated=True` gives output stride 8 (layer3 dilated by 2, layer4 by 4), as CSAIL's
    `ResnetDilated`; timm's `output_stride=8` makes exactly the same strides and dilations.
    """

    head_prefixes = ("fc.",)

    def __init__(self, depth: int, dilated: bool = False):
        super().__init__()
        block, layers = _RESNET_LAYOUTS[depth]
        net = timm_resnet.ResNet(
            block, layers, stem_type="deep", stem_width=64, output_stride=8 if dilated else 32, num_classes=0
        )
        # Keep only what the segmentation encoder uses (no pooling/classifier).
        self.conv1, self.bn1, self.act1, self.maxpool = net.conv1, net.bn1, net.act1, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = [info["num_chs"] for info in net.feature_info[1:]]
        self.reductions = [4, 8, 8, 8] if dilated else [4, 8, 16, 32]
        self.pad_multiple = 8 if dilated else 32

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features

    def adapt_state_dict(self, state):
        if "conv3.weight" not in state:  # timm's layout already (CSAIL's has conv1..conv3 at the top)
            return dict(state)
        renamed = {}
        for key, value in state.items():
            top, _, rest = key.partition(".")
            renamed[f"{_CSAIL_RESNET_STEM.get(top, top)}.{rest}"] = value
        return renamed


# --- MobileNetV2, dilated -----------------------------------------------------------------------

# `features.N.conv.<path>` -> timm's block submodules, per layout and block type
# (DS: the first, depthwise-separable block; IR: inverted residuals).
_MBV2_BLOCK_NAMES = {
    # CSAIL's (tonylins') flat Sequential
    "csail": {
        "DS": {"0": "conv_dw", "1": "bn1", "3": "conv_pw", "4": "bn2"},
        "IR": {"0": "conv_pw", "1": "bn1", "3": "conv_dw", "4": "bn2", "6": "conv_pwl", "7": "bn3"},
    },
    # torchvision's, with nested Conv2dNormActivation
    "torchvision": {
        "DS": {"0.0": "conv_dw", "0.1": "bn1", "1": "conv_pw", "2": "bn2"},
        "IR": {"0.0": "conv_pw", "0.1": "bn1", "1.0": "conv_dw", "1.1": "bn2", "2": "conv_pwl", "3": "bn3"},
    },
}
_MBV2_KEY = re.compile(r"features\.(\d+)\.(?:conv\.)?((?:\d+\.)*\d+)\.([a-z_]+)")
# timm stages whose FIRST block output CSAIL taps (its features[2], [4], [7], [14], [17]).
_MBV2_TAP_STAGES = (1, 2, 3, 5, 6)


class MobileNetV2DilatedEncoder(Encoder):
    """CSAIL's MobileNetV2dilated on timm's `mobilenetv2_100` blocks, final 1x1 conv dropped.

    Output stride 8 via timm's `output_stride=8`, which dilates exactly as CSAIL does (blocks 7..13
    by 2, 14..17 by 4, each stride-2 block getting half its stage's dilation). Taps the output of
    the first block of the 24-, 32-, 64-, 160- and 320-channel stages.
    """

    # timm's final 1x1 conv + BN and classifier; CSAIL's/torchvision's features.18 is that same conv.
    head_prefixes = ("conv_head.", "bn2.", "classifier.", "features.18.")

    def __init__(self):
        super().__init__()
        net = timm.create_model("mobilenetv2_100", pretrained=False, output_stride=8, num_classes=0)
        self.conv_stem, self.bn1, self.blocks = net.conv_stem, net.bn1, net.blocks
        self.channels = [self.blocks[s][0].conv_pwl.out_channels for s in _MBV2_TAP_STAGES]
        self.reductions = [4, 8, 8, 8, 8]
        self.pad_multiple = 8

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.bn1(self.conv_stem(x))
        features = []
        for s, stage in enumerate(self.blocks):
            for b, block in enumerate(stage):
                x = block(x)
                if b == 0 and s in _MBV2_TAP_STAGES:
                    features.append(x)
        return features

    def adapt_state_dict(self, state):
        # CSAIL's and torchvision's layouts: features.0 = stem conv/BN, features.1.. = the blocks.
        nested = any(re.match(r"features\.\d+\.conv\.\d+\.\d+\.", k) for k in state)
        names = _MBV2_BLOCK_NAMES["torchvision" if nested else "csail"]
        blocks = [(f"blocks.{s}.{b}", block) for s, stage in enumerate(self.blocks) for b, block in enumerate(stage)]
        renamed = {}
        for key, value in state.items():
            m = _MBV2_KEY.fullmatch(key)
            if m is None:
                renamed[key] = value  # timm's layout, or reported as unexpected
                continue
            index, path, leaf = int(m[1]), m[2], m[3]
            if index == 0:
                renamed[f"{'conv_stem' if path == '0' else 'bn1'}.{leaf}"] = value
            elif index <= len(blocks):
                name, block = blocks[index - 1]
                table = names["DS" if isinstance(block, DepthwiseSeparableConv) else "IR"]
                renamed[f"{name}.{table.get(path, path)}.{leaf}"] = value
            else:
                renamed[key] = value
        return renamed


# --- HRNetV2 --------------------------------------------------------------------------------------


class _BilinearFuseModule(timm_hrnet.HighResolutionModule):
    """timm's HRNet module with CSAIL's fusion: lower-resolution branches are resized bilinearly
    (align_corners=False) to the target branch's exact size, not nearest-upsampled by a factor."""

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        x = [branch(t) for branch, t in zip(self.branches, x)]
        fused = []
        for i, fuse_outer in enumerate(self.fuse_layers):
            y = None
            for j, fuse in enumerate(fuse_outer):
                t = fuse(x[j])
                if j > i:
                    t = resize(t, x[i].shape[-2:])
                y = t if y is None else y + t
            fused.append(self.fuse_act(y))
        return fused


class HRNetV2Encoder(Encoder):
    """HRNetV2 (timm's HRNet, CSAIL's fusion). Returns the four branch outputs (1/4..1/32) and, last,
    CSAIL's HRNetV2 representation: all four resized bilinearly to 1/4 and concatenated."""

    head_prefixes = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")

    def __init__(self, variant: str = "hrnet_w48"):
        super().__init__()
        self.body = timm.create_model(
            variant, pretrained=False, features_only=True, feature_location="", out_indices=(1, 2, 3, 4)
        )
        for module in self.body.modules():
            if isinstance(module, timm_hrnet.HighResolutionModule):
                # Same submodules and state_dict, CSAIL's forward: timm's stages now call ours.
                module.__class__ = _BilinearFuseModule
                for fuse_outer in module.fuse_layers if module.num_branches > 1 else ():
                    for fuse in fuse_outer:
                        if isinstance(fuse, nn.Sequential) and isinstance(fuse[-1], nn.Upsample):
                            fuse[-1] = nn.Identity()  # the resize happens in _BilinearFuseModule
        branch_channels = self.body.feature_info.channels()
        self.channels = [*branch_channels, sum(branch_channels)]
        self.reductions = [*self.body.feature_info.reduction(), 4]
        self.pad_multiple = 32

    def forward(self, x: Tensor) -> list[Tensor]:
        branches = self.body(x)
        size = branches[0].shape[-2:]
        fused = torch.cat([branches[0]] + [resize(b, size) for b in branches[1:]], 1)
        return [*branches, fused]

    def adapt_state_dict(self, state):
        # CSAIL's and timm's HRNet share names; ours sit under `body.`.
        return {k if k.startswith("body.") else f"body.{k}": v for k, v in state.items()}


# --- any timm model ---------------------------------------------------------------------------------


# timm.create_model options that only the features_only wrapper understands.
_FEATURES_ONLY_OPTIONS = {"out_indices", "feature_location", "feature_cls", "feature_cfg", "flatten_sequential"}
# Options that set the input size of models built for one (ViT, Swin): given one, the user decides.
_SIZE_OPTIONS = {"img_size", "dynamic_img_size", "strict_img_size", "dynamic_img_pad"}


class TimmEncoder(Encoder):
    """Any timm model with `features_only=True`; options go to `timm.create_model`.

    Two differences from timm's defaults, both because segmentation feeds images of every size
    and decoders expect `N x C x H x W` maps: a model that takes `dynamic_img_size` (ViT, Swin, ...)
    gets `dynamic_img_size=True` unless an option sets its size, and feature maps that a model
    returns channels-last (`N x H x W x C`: Swin, MambaOut) come back channels-first.
    """

    def __init__(self, model_name: str, **options):
        super().__init__()
        if not timm.is_model(model_name):
            raise SceneparseError(
                f"unknown timm model {model_name!r}", hint="see timm.list_models() for the names"
            )
        self.model_name = model_name
        self.options = options
        try:
            self.body = self._create(options)
        except (TypeError, IndexError, ValueError, AssertionError) as err:
            if not options:  # no option of the user's to blame: a real failure, keep its traceback
                raise
            # an option the constructor does not take (TypeError), out_indices beyond the model's
            # stages (IndexError), a value timm refuses (ValueError, AssertionError)
            raise SceneparseError(
                f"bad options for encoder timm:{model_name} {options}: {type(err).__name__}: {err}",
                hint="check model.encoder_options against the timm model's arguments (out_indices: "
                     "indices of its feature stages, e.g. [1, 2, 3, 4])") from None
        self.channels = list(self.body.feature_info.channels())
        self.reductions = list(self.body.feature_info.reduction())
        self.pad_multiple = max(32, max(self.reductions))
        if any(self.pad_multiple % r for r in self.reductions):
            # a reduction that does not divide 32 (a patch-14 ViT such as DINOv2): the input must be a
            # multiple of the patch itself, and padding to 32 would break it
            self.pad_multiple = math.lcm(*self.reductions)
        self.channels_last_maps = getattr(self.body, "output_fmt", "NCHW") == "NHWC"
        # timm's feature getter (models whose features come from `forward_intermediates`, e.g. ViT)
        # keeps the whole model under `model.`; the other wrappers hold its modules directly.
        self.key_prefix = "body.model." if isinstance(self.body, FeatureGetterNet) else "body."

    def _create(self, options: dict) -> nn.Module:
        create = partial(timm.create_model, self.model_name, pretrained=False, features_only=True)
        if not _SIZE_OPTIONS & options.keys():
            try:
                return create(dynamic_img_size=True, **options)
            except TypeError as err:  # a model with one input size for any image: it has no such option
                if "dynamic_img_size" not in str(err):
                    raise
        return create(**options)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = list(self.body(x))
        if self.channels_last_maps:  # a view: channels-first in shape, channels-last in memory
            features = [f.permute(0, 3, 1, 2) for f in features]
        return features

    def _full_model_on_meta(self) -> nn.Module:
        """The whole timm model (classifier included) without memory: for its names."""
        model_options = {k: v for k, v in self.options.items() if k not in _FEATURES_ONLY_OPTIONS}
        with torch.device("meta"):
            return timm.create_model(self.model_name, pretrained=False, **model_options)

    @cached_property
    def no_weight_decay(self) -> frozenset[str]:
        # timm's own list (`model.no_weight_decay()`: full names or, for ViT, top-level names), in our names
        full = self._full_model_on_meta()
        declared = full.no_weight_decay() if hasattr(full, "no_weight_decay") else ()
        own = {name for name, _ in self.named_parameters()}
        return frozenset(k for k in self.adapt_state_dict(dict.fromkeys(declared)) if k in own)

    @cached_property
    def head_prefixes(self) -> tuple[str, ...]:
        # The classifier named by timm, plus top-level modules of the full model that the feature
        # extractor dropped (layers after the last tap, e.g. a final 1x1 conv or head norm).
        full = self._full_model_on_meta()
        ours = {key[len(self.key_prefix):].split(".")[0] for key in self.state_dict()}
        dropped = [
            name for name, _ in full.named_children()
            if name not in ours and not any(o.startswith(f"{name}_") for o in ours)
        ]
        classifier = full.pretrained_cfg.get("classifier")
        return tuple(dict.fromkeys(f"{p}." for p in [*dropped, *([classifier] if classifier else [])]))

    def adapt_state_dict(self, state):
        # timm's feature wrappers may flatten `stages.2` to `stages_2`; ours sit under `body.`
        # (`body.model.` for the feature getter).
        own = set(self.state_dict())
        renamed = {}
        for key, value in state.items():
            candidates = [key, key.replace(".", "_", 1)]
            ours = next((f"{self.key_prefix}{c}" for c in candidates if f"{self.key_prefix}{c}" in own),
                        f"{self.key_prefix}{key}")
            renamed[ours] = value
        return renamed


ENCODERS = {
    "resnet18": partial(ResNetEncoder, 18, dilated=False),
    "resnet18dilated": partial(ResNetEncoder, 18, dilated=True),
    "resnet50": partial(ResNetEncoder, 50, dilated=False),
    "resnet50dilated": partial(ResNetEncoder, 50, dilated=True),
    "resnet101": partial(ResNetEncoder, 101, dilated=False),
    "resnet101dilated": partial(ResNetEncoder, 101, dilated=True),
    "mobilenetv2dilated": MobileNetV2DilatedEncoder,
    "hrnetv2": partial(HRNetV2Encoder, "hrnet_w48"),
    "hrnetv2_w18": partial(HRNetV2Encoder, "hrnet_w18"),
}
TIMM_PREFIX = "timm:"


def build_encoder(name: str, **options) -> Encoder:
    """Encoder by CSAIL name (see ENCODERS) or `timm:<model>` (options go to timm)."""
    if name.startswith(TIMM_PREFIX):
        return TimmEncoder(name[len(TIMM_PREFIX):], **options)
    if name not in ENCODERS:
        raise SceneparseError(
            f"unknown encoder {name!r}",
            hint=f"use one of: {', '.join(sorted(ENCODERS))}, or timm:<model name>",
        )
    if options:
        try:
            inspect.signature(ENCODERS[name]).bind(**options)
        except TypeError as err:
            raise SceneparseError(f"bad options for encoder {name!r}: {err}") from None
    return ENCODERS[name](**options)

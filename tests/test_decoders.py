"""FCN and DeepLab decoders: torchvision's heads as an independent reference, FCN's fusion by
hand, which maps each decoder reads, export, channels_last, and the batch-of-one declarations."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from sceneparse.errors import SceneparseError
from sceneparse.models import DECODERS, build_decoder, build_model

NEW_DECODERS = ["fcn32s", "fcn16s", "fcn8s", "deeplabv3", "deeplabv3plus"]


@torch.no_grad()
def _randomise(module: nn.Module, seed: int) -> None:
    """Random weights and BN statistics, so that a wrong mapping cannot hide behind the defaults."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point():
            low = 0.5 if name.endswith("running_var") else -0.5
            tensor.copy_(torch.rand(tensor.shape, generator=gen) + low)


def _copy_by_order(source: nn.Module, target: nn.Module) -> None:
    src, dst = source.state_dict(), target.state_dict()
    assert [v.shape for v in src.values()] == [v.shape for v in dst.values()]
    target.load_state_dict(dict(zip(dst, src.values())))


@pytest.mark.parametrize(
    "name, reference, options",
    [
        ("deeplabv3", lambda c, k: DeepLabHead(c, k), {}),
        ("deeplabv3", lambda c, k: DeepLabHead(c, k, atrous_rates=(6, 12, 18)), {"atrous_rates": (6, 12, 18)}),
        ("fcn32s", lambda c, k: FCNHead(c, k), {}),
    ],
)
def test_heads_equal_torchvision(name, reference, options):
    in_channels, num_classes = 96, 7
    torch.manual_seed(0)
    theirs = reference(in_channels, num_classes)
    ours = build_decoder(name, [32, in_channels], num_classes, **options)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    if name == "deeplabv3":  # ASPP has torchvision's names, too
        assert list(ours.aspp.state_dict()) == list(theirs[0].state_dict())
    _randomise(theirs, seed=1)
    _copy_by_order(theirs, ours)
    features = torch.randn(2, in_channels, 9, 13)
    with torch.no_grad():
        expected = theirs.eval()(features)
        got = ours.eval()([torch.randn(2, 32, 18, 26), features])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _score(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv by hand."""
    return torch.einsum("kc,nchw->nkhw", conv.weight[:, :, 0, 0], x) + conv.bias[:, None, None]


def _up(x, like):
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize(
    "sizes",
    [[(16, 20), (8, 10), (4, 5)],  # plain encoder: each map half the size of the one before
     [(16, 20), (8, 10), (8, 10)],  # dilated: the two deepest maps have the same size
     [(8, 10), (4, 5), (8, 10)]],  # hrnetv2: the deepest map (the concatenation) is the finest
)
def test_fcn_fuses_scores_by_upsampling_and_adding(sizes):
    channels, num_classes = [4, 6, 8], 3
    torch.manual_seed(0)
    features = [torch.randn(2, c, h, w) for c, (h, w) in zip(channels, sizes)]
    fcn8s = build_decoder("fcn8s", channels, num_classes).eval()
    fcn16s = build_decoder("fcn16s", channels, num_classes).eval()
    fcn32s = build_decoder("fcn32s", channels, num_classes).eval()
    # skip scores start at zero: a fresh fcn16s/fcn8s predicts what fcn32s does
    _randomise(fcn32s, seed=2)
    fcn16s.load_state_dict(fcn32s.state_dict(), strict=False)
    fcn8s.load_state_dict(fcn32s.state_dict(), strict=False)
    with torch.no_grad():
        coarse = fcn32s(features)
        finest = max(sizes[-2:], key=lambda s: s[0])
        assert torch.equal(fcn16s(features), F.interpolate(coarse, size=finest, mode="bilinear"))
        _randomise(fcn8s, seed=3)
        fcn16s.load_state_dict({k: v for k, v in fcn8s.state_dict().items() if "score_skip.1" not in k})

        deep = _score(fcn8s.score, fcn8s.head(features[2]))
        s4, s3 = _score(fcn8s.score_skip[0], features[1]), _score(fcn8s.score_skip[1], features[0])
        fine16 = s4 if s4.shape[-2] >= deep.shape[-2] else deep
        by_hand_16 = _up(deep, fine16) + _up(s4, fine16)
        fine8 = s3 if s3.shape[-2] >= by_hand_16.shape[-2] else by_hand_16
        by_hand_8 = _up(by_hand_16, fine8) + _up(s3, fine8)
        torch.testing.assert_close(fcn16s(features), by_hand_16, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fcn8s(features), by_hand_8, rtol=1e-5, atol=1e-5)


def test_deeplabv3plus_reads_the_low_level_map_and_deeplabv3_does_not():
    channels = [8, 16]
    torch.manual_seed(0)
    features = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 4, 4)]
    perturbed = [features[0] + torch.randn_like(features[0]), features[1]]
    v3 = build_decoder("deeplabv3", channels, 3).eval()
    plus = build_decoder("deeplabv3plus", channels, 3).eval()
    with torch.no_grad():
        assert v3(features).shape[-2:] == (4, 4) and plus(features).shape[-2:] == (16, 16)
        assert torch.equal(v3(features), v3(perturbed))
        assert not torch.allclose(plus(features), plus(perturbed))


@pytest.mark.parametrize("decoder", NEW_DECODERS)
def test_new_decoders_export_and_run_channels_last(decoder):
    torch.manual_seed(0)
    model = build_model("resnet18dilated", decoder, num_classes=4).eval()
    x = torch.randn(1, 3, 60, 68)  # padded to 64 x 72 inside
    with torch.no_grad():
        eager = model(x)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), eager, rtol=1e-5, atol=1e-5)
        model.to(memory_format=torch.channels_last)
        cl = model(x.contiguous(memory_format=torch.channels_last))
    assert cl.shape == (1, 4, 60, 68)
    torch.testing.assert_close(cl, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "decoder, options",
    [(name, {"fpn_dim": 32} if name == "upernet" else {}) for name in sorted(DECODERS)]
    + [("ppm", {"pool_scales": (2, 3)}), ("upernet", {"fpn_dim": 32, "pool_scales": (2, 3)})],
)
def test_pools_to_1x1_says_which_decoders_leave_batchnorm_one_value_per_channel(decoder, options):
    # With one image, does some BatchNorm see a single value per channel? PPM's and ASPP's see a
    # 1x1 map (torch then refuses); UPerNet's the 1x1 map upsampled first (a constant map: torch
    # runs, but with zero variance the branch learns nothing and the running variance collapses).
    model = build_model("resnet18dilated", decoder, num_classes=3, decoder_options=options).train()
    single = []

    def check(module, args):
        values = args[0].transpose(0, 1).flatten(1)  # channels x (N*H*W); equal up to the conv's rounding
        spread = values.amax(1) - values.amin(1)
        single.append(bool((spread <= 1e-4 * values.abs().amax(1)).all()))

    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(check)
    try:
        model(torch.randn(1, 3, 32, 32))  # 4 x 4 deepest map: only pooling to 1x1 leaves one value
    except ValueError as err:
        assert "Expected more than 1 value per channel" in str(err)
    assert any(single) == DECODERS[decoder].pools_to_1x1(options)


def test_train_refuses_a_batch_of_one_for_deeplab():
    from sceneparse.engine.train import _check_batch_of_one

    info = SimpleNamespace(device=torch.device("cpu"), world_size=1)

    def cfg(decoder, batch_size=1, **options):
        return OmegaConf.create({"model": {"decoder": decoder, "decoder_options": options},
                                 "data": {"batch_size": batch_size}})

    for decoder in ("deeplabv3", "deeplabv3plus"):
        with pytest.raises(SceneparseError, match=f"data.batch_size=1 cannot train the {decoder} decoder") as err:
            _check_batch_of_one(cfg(decoder), info)
        assert "(c1, c1_deepsup, fcn32s, fcn16s, fcn8s)" in err.value.hint
        _check_batch_of_one(cfg(decoder, batch_size=2), info)
    for decoder in ("c1", "fcn8s"):
        _check_batch_of_one(cfg(decoder), info)
    _check_batch_of_one(cfg("upernet", pool_scales=[2, 3, 6]), info)
    with pytest.raises(SceneparseError, match="cannot train the upernet decoder"):
        _check_batch_of_one(cfg("upernet", pool_scales=[1, 2]), info)

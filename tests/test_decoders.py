"""FCN, DeepLab, DANet, DenseASPP, EncNet, BiSeNet, U-Net, FPN, SegFormer and OCRNet decoders:
torchvision's heads as an independent reference, FCN's fusion, DANet's attentions, EncNet's
encoding, the U-Net/FPN/SegFormer wiring and OCR's attention by hand, DenseASPP's reach, which maps
each decoder reads, export, channels_last, and the batch-of-one declarations."""
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

NEW_DECODERS = ["fcn32s", "fcn16s", "fcn8s", "deeplabv3", "deeplabv3plus", "danet", "denseaspp", "encnet", "bisenet",
                "unet", "unetplusplus", "linknet", "fpn", "segformer", "ocrnet"]


@torch.no_grad()
def _randomise(module: nn.Module, seed: int) -> None:
    """Random weights and BN statistics, so that a wrong mapping cannot hide behind the defaults."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point():
            low = 0.5 if name.endswith("running_var") else -0.5
            tensor.copy_(torch.rand(tensor.shape, generator=gen) + low)


ACTIVE_TOL = {"rtol": 1e-4, "atol": 1e-3}  # for `_randomise_active` weights: values in the tens


@torch.no_grad()
def _randomise_active(module: nn.Module, seed: int) -> None:
    """`_randomise`, then positive BatchNorm shifts and larger conv weights: most ReLUs pass and
    the signal outweighs the shifts, so that a by-hand check of stacked conv-BN-ReLU layers does not
    compare two maps of zeros, or of constants."""
    _randomise(module, seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.bias.abs_().add_(0.5)
        if isinstance(m, nn.Conv2d):
            m.weight.mul_(4)


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
    torch.manual_seed(0)
    model = build_model("resnet18dilated", decoder, num_classes=3, decoder_options=options).train()
    single = []

    def check(module, args):
        values = args[0].transpose(0, 1).flatten(1)  # channels x (N*H*W); equal up to the conv's rounding
        spread = values.amax(1) - values.amin(1)
        # rounding measured against the whole map's scale: a channel near zero (the conv's sum
        # cancelling) has rounding noise large beside its own values
        single.append(bool((spread <= 1e-4 * values.abs().amax()).all()))

    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):  # 1d: EncNet's, over the codewords
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

    for decoder in ("deeplabv3", "deeplabv3plus", "bisenet"):
        with pytest.raises(SceneparseError, match=f"data.batch_size=1 cannot train the {decoder} decoder") as err:
            _check_batch_of_one(cfg(decoder), info)
        assert ("(c1, c1_deepsup, fcn32s, fcn16s, fcn8s, danet, denseaspp, encnet, unet, unetplusplus, linknet, "
                "fpn, segformer, ocrnet)" in err.value.hint)
        _check_batch_of_one(cfg(decoder, batch_size=2), info)
    for decoder in ("c1", "fcn8s", "danet", "denseaspp", "encnet", "unet", "unetplusplus", "linknet", "fpn",
                    "segformer", "ocrnet"):
        _check_batch_of_one(cfg(decoder), info)
    _check_batch_of_one(cfg("upernet", pool_scales=[2, 3, 6]), info)
    with pytest.raises(SceneparseError, match="cannot train the upernet decoder"):
        _check_batch_of_one(cfg("upernet", pool_scales=[1, 2]), info)


# --- DANet, DenseASPP, EncNet, BiSeNet ------------------------------------------------------------


def _conv1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv with bias by hand, on N x C x P (positions flattened)."""
    return torch.einsum("kc,ncp->nkp", conv.weight[:, :, 0, 0], x) + conv.bias[:, None]


def test_position_attention_by_hand():
    from sceneparse.models.layers import PositionAttention

    torch.manual_seed(0)
    pam = PositionAttention(16)
    x = torch.randn(2, 16, 3, 5)
    with torch.no_grad():
        assert torch.equal(pam(x), x)  # gamma starts at 0: the identity
        pam.gamma.fill_(0.7)
        got = pam(x)
        flat = x.flatten(2)  # N x C x P
        q, k, v = _conv1x1(pam.query, flat), _conv1x1(pam.key, flat), _conv1x1(pam.value, flat)
        assert q.shape == (2, 2, 15)  # query and key reduced to C/8
        energy = torch.einsum("ncj,nci->nji", q, k)  # s_ji = query at j . key at i
        weights = energy.exp() / energy.exp().sum(-1, keepdim=True)  # softmax over i
        expected = 0.7 * torch.einsum("nci,nji->ncj", v, weights) + flat
    torch.testing.assert_close(got, expected.view_as(x), rtol=1e-5, atol=1e-5)


def test_channel_attention_by_hand():
    from sceneparse.models.layers import ChannelAttention

    torch.manual_seed(0)
    cam = ChannelAttention()
    x = torch.randn(2, 6, 3, 4) * 0.5
    with torch.no_grad():
        assert torch.equal(cam(x), x)
        cam.gamma.fill_(-1.3)
        got = cam(x)
    expected = torch.empty_like(x)
    for n in range(2):
        for j in range(6):
            scores = torch.stack([(x[n, j] * x[n, i]).sum() for i in range(6)])
            weights = scores.exp() / scores.exp().sum()
            expected[n, j] = -1.3 * sum(weights[i] * x[n, i] for i in range(6)) + x[n, j]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_danet_sums_the_two_branches_and_supervises_conv4():
    torch.manual_seed(0)
    danet = build_decoder("danet", [8, 16, 32], 3, dim=16).eval()
    _randomise(danet, seed=4)  # gammas too: both attentions active
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4), torch.randn(2, 32, 4, 4)]
    with torch.no_grad():
        position = danet.pam_out(danet.pam(danet.pam_in(features[2])))
        channel = danet.cam_out(danet.cam(danet.cam_in(features[2])))
        classifier = danet.get_submodule(type(danet).classifier)
        torch.testing.assert_close(danet(features), classifier(position + channel))
        assert danet.pam.query.out_channels == 2 and danet.pam_in[0].out_channels == 16
        aux = danet.forward_aux(features)
        changed = [features[0], features[1] + 1, features[2]]
        assert not torch.equal(danet.forward_aux(changed), aux)
        assert torch.equal(danet(changed), danet(features))


def _signed_subset_sums(rates):
    reach = {0}
    for rate in rates:
        reach |= {r + rate for r in reach} | {r - rate for r in reach}
    return reach


@pytest.mark.parametrize("rates", [(3, 6, 12, 18, 24), (2, 5)])
def test_denseaspp_layers_grow_densely_and_reach_as_far_as_their_rates(rates):
    dim, bottleneck, growth = 16, 12, 8
    torch.manual_seed(0)
    head = build_decoder("denseaspp", [4, 24], 3, rates=rates, dim=dim, bottleneck=bottleneck, growth=growth).eval()
    assert head.reduce[0].in_channels == 24 and head.reduce[0].out_channels == dim
    for i, (layer, rate) in enumerate(zip(head.layers, rates)):
        convs = [m for m in layer if isinstance(m, nn.Conv2d)]
        assert [c.in_channels for c in convs] == [dim + i * growth, bottleneck]
        assert convs[1].out_channels == growth and convs[1].dilation == (rate, rate)
        assert isinstance(layer[0], nn.BatchNorm2d) == (i > 0)  # the first reads the activated reduction
    assert head.conv_last[1].in_channels == dim + len(rates) * growth

    # One row: with the reduction and the classifier 1x1, an output position q depends on input
    # position p exactly when q - p is a sum of +-rate over some subset of the layers (dense paths).
    # The ReLUs are taken out (the head is then linear), so that none hides a path.
    _randomise(head, seed=5)
    for seq in [head.reduce, *head.layers]:
        for i, m in enumerate(seq):
            if isinstance(m, nn.ReLU):
                seq[i] = nn.Identity()
    width, p = 160, 80
    features = [torch.randn(1, 4, 1, width), torch.randn(1, 24, 1, width)]
    perturbed = [features[0], features[1].clone()]
    perturbed[1][..., p] += 3.0
    with torch.no_grad():
        a, b = head(features), head(perturbed)
    changed = {q - p for q in range(width) if not torch.equal(a[..., q], b[..., q])}
    assert changed == _signed_subset_sums(rates)
    assert max(changed) == sum(rates)


def test_encoding_layer_by_hand():
    from sceneparse.models.layers import Encoding

    torch.manual_seed(0)
    enc = Encoding(channels=5, codes=3)
    with torch.no_grad():
        enc.codewords.copy_(torch.randn(3, 5))
        enc.smoothing.copy_(torch.tensor([0.2, 0.5, 0.9]))
    x = torch.randn(2, 5, 2, 3)
    with torch.no_grad():
        got = enc(x)
    assert got.shape == (2, 3, 5)
    expected = torch.zeros(2, 3, 5)
    for n in range(2):
        for h in range(2):
            for w in range(3):
                residuals = x[n, :, h, w] - enc.codewords  # K x C: r_ik
                logits = -enc.smoothing * (residuals**2).sum(1)
                assign = logits.exp() / logits.exp().sum()
                expected[n] += assign[:, None] * residuals  # summed over positions
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _small_encnet(seed: int):
    """A small encnet with random weights and statistics, and three feature maps for it."""
    torch.manual_seed(0)
    encnet = build_decoder("encnet", [8, 16, 32], 3, codes=4, dim=16).eval()
    _randomise(encnet, seed=seed)
    return encnet, [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4), torch.randn(2, 32, 4, 5)]


def test_encnet_scales_channels_by_the_encoded_context():
    encnet, features = _small_encnet(seed=6)
    with torch.no_grad():
        x = encnet.cbr(features[2])
        reduced = encnet.encoding[:3](x)
        encoded = encnet.encoding[3](reduced)  # N x K x C
        bn = encnet.encoding[4]
        normalised = (encoded - bn.running_mean[:, None]) / (bn.running_var[:, None] + bn.eps).sqrt()
        normalised = normalised * bn.weight[:, None] + bn.bias[:, None]  # per codeword
        context = normalised.clamp(min=0).mean(1)  # N x C
        fc = encnet.attention[0]
        gamma = torch.sigmoid(context @ fc.weight.t() + fc.bias)
        expected = encnet.conv_last[1](x * gamma[:, :, None, None])
        torch.testing.assert_close(encnet(features), expected, rtol=1e-5, atol=1e-5)
        # one context per image: the other image does not change it
        other = [f.clone() for f in features]
        other[2][1] += 1
        torch.testing.assert_close(encnet(other)[0], encnet(features)[0])


def test_encnet_predicts_class_presence_from_the_encoded_vector_in_training_only():
    from sceneparse.models import SegmenterOutput

    encnet, features = _small_encnet(seed=13)
    with torch.no_grad():
        encoded = encnet.encoding(encnet.cbr(features[2])).mean(1)  # N x dim
        logits, aux, presence = encnet.forward_train(features)
        torch.testing.assert_close(presence, encoded @ encnet.se_head.weight.t() + encnet.se_head.bias)
        torch.testing.assert_close(logits, encnet(features))
        torch.testing.assert_close(aux, encnet.forward_aux(features))
    assert presence.shape == (2, 3)
    assert len(build_decoder("encnet", [8, 16, 32], 3, se_loss=False).forward_train(features)) == 2

    model = build_model("resnet18dilated", "encnet", num_classes=3).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, SegmenterOutput) and out.presence.shape == (2, 3) and out.logits.shape == (2, 3, 64, 64)
    plain = build_model("resnet18dilated", "encnet", num_classes=3, decoder_options={"se_loss": False}).train()
    assert plain(torch.randn(2, 3, 64, 64)).presence is None
    deepsup = build_model("resnet18dilated", "ppm_deepsup", num_classes=3).train()
    assert deepsup(torch.randn(2, 3, 64, 64)).presence is None
    with torch.no_grad():  # inference: logits only
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_bisenet_reads_the_finest_and_the_two_deepest_maps():
    torch.manual_seed(0)
    channels = [8, 12, 16, 32]
    bisenet = build_decoder("bisenet", channels, 3, dim=16, fuse_dim=24).eval()
    _randomise(bisenet, seed=7)
    # resnet18's reductions 4, 8, 16, 32: the context path's 1/16 and 1/32, the paper's
    features = [torch.randn(2, c, 32 // r, 48 // r) for c, r in zip(channels, (1, 2, 4, 8))]
    with torch.no_grad():
        out = bisenet(features)
        aux = bisenet.forward_aux(features)
        assert out.shape[-2:] == aux.shape[-2:] == (32, 48)  # at features[0]'s size
        for i in range(4):
            perturbed = list(features)
            perturbed[i] = features[i] + torch.randn_like(features[i])
            assert torch.equal(bisenet(perturbed), out) == (i == 1), i
            # the auxiliary head supervises the context path only
            assert torch.equal(bisenet.forward_aux(perturbed), aux) == (i in (0, 1)), i


def test_bisenet_modules_by_hand():
    """Attention refinement: conv, then x * sigmoid(BN(1x1 conv(mean of x))); feature fusion:
    F = conv-BN-ReLU(concat), F + F * sigmoid(1x1(ReLU(1x1(mean of F))))."""
    from sceneparse.models.decoders import _AttentionRefinement, _FeatureFusion

    torch.manual_seed(0)
    arm, ffm = _AttentionRefinement(6, 4).eval(), _FeatureFusion(8, 8).eval()
    _randomise(arm, seed=3)
    _randomise(ffm, seed=4)
    x, spatial, context = torch.randn(2, 6, 5, 7), torch.randn(2, 4, 5, 7), torch.randn(2, 4, 5, 7)
    with torch.no_grad():
        y = arm.conv(x)
        conv, bn = arm.attention[1], arm.attention[2]
        pooled = y.mean((2, 3))  # N x C
        z = pooled @ conv.weight[:, :, 0, 0].t()
        z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        torch.testing.assert_close(arm(x), y * torch.sigmoid(z)[:, :, None, None], rtol=1e-5, atol=1e-5)

        f = ffm.fuse(torch.cat([spatial, context], 1))
        squeeze, excite = ffm.attention[1], ffm.attention[3]
        h = torch.relu(f.mean((2, 3)) @ squeeze.weight[:, :, 0, 0].t() + squeeze.bias)
        gate = torch.sigmoid(h @ excite.weight[:, :, 0, 0].t() + excite.bias)
        torch.testing.assert_close(ffm(spatial, context), f + f * gate[:, :, None, None], rtol=1e-5, atol=1e-5)


def test_bisenet_trains_its_context_path_once_per_step():
    model = build_model("resnet18", "bisenet", num_classes=3).train()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == out.aux.shape == (2, 3, 64, 64)
    counts = {int(m.num_batches_tracked) for m in model.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert counts == {1}
    model.eval()
    with torch.no_grad():  # the training pass's heads are forward's and forward_aux's
        features = model.encoder(torch.randn(2, 3, 64, 64))
        logits, aux = model.decoder.forward_train(features)
        torch.testing.assert_close(logits, model.decoder(features))
        torch.testing.assert_close(aux, model.decoder.forward_aux(features))


def test_deeplabv3plus_widths_are_the_papers():
    plus = build_decoder("deeplabv3plus", [24, 2048], 21)
    assert plus.low_level[0].out_channels == 48  # the low-level projection
    convs = [m for m in plus.conv_last.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (256 + 48, 256, (3, 3)), (256, 256, (3, 3)), (256, 21, (1, 1))]


@pytest.mark.parametrize("decoder", ["danet", "encnet", "bisenet", "ocrnet"])
def test_dynamic_shape_export(decoder, tmp_path):
    """`sceneparse export --dynamic` (pt2) captures the attention and encoding heads with symbolic
    H and W, and the file matches the model at other sizes (export_model checks three shapes)."""
    from sceneparse.engine.export import export_model

    torch.manual_seed(0)
    model = build_model("resnet18dilated", decoder, num_classes=3).eval()
    report = export_model(model, tmp_path / "m.pt2", format="pt2", size=(40, 48), dynamic=True, log=lambda _: None)
    assert len(report["checks"]) == 3 and all(check["ok"] for check in report["checks"])


def test_channel_attention_stays_finite_under_float16_autocast():
    from sceneparse.models.layers import ChannelAttention

    cam = ChannelAttention()
    cam.gamma.data.fill_(1.0)
    x = torch.rand(1, 8, 128, 256) * 4  # dot products over 32768 positions: far above float16's 65504
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out = cam(x.half())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), cam(x), rtol=2e-3, atol=2e-2)


# --- U-Net, FPN, SegFormer, OCRNet ----------------------------------------------------------------


def _cbr_by_hand(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """conv (no bias) + BatchNorm in eval mode + ReLU, with the functional ops."""
    conv, bn = seq[0], seq[1]
    y = F.conv2d(x, conv.weight, padding=conv.padding, dilation=conv.dilation)
    y = (y - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + bn.eps).sqrt()
    return torch.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])


# resnet18's sizes (each map half the one before), a dilated encoder's (the deepest two equal) and
# hrnetv2's (the deepest map is the 1/4 concatenation)
SIZES = {"plain": [(16, 20), (8, 10), (4, 5)], "dilated": [(16, 20), (8, 10), (8, 10)],
         "hrnet": [(8, 10), (4, 5), (8, 10)]}


def _decoder_and_maps(name: str, channels: list[int], sizes, seed: int, **options):
    """Decoder `name` with active random weights (`_randomise_active`), and random maps of `sizes`."""
    torch.manual_seed(0)
    decoder = build_decoder(name, channels, 3, **options).eval()
    _randomise_active(decoder, seed=seed)
    return decoder, [torch.randn(2, c, h, w) for c, (h, w) in zip(channels, sizes)]


def _at_finest(maps):
    """The maps, each bilinearly resized to the largest size among them."""
    size = max(m.shape[-2:] for m in maps)
    return [_up(m, torch.empty(size)) if m.shape[-2:] != size else m for m in maps]


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES)
def test_unet_concatenates_each_skip_at_the_finer_size_by_hand(sizes):
    unet, features = _decoder_and_maps("unet", [4, 6, 8], sizes, seed=8, decoder_channels=[10, 5])

    with torch.no_grad():
        x = features[2]
        for block, skip in zip(unet.blocks, [features[1], features[0]]):
            x = _cbr_by_hand(block[1], _cbr_by_hand(block[0], torch.cat(_at_finest([x, skip]), 1)))
        expected = _score(unet.conv_last, x)
        got = unet(features)
    assert expected.std(dim=(2, 3)).min() > 0.01
    assert got.shape[-2:] == max(sizes)  # the finest map's size
    torch.testing.assert_close(got, expected, **ACTIVE_TOL)
    assert [b[0][0].in_channels for b in unet.blocks] == [8 + 6, 10 + 4]


def test_unet_default_widths_and_a_wrong_count_of_widths():
    assert [b[1][0].out_channels for b in build_decoder("unet", [24, 32, 64, 160, 320], 3).blocks] == [256, 128, 64, 32]
    for name in ("unet", "unetplusplus"):
        with pytest.raises(SceneparseError, match=f"{name} has one block width per skip map: 3 for this encoder's 4 maps, "
                           "but decoder_channels has 2 widths") as err:
            build_decoder(name, [8, 16, 32, 64], 3, decoder_channels=[64, 32])
        assert "decoder_channels=[256, 128, 64]" in err.value.hint
        for wrong in (64, 64.0, "64", [64, 32.5, 16], [64, 0, 16], [True, 1, 1]):
            with pytest.raises(SceneparseError, match=f"{name}'s decoder_channels must be a list of 3 positive widths"):
                build_decoder(name, [8, 16, 32, 64], 3, decoder_channels=wrong)


def test_ocrnet_refuses_a_single_class():
    with pytest.raises(SceneparseError, match="ocrnet needs at least 2 classes") as err:
        build_decoder("ocrnet", [8, 16], 1)
    assert "2 classes" in err.value.hint




@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES)
def test_unetplusplus_nested_dense_skips_by_hand(sizes):
    net, x = _decoder_and_maps("unetplusplus", [4, 6, 8], sizes, seed=14, decoder_channels=[10, 5])

    def node(name, inputs):
        block = net.nodes[name]
        return _cbr_by_hand(block[1], _cbr_by_hand(block[0], torch.cat(_at_finest(inputs), 1)))

    with torch.no_grad():
        x11 = node("1_1", [x[2], x[1]])  # row 1: width 10 (the deeper skip's)
        x01 = node("0_1", [x[1], x[0]])  # row 0: width 5
        x02 = node("0_2", [x11, x[0], x01])  # the dense path: x(0,0) and x(0,1) again
        expected = _score(net.conv_last, x02)
        torch.testing.assert_close(net(x), expected, **ACTIVE_TOL)
    assert expected.std(dim=(2, 3)).min() > 0.01
    assert net.nodes["0_2"][0][0].in_channels == 10 + 4 + 5 and net.nodes["1_1"][0][0].out_channels == 10


def test_unetplusplus_with_two_maps_is_unet():
    torch.manual_seed(0)
    plus, unet = build_decoder("unetplusplus", [4, 8], 3).eval(), build_decoder("unet", [4, 8], 3).eval()
    _randomise_active(plus, seed=15)
    _copy_by_order(plus, unet)
    features = [torch.randn(2, 4, 8, 10), torch.randn(2, 8, 4, 5)]
    with torch.no_grad():
        torch.testing.assert_close(plus(features), unet(features))


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES)
def test_linknet_adds_each_block_to_its_skip_by_hand(sizes):
    net, x = _decoder_and_maps("linknet", [16, 32, 64], sizes, seed=16, final_dim=6)

    def block(b, v, size):
        reduced = _cbr_by_hand(b["reduce"], v)
        if size != tuple(reduced.shape[-2:]) and size[0] > reduced.shape[-2]:
            reduced = _up(reduced, torch.empty(size))
        return _cbr_by_hand(b["expand"], _cbr_by_hand(b["conv"], reduced))

    with torch.no_grad():
        y = x[2]
        for b, skip in zip(net.blocks, [x[1], x[0]]):
            size = max(y.shape[-2:], skip.shape[-2:])
            y = block(b, y, size) + _at_finest([skip, torch.empty(1, 1, *size)])[0]
        expected = _score(net.conv_last, block(net.final, y, tuple(y.shape[-2:])))
        torch.testing.assert_close(net(x), expected, **ACTIVE_TOL)
    assert expected.std(dim=(2, 3)).min() > 0.01  # varies over the image: the check is not of constants
    # each block ends at its skip's width; the reductions are a quarter of the input's
    assert [(b["reduce"][0].out_channels, b["expand"][0].out_channels) for b in net.blocks] == [(16, 32), (8, 16)]


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES)
def test_fpn_top_down_pyramid_and_upsampling_blocks_by_hand(sizes):
    channels = [4, 6, 8]
    torch.manual_seed(0)
    fpn = build_decoder("fpn", channels, 3, pyramid_dim=8, segmentation_dim=16).eval()
    _randomise(fpn, seed=9)
    assert [len(blocks) for blocks in fpn.levels] == [1, 1, 2]  # Panoptic FPN: 1/4, 1/8, 1/16 x2 ...
    assert fpn.levels[0][0][1].num_groups == 16  # gcd(32, 16)
    features = [torch.randn(2, c, h, w) for c, (h, w) in zip(channels, sizes)]

    def at_finer(x, size):
        return _up(x, torch.empty(size)) if size[0] > x.shape[-2] else x

    def block(seq, x):  # conv, GroupNorm, ReLU
        return torch.relu(seq[1](F.conv2d(x, seq[0].weight, padding=1)))

    with torch.no_grad():
        lateral = [_score(conv, f) for conv, f in zip(fpn.lateral, features)]
        p2 = lateral[2]
        size1 = max(p2.shape[-2:], lateral[1].shape[-2:])
        p1 = at_finer(lateral[1], size1) + at_finer(p2, size1)
        size0 = max(p1.shape[-2:], lateral[0].shape[-2:])
        p0 = at_finer(lateral[0], size0) + at_finer(p1, size0)
        s = [f.shape[-2:] for f in features]
        level0 = block(fpn.levels[0][0], p0)
        level1 = at_finer(block(fpn.levels[1][0], p1), s[0])
        level2 = at_finer(block(fpn.levels[2][1], at_finer(block(fpn.levels[2][0], p2), s[1])), s[0])
        finest = max(x.shape[-2:] for x in (level0, level1, level2))
        summed = sum(at_finer(x, finest) for x in (level0, level1, level2))
        expected = _score(fpn.conv_last[1], summed)
        got = fpn(features)
    assert got.shape[-2:] == max(sizes)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES)
def test_segformer_head_projects_resizes_and_fuses_by_hand(sizes):
    head, features = _decoder_and_maps("segformer", [4, 6, 8], sizes, seed=10, embed_dim=5)
    finest = torch.empty(max(sizes))
    with torch.no_grad():
        projected = [_up(_score(conv, f), finest) for conv, f in zip(head.project, features)]
        fused = _cbr_by_hand(head.fuse, torch.cat(projected[::-1], 1))  # deepest first, as the authors'
        expected = _score(head.conv_last[1], fused)
        torch.testing.assert_close(head(features), expected, **ACTIVE_TOL)
    assert expected.std(dim=(2, 3)).min() > 0.01
    assert head.fuse[0].in_channels == 3 * 5


def test_object_attention_by_hand():
    from sceneparse.models.layers import ObjectAttention

    torch.manual_seed(0)
    block = ObjectAttention(channels=6, key_dim=4).eval()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # BN statistics that are not the identity, with shifts that let most ReLUs pass
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(3)  # default init's weights give near-equal scores
            if isinstance(m, nn.BatchNorm2d):
                for t, low, high in [(m.running_mean, -0.2, 0.2), (m.running_var, 0.5, 1.5),
                                     (m.weight, 0.5, 1.5), (m.bias, 0.0, 0.5)]:
                    t.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)
    x, objects = torch.randn(2, 6, 3, 4) * 2, torch.randn(2, 6, 5) * 2  # 5 object regions

    def cbr(seq, v):  # 1x1 conv-BN-ReLU(s) on one vector
        for i in range(0, len(seq), 3):
            conv, bn = seq[i], seq[i + 1]
            v = conv.weight[:, :, 0, 0] @ v
            v = torch.relu((v - bn.running_mean) / (bn.running_var + bn.eps).sqrt() * bn.weight + bn.bias)
        return v

    with torch.no_grad():
        got = block(x, objects)
        expected, spreads = torch.empty_like(x), []
        for n in range(2):
            keys = [cbr(block.key, objects[n, :, k]) for k in range(5)]
            values = [cbr(block.value, objects[n, :, k]) for k in range(5)]
            for h in range(3):
                for w in range(4):
                    query = cbr(block.query, x[n, :, h, w])
                    scores = torch.stack([query @ key / 2.0 for key in keys])  # / sqrt(4)
                    spreads.append(scores.std())
                    weights = scores.exp() / scores.exp().sum()
                    expected[n, :, h, w] = cbr(block.out, sum(wk * v for wk, v in zip(weights, values)))
    assert torch.stack(spreads).mean() > 0.5  # the scores differ between regions: the softmax matters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_object_attention_compiles_for_changing_sizes():
    """torch.compile with symbolic H and W: its layout pass once failed on the 1x1 conv over the
    attention product's view (torch.export is checked by test_dynamic_shape_export[ocrnet])."""
    from sceneparse.models.layers import ObjectAttention

    torch._dynamo.reset()
    torch.manual_seed(0)
    block = ObjectAttention(channels=8, key_dim=8).eval()
    compiled = torch.compile(block, dynamic=True)  # symbolic from the start, as after a second size
    x, objects = torch.randn(2, 8, 19, 23), torch.randn(2, 8, 3)
    torch.testing.assert_close(compiled(x, objects), block(x, objects), rtol=1e-4, atol=1e-5)


def test_ocrnet_gathers_one_representation_per_class_by_hand():
    torch.manual_seed(0)
    ocr = build_decoder("ocrnet", [6, 8], 3, ocr_dim=10, key_dim=4).eval()
    _randomise_active(ocr, seed=12)
    features = [torch.randn(2, 6, 8, 10), torch.randn(2, 8, 4, 5)]
    captured = {}
    ocr.object_attention.register_forward_hook(lambda m, args, out: captured.update(objects=args[1]))
    with torch.no_grad():
        regions = ocr.regions(features[-1])  # N x K x h x w
        pixels = _cbr_by_hand(ocr.pixels, features[-1])
        expected_objects = torch.empty(2, 10, 3)
        for n in range(2):
            for k in range(3):
                weights = regions[n, k].flatten().exp() / regions[n, k].flatten().exp().sum()
                expected_objects[n, :, k] = (pixels[n].flatten(1) * weights).sum(1)
        out = ocr(features)
        torch.testing.assert_close(captured["objects"], expected_objects, **ACTIVE_TOL)
        context = ocr.object_attention(pixels, expected_objects)
        fused = _cbr_by_hand(ocr.fuse, torch.cat([context, pixels], 1))
        torch.testing.assert_close(out, _score(ocr.conv_last, fused), **ACTIVE_TOL)
        # the auxiliary output is the regions; a training pass computes them once for both heads
        torch.testing.assert_close(ocr.forward_aux(features), regions, **ACTIVE_TOL)
        logits, aux = ocr.forward_train(features)
        torch.testing.assert_close(logits, out, **ACTIVE_TOL)
        torch.testing.assert_close(aux, regions, **ACTIVE_TOL)
        # only the deepest map is read
        assert torch.equal(ocr([features[0] + 1, features[1]]), out)

    model = build_model("resnet18dilated", "ocrnet", num_classes=3, decoder_options={"ocr_dim": 16, "key_dim": 8})
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 64, 64))
    counts = {int(m.num_batches_tracked) for m in model.decoder.modules() if isinstance(m, nn.BatchNorm2d)}
    assert counts == {1}

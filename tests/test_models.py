"""Encoders, decoders, Segmenter, build_model and strict backbone-weight loading."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from sceneparse.errors import SceneparseError
from sceneparse.models import (
    DECODERS,
    ENCODERS,
    Segmenter,
    SegmenterOutput,
    build_encoder,
    build_model,
    load_encoder_weights,
)
from sceneparse.models.pretrained import SYNCBN_EXTRA_SUFFIXES

# Small encoders for the full encoder x decoder matrix; the big CSAIL ones are exercised by the
# conversion tests (tests/test_csail_conversion.py).
SMALL_ENCODERS = ["resnet18", "resnet18dilated", "mobilenetv2dilated", "hrnetv2_w18", "timm:resnet18"]



def test_registries_hold_every_encoder_and_decoder_name():
    assert set(DECODERS) == {
        "c1", "c1_deepsup", "ppm", "ppm_deepsup", "upernet", "fcn32s", "fcn16s", "fcn8s", "deeplabv3", "deeplabv3plus",
        "danet", "denseaspp", "encnet", "bisenet", "unet", "fpn", "segformer", "ocrnet", "unetplusplus", "linknet",
    }
    assert {
        "mobilenetv2dilated", "resnet18", "resnet18dilated", "resnet50", "resnet50dilated",
        "resnet101", "resnet101dilated", "hrnetv2", "hrnetv2_w18",
    } <= set(ENCODERS)


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("encoder", SMALL_ENCODERS)
def test_every_pair_trains_and_predicts_at_input_size(encoder, decoder):
    torch.manual_seed(0)
    options = {"fpn_dim": 32} if decoder == "upernet" else {}  # CSAIL's 512 is slow on CPU
    model = build_model(encoder, decoder, num_classes=3, decoder_options=options)
    images = torch.randn(2, 3, 21, 29)  # odd size: padded, then cropped back

    model.train()
    out = model(images)
    if hasattr(model.decoder, "forward_aux"):  # the *_deepsup heads, danet, encnet, bisenet
        assert isinstance(out, SegmenterOutput)
        assert out.logits.shape == out.aux.shape == (2, 3, 21, 29)
        loss = out.logits.logsumexp(1).mean() + 0.4 * out.aux.logsumexp(1).mean()
    else:
        assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 21, 29)
        loss = out.logsumexp(1).mean()
    loss.backward()
    first_conv = next(m for m in model.encoder.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    classifier = model.decoder.get_submodule(type(model.decoder).classifier)
    assert classifier.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3, 21, 29)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "name, channels, reductions, pad",
    [
        ("resnet18", [64, 128, 256, 512], [4, 8, 16, 32], 32),
        ("resnet18dilated", [64, 128, 256, 512], [4, 8, 8, 8], 8),
        ("resnet50dilated", [256, 512, 1024, 2048], [4, 8, 8, 8], 8),
        ("mobilenetv2dilated", [24, 32, 64, 160, 320], [4, 8, 8, 8, 8], 8),
        ("hrnetv2_w18", [18, 36, 72, 144, 270], [4, 8, 16, 32, 4], 32),
        ("timm:convnext_atto", [40, 80, 160, 320], [4, 8, 16, 32], 32),
        ("timm:test_mambaout", [16, 32, 48, 64], [4, 8, 16, 32], 32),  # timm returns its maps N x H x W x C
    ],
)
def test_encoder_attributes_describe_its_feature_maps(name, channels, reductions, pad):
    encoder = build_encoder(name).eval()
    assert (encoder.channels, encoder.reductions, encoder.pad_multiple) == (channels, reductions, pad)
    with torch.no_grad():
        features = encoder(torch.randn(1, 3, 64, 96))
    assert [f.shape[1] for f in features] == channels
    assert [(f.shape[2], f.shape[3]) for f in features] == [(64 // r, 96 // r) for r in reductions]


@pytest.mark.parametrize("name, options", [
    ("timm:vit_tiny_patch16_224", {"depth": 3}),  # timm taps its last 3 blocks
    ("timm:swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "embed_dim": 16}),
])
def test_timm_transformers_built_for_one_input_size_take_any_padded_size(name, options):
    # ViT and Swin assert their 224 training size unless built with dynamic_img_size; Swin's
    # maps also come N x H x W x C from timm. Through the Segmenter (which pads to 32) any size works.
    model = build_model(name, "upernet", 3, encoder_options=options).eval()
    with torch.no_grad():
        for h, w in [(64, 96), (100, 130)]:
            assert model(torch.randn(1, 3, h, w)).shape == (1, 3, h, w)
    # a size option of the user's own is theirs: the fixed size comes back
    fixed = build_model(name, "c1", 3, encoder_options={**options, "img_size": 64}).eval()
    with torch.no_grad():
        assert fixed(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
        with pytest.raises(AssertionError):
            fixed(torch.randn(1, 3, 64, 96))


def test_hrnet_fuses_bilinearly_at_exact_size():
    encoder = build_encoder("hrnetv2_w18").eval()
    assert not any(isinstance(m, nn.Upsample) for m in encoder.modules())
    # the last map is the four branches resized bilinearly to 1/4 and concatenated
    with torch.no_grad():
        *branches, fused = encoder(torch.randn(1, 3, 64, 64))
    size = branches[0].shape[-2:]
    expected = torch.cat(
        [branches[0]] + [F.interpolate(b, size=size, mode="bilinear", align_corners=False) for b in branches[1:]], 1
    )
    assert torch.equal(fused, expected)


def test_padding_is_zeros_bottom_right_then_cropped():
    torch.manual_seed(0)
    model = build_model("resnet18dilated", "ppm", num_classes=4).eval()
    images = torch.randn(1, 3, 67, 93)
    with torch.no_grad():
        logits = model(images)
        padded = F.pad(images, (0, 3, 0, 5))  # to 72 x 96, multiples of 8
        by_hand = F.interpolate(model.decoder(model.encoder(padded)), size=(72, 96), mode="bilinear",
                                align_corners=False)[..., :67, :93]
    assert logits.shape == (1, 4, 67, 93)
    assert torch.equal(logits, by_hand)


def test_train_mode_output_kinds():
    images = torch.randn(2, 3, 32, 32)
    deepsup = build_model("timm:resnet18", "c1_deepsup", num_classes=2).train()
    out = deepsup(images)
    assert isinstance(out, SegmenterOutput) and out.logits.shape == out.aux.shape == (2, 2, 32, 32)
    assert not torch.equal(out.logits, out.aux)
    plain = build_model("timm:resnet18", "c1", num_classes=2).train()
    assert type(plain(images)) is torch.Tensor
    assert type(deepsup.eval()(images)) is torch.Tensor


def test_a_users_own_decoder_with_an_auxiliary_head_trains():
    """A plain nn.Module with forward and forward_aux (no `Decoder` base, no forward_train) is a
    deep-supervision decoder too."""
    from sceneparse.models import Segmenter, build_encoder

    class Mine(nn.Module):
        num_classes = 2

        def __init__(self, channels):
            super().__init__()
            self.main, self.aux = nn.Conv2d(channels[-1], 2, 1), nn.Conv2d(channels[-2], 2, 1)

        def forward(self, features):
            return self.main(features[-1])

        def forward_aux(self, features):
            return self.aux(features[-2])

    encoder = build_encoder("resnet18")
    model = Segmenter(encoder, Mine(encoder.channels)).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, SegmenterOutput) and out.logits.shape == out.aux.shape == (2, 2, 32, 32)


def test_config_rebuilds_the_same_model():
    model = build_model("timm:resnet18", "upernet", 5, encoder_options={"out_indices": (1, 2, 3, 4)},
                        decoder_options={"fpn_dim": 16, "pool_scales": (1, 2)})
    assert model.config == {
        "encoder": "timm:resnet18", "decoder": "upernet", "num_classes": 5,
        "encoder_options": {"out_indices": (1, 2, 3, 4)}, "decoder_options": {"fpn_dim": 16, "pool_scales": (1, 2)},
    }
    assert len(model.encoder.channels) == 4 and model.decoder.fpn_in[0][0].out_channels == 16
    rebuilt = build_model(**model.config)
    assert isinstance(rebuilt, Segmenter)
    rebuilt.load_state_dict(model.state_dict(), strict=True)


def test_unknown_names_and_options_are_user_errors():
    with pytest.raises(SceneparseError, match="unknown encoder 'resnet34'"):
        build_model("resnet34", "c1", 3)
    with pytest.raises(SceneparseError, match="unknown decoder 'fcn'"):
        build_model("resnet18", "fcn", 3)
    with pytest.raises(SceneparseError, match="unknown timm model 'no_such_net'"):
        build_model("timm:no_such_net", "c1", 3)
    with pytest.raises(SceneparseError, match="bad options for decoder 'ppm'"):
        build_model("resnet18", "ppm", 3, decoder_options={"fpn_dim": 8})
    with pytest.raises(SceneparseError, match="bad options for encoder 'resnet18'"):
        build_model("resnet18", "ppm", 3, encoder_options={"depth": 8})
    with pytest.raises(SceneparseError, match="bad options for encoder timm:test_resnet .*: TypeError: .*'foo'"):
        build_model("timm:test_resnet", "c1", 3, encoder_options={"foo": 1})
    with pytest.raises(SceneparseError, match=r"bad options for encoder timm:resnet18 \{'out_indices': \[9\]\}: IndexError"):
        build_model("timm:resnet18", "c1", 3, encoder_options={"out_indices": [9]})
    with pytest.raises(SceneparseError, match="at least 2 feature maps"):
        build_model("timm:resnet18", "upernet", 3, encoder_options={"out_indices": (4,)})


# --- backbone weights ---------------------------------------------------------------------------------


def _save(tmp_path, state, name="weights.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def _mit_semseg():
    return pytest.importorskip("mit_semseg.models.models", reason="mit_semseg (CSAIL's code, test-only) not importable")


@torch.no_grad()
def _randomise_bn(module, seed):
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def _assert_same_features(encoder, reference) -> None:
    """Our encoder's feature maps equal CSAIL's (`return_feature_maps=True`) on one random input."""
    images = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        ours, theirs = encoder.eval()(images), reference(images, return_feature_maps=True)
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(ours, theirs, strict=True))


def test_csail_imagenet_resnet_loads_and_matches_csail(tmp_path):
    models = _mit_semseg()
    from mit_semseg.models import resnet

    torch.manual_seed(0)
    csail_net = resnet.resnet18(pretrained=False)  # CSAIL's ImageNet model (with fc)
    _randomise_bn(csail_net, seed=1)
    state = {k: v for k, v in csail_net.state_dict().items() if not k.endswith(SYNCBN_EXTRA_SUFFIXES)}
    assert "fc.weight" in state and "conv3.weight" in state
    encoder = build_encoder("resnet18dilated")
    load_encoder_weights(encoder, _save(tmp_path, state, "resnet18-imagenet.pth"))
    assert torch.equal(encoder.bn1.running_var, state["bn3.running_var"])

    reference = models.ResnetDilated(csail_net, dilate_scale=8).eval()
    _assert_same_features(encoder, reference)


def test_csail_imagenet_mobilenet_tar_loads_and_matches_csail(tmp_path):
    models = _mit_semseg()
    from mit_semseg.models import mobilenet

    torch.manual_seed(0)
    csail_net = mobilenet.mobilenetv2(pretrained=False)
    _randomise_bn(csail_net, seed=2)
    # mobilenet_v2.pth.tar: a training checkpoint of a DataParallel model
    state = {"state_dict": {f"module.{k}": v for k, v in csail_net.state_dict().items()}, "epoch": 150}
    encoder = build_encoder("mobilenetv2dilated")
    load_encoder_weights(encoder, _save(tmp_path, state, "mobilenet_v2.pth.tar"))

    reference = models.MobileNetV2Dilated(csail_net, dilate_scale=8).eval()
    _assert_same_features(encoder, reference)


def test_torchvision_mobilenet_v2_loads(tmp_path):
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2().eval()
    _randomise_bn(tv, seed=4)
    encoder = build_encoder("mobilenetv2dilated").eval()
    load_encoder_weights(encoder, _save(tmp_path, tv.state_dict()))
    assert torch.equal(encoder.blocks[6][0].conv_pwl.weight, tv.features[17].conv[2].weight)
    # the first two taps (features[2], features[4]) come before any dilation: same computation
    images = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        ours = encoder(images)
        assert (ours[0] - tv.features[:3](images)).abs().max() < 1e-4
        assert (ours[1] - tv.features[:5](images)).abs().max() < 1e-4


@pytest.mark.parametrize(
    "encoder_name, timm_name, probe",
    [
        ("resnet18", None, "layer4.1.bn2.running_var"),
        ("mobilenetv2dilated", "mobilenetv2_100", "blocks.6.0.conv_pwl.weight"),
        ("hrnetv2_w18", "hrnet_w18", "body.stage4.2.fuse_layers.0.3.0.weight"),
        ("timm:resnet18", "resnet18", "body.layer3.0.downsample.0.weight"),
        ("timm:convnext_atto", "convnext_atto", "body.stages_2.blocks.1.conv_dw.weight"),
        ("timm:mobilenetv2_100", "mobilenetv2_100", "body.blocks.5.2.conv_dw.weight"),
        ("timm:test_vit", "test_vit", "body.model.blocks.1.attn.qkv.weight"),  # timm's feature getter
        ("timm:test_mambaout", "test_mambaout", "body.stages_2.blocks.0.fc1.weight"),
    ],
)
def test_timm_state_dicts_load_dropping_only_the_head(tmp_path, encoder_name, timm_name, probe):
    torch.manual_seed(0)
    if timm_name is None:  # CSAIL's ResNet-18 layout in timm names: timm's ResNet class, deep stem
        from timm.models.resnet import BasicBlock, ResNet

        full = ResNet(BasicBlock, (2, 2, 2, 2), stem_type="deep", stem_width=64)
    else:
        full = timm.create_model(timm_name)
    _randomise_bn(full, seed=3)
    state = full.state_dict()
    encoder = build_encoder(encoder_name)
    load_encoder_weights(encoder, _save(tmp_path, state))
    source_key = probe.removeprefix("body.").removeprefix("model.").replace("stages_2", "stages.2")
    assert torch.equal(encoder.state_dict()[probe], state[source_key])


def test_timm_safetensors_weights_load_whatever_the_file_is_called(tmp_path):
    # timm's weights on the Hugging Face hub are `model.safetensors`; a cached download may have another name
    from safetensors.torch import save_file

    full = timm.create_model("test_vit")
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, tmp_path / "weights.bin")
    encoder = build_encoder("timm:test_vit")
    load_encoder_weights(encoder, tmp_path / "weights.bin")
    assert torch.equal(encoder.state_dict()["body.model.pos_embed"], full.state_dict()["pos_embed"])


def test_transformer_position_tables_take_no_weight_decay():
    from sceneparse.engine.optim import param_groups

    model = build_model("timm:swin_tiny_patch4_window7_224", "c1", 3,
                        encoder_options={"depths": (1, 2, 1, 1), "num_heads": (1, 1, 1, 1), "embed_dim": 16})
    tables = {id(p) for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")}
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, 0.1, 0.1, 0.01)}
    assert len(tables) == 5 and tables <= groups["encoder_no_decay"] and not tables & groups["encoder"]
    vit = build_encoder("timm:vit_tiny_patch16_224", depth=3)
    assert vit.no_weight_decay == {"body.model.pos_embed", "body.model.cls_token"}


def test_mismatched_backbone_files_are_rejected(tmp_path):
    from timm.models.resnet import BasicBlock, ResNet

    r18 = ResNet(BasicBlock, (2, 2, 2, 2), stem_type="deep", stem_width=64).state_dict()
    with pytest.raises(SceneparseError, match=r"encoder weights file .* (missing keys|shape mismatches)"):
        load_encoder_weights(build_encoder("resnet50"), _save(tmp_path, r18))
    extra = {**r18, "aux_head.weight": torch.zeros(2)}
    with pytest.raises(SceneparseError, match=r"1 unexpected keys: aux_head\.weight"):
        load_encoder_weights(build_encoder("resnet18"), _save(tmp_path, extra))
    partial = {k: v for k, v in r18.items() if not k.startswith("layer1.")}
    with pytest.raises(SceneparseError, match=r"missing keys: layer1\.0\.conv1\.weight"):
        load_encoder_weights(build_encoder("resnet18"), _save(tmp_path, partial))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SceneparseError, match="cannot read encoder weights file"):
        load_encoder_weights(build_encoder("resnet18"), tmp_path / "junk.pth")


def test_url_sources_go_through_the_download_cache(tmp_path, monkeypatch):
    import sceneparse.zoo.download as download

    path = _save(tmp_path, timm.create_model("resnet18").state_dict())
    calls = []
    monkeypatch.setattr(download, "fetch", lambda url, **kw: calls.append(url) or path)
    encoder = build_encoder("timm:resnet18")
    load_encoder_weights(encoder, "https://example.org/resnet18.pth")
    assert calls == ["https://example.org/resnet18.pth"]


def test_timm_weights_load_into_an_encoder_cut_short_with_out_indices(tmp_path):
    # A full timm checkpoint into `timm:<name>` with out_indices: the later stages are unused keys
    # (dropped like the head); the kept stages must receive exactly the file's tensors.
    import timm

    full = timm.create_model("test_resnet", pretrained=False)
    torch.save(full.state_dict(), tmp_path / "full.pth")
    model = build_model("timm:test_resnet", "c1", 3, encoder_options={"out_indices": [0, 1, 2]})
    load_encoder_weights(model.encoder, tmp_path / "full.pth")
    loaded = model.encoder.state_dict()
    assert torch.equal(loaded["body.conv1.0.weight"], full.state_dict()["conv1.0.weight"])
    assert torch.equal(loaded["body.layer2.0.conv1.weight"], full.state_dict()["layer2.0.conv1.weight"])
    assert not any(k.startswith("body.layer3") for k in loaded)


def test_a_patch_14_vit_pads_to_its_patch_not_to_32():
    """DINOv2's 14-pixel patches divide no multiple of 32 but 224: padding to 32 broke every size."""
    model = build_model("timm:vit_small_patch14_dinov2", "segformer", 3, encoder_options={"out_indices": [11]}).eval()
    assert model.encoder.pad_multiple == 14
    with torch.no_grad():
        for h, w in [(64, 96), (70, 98)]:
            assert model(torch.randn(1, 3, h, w)).shape == (1, 3, h, w)
    assert build_model("timm:resnet18", "c1", 3).encoder.pad_multiple == 32  # unchanged where 32 works

"""CSAIL checkpoint conversion: equal outputs to CSAIL's own code, strict key mapping, clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from csail_reference import (
    KEYS_DIR,
    SEVEN_ARCHS,
    csail_file_state,
    csail_modules,
    randomise,
    read_key_lists,
    synthetic_state,
)
from sceneparse.errors import SceneparseError
from sceneparse.models.pretrained import SYNCBN_EXTRA_SUFFIXES
from sceneparse.zoo.csail import ARCHS, from_csail

needs_shared = pytest.mark.skipif(not KEYS_DIR.is_dir(), reason=f"../shared not found: {KEYS_DIR}")


def _mit_semseg():
    return pytest.importorskip("mit_semseg.models.models", reason="mit_semseg (CSAIL's code, test-only) not importable")



def test_arch_table_matches_encoders():
    from sceneparse.models import build_encoder

    assert set(ARCHS) == set(SEVEN_ARCHS)
    assert {a.epoch for a in ARCHS.values()} == {20, 25, 30, 50}
    assert ARCHS["resnet101-upernet"].epoch == 50 and ARCHS["resnet101dilated-ppm_deepsup"].epoch == 25
    for name in ("mobilenetv2dilated-c1_deepsup", "resnet18dilated-ppm_deepsup", "resnet50-upernet"):
        # CSAIL rounds eval sizes to 8 for its stride-8 (dilated) encoders, to 32 otherwise
        assert build_encoder(ARCHS[name].encoder).pad_multiple == (8 if "dilated" in name else 32)


# --- against CSAIL's implementation -------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("arch", SEVEN_ARCHS)
def test_csails_code_saves_the_keys_of_the_shared_reference(arch):
    """So the files the tests below make from CSAIL's code are the files CSAIL published."""
    _mit_semseg()
    num_classes = 7
    csail_enc, csail_dec = csail_modules(arch, num_classes)
    ref_enc, ref_dec = read_key_lists(arch)
    for module, ref in ((csail_enc, ref_enc), (csail_dec, ref_dec)):
        saved = csail_file_state(module)
        plain = {k: list(v.shape) for k, v in saved.items() if not k.endswith(SYNCBN_EXTRA_SUFFIXES)}
        assert plain == {k: ([num_classes, *s[1:]] if s and s[0] == 150 else s) for k, s in ref.items()}


@pytest.mark.parametrize("arch", SEVEN_ARCHS)
def test_same_probabilities_as_csail(arch, tmp_path):
    _mit_semseg()
    torch.manual_seed(0)
    num_classes, size = 7, (32, 64)  # small: resnet101 and hrnet_w48 run on CPU here
    images = torch.randn(2, 3, *size)
    csail_enc, csail_dec = csail_modules(arch, num_classes)
    csail_features = randomise(csail_enc, csail_dec, images, seed=1)
    enc_file, dec_file = tmp_path / "encoder_epoch_1.pth", tmp_path / "decoder_epoch_1.pth"
    enc_state, dec_state = csail_file_state(csail_enc), csail_file_state(csail_dec)
    torch.save(enc_state, enc_file)
    torch.save(dec_state, dec_file)

    model = from_csail(enc_file, dec_file, arch)
    assert not model.training and model.num_classes == num_classes

    with torch.no_grad():
        expected = csail_dec(csail_features, segSize=size)  # CSAIL's eval output: softmax at segSize
        probs = model(images).softmax(1)
        assert probs.shape == expected.shape == (2, num_classes, *size)
        # the comparison means something: neither uniform nor one-hot
        top = expected.max(1).values.mean()
        assert 0.25 < top < 0.95, top
        assert (probs - expected).abs().max() <= 1e-5

        if hasattr(csail_dec, "cbr_deepsup"):  # the auxiliary head reads the same map as CSAIL's
            csail_dec.use_softmax = False  # CSAIL's training path: log-softmax at feature resolution
            csail_main, csail_aux = csail_dec(csail_features)
            features = model.encoder(images)
            assert (F.log_softmax(model.decoder(features), 1) - csail_main).abs().max() <= 1e-4
            assert (F.log_softmax(model.decoder.forward_aux(features), 1) - csail_aux).abs().max() <= 1e-4


# --- from the shared key lists -----------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("arch", SEVEN_ARCHS)
def test_synthetic_checkpoint_converts_strictly(arch):
    enc_shapes, dec_shapes = read_key_lists(arch)
    enc, dec = synthetic_state(enc_shapes, seed=2), synthetic_state(dec_shapes, seed=3)
    model = from_csail(enc, dec, arch)
    assert model.num_classes == 150

    # every file tensor landed, unchanged, and every model tensor came from the file
    def plain(state):
        return {k: v for k, v in state.items() if not k.endswith(SYNCBN_EXTRA_SUFFIXES)}

    for module, state in ((model.encoder, model.encoder.adapt_state_dict(plain(enc))), (model.decoder, plain(dec))):
        own = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
        assert set(own) == set(state)
        assert all(torch.equal(own[k], state[k]) for k in own)
    assert len(model.encoder.adapt_state_dict(plain(enc))) == len(enc_shapes)


@pytest.fixture(scope="module")
def r18_files():
    if not KEYS_DIR.is_dir():
        pytest.skip(f"../shared not found: {KEYS_DIR}")
    enc_shapes, dec_shapes = read_key_lists("resnet18dilated-ppm_deepsup")
    return synthetic_state(enc_shapes, seed=4), synthetic_state(dec_shapes, seed=5)


def test_wrong_architecture_is_rejected(r18_files):
    enc, dec = r18_files
    with pytest.raises(SceneparseError, match="CSAIL encoder file.*resnet50dilated-ppm_deepsup.*shape mismatches"):
        from_csail(enc, dec, "resnet50dilated-ppm_deepsup")
    # a decoder of another kind is named as such
    _, c1_dec = read_key_lists("mobilenetv2dilated-c1_deepsup")
    with pytest.raises(SceneparseError, match="has no 'conv_last.4.weight'"):
        from_csail(enc, synthetic_state(c1_dec, seed=6), "resnet18dilated-ppm_deepsup")


def test_truncated_state_is_rejected(r18_files):
    enc, dec = r18_files
    truncated = {k: v for k, v in enc.items() if not k.startswith("layer4.1.")}
    with pytest.raises(SceneparseError, match=r"missing keys: layer4\.1\.conv1\.weight"):
        from_csail(truncated, dec, "resnet18dilated-ppm_deepsup")
    extra = {**dec, "conv_last.5.weight": torch.zeros(3)}
    with pytest.raises(SceneparseError, match=r"1 unexpected keys: conv_last\.5\.weight"):
        from_csail(enc, extra, "resnet18dilated-ppm_deepsup")


def test_wrong_class_count_is_rejected(r18_files):
    enc, dec = r18_files
    with pytest.raises(SceneparseError, match="150 classes, expected 19"):
        from_csail(enc, dec, "resnet18dilated-ppm_deepsup", num_classes=19)
    # a decoder whose auxiliary classifier disagrees with the main one
    odd = {**dec, "conv_last_deepsup.bias": torch.zeros(151)}
    with pytest.raises(SceneparseError, match=r"shape mismatches: conv_last_deepsup\.bias file \[151\] vs model \[150\]"):
        from_csail(enc, odd, "resnet18dilated-ppm_deepsup")


def test_unknown_arch_and_corrupt_files(r18_files, tmp_path):
    enc, dec = r18_files
    with pytest.raises(SceneparseError, match="unknown CSAIL architecture 'resnet34-ppm'"):
        from_csail(enc, dec, "resnet34-ppm")
    good = tmp_path / "encoder_epoch_20.pth"
    torch.save(enc, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(SceneparseError, match="cannot read CSAIL encoder file .*cut.pth"):
        from_csail(cut, dec, "resnet18dilated-ppm_deepsup")
    with pytest.raises(SceneparseError, match="does not exist"):
        from_csail(tmp_path / "missing.pth", dec, "resnet18dilated-ppm_deepsup")
    # the path route works and accepts CSAIL's `ade20k-` folder prefix
    model = from_csail(good, dec, "ade20k-resnet18dilated-ppm_deepsup")
    assert model.config["encoder"] == "resnet18dilated"


def test_cli_convert_writes_checkpoint(r18_files, tmp_path):
    checkpoint = pytest.importorskip("sceneparse.engine.checkpoint")
    from sceneparse.cli.main import main

    enc, dec = r18_files
    torch.save(enc, tmp_path / "e.pth")
    torch.save(dec, tmp_path / "d.pth")
    out = tmp_path / "model.pt"
    args = ["convert", "csail", "--encoder", str(tmp_path / "e.pth"), "--decoder", str(tmp_path / "d.pth"),
            "--arch", "resnet18dilated-ppm_deepsup", "--output", str(out)]
    assert main(args) == 0
    loaded = checkpoint.load_model(out)
    assert len(loaded.class_names) == 150 and loaded.class_names[0] == "wall"
    reference = from_csail(enc, dec, "resnet18dilated-ppm_deepsup")
    images = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(loaded(images), reference(images))
    # a user mistake is one message and exit status 2
    assert main([*args[:6], "--arch", "resnet50-upernet", "--output", str(tmp_path / "x.pt")]) == 2


def test_cli_convert_of_a_sceneparse_checkpoint_says_nothing_to_convert(r18_files, tmp_path, capsys):
    from sceneparse.cli.main import main
    from sceneparse.engine.checkpoint import save_model

    enc, dec = r18_files
    model = from_csail(enc, dec, "resnet18dilated-ppm_deepsup")
    done = save_model(tmp_path / "model.pt", model, [f"c{i}" for i in range(150)], [[0, 0, 0]] * 150)
    torch.save(dec, tmp_path / "d.pth")
    args = ["convert", "csail", "--encoder", str(done), "--decoder", str(tmp_path / "d.pth"),
            "--arch", "resnet18dilated-ppm_deepsup", "--output", str(tmp_path / "again.pt")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{done} is already a sceneparse checkpoint: there is nothing to convert" in err
    assert f"--model {done}" in err and not (tmp_path / "again.pt").exists()


def test_csail_files_given_as_a_checkpoint_are_pointed_to_the_converter(r18_files, tmp_path):
    from sceneparse.engine.checkpoint import load_model

    enc, dec = r18_files
    for name, state in (("encoder_epoch_20.pth", enc), ("decoder_epoch_20.pth", dec)):
        torch.save(state, tmp_path / name)
        with pytest.raises(SceneparseError, match=f"{name} is not a sceneparse checkpoint.*CSAIL") as err:
            load_model(tmp_path / name)
        assert "sceneparse convert csail --encoder" in err.value.hint

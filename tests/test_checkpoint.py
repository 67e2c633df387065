"""Checkpoints: round trip, atomic writes under crashes and full disks, clear errors for bad files."""
from __future__ import annotations

import errno
import os
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sceneparse.engine import checkpoint as ckpt_mod
from sceneparse.engine.checkpoint import (
    FORMAT,
    atomic_save,
    load_checkpoint,
    load_model,
    rng_state,
    save_model,
    set_rng_state,
)
from sceneparse.errors import SceneparseError
from sceneparse.models import build_model

NAMES = ["sky", "road", "car"]
PALETTE = [[0, 0, 255], [128, 64, 128], [255, 0, 0]]


def tiny_model(num_classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return build_model("timm:test_efficientnet", "c1", num_classes)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_round_trip_restores_weights_metadata_and_eval_mode(tmp_path):
    model = tiny_model()
    norm = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    path = save_model(tmp_path / "m.pt", model, NAMES, PALETTE, norm)

    raw = torch.load(path, weights_only=True)  # the format promise: plain data, no code
    assert raw["format"] == FORMAT and raw["class_names"] == NAMES and "train_state" not in raw

    loaded = load_model(path)
    assert not loaded.training
    assert loaded.class_names == NAMES and loaded.palette == PALETTE
    assert loaded.normalization == norm
    assert loaded.config == model.config
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_an_encnet_saved_before_its_se_head_existed_still_loads(tmp_path):
    from sceneparse.engine.checkpoint import load_initial_weights

    torch.manual_seed(0)
    old = build_model("timm:test_efficientnet", "encnet", 3, decoder_options={"se_loss": False})
    old.config = {k: v for k, v in old.config.items() if k != "decoder_options"}  # as saved then
    path = save_model(tmp_path / "old.pt", old, NAMES, PALETTE)
    loaded = load_model(path)
    assert loaded.decoder.se_head is None and loaded.config["decoder_options"] == {"se_loss": False}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(old.eval()(x), loaded(x))
    # a new encnet has the head: fine-tuning from the old file names the setting that matches it
    with pytest.raises(SceneparseError, match="differ in decoder_options") as err:
        load_initial_weights(build_model("timm:test_efficientnet", "encnet", 3), path)
    assert "'model.decoder_options={\"se_loss\": false}'" in err.value.hint
    # one saved with the head loads with it
    new = save_model(tmp_path / "new.pt", build_model("timm:test_efficientnet", "encnet", 3), NAMES, PALETTE)
    assert load_model(new).decoder.se_head is not None


def test_default_normalization_is_imagenet_and_a_loaded_models_own_is_kept(tmp_path):
    path = save_model(tmp_path / "m.pt", tiny_model(), NAMES, PALETTE)
    assert load_model(path).normalization == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    norm = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    loaded = load_model(save_model(tmp_path / "own.pt", tiny_model(), NAMES, PALETTE, norm))
    assert load_model(save_model(tmp_path / "again.pt", loaded, NAMES, PALETTE)).normalization == norm


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    old = tiny_model(seed=1)
    save_model(path, old, NAMES, PALETTE)
    before = path.read_bytes()

    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)  # partial bytes on disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_model(path, tiny_model(seed=2), NAMES, PALETTE)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []
    reloaded = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), reloaded.state_dict().values()))


def test_disk_full_is_a_user_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_model(path, tiny_model(seed=1), NAMES, PALETTE)
    before = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.os, "fsync", no_space)
    with pytest.raises(SceneparseError, match="No space left on device") as info:
        save_model(path, tiny_model(seed=2), NAMES, PALETTE)
    assert str(path) in str(info.value)
    monkeypatch.undo()
    assert path.read_bytes() == before and _leftovers(tmp_path) == []


def test_a_file_size_limit_hit_inside_torch_save_is_a_user_error_too(tmp_path):
    """torch.save's zip writer reports a write that fails (a full disk, a file-size limit) as a
    RuntimeError, not an OSError: still one message naming the file; the previous file stays."""
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "last.pt"
    atomic_save({"w": torch.zeros(10)}, path)
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from sceneparse.engine.checkpoint import atomic_save
        from sceneparse.errors import SceneparseError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            atomic_save({{"w": torch.zeros(1 << 20)}}, {str(path)!r})
        except SceneparseError as err:
            print("user error:", err.message)
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert f"user error: could not write checkpoint {path}" in done.stdout, done.stderr[-2000:]
    assert torch.load(path, weights_only=True)["w"].shape == (10,) and _leftovers(tmp_path) == []


def test_a_checkpoint_gets_the_umasks_permissions_like_any_file(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_save({"a": 1}, tmp_path / "x.pt")
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(old)
    assert (tmp_path / "x.pt").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o644


def test_unwritable_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SceneparseError, match="could not write checkpoint"):
        atomic_save({"a": 1}, blocker / "sub" / "x.pt")


def test_missing_truncated_garbage_and_foreign_files(tmp_path):
    with pytest.raises(SceneparseError, match="checkpoint not found"):
        load_model(tmp_path / "nope.pt")

    good = save_model(tmp_path / "good.pt", tiny_model(), NAMES, PALETTE)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SceneparseError, match="truncated.pt is not a readable checkpoint"):
        load_model(truncated)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 definitely not torch" * 10)
    with pytest.raises(SceneparseError, match="garbage.pt is not a readable checkpoint"):
        load_checkpoint(garbage)

    pickled = tmp_path / "pickled.pt"  # Python objects: torch's own message would advise weights_only=False
    torch.save({"model": object()}, pickled)
    with pytest.raises(SceneparseError) as err:
        load_checkpoint(pickled)
    assert "holds Python objects beyond tensors" in err.value.message and "weights_only" not in err.value.message

    foreign = tmp_path / "weights.pth"  # a bare state_dict, as torch.save(model.state_dict()) writes
    torch.save(tiny_model().state_dict(), foreign)
    with pytest.raises(SceneparseError, match="weights.pth is not a sceneparse checkpoint"):
        load_model(foreign)


def test_class_count_that_does_not_fit_is_refused(tmp_path):
    path = save_model(tmp_path / "m.pt", tiny_model(), NAMES, PALETTE)
    ckpt = torch.load(path, weights_only=True)

    ckpt["class_names"] = NAMES[:2]
    torch.save(ckpt, tmp_path / "names.pt")
    with pytest.raises(SceneparseError, match="names.pt: model config says 3 classes but the checkpoint lists 2"):
        load_model(tmp_path / "names.pt")

    ckpt["class_names"] = NAMES + ["bus"]
    ckpt["palette"] = PALETTE + [[1, 2, 3]]
    ckpt["model"]["config"]["num_classes"] = 4  # config and names agree, the weights do not
    torch.save(ckpt, tmp_path / "weights.pt")
    with pytest.raises(SceneparseError, match=r"weights.pt: the weights of .*4 classes does not match the model: "
                       r"2 shape mismatches: decoder\.conv_last\.weight file \[3, 16, 1, 1\] vs model \[4, 16, 1, 1\]"):
        load_model(tmp_path / "weights.pt")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model"]["state_dict"]["decoder.conv_last.bias"]
    torch.save(ckpt, tmp_path / "missing.pt")
    with pytest.raises(SceneparseError, match=r"missing keys.*decoder\.conv_last\.bias"):
        load_model(tmp_path / "missing.pt")

    with pytest.raises(SceneparseError, match="2 class names"):
        save_model(tmp_path / "bad.pt", tiny_model(), NAMES[:2], PALETTE[:2])


def test_a_name_that_is_not_a_file_goes_to_the_zoo(tmp_path, monkeypatch):
    path = save_model(tmp_path / "cached.pt", tiny_model(), NAMES, PALETTE)
    asked = []

    def fake_resolve(name):
        asked.append(name)
        return path

    import sceneparse.zoo

    monkeypatch.setattr(sceneparse.zoo, "resolve", fake_resolve)
    model = load_model("resnet50dilated-ppm_deepsup")
    assert asked == ["resnet50dilated-ppm_deepsup"] and model.class_names == NAMES


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    atomic_save({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(4), random.random(), np.random.rand(3))

    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and np.array_equal(got[2], expected[2])


def test_the_overrides_a_config_mismatch_suggests_give_the_checkpoints_model():
    import shlex

    from sceneparse.engine.checkpoint import config_difference
    from sceneparse.engine.config import load_config

    theirs = {"encoder": "resnet18", "decoder": "upernet", "num_classes": 3, "decoder_options": {"fpn_dim": 128},
              "encoder_options": {"note": "it's"}}  # a quote, for the shell quoting
    ours = {"encoder": "resnet18", "decoder": "upernet", "num_classes": 3,
            "decoder_options": {"fpn_dim": 128, "pool_scales": [1, 2]}, "encoder_options": {"a": 1}}
    differ, shown = config_difference(theirs, ours)
    assert differ == ["decoder_options", "encoder_options"]
    start = ["model.encoder=resnet18", "model.decoder=upernet", "model.decoder_options={fpn_dim: 128, pool_scales: [1, 2]}",
             "model.encoder_options={a: 1}"]
    cfg = load_config(None, [*start, *shlex.split(shown)])  # as a shell would pass them on
    assert OmegaConf.to_container(cfg.model.decoder_options) == {"fpn_dim": 128}
    assert OmegaConf.to_container(cfg.model.encoder_options) == {"note": "it's"}


# --- files that are not (this version's) checkpoints: the message says what the file is and what to do


def test_bare_state_dict_says_how_to_make_a_checkpoint(tmp_path):
    model = tiny_model()
    plain = tmp_path / "w.pt"
    torch.save(model.state_dict(), plain)  # a whole Segmenter's weights: keys encoder.* / decoder.*
    with pytest.raises(SceneparseError) as err:
        load_model(plain)
    assert "bare state_dict" in err.value.message and "without the model config and class names" in err.value.message
    assert "sceneparse.save_model(" in err.value.hint and "load_state_dict" in err.value.hint
    assert "convert" not in err.value.hint  # not CSAIL's: converting would not apply

    # an encoder's weights alone (e.g. a backbone): model.encoder_weights is also offered
    backbone = tmp_path / "backbone.pt"
    torch.save({"state_dict": model.encoder.state_dict()}, backbone)
    with pytest.raises(SceneparseError) as err:
        load_model(backbone)
    assert "under 'state_dict'" in err.value.message
    assert f"model.encoder_weights={backbone}" in err.value.hint and "convert" not in err.value.hint


def test_csail_like_state_dict_is_pointed_to_the_converter(tmp_path):
    # CSAIL's encoder_epoch_N.pth: ResNet deep stem + layers, SyncBN buffers, no encoder./decoder. prefix
    csail = {"conv1.weight": torch.zeros(64, 3, 3, 3), "bn3.running_mean": torch.zeros(128),
             "bn3._running_iter": torch.zeros(1), "layer1.0.conv1.weight": torch.zeros(64, 128, 1, 1)}
    path = tmp_path / "encoder_epoch_20.pth"
    torch.save(csail, path)
    with pytest.raises(SceneparseError) as err:
        load_model(path)
    assert "CSAIL's encoder_epoch_N.pth" in err.value.message and "sceneparse convert csail" in err.value.hint

    # CSAIL's ImageNet backbone (its classifier `fc` included) is encoder weights, not a model to convert
    imagenet = {k: v for k, v in csail.items() if "_running_iter" not in k} | {"fc.weight": torch.zeros(10, 2048)}
    torch.save(imagenet, tmp_path / "resnet50-imagenet.pth")
    with pytest.raises(SceneparseError) as err:
        load_model(tmp_path / "resnet50-imagenet.pth")
    assert "model.encoder_weights=" in err.value.hint and "convert" not in err.value.hint


def test_other_files_without_a_state_dict(tmp_path):
    path = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(SceneparseError) as err:
        load_checkpoint(path)
    assert "not a sceneparse checkpoint" in err.value.message and "convert" not in err.value.hint


def test_newer_format_names_both_versions_and_says_upgrade(tmp_path):
    ckpt = torch.load(save_model(tmp_path / "m.pt", tiny_model(), NAMES, PALETTE), weights_only=True)
    ckpt["format"] = "sceneparse-checkpoint/9"
    torch.save(ckpt, tmp_path / "new.pt")
    with pytest.raises(SceneparseError) as err:
        load_model(tmp_path / "new.pt")
    assert "newer sceneparse" in err.value.message
    assert "'sceneparse-checkpoint/9'" in err.value.message and repr(FORMAT) in err.value.message
    assert "upgrade sceneparse" in err.value.hint

    ckpt["format"] = "sceneparse-checkpoint/beta"  # not a version number: unknown, not "newer"
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(SceneparseError, match="unknown checkpoint format 'sceneparse-checkpoint/beta'"):
        load_model(tmp_path / "odd.pt")


def test_resume_from_truncated_last_pt_never_suggests_resuming_best_pt(tmp_path):
    from sceneparse.engine.train import _resumable_checkpoint  # what --resume loads with

    best = save_model(tmp_path / "best.pt", tiny_model(), NAMES, PALETTE)
    last = tmp_path / "last.pt"
    last.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    with pytest.raises(SceneparseError, match="last.pt is not a readable checkpoint") as err:
        _resumable_checkpoint(last)
    hint = err.value.hint
    assert f"restore {last}" in hint and f"model.weights={best}" in hint and "cannot be resumed" in hint

    best.unlink()  # no best.pt to fall back on: restore or start over
    with pytest.raises(SceneparseError) as err:
        _resumable_checkpoint(last)
    assert "best.pt" not in err.value.hint and f"restore {last}" in err.value.hint


@pytest.mark.parametrize("name, kind", [("m.onnx", "ONNX"), ("m.pt2", "torch.export"), ("M.PT2", "torch.export")])
def test_an_exported_file_given_as_checkpoint_is_named_as_such(tmp_path, name, kind):
    # a real .pt2 is a zip and an ONNX file a protobuf: either would read as a "corrupt" checkpoint
    (tmp_path / name).write_bytes(b"PK\x03\x04 exported" if "pt2" in name.lower() else b"\x08\x09onnx")
    with pytest.raises(SceneparseError, match=f"{name} is an exported model \\({kind}\\), not a sceneparse") as err:
        load_model(tmp_path / name)
    assert "exported from" in err.value.hint and "docs/deploy.md" in err.value.hint


def test_folder_given_as_checkpoint_names_its_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(SceneparseError, match="run is a folder, not a checkpoint file") as err:
        load_model(run)
    assert "best.pt" in err.value.hint  # what a run's folder would hold

    save_model(run / "best.pt", tiny_model(), NAMES, PALETTE)
    save_model(run / "last.pt", tiny_model(), NAMES, PALETTE, train_state={})
    with pytest.raises(SceneparseError, match="is a folder") as err:
        load_model(run)
    assert str(run / "best.pt") in err.value.hint and str(run / "last.pt") in err.value.hint
    assert "--resume" in err.value.hint


def test_checkpoint_given_as_encoder_weights_points_to_model_weights(tmp_path):
    from sceneparse.models.pretrained import load_encoder_weights

    model = tiny_model()
    path = save_model(tmp_path / "best.pt", model, NAMES, PALETTE)
    with pytest.raises(SceneparseError) as err:
        load_encoder_weights(model.encoder, path)
    assert "is a sceneparse checkpoint" in err.value.message
    assert f"model.weights={path}" in err.value.hint and "model.encoder_weights=null" in err.value.hint

"""Config loading: defaults <- YAML <- overrides, with errors that name the key or file."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sceneparse.engine.config import dataset_settings, load_config
from sceneparse.errors import SceneparseError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path):
    path = write(tmp_path, "train:\n  iterations: 50\n  lr_encoder: 0.01\ndata:\n  kind: camvid\n")
    cfg = load_config(path, ["train.iterations=70", "data.crop_size=256", "train.class_weights=[1, 2.5]"])
    assert cfg.train.iterations == 70  # override beats YAML
    assert cfg.train.lr_encoder == 0.01  # YAML beats default
    assert cfg.train.lr_decoder == 0.02 and cfg.train.poly_power == 0.9  # CSAIL defaults
    assert cfg.data.kind == "camvid" and cfg.data.crop_size == 256
    assert list(cfg.train.class_weights) == [1, 2.5]
    assert list(cfg.data.scales) == [300, 375, 450, 525, 600] and cfg.data.max_size == 1000
    assert load_config(None, ["train.class_weights=auto"]).train.class_weights == "auto"


def test_unknown_key_in_yaml_names_it_and_lists_valid_keys(tmp_path):
    path = write(tmp_path, "train:\n  iteratons: 5\n")
    with pytest.raises(SceneparseError) as info:
        load_config(path)
    message = str(info.value)
    assert "train.iteratons" in message and str(path) in message
    assert "iterations" in message.split("fix:")[1]  # the closest valid key is suggested


def test_unknown_override_key_and_section():
    with pytest.raises(SceneparseError, match="lr_encodr") as info:
        load_config(None, ["train.lr_encodr=0.1"])
    assert info.value.hint.startswith("valid keys there: lr_encoder")
    with pytest.raises(SceneparseError, match="'trian'") as info:
        load_config(None, ["trian.iterations=3"])
    assert "train" in info.value.hint


def test_wrong_types_are_refused_with_the_key():
    with pytest.raises(SceneparseError, match="train.iterations") as info:
        load_config(None, ["train.iterations=many"])
    assert "100000" in info.value.hint  # an example of the expected type
    with pytest.raises(SceneparseError, match="data.flip"):
        load_config(None, ["data.flip=sometimes"])
    with pytest.raises(SceneparseError, match="train.amp='fp8' is not one of none, bf16, fp16"):
        load_config(None, ["train.amp=fp8"])
    with pytest.raises(SceneparseError, match="train.class_weights"):
        load_config(None, ["train.class_weights=median"])
    with pytest.raises(SceneparseError, match="train.checkpoint_every=0 must be a positive number"):
        load_config(None, ["train.checkpoint_every=0"])
    with pytest.raises(SceneparseError, match="not key=value"):
        load_config(None, ["train.iterations"])
    with pytest.raises(SceneparseError, match="train.time_budget_s=-5.0 must be positive"):
        load_config(None, ["train.time_budget_s=-5"])
    with pytest.raises(SceneparseError, match="data.augment_on='gpu' is not one of workers, device"):
        load_config(None, ["data.augment_on=gpu", "data.crop_size=64"])


@pytest.mark.parametrize("overrides, message", [
    (["eval.scales=[]"], r"eval.scales=\[\]: expected at least one"),
    (["eval.scales=[300, 0]"], "eval.scales=.*expected"),
    (["data.scales=[0]"], "data.scales=.*expected positive short sides"),
    (["data.max_size=0"], "data.max_size=0 must be a positive number"),
    (["data.scale_range=[2]", "data.crop_size=32"], "data.scale_range=.*low <= high"),
    (["data.scale_range=[2, 1]"], "data.scale_range=.*low <= high"),
    (["data.color_jitter=-1"], "data.color_jitter=-1.0: expected a strength >= 0"),
    (["data.std=[1, 0, 1]"], "data.std=.*std positive"),
    (["data.mean=[0.5, 0.5]"], "data.mean=.*three values each"),
])
def test_values_that_would_fail_later_are_refused_at_load(overrides, message):
    with pytest.raises(SceneparseError, match=message):
        load_config(None, overrides)


def test_an_override_cut_by_the_shell_says_to_quote_it():
    # `sceneparse train CFG model.decoder_options={pool_scales: [1, 2]}` unquoted: the shell splits it
    with pytest.raises(SceneparseError, match="not valid YAML") as info:
        load_config(None, ["model.decoder_options={pool_scales:", "[1,", "2]}"])
    assert "quote the whole override" in info.value.hint


def test_missing_file_and_yaml_syntax_error_name_the_file(tmp_path):
    with pytest.raises(SceneparseError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    broken = write(tmp_path, "train:\n  iterations: [1, 2\n")
    with pytest.raises(SceneparseError, match=r"cfg.yaml: not valid YAML at line 3, column 1: did not find expected"):
        load_config(broken)
    scalar = write(tmp_path, "- a list\n- not a mapping\n")
    with pytest.raises(SceneparseError, match="mapping"):
        load_config(scalar)


def test_dataset_settings_flattens_synthetic_options():
    cfg = load_config(None, ["data.kind=synthetic", "data.synthetic.num_images=12", "data.synthetic.seed=3"])
    settings = dataset_settings(cfg.data)
    assert settings["kind"] == "synthetic" and settings["num_images"] == 12 and settings["seed"] == 3
    assert "synthetic" not in settings


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads_and_builds_its_model(path):
    from sceneparse.data import build_dataset
    from sceneparse.models import build_model

    cfg = load_config(path)
    num_classes = cfg.model.num_classes
    if num_classes is None:  # only datasets that need no files may leave it to the dataset
        num_classes = build_dataset(dataset_settings(cfg.data), cfg.data.train_split).num_classes
    import torch

    with torch.device("meta"):  # shapes only: no time spent initialising weights
        model = build_model(cfg.model.encoder, cfg.model.decoder, num_classes,
                            encoder_options=OmegaConf.to_container(cfg.model.encoder_options),
                            decoder_options=OmegaConf.to_container(cfg.model.decoder_options))
    assert model.num_classes == num_classes


def test_an_empty_mapping_override_empties_the_files_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {encoder: timm:test_resnet, encoder_options: {out_indices: [0, 1, 2]}}\n")
    assert OmegaConf.to_container(load_config(path).model.encoder_options) == {"out_indices": [0, 1, 2]}
    assert OmegaConf.to_container(load_config(path, ["model.encoder_options={}"]).model.encoder_options) == {}
    merged = load_config(path, ["model.encoder_options={drop_rate: 0.1}"]).model.encoder_options  # others merge
    assert OmegaConf.to_container(merged) == {"out_indices": [0, 1, 2], "drop_rate": 0.1}
    with pytest.raises(SceneparseError) as err:
        load_config(path, ["model.encoder_options=null"])
    assert "is a section" in err.value.message and "{} empties it" in err.value.hint

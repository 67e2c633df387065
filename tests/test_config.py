"""Config loading: defaults <- YAML <- overrides, with errors that name the key or file."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
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
    # torch would refuse these at the optimizer or the seed (bare tracebacks), or train on nonsense
    (["train.momentum=-0.5"], r"train.momentum=-0.5: expected a value in \[0, 1\)"),
    (["train.momentum=1"], r"train.momentum=1.0: expected a value in \[0, 1\)"),
    (["train.lr_decoder=-0.01"], "train.lr_decoder=-0.01: expected a learning rate >= 0"),
    (["train.lr_encoder=-1"], "train.lr_encoder=-1.0: expected a learning rate >= 0"),
    (["train.weight_decay=-1"], "train.weight_decay=-1.0: expected a value >= 0"),
    (["train.poly_power=-1"], "train.poly_power=-1.0: expected a power >= 0"),
    (["train.seed=-1"], r"train.seed=-1: expected a seed in 0..2\*\*32-1"),
    (["train.seed=4294967296"], "train.seed=4294967296: expected a seed"),
    (["train.warmup_iters=-5"], r"^train.warmup_iters=-5 must not be negative \(0: no warm-up\)$"),
    (["train.val_every=-1"], r"^train.val_every=-1 must not be negative \(0: never\)$"),
    (["train.device=gpu"], "train.device='gpu' is not a device"),
    (["train.device=cuda:x"], "train.device='cuda:x' is not a device"),
    (["train.device=mps"], "train.device='mps' is not a device"),  # no backend of ours: torch would fail later
    # 0 would silently become the dataset's count; weights < 0 train a class away from its label
    (["model.num_classes=0"], "model.num_classes=0: expected a positive class count"),
    (["train.class_weights=[1, -0.5]"], r"train.class_weights=\[1, -0.5\]: expected numbers >= 0"),
    (["train.class_weights=[0, 0]"], r"train.class_weights=\[0, 0\]: expected numbers >= 0 \(one per class, not all 0"),
    (["train.class_weights=[a, b]"], "train.class_weights=.*expected numbers"),
    (["data.synthetic={num_images: {train: 0, val: 3}}"], "data.synthetic.num_images=.*expected a positive number"),
    (["data.synthetic={image_size: 0}"], "data.synthetic.image_size=0: expected a positive size"),
    (["data.synthetic={seed: -1}"], "data.synthetic.seed=-1: expected a seed >= 0"),
    (["data.num_workers=-1"], r"^data.num_workers=-1 must not be negative"),
    # inf passes every ">= 0" check and would make the first step nan
    (["train.lr_encoder=inf"], r"^train.lr_encoder=inf: expected a finite number$"),
    (["train.class_weights=[1, .inf]"], r"^train.class_weights\[1\]=inf: expected a finite number$"),
    (["data.mean=[0.4, nan, 0.4]"], r"^data.mean\[1\]=nan: expected a finite number$"),
    (["model.decoder_options={dropout: .inf}"], r"^model.decoder_options.dropout=inf: expected a finite"),
])
def test_values_that_would_fail_later_are_refused_at_load(overrides, message):
    with pytest.raises(SceneparseError, match=message):
        load_config(None, overrides)


def test_edge_values_that_mean_something_load():
    cfg = load_config(None, ["train.lr_encoder=0", "train.momentum=0", "train.poly_power=0", "train.seed=0",
                             "train.device=cuda:1", "train.warmup_iters=0", "train.weight_decay=0"])
    assert cfg.train.lr_encoder == 0 and cfg.train.device == "cuda:1"  # a GPU config loads on a CPU machine
    cfg = load_config(None, ["model.num_classes=1", "train.class_weights=[0, 2.5]",
                             "data.synthetic={num_images: {train: 4, val: 1}, image_size: 16, seed: 0}"])
    assert list(cfg.train.class_weights) == [0, 2.5] and cfg.data.synthetic.num_images.train == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_a_device_sceneparse_cannot_use_is_refused_with_the_forms_it_takes():
    from sceneparse.engine.distributed import resolve_device

    with pytest.raises(SceneparseError, match="'mps' is not a device") as err:  # as --device of predict, serve
        resolve_device("mps")
    assert "auto" in err.value.hint and "cuda:N" in err.value.hint
    with pytest.raises(SceneparseError, match="'cuda:0' requested but CUDA is not available") as err:
        resolve_device("cuda:0")
    assert "train.device" in err.value.hint


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


# --- base: composed config files --------------------------------------------------------------------


def test_a_file_builds_on_its_base_files_in_order(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "exp").mkdir()
    (tmp_path / "common" / "data.yaml").write_text(
        "data: {kind: camvid, crop_size: [360, 480], scales: [300, 400]}\ntrain: {iterations: 500, lr_encoder: 0.1}\n")
    (tmp_path / "common" / "model.yaml").write_text(
        "model: {encoder: resnet18, decoder: upernet, decoder_options: {fpn_dim: 128, pool_scales: [1, 2]}}\n"
        "train: {iterations: 700}\n")
    child = tmp_path / "exp" / "run.yaml"
    child.write_text("base: [../common/data.yaml, ../common/model.yaml]\n"  # relative to exp/
                     "data: {scales: [600]}\nmodel: {decoder_options: {fpn_dim: 64}}\ntrain: {lr_decoder: 0.5}\n")
    cfg = load_config(child, ["train.lr_encoder=0.2"])
    assert cfg.data.kind == "camvid" and list(cfg.data.crop_size) == [360, 480]  # from the first base
    assert list(cfg.data.scales) == [600]  # a list is replaced, not merged
    assert cfg.train.iterations == 700  # the later base wins over the earlier
    assert (cfg.train.lr_encoder, cfg.train.lr_decoder) == (0.2, 0.5)  # the command line over all files
    assert OmegaConf.to_container(cfg.model.decoder_options) == {"fpn_dim": 64, "pool_scales": [1, 2]}
    assert "base" not in cfg
    # a base's base, and an empty mapping in a file replaces its base's
    grandchild = tmp_path / "exp" / "small.yaml"
    grandchild.write_text("base: run.yaml\nmodel: {decoder: c1, decoder_options: {}}\n")
    small = load_config(grandchild)
    assert small.model.decoder == "c1" and OmegaConf.to_container(small.model.decoder_options) == {}
    assert small.train.iterations == 700 and list(small.data.scales) == [600]
    # the composed config saved by a run stands alone
    from sceneparse.engine.config import save_config

    save_config(cfg, tmp_path / "saved.yaml")
    assert "base" not in OmegaConf.load(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("files, message, hint", [
    ({"a.yaml": "base: missing.yaml\n"}, "a.yaml: base file not found: ", "relative to the folder of the file"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: [a.yaml]\n"}, "config files name each other as base: ", None),
    ({"a.yaml": "base: {x: 1}\n"}, "a.yaml: base must be a file path or a list of file paths", "e.g. base:"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "train: {iterationz: 5}\n"}, "b.yaml: invalid setting 'train.iterationz'",
     "iterations"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "train: [1, 2\n"}, "b.yaml: not valid YAML at line 2", None),
])
def test_base_file_mistakes_name_the_file(tmp_path, files, message, hint):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SceneparseError) as err:
        load_config(tmp_path / "a.yaml")
    assert message in err.value.message
    if hint:
        assert hint in err.value.hint


def test_an_empty_section_keeps_its_defaults_and_an_empty_option_mapping_empties(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model: {decoder: upernet, decoder_options: {fpn_dim: 128}}\ndata: {synthetic: {num_images: 8}}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nmodel: {}\ntrain: {loss: {}}\ndata: {synthetic: {}}\n")
    cfg = load_config(child)  # a section written {} is a section with nothing changed
    assert cfg.model.decoder == "upernet" and cfg.train.loss.name == "cross_entropy"
    assert OmegaConf.to_container(cfg.model.decoder_options) == {"fpn_dim": 128}
    assert OmegaConf.to_container(cfg.data.synthetic) == {}  # a free-form mapping written {} is emptied
    assert load_config(child, ["model={}"]).model.decoder == "upernet"


def test_a_file_two_bases_share_is_merged_once(tmp_path):
    # d <- b (iterations 20), d <- c (decoder): a <- [b, c] must keep b's 20, not d's 10 again
    (tmp_path / "d.yaml").write_text("train: {iterations: 10, lr_encoder: 0.3}\n")
    (tmp_path / "b.yaml").write_text("base: d.yaml\ntrain: {iterations: 20}\n")
    (tmp_path / "c.yaml").write_text("base: d.yaml\nmodel: {decoder: c1}\n")
    (tmp_path / "a.yaml").write_text("base: [b.yaml, c.yaml]\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert (cfg.train.iterations, cfg.train.lr_encoder, cfg.model.decoder) == (20, 0.3, "c1")


def test_mmsegmentations_base_key_is_pointed_at_ours(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    with pytest.raises(SceneparseError, match="_base_ is MMSegmentation's key") as err:
        load_config(tmp_path / "a.yaml")
    assert "base:" in err.value.hint


def test_a_class_count_the_dataset_does_not_have_says_how_to_override_the_files(tmp_path):
    from sceneparse.engine.feed import build_data

    # a file that sets model.num_classes: "remove it" cannot be done on the command line
    path = write(tmp_path, "model: {num_classes: 7}\ndata: {kind: synthetic, synthetic: {num_images: 2, image_size: 16}}\n")
    with pytest.raises(SceneparseError, match="model.num_classes=7 but the synthetic dataset has 5 classes") as err:
        build_data(load_config(path, ["train.val_every=0"]), verbose=False)
    assert "model.num_classes=null" in err.value.hint and "model.num_classes=5" in err.value.hint
    assert "remove" not in err.value.hint

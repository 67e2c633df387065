"""The CamVid from-scratch recipe (configs/camvid/scratch_10min*.yaml) and the data options it uses:
joined splits ("train+val"), the in-memory cache and [height, width] crops.

The recipe's real target (>= 65% mIoU on val after 10 H100-minutes) needs a GPU; here it is shrunk
(a few real CamVid images, small crops, CPU) and must still train: the logged loss has to fall.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sceneparse.data import build_dataset
from sceneparse.engine.config import load_config
from sceneparse.errors import SceneparseError
from sceneparse.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SHARED_CAMVID = ROOT.parent / "shared" / "data" / "camvid"
RECIPE = ROOT / "configs" / "camvid" / "scratch_10min.yaml"
RECIPE_TRAINVAL = ROOT / "configs" / "camvid" / "scratch_10min_trainval.yaml"


def need_camvid() -> Path:
    if not (SHARED_CAMVID / "train" / "images").is_dir():
        pytest.skip(f"../shared not found: no CamVid data at {SHARED_CAMVID}")
    return SHARED_CAMVID


def small_camvid(tmp_path: Path, counts: dict[str, int]) -> Path:
    """A CamVid root holding links to the first few real pairs of each split."""
    source = need_camvid()
    root = tmp_path / "camvid"
    for split, count in counts.items():
        for folder in ("images", "labels"):
            (root / split / folder).mkdir(parents=True)
        for image in sorted((source / split / "images").iterdir())[:count]:
            label = source / split / "labels" / f"{image.stem}.png"
            (root / split / "images" / image.name).symlink_to(image)
            (root / split / "labels" / label.name).symlink_to(label)
    return root


@pytest.mark.parametrize("path", [RECIPE, RECIPE_TRAINVAL], ids=lambda p: p.name)
def test_recipes_load_and_build_their_models(path):
    cfg = load_config(path)
    assert cfg.data.kind == "camvid" and cfg.model.encoder_weights is None  # from scratch
    assert list(cfg.data.crop_size) == [360, 480] and cfg.train.amp == "bf16"
    model = build_model(cfg.model.encoder, cfg.model.decoder, cfg.model.num_classes,
                        encoder_options=OmegaConf.to_container(cfg.model.encoder_options),
                        decoder_options=OmegaConf.to_container(cfg.model.decoder_options)).eval()
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 45, 60))
    assert logits.shape == (1, 11, 45, 60)


def test_trainval_recipe_differs_only_where_it_must():
    train_only = OmegaConf.to_container(load_config(RECIPE))
    trainval = OmegaConf.to_container(load_config(RECIPE_TRAINVAL))
    assert trainval["data"].pop("train_split") == "train+val"
    assert train_only["data"].pop("train_split") == "train"
    assert trainval["train"].pop("val_every") == 0 and train_only["train"].pop("val_every") > 0
    assert trainval.pop("output_dir") != train_only.pop("output_dir")
    assert trainval == train_only


def test_joined_splits_and_memory_cache_give_the_same_samples(tmp_path):
    root = small_camvid(tmp_path, {"train": 3, "val": 2})
    settings = {"kind": "camvid", "root": str(root)}
    train, val = build_dataset(settings, "train"), build_dataset(settings, "val")
    joined = build_dataset({**settings, "cache_in_memory": True}, "train+val")
    assert len(joined) == 5 and joined.files == train.files + val.files
    assert joined.image_sizes() == train.image_sizes() + val.image_sizes()
    for index, (dataset, i) in enumerate([(train, 0), (train, 1), (train, 2), (val, 0), (val, 1)]):
        expected, got = dataset[i], joined[index]
        assert torch.equal(got["image"], expected["image"]) and got["path"] == expected["path"]
        assert got["mask"].dtype == torch.int64 and torch.equal(got["mask"], expected["mask"])
    assert (joined[0]["mask"] == 255).any()  # CamVid's void (11) survives the uint8 cache as IGNORE_INDEX
    with pytest.raises(SceneparseError, match="unknown camvid split"):
        build_dataset(settings, "train+nope")


def test_data_check_of_the_trainval_recipe_checks_each_split(tmp_path):
    from sceneparse.data.check import datasets_to_check

    root = small_camvid(tmp_path, {"train": 2, "val": 1})
    config = tmp_path / "trainval.yaml"
    config.write_text(f"base: {RECIPE_TRAINVAL}\ndata: {{root: {root}}}\n")  # an absolute base: path
    built, _ = datasets_to_check(config)
    assert {split: len(d) for split, d in built.items()} == {"train": 2, "val": 1}


def test_generated_datasets_refuse_joined_splits():
    with pytest.raises(SceneparseError, match="cannot join splits"):
        build_dataset({"kind": "synthetic", "num_images": 2, "image_size": 32}, "train+val")


@pytest.mark.parametrize("value", ["[360,480,3]", "[0,480]", "-1", "[360.5,480]"])
def test_crop_size_must_be_an_int_or_height_width(value):
    with pytest.raises(SceneparseError, match="data.crop_size"):
        load_config(RECIPE, [f"data.crop_size={value}"])


def test_shrunk_recipe_trains_on_real_camvid_and_the_loss_falls(tmp_path):
    from sceneparse.engine.train import train

    root = small_camvid(tmp_path, {"train": 4, "val": 1})
    cfg = load_config(RECIPE, [
        f"data.root={root}", f"output_dir={tmp_path / 'run'}",
        # shrunk: small crops of zoomed-out images (more of each scene per crop), 80 steps on CPU
        "data.crop_size=[64,96]", "data.scale_range=[0.5,1.0]", "data.batch_size=4", "data.num_workers=0",
        "train.iterations=80", "train.warmup_iters=5", "train.log_every=10",
        "train.val_every=80", "train.checkpoint_every=80",
        "train.amp=none", "train.channels_last=false", "train.device=cpu",
    ])
    result = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # measured 2026-11-23 with train.seed 0, 1, 2: 0.78, 0.72, 0.81 (at 40 steps: 0.86, 0.80, 0.82,
    # too close to call, so 80)
    assert last < 0.85 * first, losses
    assert result["iterations"] == 80 and Path(result["last"]).is_file()
    assert 0.0 <= result["metrics"]["mean_iou"] <= 1.0  # validated once, at full 360x480

    # What the GPU run does next (benchmarks/gpu/camvid.sh): `sceneparse eval` of last.pt on val,
    # then benchmarks/camvid_report.py turns the run and the report into the block for the docs.
    from sceneparse.cli.main import main

    assert main(["eval", "--model", result["last"], "--dataset", "camvid", "--data-root", str(root),
                 "--split", "val", "--workers", "0", "--device", "cpu", "--output", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["mean_iou"] == pytest.approx(result["metrics"]["mean_iou"], abs=1e-9)  # same model, same image
    text = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "camvid_report.py"), str(tmp_path / "run"),
                           str(tmp_path / "eval"), "--wall-clock", "75", "--checkpoint", result["last"]],
                          capture_output=True, text=True, check=True).stdout
    speeds = [r["img_per_s"] for r in records if "img_per_s" in r][1:]  # the first window: warm-up
    assert f"- iterations: 80 (last logged), final training loss {losses[-1]:.4f}" in text
    assert "- evaluated checkpoint: last.pt of iteration 80\n" in text  # the run's end
    assert f"median {statistics.median(speeds):.0f} img/s over 7 log windows" in text
    assert "1 min 15 s" in text
    assert f"`sceneparse eval`, eval (fp32): mIoU {100 * report['mean_iou']:.2f} %" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "class" not in line]
    assert len(rows) == 12  # 11 classes and the mean
    for cls, row in zip(report["classes"], rows):
        expected = "-" if cls["iou"] is None else f"{100 * cls['iou']:.2f}"
        assert row == f"| {cls['name']} | {expected} |"


def test_camvid_report_says_when_the_evaluated_checkpoint_is_not_the_runs_end():
    import importlib.util

    spec = importlib.util.spec_from_file_location("camvid_report", ROOT / "benchmarks" / "camvid_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    records = [{"iter": 3000, "loss": 0.5, "img_per_s": 900.0}, {"iter": 3100, "loss": 0.4, "img_per_s": 950.0}]
    assert "last.pt of iteration 3100\n" in report.render(records, [], checkpoint_iteration=3100)
    assert "last.pt of iteration 3000 (NOT the end of the run" in report.render(records, [], checkpoint_iteration=3000)

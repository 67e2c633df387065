"""Pascal VOC (+ SBD's train_aug) and Cityscapes: layouts, label mappings, errors, data check."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sceneparse.cli.main import main
from sceneparse.data import IGNORE_INDEX, VOC, Cityscapes, COCOStuff, build_dataset, builtin_meta
from sceneparse.data.datasets import detect_kind
from sceneparse.errors import SceneparseError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def need_shared(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared not found: {path} is needed for this test")
    return path


def write_voc(root: Path, splits: dict[str, list[str]], labels: dict[str, np.ndarray], folder="SegmentationClass"):
    """ROOT/VOCdevkit/VOC2012 with a JPEG per id, the given labels and split lists."""
    base = root / "VOCdevkit" / "VOC2012"
    (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (base / folder).mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    for ids in splits.values():
        for i in ids:
            h, w = labels[i].shape if i in labels else (5, 7)
            shade = sum(map(ord, i)) % 200 + 30  # photos that differ: `data check` flags duplicates
            Image.fromarray(np.full((h, w, 3), shade, np.uint8)).save(base / "JPEGImages" / f"{i}.jpg")
    palette = [c for colour in builtin_meta("voc")["palette"] for c in colour]
    for i, label in labels.items():
        png = Image.fromarray(label.astype(np.uint8), mode="P")
        png.putpalette(palette)  # as VOC's files have (Pillow renumbers a P image saved without one)
        png.save(base / folder / f"{i}.png")
    for split, ids in splits.items():
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return base


# --------------------------------------------------------------------------- VOC


def test_voc_official_layout_reads_the_real_samples(tmp_path):
    samples = need_shared("voc_samples")
    base = tmp_path / "VOCdevkit" / "VOC2012"
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    os.symlink(samples / "JPEGImages", base / "JPEGImages")  # the samples' "JPEGImages" are PNGs
    os.symlink(samples / "SegmentationClass", base / "SegmentationClass")
    stems = sorted(p.stem for p in (samples / "JPEGImages").iterdir())
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(stems[:10]) + "\n")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(reversed(stems[10:])) + "\n")

    for root in (tmp_path, tmp_path / "VOCdevkit", base):  # any level of the download
        assert detect_kind(root) == "voc"
        val = build_dataset({"kind": "voc", "root": str(root)}, "val")
        assert [Path(f).stem for f, _ in val.files] == list(reversed(stems[10:]))  # the list's order
    train = VOC(tmp_path, "train")
    assert len(train) == 10 and train.num_classes == 21 and train.class_names[15] == "person"
    for i in (0, 9):
        raw = np.array(Image.open(train.files[i][1]))
        assert (raw == 255).any()  # VOC's void outlines
        np.testing.assert_array_equal(train[i]["mask"].numpy(), raw.astype(np.int64))
    # The built-in palette is the one VOC's own label files carry.
    png_palette = Image.open(train.files[0][1]).getpalette()[: 21 * 3]
    assert [c for colour in builtin_meta("voc")["palette"] for c in colour] == png_palette


def test_voc_listing_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(SceneparseError, match="no VOC2012 JPEGImages folder"):
        VOC(tmp_path, "train")
    label = np.zeros((5, 7), np.uint8)
    base = write_voc(tmp_path, {"train": ["a", "b"]}, {"a": label})
    with pytest.raises(SceneparseError, match=r"1 images have no label file: .*b\.jpg"):
        VOC(tmp_path, "train")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nghost\n")
    with pytest.raises(SceneparseError, match=r"do not exist, e\.g\. .*ghost"):
        VOC(tmp_path, "val")
    with pytest.raises(SceneparseError, match="trainval.txt does not exist") as err:
        VOC(tmp_path, "trainval")
    assert "expected layout" in err.value.hint
    with pytest.raises(SceneparseError, match="train_aug.txt does not exist") as err:
        VOC(tmp_path, "train_aug")
    assert "sceneparse convert sbd" in err.value.hint
    with pytest.raises(SceneparseError, match="unknown voc split 'test'"):
        VOC(tmp_path, "test")
    bad = label.copy()
    bad[0, 0] = 21  # one past the last class
    write_voc(tmp_path, {"val": ["c"]}, {"c": bad})
    with pytest.raises(SceneparseError, match=r"c\.png has values outside the 21 classes: 21"):
        VOC(tmp_path, "val")[0]


def test_voc_reads_deeplab_style_train_aug_lists(tmp_path):
    labels = {"x": np.eye(5, 7, dtype=np.uint8) * 3, "y": np.full((5, 7), 255, np.uint8)}
    base = write_voc(tmp_path, {"train_aug": []}, labels, folder="SegmentationClassAug")
    for i in labels:
        Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(base / "JPEGImages" / f"{i}.jpg")
    (base / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        "/JPEGImages/x.jpg /SegmentationClassAug/x.png\n/JPEGImages/y.jpg /SegmentationClassAug/y.png\n"
    )
    ds = VOC(tmp_path, "train_aug")
    assert [Path(label).parent.name for _, label in ds.files] == ["SegmentationClassAug"] * 2
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), labels["x"])
    assert (ds[1]["mask"] == IGNORE_INDEX).all()


# --------------------------------------------------------------------------- SBD -> train_aug


def _write_sbd(root: Path, splits: dict[str, list[str]], labels: dict[str, np.ndarray]) -> Path:
    from scipy.io import savemat

    base = root / "benchmark_RELEASE" / "dataset"
    (base / "cls").mkdir(parents=True)
    for i, label in labels.items():  # SBD's format: a struct GTcls with the class map in Segmentation
        savemat(base / "cls" / f"{i}.mat", {"GTcls": {"Segmentation": label, "Boundaries": np.zeros(1)}})
    for split, ids in splits.items():
        (base / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return base


def test_sbd_conversion_builds_train_aug_without_val_images(tmp_path):
    pytest.importorskip("scipy", reason="scipy (the `sbd` extra) reads SBD's .mat files")
    rng = np.random.default_rng(0)
    voc_labels = {i: rng.integers(0, 21, (6, 8)).astype(np.uint8) for i in ("a", "b", "c")}
    voc_labels["a"][0] = 255
    base = write_voc(tmp_path / "voc", {"train": ["a", "b"], "val": ["c"]}, voc_labels)
    sbd_labels = {i: rng.integers(0, 21, (6, 8)).astype(np.uint8) for i in ("b", "c", "d", "e")}
    for i in ("d", "e"):
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(base / "JPEGImages" / f"{i}.jpg")
    _write_sbd(tmp_path / "sbd", {"train": ["b", "d", "c"], "val": ["e"]}, sbd_labels)

    code = main(["convert", "sbd", "--sbd-root", str(tmp_path / "sbd"), "--voc-root", str(tmp_path / "voc")])
    assert code == 0
    # (VOC train + SBD train + SBD val) - VOC val; VOC's own label wins where it has one.
    assert (base / "ImageSets" / "Segmentation" / "train_aug.txt").read_text() == "a\nb\nd\ne\n"
    for i in ("a", "b"):
        assert (base / "SegmentationClassAug" / f"{i}.png").read_bytes() == (base / "SegmentationClass" / f"{i}.png").read_bytes()
    assert not (base / "SegmentationClassAug" / "c.png").exists()
    ds = build_dataset({"kind": "voc", "root": str(tmp_path / "voc")}, "train_aug")
    expected = {"a": voc_labels["a"], "b": voc_labels["b"], "d": sbd_labels["d"], "e": sbd_labels["e"]}
    for k, (image, _) in enumerate(ds.files):
        want = expected[Path(image).stem].astype(np.int64)
        np.testing.assert_array_equal(ds[k]["mask"].numpy(), np.where(want == 255, IGNORE_INDEX, want))
    assert Image.open(ds.files[2][1]).getpalette()[:6] == [0, 0, 0, 128, 0, 0]  # VOC's colours


def test_sbd_conversion_errors(tmp_path, monkeypatch, capsys):
    pytest.importorskip("scipy", reason="scipy (the `sbd` extra) reads SBD's .mat files")
    label = np.zeros((4, 4), np.uint8)
    write_voc(tmp_path / "voc", {"train": ["a"], "val": []}, {"a": label})
    sbd = _write_sbd(tmp_path / "sbd", {"train": ["d"], "val": []}, {})
    args = ["convert", "sbd", "--sbd-root", str(tmp_path / "sbd"), "--voc-root", str(tmp_path / "voc")]
    assert main(args) == 2
    assert "1 train_aug images are not in" in capsys.readouterr().err  # d has no VOC photo
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "voc/VOCdevkit/VOC2012/JPEGImages/d.jpg")
    (sbd / "cls" / "d.mat").write_bytes(b"not a mat file")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot read SBD label" in err and "d.mat" in err and "Traceback" not in err
    assert not (tmp_path / "voc/VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt").exists()
    (sbd / "cls" / "d.mat").unlink()
    assert main(args) == 2
    assert "d.mat does not exist, though SBD's lists name it" in capsys.readouterr().err
    (sbd / "cls" / "d.mat").write_bytes(b"not a mat file")
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # scipy not installed
    assert main(args) == 2
    assert "pip install 'sceneparse[sbd]'" in capsys.readouterr().err
    assert main(["convert", "sbd", "--sbd-root", str(tmp_path), "--voc-root", str(tmp_path / "voc")]) == 2
    assert "has no SBD cls/ folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- Cityscapes

# Cityscapes' own table (cityscapesscripts' labels.py): label id -> trainId of the 19 evaluated classes.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def write_cityscapes(root: Path, split: str, city: str, frame: str, label_ids: np.ndarray) -> None:
    (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
    (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
    h, w = label_ids.shape
    Image.fromarray(np.full((h, w, 3), 60, np.uint8)).save(root / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png")
    Image.fromarray(label_ids.astype(np.uint8)).save(root / "gtFine" / split / city / f"{frame}_gtFine_labelIds.png")


def test_cityscapes_label_ids_become_the_19_train_ids(tmp_path):
    every_id = np.array([*range(34), 255, 255], dtype=np.uint8).reshape(2, 18)
    write_cityscapes(tmp_path, "train", "aachen", "aachen_000000_000019", every_id)
    write_cityscapes(tmp_path, "train", "bochum", "bochum_000000_000313", every_id[::-1])
    assert detect_kind(tmp_path) == "cityscapes"
    ds = build_dataset({"kind": "cityscapes", "root": str(tmp_path)}, "train")
    assert len(ds) == 2 and ds.num_classes == 19 and ds.class_names[11] == "person"
    expected = np.vectorize(lambda v: CITYSCAPES_TRAIN_IDS.get(int(v), IGNORE_INDEX))(every_id)
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), expected)
    np.testing.assert_array_equal(ds[1]["mask"].numpy(), expected[::-1])


def test_cityscapes_errors_name_the_files(tmp_path):
    write_cityscapes(tmp_path, "val", "lindau", "lindau_000000_000019", np.full((2, 3), 34, np.uint8))
    with pytest.raises(SceneparseError, match=r"lindau_000000_000019_gtFine_labelIds\.png has values outside the 19 classes: 34"):
        Cityscapes(tmp_path, "val")[0]
    with pytest.raises(SceneparseError, match=r"leftImg8bit/train does not exist"):
        Cityscapes(tmp_path, "train")
    (tmp_path / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png").rename(
        tmp_path / "gtFine/val/lindau/lindau_000000_000020_gtFine_labelIds.png")
    listing = Cityscapes(tmp_path, "val", strict=False).listing
    assert [p.name for p in listing.images_without_labels] == ["lindau_000000_000019_leftImg8bit.png"]
    assert [p.name for p in listing.labels_without_images] == ["lindau_000000_000020_gtFine_labelIds.png"]
    with pytest.raises(SceneparseError, match="1 images have no label file"):
        Cityscapes(tmp_path, "val")


def test_cityscapes_real_sample_matches_its_train_id_file():
    root = need_shared("cityscapes_sample")
    ds = Cityscapes(root, "val")
    assert len(ds) == 1
    mask = ds[0]["mask"].numpy()
    train_ids = np.array(Image.open(ds.files[0][1].replace("_labelIds", "_labelTrainIds")))
    # The sample's labelIds and labelTrainIds files were each downscaled (to 256x128) on their own,
    # so a few boundary pixels picked different neighbours; everywhere else they must agree.
    assert (mask == train_ids).mean() > 0.995
    assert set(np.unique(mask)) == set(np.unique(train_ids))


def test_data_check_detects_voc_and_cityscapes(tmp_path, capsys):
    base = write_voc(tmp_path / "voc", {"train": ["a"], "val": ["b"]}, {"a": np.zeros((5, 7)), "b": np.ones((5, 7))})
    write_cityscapes(tmp_path / "cs", "val", "ulm", "ulm_000000_000019", np.full((4, 5), 26, np.uint8))
    assert main(["data", "check", str(tmp_path / "voc"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "voc" and report["splits"] == {"train": 1, "val": 1}
    # once train_aug exists it holds train: checking both would count (and flag) train's files twice
    (base / "SegmentationClassAug").mkdir()
    (base / "SegmentationClassAug" / "a.png").write_bytes((base / "SegmentationClass" / "a.png").read_bytes())
    (base / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("a\n")
    assert main(["data", "check", str(tmp_path / "voc"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["splits"] == {"val": 1, "train_aug": 1}
    assert [p for p in report["problems"] if p["code"] == "duplicate_files"] == []
    assert main(["data", "check", str(tmp_path / "cs"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "cityscapes" and report["splits"] == {"val": 1}


# --------------------------------------------------------------------------- the shipped configs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = ["model.encoder=resnet18dilated", "model.encoder_weights=null", "data.batch_size=2",
         "data.num_workers=0", "train.iterations=2", "train.val_every=0", "train.log_every=1"]


def _train_then_eval(config: Path, root: Path, run: Path, capsys, *overrides: str) -> dict:
    args = [str(config), f"data.root={root}", f"output_dir={run}", *SMALL, *overrides]
    assert main(["train", *args]) == 0
    assert main(["eval", "--model", str(run / "last.pt"), "--config", str(run / "config.yaml"),
                 "--output", str(run / "eval"), "--workers", "0"]) == 0
    capsys.readouterr()
    return json.loads((run / "eval" / "report.json").read_text())


@pytest.mark.parametrize("config", ["resnet50dilated-ppm_deepsup.yaml", "resnet50dilated-deeplabv3plus.yaml"])
def test_voc_config_trains_and_evaluates_on_the_real_samples(tmp_path, capsys, config):
    samples = need_shared("voc_samples")
    base = tmp_path / "voc" / "VOC2012"
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    os.symlink(samples / "JPEGImages", base / "JPEGImages")
    os.symlink(samples / "SegmentationClass", base / "SegmentationClass")
    stems = sorted(p.stem for p in (samples / "JPEGImages").iterdir())
    for split, ids in (("train", stems[:10]), ("val", stems[10:12])):  # 2 val images: 513x513 is slow on a CPU
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    report = _train_then_eval(CONFIGS / "voc" / config, tmp_path / "voc",
                              tmp_path / "run", capsys, "data.crop_size=64", "data.train_split=train")
    assert report["dataset"]["kind"] == "voc" and report["num_images"] == 2
    assert len(report["classes"]) == 21 and report["classes"][0]["name"] == "background"


@pytest.mark.parametrize("config", ["resnet50dilated-ppm_deepsup.yaml", "hrnetv2-ocrnet.yaml"])
def test_cityscapes_config_trains_and_evaluates_on_the_real_sample(tmp_path, capsys, config):
    sample = need_shared("cityscapes_sample")
    root = tmp_path / "cityscapes"
    frame = "frankfurt_000000_000294"
    for kind, tail in (("leftImg8bit", "leftImg8bit"), ("gtFine", "gtFine_labelIds")):
        for split, names in (("train", ["frankfurt_000000_000001", "frankfurt_000000_000002"]), ("val", [frame])):
            (root / kind / split / "frankfurt").mkdir(parents=True)
            for name in names:  # the one real frame, twice for a training batch of two
                os.symlink(sample / kind / "val" / "frankfurt" / f"{frame}_{tail}.png",
                           root / kind / split / "frankfurt" / f"{name}_{tail}.png")
    report = _train_then_eval(CONFIGS / "cityscapes" / config, root,
                              tmp_path / "run", capsys, "data.crop_size=[64,128]", "data.batch_size=2")
    assert report["dataset"]["kind"] == "cityscapes" and report["num_images"] == 1
    assert len(report["classes"]) == 19 and report["classes"][13]["name"] == "car"


# --------------------------------------------------------------------------- PASCAL-Context, COCO-Stuff


def test_pascal_context_ignores_background_and_maps_1_to_59(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    for folder in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        (base / folder).mkdir(parents=True)
    raw = np.array([[0, 1, 2, 59], [33, 255, 0, 1]], np.uint8)
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(base / "JPEGImages" / "2008_000002.jpg")
    Image.fromarray(raw).save(base / "SegmentationClassContext" / "2008_000002.png")
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    assert detect_kind(tmp_path) == "pascal_context"
    ds = build_dataset({"kind": "pascal_context", "root": str(tmp_path)}, "val")
    assert ds.num_classes == 59 and ds.class_names[0] == "aeroplane" and ds.class_names[58] == "wood"
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), [[255, 0, 1, 58], [32, 255, 255, 0]])
    raw[0, 0] = 60
    Image.fromarray(raw).save(base / "SegmentationClassContext" / "2008_000002.png")
    with pytest.raises(SceneparseError, match="values outside the 59 classes: 60"):
        ds[0]
    with pytest.raises(SceneparseError, match="SegmentationContext/train.txt does not exist"):
        build_dataset({"kind": "pascal_context", "root": str(tmp_path)}, "train")
    # The 60-class benchmark reads the same files with background as class 0 (only 255 ignored).
    ds60 = build_dataset({"kind": "pascal_context60", "root": str(tmp_path)}, "val")
    assert ds60.num_classes == 60 and ds60.class_names[:2] == ["background", "aeroplane"]
    assert ds60.class_names[1:] == ds.class_names and ds60.palette[1:] == ds.palette
    with pytest.raises(SceneparseError, match="values outside the 60 classes: 60"):
        ds60[0]
    raw[0, 0] = 0
    Image.fromarray(raw).save(base / "SegmentationClassContext" / "2008_000002.png")
    np.testing.assert_array_equal(ds60[0]["mask"].numpy(), [[0, 1, 2, 59], [33, 255, 0, 1]])


# COCO-Stuff ids that COCO dropped (nightrome/cocostuff labels.md: "Removed from COCO"); PNG value = id - 1.
COCO_REMOVED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91}


def test_coco_stuff_maps_its_182_ids_to_171_classes(tmp_path):
    values = np.array([*range(182), 255], np.uint8).reshape(1, -1)
    for kind, array in (("images", np.zeros((1, 183, 3), np.uint8)), ("annotations", values)):
        (tmp_path / kind / "val2017").mkdir(parents=True)
        Image.fromarray(array).save(tmp_path / kind / "val2017" / f"000000000139.{'jpg' if kind == 'images' else 'png'}")
    assert detect_kind(tmp_path) == "coco_stuff"
    ds = build_dataset({"kind": "coco_stuff", "root": str(tmp_path)}, "val")
    assert ds.num_classes == 171 and ds.class_names[0] == "person" and ds.class_names[-1] == "wood"
    kept = [v for v in range(182) if v + 1 not in COCO_REMOVED_IDS]
    expected = [kept.index(v) if v in kept else IGNORE_INDEX for v in range(182)] + [IGNORE_INDEX]
    np.testing.assert_array_equal(ds[0]["mask"].numpy()[0], expected)
    names = builtin_meta("coco_stuff")["class_names"]
    assert names[kept.index(91)] == "banner" and names[kept.index(12)] == "stop sign"  # ids 92 and 13


def test_cli_dataset_kinds_are_the_file_backed_datasets():
    from sceneparse.cli.options import DATASET_KINDS
    from sceneparse.data import DATASETS

    assert set(DATASET_KINDS) == set(DATASETS) - {"synthetic"}


def test_layout_detection_leaves_no_room_for_a_wrong_guess(tmp_path):
    # a folder dataset whose split folders are named like COCO's: its classes file decides
    for sub in ("images/train2017", "labels/train2017"):
        (tmp_path / "mine" / sub).mkdir(parents=True)
    (tmp_path / "mine" / "classes.yaml").write_text("classes: [a, b]\n")
    assert detect_kind(tmp_path / "mine") == "folder"
    # COCO-Stuff needs its annotations beside the images
    (tmp_path / "coco" / "images" / "val2017").mkdir(parents=True)
    assert detect_kind(tmp_path / "coco") != "coco_stuff"
    (tmp_path / "coco" / "annotations" / "val2017").mkdir(parents=True)
    assert detect_kind(tmp_path / "coco") == "coco_stuff"
    # one VOCdevkit holding VOC2010 (PASCAL-Context) and VOC2012: ambiguous, the user says which
    (tmp_path / "both" / "VOCdevkit" / "VOC2010" / "SegmentationClassContext").mkdir(parents=True)
    (tmp_path / "both" / "VOCdevkit" / "VOC2010" / "JPEGImages").mkdir()
    assert detect_kind(tmp_path / "both") == "pascal_context"
    (tmp_path / "both" / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)
    assert detect_kind(tmp_path / "both") is None
    with pytest.raises(SceneparseError, match="cannot tell the dataset layout"):
        from sceneparse.data.check import datasets_to_check

        datasets_to_check(tmp_path / "both")


def test_a_bad_coco_stuff_value_is_named_in_a_short_message(tmp_path):
    for kind, array in (("images", np.zeros((1, 2, 3), np.uint8)), ("annotations", np.array([[0, 200]], np.uint8))):
        (tmp_path / kind / "val2017").mkdir(parents=True)
        Image.fromarray(array).save(tmp_path / kind / "val2017" / f"1.{'jpg' if kind == 'images' else 'png'}")
    with pytest.raises(SceneparseError, match=r"values outside the 171 classes: 200 \(expected class values 0-10, 12-24") as err:
        COCOStuff(tmp_path, "val")[0]
    assert len(err.value.message) < 300  # ranges, not the 171 ids one by one


def _photos_and_labels(image_dir: Path, label_dir: Path, names: list[str], values: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(image_dir / f"{name}.jpg")
        Image.fromarray(rng.integers(0, values, (40, 56), dtype=np.uint8)).save(label_dir / f"{name}.png")


def test_pascal_context_config_trains_and_evaluates(tmp_path, capsys):
    base = tmp_path / "ctx" / "VOCdevkit" / "VOC2010"
    names = [f"2008_00000{i}" for i in range(6)]
    _photos_and_labels(base / "JPEGImages", base / "SegmentationClassContext", names, 60, seed=0)
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    for split, ids in (("train", names[:4]), ("val", names[4:])):
        (base / "ImageSets" / "SegmentationContext" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    report = _train_then_eval(CONFIGS / "pascal_context" / "resnet50dilated-encnet.yaml", tmp_path / "ctx",
                              tmp_path / "run", capsys, "data.crop_size=48", "data.base_size=40")
    assert report["dataset"]["kind"] == "pascal_context" and report["num_images"] == 2
    assert [c["name"] for c in report["classes"]][:2] == ["aeroplane", "bag"] and len(report["classes"]) == 59


def test_coco_stuff_config_trains_and_evaluates(tmp_path, capsys):
    root = tmp_path / "coco"
    for split, names in (("train2017", ["000000000009", "000000000025"]), ("val2017", ["000000000139"])):
        _photos_and_labels(root / "images" / split, root / "annotations" / split, names, 182, seed=len(split))
    report = _train_then_eval(CONFIGS / "coco_stuff" / "resnet50dilated-deeplabv3plus.yaml", root,
                              tmp_path / "run", capsys, "data.crop_size=48", "data.base_size=40")
    assert report["dataset"]["kind"] == "coco_stuff" and report["num_images"] == 1
    assert len(report["classes"]) == 171 and report["classes"][-1]["name"] == "wood"

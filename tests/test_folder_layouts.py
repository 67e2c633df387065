"""The folder kind's trees and splits, and the messages for files a user gets slightly wrong
(split typos, non-UTF-8 lists, JPEG labels, empty and non-image files, float labels)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sceneparse.cli.main import main
from sceneparse.data import VOC, Folder
from sceneparse.data.check import check_datasets, datasets_to_check, overlap_problems, quick_check
from sceneparse.data.datasets import detect_kind
from sceneparse.data.io import image_size, read_image, read_label
from sceneparse.errors import SceneparseError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")

H, W = 6, 8
CLASSES = "classes: [bg, road, car]\n"


def _pair(images: Path, labels: Path, stem: str, label_ext: str = ".png"):
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(list(stem.encode()))  # no two images alike: no duplicate warnings
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(images / f"{stem}.jpg")
    ids = np.zeros((H, W), np.uint8)
    ids[0, :3] = 1
    ids[1, :3] = 2
    Image.fromarray(ids).save(labels / f"{stem}{label_ext}")


def split_tree(root: Path) -> Path:
    """ROOT/{train,val}/{images,labels} + ROOT/classes.yaml: what a user made from the README."""
    for split, stems in (("train", ["a", "b"]), ("val", ["c"])):
        for stem in stems:
            _pair(root / split / "images", root / split / "labels", stem)
    (root / "classes.yaml").write_text(CLASSES)
    return root


def images_tree(root: Path) -> Path:
    """ROOT/{images,labels}/{train,val} + ROOT/classes.yaml."""
    for split, stems in (("train", ["a", "b"]), ("val", ["c"])):
        for stem in stems:
            _pair(root / "images" / split, root / "labels" / split, stem)
    (root / "classes.yaml").write_text(CLASSES)
    return root


def flat_with_lists(root: Path) -> Path:
    for stem in ("a", "b", "c"):
        _pair(root / "images", root / "labels", stem)
    (root / "classes.yaml").write_text(CLASSES)
    (root / "train.txt").write_text("a\nb\n")
    (root / "val.txt").write_text("c.jpg\n")
    return root


def _stems(ds) -> list[str]:
    return [Path(image).stem for image, _ in ds.files]


# --------------------------------------------------------------------------- trees


def test_split_tree_with_a_classes_file_is_a_folder_dataset(tmp_path, capsys):
    root = split_tree(tmp_path / "mine")
    assert detect_kind(root) == "folder"  # not CamVid: the classes file is the folder kind's own
    assert _stems(Folder(root, "train")) == ["a", "b"] and _stems(Folder(root, "val")) == ["c"]
    assert _stems(Folder(root, None)) == ["a", "b", "c"]  # every split
    assert main(["data", "check", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "folder" and report["splits"] == {"train": 2, "val": 1}
    assert [c["name"] for c in report["classes"]] == ["bg", "road", "car"]
    assert [c["pixels"] for c in report["classes"]] == [3 * (H * W - 6), 9, 9]
    # without the classes file the same tree is CamVid's
    (root / "classes.yaml").unlink()
    assert detect_kind(root) == "camvid"


def test_training_reads_the_split_tree(tmp_path):
    from sceneparse.engine.config import load_config
    from sceneparse.engine.feed import build_data

    root = split_tree(tmp_path / "mine")
    train, val, classes = build_data(
        load_config(None, ["data.kind=folder", f"data.root={root}", "model.num_classes=null"]), verbose=False
    )
    assert (len(train), len(val), classes) == (2, 1, 3)


def test_both_trees_images_folder_wins(tmp_path):
    root = images_tree(tmp_path / "mine")
    _pair(root / "train" / "images", root / "train" / "labels", "other")
    assert _stems(Folder(root, "train")) == ["a", "b"]
    assert Folder.splits_on_disk({"root": str(root)}) == ["train", "val"]


def test_the_layout_hint_spells_both_trees(tmp_path):
    (tmp_path / "classes.yaml").write_text(CLASSES)
    with pytest.raises(SceneparseError) as info:
        Folder(tmp_path, "train")
    text = str(info.value)
    assert "ROOT/images/<split>/*  +  ROOT/labels/<split>/*.png" in text
    assert "ROOT/<split>/images/*  +  ROOT/<split>/labels/*.png" in text
    assert "ROOT/<split>.txt" in text and "ROOT/classes.yaml" in text


def test_split_overlap_hint_spells_the_trees(tmp_path):
    root = flat_with_lists(tmp_path / "d")
    ds = Folder(root, None)
    [problem] = overlap_problems([("train", ds), ("val", ds)])
    assert "ROOT/images/train/ + ROOT/labels/train/" in problem.message
    assert "ROOT/train/{images,labels}/" in problem.message


# --------------------------------------------------------------------------- split typos


def test_a_split_without_its_list_is_refused_naming_the_lists(tmp_path):
    root = flat_with_lists(tmp_path / "d")
    assert _stems(Folder(root, "val")) == ["c"]
    with pytest.raises(SceneparseError) as info:
        Folder(root, "valid")  # was: silently every image
    text = str(info.value)
    assert str(root / "valid.txt") in text and "train (train.txt), val (val.txt)" in text
    assert "data.val_split" in text


def test_a_split_without_its_subfolder_is_refused_naming_the_subfolders(tmp_path):
    root = images_tree(tmp_path / "d")
    with pytest.raises(SceneparseError) as info:
        Folder(root, "training")
    assert str(root / "images" / "training") in str(info.value) and "train, val" in str(info.value)
    root = split_tree(tmp_path / "e")
    with pytest.raises(SceneparseError) as info:
        Folder(root, "vall")
    assert str(root / "vall" / "images") in str(info.value) and "train, val" in str(info.value)
    # data check and eval name it the same way (data check exits 2 on a usage mistake)
    assert main(["data", "check", str(root), "--split", "vall"]) == 2


def test_a_folder_without_lists_or_subfolders_is_every_split(tmp_path):
    root = flat_with_lists(tmp_path / "d")
    (root / "train.txt").unlink()
    (root / "val.txt").unlink()
    assert _stems(Folder(root, "valid")) == ["a", "b", "c"]
    (root / "notes.txt").write_text("not a split list\n")  # other text files are no split lists
    assert _stems(Folder(root, "train")) == ["a", "b", "c"]


# --------------------------------------------------------------------------- list files


def test_a_non_utf8_list_names_the_file_and_line(tmp_path, capsys):
    root = flat_with_lists(tmp_path / "d")
    with open(root / "val.txt", "ab") as f:
        f.write(b"caf\xe9.jpg\n")
    with pytest.raises(SceneparseError) as info:
        Folder(root, "val")
    text = str(info.value)
    assert str(root / "val.txt") in text and "line 2" in text and "UTF-8" in text
    assert main(["data", "check", str(root)]) == 2
    assert "line 2" in capsys.readouterr().err
    # a UTF-8 list with a BOM (Windows editors) reads as its names
    (root / "val.txt").write_bytes(b"\xef\xbb\xbfc\r\n")
    assert _stems(Folder(root, "val")) == ["c"]


def test_a_non_utf8_voc_and_sbd_list_names_the_file(tmp_path):
    from sceneparse.data.sbd import convert_sbd

    voc = tmp_path / "VOC2012"
    _pair(voc / "JPEGImages", voc / "SegmentationClass", "2007_000032")
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_bytes(b"2007_000032\n\xff\n")
    with pytest.raises(SceneparseError, match="train.txt is not UTF-8 text: line 2"):
        VOC(voc, "train")
    (tmp_path / "sbd" / "cls").mkdir(parents=True)
    with pytest.raises(SceneparseError, match="train.txt is not UTF-8 text: line 2"):
        convert_sbd(tmp_path / "sbd", voc, progress=False)


# --------------------------------------------------------------------------- label files


def test_jpeg_labels_are_named_as_such(tmp_path):
    root = tmp_path / "d"
    _pair(root / "images" / "train", root / "labels" / "train", "a")
    _pair(root / "images" / "train", root / "labels" / "train", "b", label_ext=".jpg")
    (root / "classes.yaml").write_text(CLASSES)
    with pytest.raises(SceneparseError) as info:  # training
        Folder(root, "train")
    text = str(info.value)
    assert str(root / "labels" / "train" / "b.jpg") in text and "JPEG is lossy" in text and "PNG" in text
    found = [p for p in quick_check(Folder(root, "train", strict=False)) if p.code == "image_without_label"]
    report = check_datasets(datasets_to_check(root)[0], progress=False)
    for problems in (found, [p for p in report.problems if p.code == "image_without_label"]):
        [problem] = problems
        assert "b.jpg" in problem.message and "no usable label" in problem.message
        assert "unsupported format" in problem.message
        assert "JPEG is lossy" in problem.message and "save labels as PNG" in problem.message


def test_colour_labels_get_the_same_advice_in_check_and_training(tmp_path):
    root = tmp_path / "d"
    _pair(root / "images", root / "labels", "a")
    Image.fromarray(np.dstack([np.full((H, W), v, np.uint8) for v in (200, 10, 10)])).save(root / "labels" / "a.png")
    (root / "classes.yaml").write_text(CLASSES)
    with pytest.raises(SceneparseError) as training:
        Folder(root, None).load(0)
    [problem] = [p for p in check_datasets(datasets_to_check(root)[0], progress=False).problems
                 if p.code == "color_label"]
    assert "label_colors" in problem.message and training.value.hint in problem.message


def test_float_labels_with_fractions_are_refused(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.0, 1.0], [2.6, 1.0]], np.float32), "F").save(path)
    with pytest.raises(SceneparseError, match=r"f\.tif holds non-integer values \(e\.g\. 2\.6\)"):
        read_label(path)
    Image.fromarray(np.array([[0.0, 1.0], [2.0, 1.0]], np.float32), "F").save(path)
    assert read_label(path).tolist() == [[0, 1], [2, 1]]  # whole numbers are ids


def test_empty_and_non_image_files_are_named_plainly(tmp_path):
    empty, text = tmp_path / "empty.jpg", tmp_path / "notes.png"
    empty.write_bytes(b"")
    text.write_bytes(b"these are notes, not pixels\n" * 4)
    for call in (image_size, read_label):
        with pytest.raises(SceneparseError, match=r"empty\.jpg is an empty file"):
            call(empty)
    for call in (read_image, image_size, read_label):
        with pytest.raises(SceneparseError) as info:
            call(text)
        assert str(text) in str(info.value) and "BytesIO" not in str(info.value) and " at 0x" not in str(info.value)
    # the training start-up check says it too
    root = tmp_path / "d"
    _pair(root / "images", root / "labels", "a")
    (root / "images" / "a.jpg").write_bytes(b"")
    (root / "classes.yaml").write_text(CLASSES)
    [problem] = quick_check(Folder(root, None))
    assert problem.code == "unreadable_image" and "is an empty file" in problem.message


# --------------------------------------------------------------------------- report text


def test_the_ignored_row_lines_up_with_the_class_rows(tmp_path):
    root = tmp_path / "d"
    _pair(root / "images", root / "labels", "a")
    ids = np.zeros((H, W), np.uint8)
    ids[0, 0] = 255
    Image.fromarray(ids).save(root / "labels" / "a.png")
    (root / "classes.yaml").write_text("classes: [bg, x]\n")  # names shorter than "(ignored)"
    text = check_datasets(datasets_to_check(root)[0], progress=False).format_text()
    rows = text.split("pixels per class:\n")[1].splitlines()[:3]
    assert rows[2].split()[1] == "(ignored)"
    assert len({row.index("%") for row in rows}) == 1 and len({len(row) for row in rows}) == 1


@pytest.mark.parametrize("kind", ["ade20k", "camvid", "voc"])
def test_a_builtin_kind_on_a_folder_of_ones_own_suggests_data_kind_folder(tmp_path, kind):
    """The README's fine-tune command with `data.kind=folder` forgotten: the ADE20K config's kind
    reads the folder, and its own message (no annotations, no label file) would not say why."""
    from sceneparse.data import build_dataset

    root = flat_with_lists(tmp_path / "mine")
    with pytest.raises(SceneparseError) as err:
        build_dataset({"kind": kind, "root": str(root)}, "train")
    assert err.value.hint.endswith(f"{root / 'classes.yaml'} marks a dataset of your own: if this is one, "
                                   "set data.kind=folder")
    assert len(build_dataset({"kind": "folder", "root": str(root)}, "train")) == 2


def test_the_check_of_a_flat_folder_with_lists_names_a_label_no_image_has(tmp_path):
    root = flat_with_lists(tmp_path / "mine")
    (root / "labels" / "b.png").rename(root / "labels" / "b_mask.png")
    report = check_datasets(datasets_to_check(str(root), None, None)[0], progress=False)
    found = {p.code: p.files for p in report.problems}
    assert found["image_without_label"] == [str(root / "images" / "b.jpg")]
    assert found["label_without_image"] == [str(root / "labels" / "b_mask.png")]
    assert [p.code for p in report.problems].count("label_without_image") == 1  # not once per split

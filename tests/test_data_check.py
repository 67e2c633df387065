"""`sceneparse data check` and `quick_check`: every finding on small files written here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sceneparse.cli.main import main
from sceneparse.data import Folder
from sceneparse.data.check import check_datasets, datasets_to_check, quick_check
from sceneparse.errors import SceneparseError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
H, W = 6, 8


def _image(path: Path, size=(H, W), **save):
    """Random pixels seeded by the file name, so that no two test images are duplicates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(list(path.name.encode()))
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, **save)


def _label(path: Path, ids: np.ndarray, mode: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint8), mode).save(path)


def _ids(road_pixels: int = 10) -> np.ndarray:
    ids = np.zeros((H, W), np.uint8)
    ids.flat[:road_pixels] = 1
    ids[-1, -1] = 255  # one ignored pixel
    return ids


def clean_dataset(root: Path) -> Path:
    """3 good pairs (one palette label) of classes bg, road, car; 'car' never occurs."""
    for stem in ["a", "b c", "é"]:
        _image(root / "images" / f"{stem}.png")
        _label(root / "labels" / f"{stem}.png", _ids())
    palette = Image.fromarray(_ids(), "P")
    palette.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
    palette.save(root / "labels" / "b c.png")
    (root / "classes.yaml").write_text("classes: [bg, road, car]\n")
    return root


def broken_dataset(root: Path) -> Path:
    clean_dataset(root)
    img, lbl = root / "images", root / "labels"
    (img / "garbage.jpg").write_bytes(b"not a jpeg at all")
    _label(lbl / "garbage.png", _ids())
    _image(img / "full.jpg")
    data = (img / "full.jpg").read_bytes()
    (img / "full.jpg").unlink()
    (img / "cut.jpg").write_bytes(data[: len(data) // 2])
    _label(lbl / "cut.png", _ids())
    _image(img / "lonely.png")
    _label(lbl / "orphan.png", _ids())
    _image(img / "wide.png")
    _label(lbl / "wide.png", np.zeros((H, W + 1), np.uint8))
    _image(img / "values.png")
    bad = _ids()
    bad[0, 0], bad[0, 1] = 7, 9
    _label(lbl / "values.png", bad)
    _image(img / "colour.png")
    Image.fromarray(np.dstack([_ids() * 100, _ids(), _ids()])).save(lbl / "colour.png")
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees: same size, so only EXIF tells
    _image(img / "rotated.jpg", exif=exif)
    _label(lbl / "rotated.png", _ids())
    (img / "copy.png").write_bytes((img / "a.png").read_bytes())
    _label(lbl / "copy.png", _ids())
    return root


def _codes(problems) -> dict[str, list]:
    found: dict[str, list] = {}
    for p in problems:
        found.setdefault(p.code, []).append(p)
    return found


def test_full_check_finds_every_problem(tmp_path):
    root = broken_dataset(tmp_path)
    datasets, _ = datasets_to_check(root)
    report = check_datasets(datasets, root=root, workers=2, progress=False)
    found = _codes(report.problems)
    assert not report.ok

    def files(code):
        return sorted(Path(f).name for p in found[code] for f in p.files)

    assert files("unreadable_image") == ["cut.jpg", "garbage.jpg"]
    assert files("image_without_label") == ["lonely.png"]
    assert files("label_without_image") == ["orphan.png"]
    assert files("size_mismatch") == ["wide.png", "wide.png"]
    assert files("bad_label_values") == ["values.png"] and found["bad_label_values"][0].details["values"] == [7, 9]
    assert files("color_label") == ["colour.png"]
    assert files("exif_rotated") == ["rotated.jpg", "rotated.png"]
    assert files("duplicate_files") == ["a.png", "copy.png"]
    assert found["unused_classes"][0].details["classes"] == ["car"]
    severities = {p.code: p.severity for p in report.problems}
    assert severities["label_without_image"] == severities["duplicate_files"] == "warning"
    assert severities["size_mismatch"] == severities["bad_label_values"] == "error"
    # the histogram counts every decodable label's valid pixels: a, b c, é, copy, cut, garbage and
    # rotated have 10 road, 37 bg, 1 ignored; values.png 8 road (7 and 9 replaced two), 37 bg, 1
    # ignored; wide.png is all bg (H x W+1)
    assert report.pixel_counts == [8 * 37 + H * (W + 1), 7 * 10 + 8, 0]
    assert report.ignore_pixels == 8


def test_clean_dataset_passes_with_only_the_unused_class_warning(tmp_path):
    datasets, _ = datasets_to_check(clean_dataset(tmp_path))
    report = check_datasets(datasets, progress=False)
    assert report.ok and [p.code for p in report.problems] == ["unused_classes"]
    assert report.pixel_counts == [3 * (H * W - 11), 30, 0] and report.ignore_pixels == 3
    assert "road" in report.format_text()


def test_quick_check_sees_listing_headers_sizes_and_exif_only(tmp_path):
    ds = Folder(broken_dataset(tmp_path), None, strict=False)
    found = _codes(quick_check(ds))
    # garbage.jpg has no readable header (cut.jpg, whose header is cut too on such a tiny file, may join it)
    assert "garbage.jpg" in {Path(p.files[0]).name for p in found["unreadable_image"]}
    assert [Path(p.files[0]).name for p in found["image_without_label"]] == ["lonely.png"]
    assert [Path(p.files[0]).name for p in found["size_mismatch"]] == ["wide.png"]
    # the 180-degree EXIF rotation keeps the size: the header's orientation tag tells, as in the full check
    assert [[Path(f).name for f in p.files] for p in found["exif_rotated"]] == [["rotated.jpg", "rotated.png"]]
    assert "bad_label_values" not in found and "color_label" not in found  # need a full decode
    assert quick_check(Folder(clean_dataset(tmp_path / "ok"), None)) == []


def test_cli_exit_codes_json_and_histogram(tmp_path, capsys):
    broken = broken_dataset(tmp_path / "broken")
    assert main(["data", "check", str(broken), "--json", "--workers", "2"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["kind"] == "folder"
    assert {p["code"] for p in report["problems"]} >= {"unreadable_image", "size_mismatch", "exif_rotated"}
    assert [c["name"] for c in report["classes"]] == ["bg", "road", "car"]

    clean = clean_dataset(tmp_path / "clean")
    histogram = tmp_path / "out" / "hist.png"
    assert main(["data", "check", str(clean), "--histogram", str(histogram), "--output", str(tmp_path / "rep")]) == 0
    text = capsys.readouterr().out
    assert "0 errors, 1 warnings" in text and "car" in text
    assert Image.open(histogram).format == "PNG" and Image.open(tmp_path / "rep" / "histogram.png").size[0] > 100
    # the bars are drawn (tab:blue), and no bars where there are no pixels
    from dataclasses import replace

    full = check_datasets(datasets_to_check(clean)[0], progress=False)
    empty = replace(full, pixel_counts=[0] * len(full.pixel_counts))

    def blue_pixels(report, name):
        with Image.open(report.save_histogram(tmp_path / name)) as img:
            return int((np.abs(np.asarray(img.convert("RGB")).astype(int) - [31, 119, 180]).sum(axis=2) < 20).sum())

    assert blue_pixels(full, "full.png") > 1000 and blue_pixels(empty, "empty.png") == 0
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["ok"] is True

    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_cli_reads_a_yaml_config(tmp_path, capsys):
    root = clean_dataset(tmp_path / "d")
    (root / "classes.yaml").rename(tmp_path / "mine.yaml")
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data:\n  kind: folder\n  root: {root}\n  classes_file: {tmp_path / 'mine.yaml'}\nmodel: {{}}\n")
    assert main(["data", "check", str(config), "--json"]) == 0
    # the splits training reads: the defaults train and val, each the whole folder when it has no lists
    report = json.loads(capsys.readouterr().out)
    assert report["splits"] == {"train": 3, "val": 3}
    overlap = [p for p in report["problems"] if p["code"] == "split_overlap"]
    assert len(overlap) == 1 and overlap[0]["severity"] == "warning" and len(overlap[0]["files"]) == 3
    assert "3 images are in both train and val" in overlap[0]["message"] and "val.txt" in overlap[0]["message"]
    assert not [p for p in report["problems"] if p["code"] == "duplicate_files"]  # one file, not two copies
    # a training config names its splits
    (root / "train.txt").write_text("a\n")
    (root / "val.txt").write_text("b c\né\n")
    config.write_text(config.read_text().replace("  kind: folder\n", "  kind: folder\n  train_split: train\n  val_split: val\n"))
    assert main(["data", "check", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["splits"] == {"train": 1, "val": 2}
    assert not [p for p in report["problems"] if p["code"] == "split_overlap"]


def test_check_real_ade20k_samples(capsys):
    if not (DATA / "ade20k_samples").exists():
        pytest.skip(f"../shared not found: {DATA / 'ade20k_samples'} is needed")
    assert main(["data", "check", str(DATA / "ade20k_samples"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "ade20k" and report["splits"] == {"train": 1, "val": 5}
    raw = np.concatenate([np.array(Image.open(p)).ravel() for p in sorted((DATA / "ade20k_samples" / "annotations").glob("*.png"))])
    assert report["ignore_pixels"] == int((raw == 0).sum())
    assert [c["pixels"] for c in report["classes"]] == np.bincount(raw, minlength=151)[1:151].tolist()


def test_camvid_layout_is_detected_and_void_is_not_an_error(tmp_path, capsys):
    for split in ("train", "val"):
        _image(tmp_path / split / "images" / f"{split}1.jpg")
        ids = np.full((H, W), 11, np.uint8)  # void everywhere but one pixel
        ids[0, 0] = 3
        _label(tmp_path / split / "labels" / f"{split}1.png", ids)
    assert main(["data", "check", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "camvid" and report["splits"] == {"train": 1, "val": 1}
    assert report["classes"][3]["pixels"] == 2 and report["ignore_pixels"] == 2 * (H * W - 1)
    ids[0, 1] = 12  # not a CamVid value
    _label(tmp_path / "val" / "labels" / "val1.png", ids)
    assert main(["data", "check", str(tmp_path), "--split", "val", "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [(p["code"], p["details"].get("values")) for p in problems if p["severity"] == "error"] == [
        ("bad_label_values", [12])
    ]
    assert main(["data", "check", str(tmp_path), "--split", "train", "--json"]) == 0  # val is left out
    assert json.loads(capsys.readouterr().out)["splits"] == {"train": 1}


def test_unknown_layout_asks_for_kind_and_synthetic_needs_no_check(tmp_path, capsys):
    (tmp_path / "stuff").mkdir()
    assert main(["data", "check", str(tmp_path / "stuff")]) == 2
    assert "--kind" in capsys.readouterr().err
    from sceneparse.data import Synthetic

    assert quick_check(Synthetic("val", num_images=2, image_size=16)) == []


def test_a_synthetic_config_is_checked_with_its_own_options(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text("data:\n  kind: synthetic\n  synthetic: {num_images: {train: 8, val: 4}, image_size: 32}\n")
    assert main(["data", "check", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"] == {"train": 8, "val": 4}


def test_a_turned_photo_whose_label_has_the_turned_size_is_accepted(tmp_path):
    """Orientation 6 (90 degrees) of a non-square image: a label with the rotated size can only
    match the view the image is read as, so both checks accept it; with the stored size it is one
    error that says so (the size tells: remove the tag or turn the label), in training's words."""
    exif = Image.Exif()
    exif[0x0112] = 6
    root = clean_dataset(tmp_path / "d")
    _image(root / "images" / "turned.jpg", size=(H, W), exif=exif)  # stored 6x8, read as 8x6
    _label(root / "labels" / "turned.png", np.zeros((W, H), np.uint8))
    assert quick_check(Folder(root, None)) == []
    datasets, _ = datasets_to_check(root)
    assert check_datasets(datasets, progress=False).ok
    _label(root / "labels" / "turned.png", np.zeros((H, W), np.uint8))  # drawn on the stored pixels
    quick = quick_check(Folder(root, None, strict=False))
    full = [p for p in check_datasets(datasets_to_check(root)[0], progress=False).problems if p.severity == "error"]
    with pytest.raises(SceneparseError) as training:
        Folder(root, None).load([Path(i).name for i, _ in Folder(root, None).files].index("turned.jpg"))
    for found in (quick, full):
        assert [p.code for p in found] == ["exif_rotated"]
        message = found[0].message
        assert "label fits the pixels as stored" in message and "remove the image's orientation tag" in message
        assert "nothing tells" not in message
        assert message.startswith(training.value.message)  # the words training uses
    # a label of neither view's size is a plain size mismatch, not an EXIF guess
    _label(root / "labels" / "turned.png", np.zeros((H + 1, W), np.uint8))
    assert [p.code for p in quick_check(Folder(root, None, strict=False))] == ["size_mismatch"]


def test_training_warns_when_val_holds_the_training_images(tmp_path, capsys):
    from sceneparse.engine.config import load_config
    from sceneparse.engine.feed import build_data

    root = clean_dataset(tmp_path / "d")
    settings = ["data.kind=folder", f"data.root={root}", "model.num_classes=null"]
    build_data(load_config(None, settings))  # no split lists: train and val are the whole folder
    err = capsys.readouterr().err
    assert ("data warning: [split_overlap] 3 images are in both the training split 'train' and the validation "
            "split 'val'") in err
    build_data(load_config(None, [*settings, "train.val_every=0"]))  # never validates: nothing to say
    assert "split_overlap" not in capsys.readouterr().err
    (root / "train.txt").write_text("a\nb c\n")
    (root / "val.txt").write_text("é\n")
    build_data(load_config(None, settings))
    assert "split_overlap" not in capsys.readouterr().err
    (root / "val.txt").write_text("é\na\n")
    build_data(load_config(None, settings))
    assert "1 image is in both the training split 'train' and the validation split 'val'" in capsys.readouterr().err
    build_data(load_config(None, [*settings, "data.val_split=train"]))  # one split named twice
    assert "2 images are in both the training split 'train' and the validation split 'train'" in capsys.readouterr().err


def test_a_config_whose_splits_share_a_folder_reports_each_problem_once(tmp_path, capsys):
    root = broken_dataset(tmp_path / "d")
    assert main(["data", "check", str(root), "--json"]) == 1
    alone = json.loads(capsys.readouterr().out)
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data: {{kind: folder, root: {root}}}\n")  # train and val: the whole folder
    assert main(["data", "check", str(config), "--json"]) == 1
    both = json.loads(capsys.readouterr().out)
    assert both["splits"] == {"train": alone["splits"]["all"], "val": alone["splits"]["all"]}

    def codes(report):
        return sorted(p["code"] for p in report["problems"] if p["code"] != "split_overlap")

    assert codes(both) == codes(alone)
    assert both["classes"] == alone["classes"] and both["ignore_pixels"] == alone["ignore_pixels"]  # counted once

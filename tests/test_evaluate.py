"""evaluate(), `sceneparse eval`, `sceneparse predict` and the visualisation helpers, end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sceneparse.cli.main import main
from sceneparse.errors import SceneparseError
from sceneparse.data import build_dataset
from sceneparse.data.io import read_image
from sceneparse.engine.checkpoint import load_model, save_model
from sceneparse.engine.evaluate import evaluate, format_table, write_report
from sceneparse.engine.infer import Predictor
from sceneparse.engine.visualize import colorize, overlay, save_confusion_png, save_curves_png
from sceneparse.models import build_model

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PALETTE = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]



class RedChannelOracle(nn.Module):
    """Predicts class round(R / 100) from the red value of each pixel (undoing the normalisation)."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        red = (x[:, 0] * STD[0] + MEAN[0]) * 255
        cls = (red / 100).round().long().clamp(0, 2)
        return nn.functional.one_hot(cls, 3).permute(0, 3, 1, 2).float() * 10 + self.dummy


def _write_folder_dataset(root: Path, pairs: dict[str, tuple[np.ndarray, np.ndarray]],
                          classes=("road", "tree", "sky")) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for stem, (image, label) in pairs.items():
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        Image.fromarray(label.astype(np.uint8)).save(root / "labels" / f"{stem}.png")
    (root / "classes.yaml").write_text("classes: [" + ", ".join(classes) + "]\n")
    return root


def _image_with_red(red: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(*red.shape, 3), dtype=np.uint8)
    img[..., 0] = red
    return img


@pytest.fixture
def oracle_dataset(tmp_path):
    # image 1 predicts [[0,1,2],[2,2,0]], label [[0,1,1],[2,255,0]]
    # image 2 predicts [[1,1],[0,2]],     label [[1,0],[0,255]]
    pairs = {
        "one": (_image_with_red(np.array([[0, 100, 200], [200, 200, 0]])), np.array([[0, 1, 1], [2, 255, 0]])),
        "two": (_image_with_red(np.array([[100, 100], [0, 200]]), 1), np.array([[1, 0], [0, 255]])),
    }
    return build_dataset({"kind": "folder", "root": str(_write_folder_dataset(tmp_path / "data", pairs))}, "val")


def test_evaluate_accumulates_over_images_hand_computed(oracle_dataset):
    model = RedChannelOracle().train()
    report = evaluate(model, oracle_dataset, {"scales": (None,)}, "cpu", num_workers=0)
    assert model.training  # mode restored
    # (target, prediction) pairs over both images (ignored pixels dropped):
    # image 1: (0,0) (1,1) (1,2) (2,2) (0,0); image 2: (1,1) (0,1) (0,0)
    assert report["confusion_matrix"] == [[3, 1, 0],
                                          [0, 2, 1],
                                          [0, 0, 1]]
    # 8 labelled, 6 correct; IoU = 3/(4+3-3), 2/(3+3-2), 1/(1+2-1) = 3/4, 1/2, 1/2 -> mean 7/12
    assert report["pixel_accuracy"] == pytest.approx(0.75)
    assert [c["iou"] for c in report["classes"]] == pytest.approx([0.75, 0.5, 0.5])
    assert report["mean_iou"] == pytest.approx(7 / 12)
    assert report["score"] == pytest.approx((7 / 12 + 0.75) / 2)
    assert report["num_images"] == 2 and report["ignored_pixels"] == 2
    assert [c["name"] for c in report["classes"]] == ["road", "tree", "sky"]
    table = format_table(report)
    assert "58.33" in table and "75.00" in table  # mIoU and pixel accuracy in %
    # the keyword style the training loop uses gives the same numbers
    again = evaluate(model, oracle_dataset, scales=[None], flip=False, max_size=1000, mean=MEAN, std=STD,
                     device="cpu", num_workers=0)
    assert again["confusion_matrix"] == report["confusion_matrix"]


def test_evaluate_csail_protocol_and_report_json(oracle_dataset, tmp_path):
    report = evaluate(RedChannelOracle(), oracle_dataset, {"single_scale": True}, "cpu",
                      protocol="csail", num_workers=0, max_images=1)
    s = report["settings"]
    assert s["scales"] == [450] and s["resize"] == "pil" and s["max_size"] == 1000
    assert report["num_images"] == 1 and report["labelled_pixels"] == 5
    # 2x3 -> 450x675 (Pillow bilinear) and the logits back to 2x3: at the original pixel centres the
    # red values are unchanged, so the oracle predicts as before: 4 of the 5 labelled pixels right
    assert report["pixel_accuracy"] == pytest.approx(0.8)
    report["classes"][2]["iou"] = math.nan  # what compute() gives a class absent everywhere
    path = write_report(report, tmp_path / "r" / "report.json")
    loaded = json.loads(path.read_text())  # strict JSON: NaN became null
    assert loaded["classes"][2]["iou"] is None


# --------------------------------------------------------------------------- real model + CLI
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("mobilenetv2dilated", "c1", num_classes=3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny model.pt"
    save_model(path, model, ["road", "tree", "sky"], PALETTE)
    return path


@pytest.fixture
def real_dataset(tmp_path):
    rng = np.random.default_rng(3)
    pairs = {}
    for i, (h, w) in enumerate([(40, 56), (48, 40)]):
        label = rng.integers(0, 2, size=(h, w))  # class 2 ("sky") never occurs
        label[:5] = 255
        pairs[f"img{i}"] = (rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), label)
    return _write_folder_dataset(tmp_path / "real data", pairs)


def test_cli_eval_end_to_end(tiny_checkpoint, real_dataset, tmp_path, capsys):
    out = tmp_path / "eval out"
    code = main(["eval", "--model", str(tiny_checkpoint), "--data-root", str(real_dataset),
                 "--dataset", "folder", "--output", str(out), "--workers", "1", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mean IoU" in printed and "overall score" in printed and "sky" in printed
    report = json.loads((out / "report.json").read_text())
    with Image.open(out / "confusion.png") as png:
        assert png.size[0] > 100
    # independent check of the numbers: predictions and labels compared with numpy
    model = load_model(tiny_checkpoint)
    predictor = Predictor(model)
    correct = labelled = 0
    for stem in ("img0", "img1"):
        pred = predictor.predict(read_image(real_dataset / "images" / f"{stem}.png")).numpy()
        label = np.asarray(Image.open(real_dataset / "labels" / f"{stem}.png")).astype(np.int64)
        valid = label != 255
        correct += int((pred[valid] == label[valid]).sum())
        labelled += int(valid.sum())
    assert report["labelled_pixels"] == labelled
    assert report["pixel_accuracy"] == pytest.approx(correct / labelled)
    assert report["classes"][2]["accuracy"] is None  # "sky" is not in the labels
    assert report["num_images"] == 2 and report["dataset"]["kind"] == "folder"


def test_cli_eval_csail_single_scale(tiny_checkpoint, real_dataset, tmp_path):
    out = tmp_path / "csail"
    code = main(["eval", "--model", str(tiny_checkpoint), "--data-root", str(real_dataset), "--dataset", "folder",
                 "--protocol", "csail", "--single-scale", "--max-images", "1", "--output", str(out),
                 "--workers", "0", "--device", "cpu"])
    assert code == 0
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert settings["scales"] == [450] and settings["pad_multiple"] == 8 and settings["resize"] == "pil"


def test_cli_eval_from_config(tiny_checkpoint, real_dataset, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  kind: folder\n  root: '{real_dataset}'\n"
                   "eval:\n  scales: [null, 32]\n  flip: true\n  max_size: 64\n")
    out = tmp_path / "from config"
    code = main(["eval", "--model", str(tiny_checkpoint), "--config", str(cfg), "--output", str(out),
                 "--workers", "0", "--device", "cpu"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["scales"] == [None, 32] and report["settings"]["flip"] is True
    assert report["settings"]["max_size"] == 64 and report["dataset"]["split"] == "val"


def test_cli_eval_class_count_mismatch(tiny_checkpoint, tmp_path, capsys):
    label = np.zeros((8, 8))
    root = _write_folder_dataset(tmp_path / "four", {"a": (np.zeros((8, 8, 3), np.uint8), label)},
                                 classes=("a", "b", "c", "d"))
    code = main(["eval", "--model", str(tiny_checkpoint), "--data-root", str(root), "--dataset", "folder",
                 "--workers", "0", "--device", "cpu", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "3 classes" in err and "4 classes" in err
    assert str(tiny_checkpoint) in err and str(root / "classes.yaml") in err


@pytest.mark.parametrize("classes, refused", [(("sky", "road", "tree"), True), (("road", "tree", "cloud"), False)])
def test_cli_eval_checks_the_class_names(tiny_checkpoint, tmp_path, capsys, classes, refused):
    # The model's classes are road, tree, sky: the same names in another order would put every IoU
    # under the wrong name (refused); a renamed class may be the same class (a warning).
    label = np.zeros((8, 8))
    root = _write_folder_dataset(tmp_path / "data", {"a": (np.zeros((8, 8, 3), np.uint8), label)}, classes=classes)
    code = main(["eval", "--model", str(tiny_checkpoint), "--data-root", str(root), "--dataset", "folder",
                 "--workers", "0", "--device", "cpu", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    if refused:
        assert code == 2 and "name the same classes in another order" in err
        assert "id 0: 'road' in the model, 'sky' in the data" in err and "Traceback" not in err
    else:
        assert code == 0 and "warning: 1 class id(s) have other names" in err and "2: 'sky' / 'cloud'" in err


def test_cli_eval_checks_its_output_folder_first(tiny_checkpoint, real_dataset, tmp_path, capsys, monkeypatch):
    from sceneparse.engine import evaluate as evaluate_mod

    taken = tmp_path / "a file"
    taken.write_text("not a folder")
    monkeypatch.setattr(evaluate_mod, "evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
    code = main(["eval", "--model", str(tiny_checkpoint), "--data-root", str(real_dataset), "--dataset", "folder",
                 "--workers", "0", "--device", "cpu", "--output", str(taken)])
    assert code == 2 and f"cannot write the evaluation results to {taken}" in capsys.readouterr().err
    assert taken.read_text() == "not a folder"


def test_default_eval_folders_differ_between_runs_and_splits():
    from sceneparse.cli.evaluate import _default_output

    assert _default_output("runs/a/best.pt", "val") == Path("outputs/eval/a-best-val")
    assert _default_output("runs/b/best.pt", "val") == Path("outputs/eval/b-best-val")
    assert _default_output("best.pt", "train") == Path("outputs/eval/best-train")
    assert _default_output("ade20k-resnet50dilated-ppm_deepsup", "val") == \
        Path("outputs/eval/ade20k-resnet50dilated-ppm_deepsup-val")


def test_cli_eval_bad_options(tiny_checkpoint, real_dataset, capsys):
    base = ["eval", "--model", str(tiny_checkpoint), "--data-root", str(real_dataset), "--dataset", "folder"]
    assert main(base + ["--single-scale"]) == 2
    assert main(base + ["--protocol", "csail", "--scales", "300"]) == 2
    assert main(base + ["--protocol", "csail", "--max-size", "500"]) == 2
    assert "--max-size cannot be combined with --protocol csail" in capsys.readouterr().err
    assert main(base + ["--scales", "0"]) == 2
    assert "--scales must be positive" in capsys.readouterr().err
    image = real_dataset / "images" / "img0.png"
    for bad in (["--scales", "0"], ["--scales", "450", "--max-size", "0"]):
        assert main(["predict", "--model", str(tiny_checkpoint), str(image), *bad]) == 2
        assert "--scales and --max-size must be positive" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_checkpoint)]) == 2
    assert "no dataset given" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_checkpoint), "--dataset", "folder"]) == 2
    assert "no dataset given (--data-root is missing)" in capsys.readouterr().err


def test_evaluate_refuses_options_of_the_other_protocol(tiny_checkpoint, real_dataset):
    from sceneparse.data import build_dataset
    from sceneparse.engine.evaluate import evaluate

    dataset, model = build_dataset({"kind": "folder", "root": str(real_dataset)}, "val"), load_model(tiny_checkpoint)
    with pytest.raises(SceneparseError, match="scales do not apply to protocol 'csail'"):
        evaluate(model, dataset, {"scales": (450,)}, "cpu", protocol="csail")
    with pytest.raises(SceneparseError, match="single_scale do not apply to protocol 'default'"):
        evaluate(model, dataset, {"single_scale": True}, "cpu")


def test_cli_eval_classes_file_flag_wins_over_the_config(tiny_checkpoint, real_dataset, tmp_path, capsys):
    four = tmp_path / "four.yaml"
    four.write_text("classes: [a, b, c, d]\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  kind: folder\n  root: '{real_dataset}'\neval:\n  scales: [null]\n")
    code = main(["eval", "--model", str(tiny_checkpoint), "--config", str(cfg), "--classes-file", str(four),
                 "--workers", "0", "--device", "cpu", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err  # the model has 3 classes: the flag's file (4) was used
    assert code == 2 and "4 classes" in err and str(four) in err


def test_cli_eval_window_below_predictor_minimum(tiny_checkpoint, real_dataset, capsys):
    base = ["eval", "--model", str(tiny_checkpoint), "--data-root", str(real_dataset), "--dataset", "folder"]
    assert main(base + ["--window", "16"]) == 2
    err = capsys.readouterr().err
    assert "--window must be at least 32 pixels, got 16" in err
    assert "Traceback" not in err


def test_cli_predict_writes_and_matches_predictor(tiny_checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(5)
    folder = tmp_path / "my photos ü"
    (folder / "sub").mkdir(parents=True)
    files = [folder / "straße 1.png", folder / "sub" / "b.jpg", tmp_path / "other" / "b.png",
             tmp_path / "third" / "b.png"]
    for f in files:
        f.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(30, 44, 3), dtype=np.uint8)).save(f)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code = main(["predict", "--model", str(tiny_checkpoint), str(folder), str(tmp_path / "oth*" / "*.png"),
                 str(files[3]), "--output", str(out), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "straße 1.png" in printed and "%" in printed
    model = load_model(tiny_checkpoint)
    predictor = Predictor(model)
    # a folder's images keep their subfolders; two inputs named b outside folders: the second gets a suffix
    for src, stem in [(files[0], "straße 1"), (files[1], "sub/b"), (files[2], "b"), (files[3], "b-2")]:
        expected = predictor.predict(read_image(src)).numpy()
        labels = np.asarray(Image.open(out / f"{stem}_labels.png"))
        assert labels.dtype == np.uint8 and np.array_equal(labels, expected)
        color = np.asarray(Image.open(out / f"{stem}_color.png"))
        assert np.array_equal(color, colorize(expected, PALETTE))
        assert (out / f"{stem}_overlay.png").is_file()
    assert len([p for p in out.rglob("*") if p.is_file()]) == 12


def test_cli_predict_with_csails_protocol_is_predictor_csail(tiny_checkpoint, tmp_path, capsys):
    """`predict --protocol csail [--single-scale]`: CSAIL's own test resizing (Pillow, sizes rounded
    up to the model's multiple), which `--scales 450` is not."""
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)).save(image)
    model = load_model(tiny_checkpoint)
    for extra, single in (([], False), (["--single-scale"], True)):
        out = tmp_path / f"out{len(extra)}"
        assert main(["predict", "--model", str(tiny_checkpoint), str(image), "--output", str(out), "--device", "cpu",
                     "--protocol", "csail", *extra]) == 0
        expected = Predictor.csail(model, single_scale=single).predict(read_image(image)).numpy()
        assert np.array_equal(np.asarray(Image.open(out / "photo_labels.png")), expected)
    for wrong, message in ((["--protocol", "csail", "--scales", "450"], "--scales cannot be combined"),
                           (["--single-scale"], "--single-scale belongs to --protocol csail")):
        assert main(["predict", "--model", str(tiny_checkpoint), str(image), "--output", str(tmp_path / "x"),
                     *wrong]) == 2
        assert message in capsys.readouterr().err


def test_cli_predict_skips_an_unreadable_image_and_goes_on(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a broken.jpg").write_bytes(b"not a jpeg at all")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(folder / "b.png")
    out = tmp_path / "out"
    assert main(["predict", "--model", str(tiny_checkpoint), str(folder), "--output", str(out), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert f"skipped: cannot decode image {folder / 'a broken.jpg'}" in captured.err
    assert "error: 1 of 2 inputs could not be read" in captured.err and "Traceback" not in captured.err
    assert "wrote 3 files for 1 image to" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["b_color.png", "b_labels.png", "b_overlay.png"]


def test_cli_predict_speed_options_reach_the_predictor(tiny_checkpoint, tmp_path):
    image_path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(6).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)).save(image_path)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(tiny_checkpoint), str(image_path), "--output", str(out),
                 "--device", "cpu", "--amp", "bf16", "--channels-last"]) == 0
    image = read_image(image_path)
    fast = Predictor(load_model(tiny_checkpoint), amp_dtype=torch.bfloat16, channels_last=True)
    plain = Predictor(load_model(tiny_checkpoint))
    assert np.array_equal(np.asarray(Image.open(out / "a_labels.png")), fast.predict(image).numpy())
    # bf16 really changes the numbers, so the equality above would catch an option left behind
    assert not torch.equal(fast.probabilities(image), plain.probabilities(image))


def test_cli_predict_scales_flip_alpha_and_top_reach_their_places(tiny_checkpoint, tmp_path, capsys):
    image_path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)).save(image_path)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(tiny_checkpoint), str(image_path), "--output", str(out), "--device", "cpu",
                 "--scales", "24", "48", "--max-size", "60", "--flip", "--alpha", "0", "--top", "2"]) == 0
    image, model = read_image(image_path), load_model(tiny_checkpoint)
    expected = Predictor(model, scales=(24, 48), max_size=60, flip=True).predict(image)
    labels = np.asarray(Image.open(out / "a_labels.png"))
    assert np.array_equal(labels, expected.numpy())
    # those options change the result here, so the equality above would catch one left behind
    assert not torch.equal(Predictor(model).predict(image), expected)
    assert np.array_equal(np.asarray(Image.open(out / "a_overlay.png")), image.permute(1, 2, 0).numpy())  # alpha 0
    counts = np.bincount(labels.reshape(-1), minlength=3)
    top = np.argsort(-counts, kind="stable")[:2]
    line = capsys.readouterr().out.splitlines()[0]
    assert line == f"{image_path}: " + ", ".join(
        f"{model.class_names[i]} {100 * counts[i] / labels.size:.1f}%" for i in top if counts[i])


def test_cli_eval_scales_and_flip_reach_the_evaluation(tiny_checkpoint, real_dataset, tmp_path):
    from sceneparse.data import build_dataset
    from sceneparse.engine.evaluate import evaluate

    out = tmp_path / "flags"
    assert main(["eval", "--model", str(tiny_checkpoint), "--data-root", str(real_dataset), "--dataset", "folder",
                 "--scales", "24", "48", "--flip", "--output", str(out), "--workers", "0", "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    dataset = build_dataset({"kind": "folder", "root": str(real_dataset)}, "val")
    model = load_model(tiny_checkpoint)
    expected = evaluate(model, dataset, {"scales": (24, 48), "flip": True}, "cpu")
    plain = evaluate(model, dataset, {"scales": (None,)}, "cpu")
    assert report["confusion_matrix"] == expected["confusion_matrix"] != plain["confusion_matrix"]


def test_inference_speed_flags_become_predictor_options(tiny_checkpoint, tmp_path, capsys):
    from sceneparse.cli.main import build_parser
    from sceneparse.cli.options import inference_speed_options

    for command in (["predict", "--model", "m", "x.jpg"], ["eval", "--model", "m"]):
        parse = build_parser().parse_args
        assert inference_speed_options(parse(command)) == {"amp_dtype": None, "channels_last": False, "compile": False}
        assert inference_speed_options(parse(command + ["--amp", "bf16", "--channels-last", "--compile"])) == {
            "amp_dtype": torch.bfloat16, "channels_last": True, "compile": True}
        assert inference_speed_options(parse(command + ["--compile", "--cuda-graphs"]))["compile"] == "reduce-overhead"
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    assert main(["predict", "--model", str(tiny_checkpoint), str(image), "--cuda-graphs"]) == 2
    assert "--cuda-graphs works through torch.compile" in capsys.readouterr().err


def test_a_failing_torch_compile_is_one_clear_message(tiny_checkpoint, real_dataset, tmp_path, monkeypatch, capsys):
    import functools

    def no_compiler(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=no_compiler))
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    for command in (["predict", "--model", str(tiny_checkpoint), str(image), "--output", str(tmp_path / "o")],
                    ["eval", "--model", str(tiny_checkpoint), "--data-root", str(real_dataset), "--dataset",
                     "folder", "--workers", "0", "--output", str(tmp_path / "e")]):
        assert main(command + ["--device", "cpu", "--compile"]) == 2
        err = capsys.readouterr().err
        assert "torch.compile failed:" in err and "no C++ compiler found" in err
        assert "run without --compile" in err and "Traceback" not in err
    from sceneparse.engine.config import save_config
    from test_train import tiny_config

    save_config(tiny_config(tmp_path, "train.compile=true"), tmp_path / "train.yaml")
    assert main(["train", str(tmp_path / "train.yaml")]) == 2
    err = capsys.readouterr().err
    assert "torch.compile failed:" in err and "train.compile=false" in err and "Traceback" not in err


def test_cli_predict_checks_its_output_folder_before_loading_the_model(tiny_checkpoint, tmp_path, capsys,
                                                                     monkeypatch):
    from sceneparse.engine import checkpoint

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "b.png")
    taken = tmp_path / "a file"
    taken.write_text("not a folder")
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded the model before the check"))
    code = main(["predict", "--model", str(tiny_checkpoint), str(tmp_path / "b.png"), "--output", str(taken)])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot write the predictions to {taken}" in err and "--output" in err
    assert taken.read_text() == "not a folder" and "Traceback" not in err


def test_cli_predict_with_the_output_folder_among_the_inputs(tiny_checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(photos / "a.png")
    model = ["predict", "--model", str(tiny_checkpoint), "--device", "cpu"]
    # named one by one, files inside the output folder are predicted
    assert main([*model, str(photos / "a.png"), "--output", str(photos)]) == 0
    assert sorted(p.name for p in photos.iterdir()) == ["a.png", "a_color.png", "a_labels.png", "a_overlay.png"]
    # searched for, they are left out (they would include earlier outputs); all left out: said so
    capsys.readouterr()
    assert main([*model, str(photos), "--output", str(photos)]) == 2
    err = capsys.readouterr().err
    assert f"the 4 image(s) found in {photos} lie inside the output folder {photos}" in err and "--output" in err
    # an output folder beneath the searched one: its files are skipped, the others predicted
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "b.png")
    assert main([*model, str(tmp_path), "--output", str(photos)]) == 0
    assert "wrote 3 files for 1 image to" in capsys.readouterr().out
    assert sorted(p.name for p in photos.iterdir() if p.name.startswith("b")) == [
        "b_color.png", "b_labels.png", "b_overlay.png"]


def test_cli_predict_nothing_matched(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", "--model", str(tiny_checkpoint), str(tmp_path / "empty"), "--output",
                 str(tmp_path / "o")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["predict", "--model", str(tiny_checkpoint), str(tmp_path / "missing.jpg")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sixteen_bit_labels_for_many_classes(tmp_path):
    from sceneparse.cli.predict import save_label_png

    labels = torch.tensor([[0, 299], [256, 7]])
    save_label_png(labels, 300, tmp_path / "l.png")
    back = np.asarray(Image.open(tmp_path / "l.png"))
    assert back.dtype == np.uint16 and back.tolist() == [[0, 299], [256, 7]]


# --------------------------------------------------------------------------- visualisation
def test_colorize_and_overlay():
    labels = np.array([[0, 1], [2, 255]])
    colors = colorize(labels, PALETTE)
    assert colors.tolist() == [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [0, 0, 0]]]
    image = torch.full((3, 2, 2), 100, dtype=torch.uint8)
    blended = overlay(image, labels, PALETTE, alpha=0.25)
    # 0.75 * 100 + 0.25 * 255 = 138.75 -> 139; 0.75 * 100 + 0 = 75; unlabelled pixel unchanged
    assert blended[0, 0].tolist() == [139, 75, 75]
    assert blended[1, 1].tolist() == [100, 100, 100]
    # a 3-pixel-wide image: a tensor is 3 x H x W, an array H x W x 3, whatever the sizes
    tall = torch.arange(3 * 5 * 3, dtype=torch.uint8).reshape(3, 5, 3)
    nothing_known = np.full((5, 3), 255)
    np.testing.assert_array_equal(overlay(tall, nothing_known, PALETTE), tall.permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(overlay(tall.permute(1, 2, 0).numpy(), nothing_known, PALETTE),
                                  tall.permute(1, 2, 0).numpy())


def test_confusion_and_curves_png(tmp_path):
    save_confusion_png([[5, 1], [0, 0]], ["a", "b"], tmp_path / "c.png")
    save_confusion_png(np.eye(60, dtype=int), [f"c{i}" for i in range(60)], tmp_path / "c60.png")
    records = [{"iter": 10, "loss": 2.0, "lr": 0.01}, {"iter": 20, "loss": 1.5, "lr": 0.009},
               {"iter": 20, "val_miou": 0.3}]
    save_curves_png(records, tmp_path / "curves.png")
    save_curves_png([], tmp_path / "empty.png")
    for name in ("c.png", "c60.png", "curves.png", "empty.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and min(img.size) > 50

    def rgb(name):
        with Image.open(tmp_path / name) as img:
            return np.asarray(img.convert("RGB")).astype(int)

    # What is drawn: a perfect 2-class matrix lights up half the cells with the colour map's top
    # (viridis yellow), an all-wrong one the other half; both have the same colour bar.
    save_confusion_png([[5, 0], [0, 5]], ["a", "b"], tmp_path / "right.png")
    save_confusion_png([[0, 5], [5, 0]], ["a", "b"], tmp_path / "wrong.png")
    right, wrong = rgb("right.png"), rgb("wrong.png")
    yellow = [(np.abs(img - [253, 231, 37]).sum(axis=2) < 30) for img in (right, wrong)]
    assert yellow[0].sum() > 1000 and abs(int(yellow[0].sum()) - int(yellow[1].sum())) < 50

    def diagonal_tilt(y):  # > 0: yellow along the diagonal (x grows with y), < 0: the anti-diagonal
        ys, xs = np.nonzero(y[:, : int(0.8 * y.shape[1])])  # the matrix: left of the colour bar
        return ((xs - xs.mean()) * (ys - ys.mean())).mean()

    assert diagonal_tilt(yellow[0]) > 0 > diagonal_tilt(yellow[1])
    # the curves: the same records with and without their losses draw different pictures
    save_curves_png([{**r, "loss": float("nan")} if "loss" in r else r for r in records], tmp_path / "noloss.png")
    assert rgb("curves.png").shape == rgb("noloss.png").shape and not np.array_equal(rgb("curves.png"), rgb("noloss.png"))

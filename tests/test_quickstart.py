"""`sceneparse quickstart`, and a train -> resume -> evaluate -> predict round trip through the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sceneparse.cli.main import main
from sceneparse.cli.quickstart import quickstart_config, run_quickstart
from sceneparse.engine.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_configs_quickstart_yaml_is_what_quickstart_runs():
    from omegaconf import OmegaConf

    ours = OmegaConf.to_container(quickstart_config())
    shipped = OmegaConf.to_container(load_config(REPO / "configs" / "quickstart.yaml"))
    assert ours == shipped


def test_quickstart_reaches_the_miou_and_writes_its_files(tmp_path, capsys):
    # Reduced: the same recipe, 40 iterations of 4 images from 32 scenes, scored on 12
    # (the full run: 120 iterations of 8 from 100, scored on 30).
    result = run_quickstart(tmp_path / "qs", ["data.synthetic.num_images={train: 32, val: 12}",
                                              "data.batch_size=4", "train.iterations=40", "train.val_every=40",
                                              "train.checkpoint_every=40"])
    out = tmp_path / "qs"
    assert result["mean_iou"] >= 0.80, result
    best = max(json.loads(line).get("val_miou", 0) for line in (out / "metrics.jsonl").read_text().splitlines())
    assert result["mean_iou"] == pytest.approx(best)  # re-evaluating best.pt agrees with the log
    for name in ("best.pt", "last.pt", "curves.png", "metrics.jsonl"):
        assert (out / name).is_file(), name
    predictions = sorted((out / "predictions").glob("*.png"))
    assert len(predictions) == 6 and predictions == sorted(result["predictions"])
    from PIL import Image

    with Image.open(predictions[0]) as img:
        assert img.size == (3 * 128, 128)  # image | ground truth | prediction


def test_cli_train_resume_evaluate_predict_round_trip(tmp_path, capsys):
    from sceneparse.data import Synthetic

    root = Synthetic("train", num_images=6, image_size=48).write_folder(tmp_path / "data")
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
model: {{encoder: "timm:test_efficientnet", decoder: c1}}
data: {{kind: folder, root: "{root}", scales: [48], max_size: 48, batch_size: 2, num_workers: 0}}
train: {{iterations: 4, val_every: 2, checkpoint_every: 2, log_every: 1, lr_encoder: 0.05, lr_decoder: 0.05}}
eval: {{scales: [null]}}
output_dir: "{out}"
""")
    assert main(["train", str(cfg)]) == 0
    assert torch.load(out / "last.pt", weights_only=True)["train_state"]["iteration"] == 4
    assert f"outputs in {out}" in capsys.readouterr().out

    assert main(["train", str(cfg)]) == 2  # a second run into the same folder is refused
    assert "already holds a run" in capsys.readouterr().err

    assert main(["train", str(cfg), "--resume", "train.iterations=6"]) == 0  # an override, not a PATH
    assert torch.load(out / "last.pt", weights_only=True)["train_state"]["iteration"] == 6
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5, 6]

    assert main(["eval", "--model", str(out / "best.pt"), "--config", str(cfg), "--workers", "0",
                 "--output", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["mean_iou"] == pytest.approx(max(r["val_miou"] for r in logged if "val_miou" in r))

    image = root / "images" / "train_0000.png"
    assert main(["predict", "--model", str(out / "best.pt"), str(image), "--output", str(tmp_path / "pred")]) == 0
    assert any(p.name.startswith("train_0000") for p in (tmp_path / "pred").iterdir())


def test_quickstart_refuses_a_folder_holding_another_run_and_names_its_option(tmp_path, capsys):
    from sceneparse.cli.main import main

    run = tmp_path / "r50d"
    (run / "tb").mkdir(parents=True)
    (run / "tb" / "events.keep").write_text("keep")
    (run / "best.pt").write_bytes(b"a real model")
    (run / "config.yaml").write_text("data:\n  kind: ade20k\n")
    assert main(["quickstart", "--output", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run} holds a training run that is not a quickstart's" in err and "data.kind=ade20k" in err
    assert (run / "best.pt").read_bytes() == b"a real model" and (run / "tb" / "events.keep").is_file()
    (tmp_path / "a file").write_text("")
    assert main(["quickstart", "--output", str(tmp_path / "a file" / "qs")]) == 2
    assert "fix: choose a writable --output folder" in capsys.readouterr().err

"""The training loop's parts (optimizer groups, poly LR, batches, seeding, loss) and a tiny real run."""
from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sceneparse.engine.config import load_config
from sceneparse.engine.feed import SeededDataset, TrainBatches, epoch_batches_fn
from sceneparse.engine.optim import PolySchedule, param_groups
from sceneparse.engine.train import (
    clear_previous,
    median_frequency_weights,
    prepare_output,
    segmentation_loss,
    train,
)
from sceneparse.errors import SceneparseError
from sceneparse.models import SegmenterOutput, build_model

TINY = [
    "model.encoder=timm:test_efficientnet", "model.decoder=c1_deepsup", "model.encoder_options={}",
    "data.kind=synthetic", "data.synthetic={num_images: {train: 8, val: 4}, seed: 0, image_size: 64}",
    "data.scales=[48, 64]", "data.max_size=64", "data.batch_size=2", "data.num_workers=0", "data.batching=aspect",
    "train.iterations=12", "train.lr_encoder=0.05", "train.lr_decoder=0.05", "train.val_every=6",
    "train.checkpoint_every=4", "train.log_every=2", "train.seed=1", "eval.scales=[null]",
]


def tiny_config(tmp_path, *overrides):
    return load_config(None, [*TINY, f"output_dir={tmp_path / 'run'}", *overrides])


def test_param_groups_split_lr_and_skip_decay_on_norms_and_biases():
    model = build_model("timm:test_efficientnet", "c1", 3)
    groups = {g["name"]: g for g in param_groups(model, lr_encoder=0.1, lr_decoder=0.2, weight_decay=1e-4)}
    assert set(groups) == {"encoder", "encoder_no_decay", "decoder", "decoder_no_decay"}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    everything = [p for p in model.parameters()]
    assert sum(len(v) for v in ids.values()) == len(everything)  # each parameter exactly once
    for name, module in model.named_modules():
        if isinstance(module, (nn.BatchNorm2d, nn.Conv2d)):
            part = "encoder" if name.startswith("encoder") else "decoder"
            if isinstance(module, nn.BatchNorm2d):
                assert id(module.weight) in ids[f"{part}_no_decay"] and id(module.bias) in ids[f"{part}_no_decay"]
            else:
                assert id(module.weight) in ids[part]
    assert groups["encoder"]["lr"] == 0.1 and groups["decoder_no_decay"]["lr"] == 0.2
    assert groups["decoder"]["weight_decay"] == 1e-4 and groups["encoder_no_decay"]["weight_decay"] == 0.0


def test_poly_lr_with_warmup_by_hand():
    f = PolySchedule(10, power=0.9)
    assert f(0) == 1.0 and f(10) == 0.0
    assert f(5) == pytest.approx(0.5 ** 0.9)
    w = PolySchedule(10, power=0.9, warmup_iters=4)
    assert w(0) == pytest.approx(0.25)  # (1 - 0/10)^0.9 * 1/4
    assert w(2) == pytest.approx(0.8 ** 0.9 * 3 / 4)
    assert w(4) == pytest.approx(0.6 ** 0.9)  # warmup over
    f.horizon = 20  # moved by train.time_budget_s
    assert f(5) == pytest.approx(0.75 ** 0.9) and f(25) == 0.0


def test_batches_are_a_function_of_the_iteration():
    epochs = {e: [[3 * e + i] for i in range(3)] for e in range(5)}  # 3 batches per epoch
    full = list(TrainBatches(epochs.__getitem__, seed=7, iterations=8))
    assert [b[0][0] for b in full] == [0, 1, 2, 3, 4, 5, 6, 7]
    walk = list(TrainBatches(epochs.__getitem__, seed=7, iterations=8).walk())
    it, epoch, offset, _ = walk[4]
    assert (it, epoch, offset) == (4, 1, 1)
    # resuming after 5 batches (position: epoch 1, offset 2) gives exactly the tail, seeds included
    tail = list(TrainBatches(epochs.__getitem__, seed=7, iterations=8, start_iter=5, start=(1, 2)))
    assert tail == full[5:]
    assert full[0][0][1] != full[3][0][1]  # every iteration draws its own augmentation seed


def test_seeded_dataset_is_order_independent_and_leaves_global_rngs_alone():
    class Noisy:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return (i, torch.rand(1).item(), random.random(), float(np.random.rand()))

    data = SeededDataset(Noisy())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    a = [data[(i, 100 + i)] for i in range(4)]
    b = [data[(i, 100 + i)] for i in reversed(range(4))][::-1]
    assert a == b
    assert data[(0, 5)] != data[(0, 6)]
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    data[(1, 42)]
    assert torch.equal(torch.rand(1), expected)


def test_median_frequency_weights_by_hand():
    # image 1: 3 px of class 0, 1 px of class 1; image 2: 2 px class 1, 2 px ignored
    masks = [torch.tensor([[0, 0], [0, 1]]), torch.tensor([[1, 255], [1, 255]])]
    weights = median_frequency_weights([{"mask": m} for m in masks], num_classes=3)
    # freq0 = 3/4 (only image 1 has class 0), freq1 = 3/(4+2) = 0.5, median = 0.625; class 2 unseen
    assert weights.tolist() == pytest.approx([0.625 / 0.75, 0.625 / 0.5, 1.0])


def test_deep_supervision_loss_adds_weighted_aux():
    ce = nn.CrossEntropyLoss(ignore_index=255)
    target = torch.tensor([[[0, 1], [255, 1]]])
    logits, aux = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)
    combined = segmentation_loss(SegmenterOutput(logits, aux), target, ce, 0.4)
    assert combined.item() == pytest.approx(ce(logits, target).item() + 0.4 * ce(aux, target).item())
    assert segmentation_loss(logits, target, ce, 0.4).item() == pytest.approx(ce(logits, target).item())


def test_encnet_se_loss_is_binary_cross_entropy_on_the_classes_each_image_holds():
    ce = nn.CrossEntropyLoss(ignore_index=255)
    # image 0 holds class 0 only (and void, which counts for no class); image 1 classes 1 and 2
    target = torch.tensor([[[0, 0], [255, 0]], [[1, 2], [1, 1]]])
    logits, aux, presence = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), torch.randn(2, 3)
    present = [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    bce = 0.0
    for n in range(2):
        for k in range(3):
            p = 1 / (1 + math.exp(-presence[n, k].item()))
            bce -= (math.log(p) if present[n][k] else math.log(1 - p)) / 6
    out = SegmenterOutput(logits, aux, presence)
    expected = ce(logits, target).item() + 0.4 * ce(aux, target).item() + 0.25 * bce
    assert segmentation_loss(out, target, ce, 0.4, 0.25).item() == pytest.approx(expected, rel=1e-6)
    # at weight 0 the term is still in the graph (DDP needs every parameter to take part)
    presence.requires_grad_(True)
    segmentation_loss(SegmenterOutput(logits, aux, presence), target, ce, 0.4, 0.0).backward()
    assert presence.grad is not None and torch.equal(presence.grad, torch.zeros(2, 3))


@pytest.mark.parametrize("weights", ["[0.5, 1, 2, 3, 4]", "auto"])
def test_loss_settings_and_warmup_reach_the_training_step(tmp_path, monkeypatch, weights):
    """train.class_weights (a list, or median frequency from the training labels), deepsup_weight, se_weight
    and warmup_iters, seen by the step itself."""
    from sceneparse.data import build_dataset
    from sceneparse.engine import train as train_mod
    from sceneparse.engine.config import dataset_settings

    seen = []
    real = train_mod.segmentation_loss

    def spy(output, masks, criterion, deepsup_weight, se_weight):
        seen.append((criterion.weight, deepsup_weight, se_weight))
        return real(output, masks, criterion, deepsup_weight, se_weight)

    monkeypatch.setattr(train_mod, "segmentation_loss", spy)
    cfg = tiny_config(tmp_path, f"train.class_weights={weights}", "train.deepsup_weight=0.25", "train.se_weight=0.3",
                      "train.warmup_iters=4", "train.log_every=1", "train.iterations=6", "train.val_every=0")
    train(cfg)
    if weights == "auto":
        expected = median_frequency_weights(build_dataset(dataset_settings(cfg.data), "train"), 5)
    else:
        expected = torch.tensor([0.5, 1, 2, 3, 4])
    assert len(seen) == 6 and all(torch.equal(w, expected) and d == 0.25 and s == 0.3 for w, d, s in seen)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # step i runs at schedule position i - 1: ramp (i / 4) times poly (1 - (i - 1) / 6)^0.9
    assert lrs == pytest.approx([0.05 * min(1, i / 4) * (1 - (i - 1) / 6) ** 0.9 for i in range(1, 7)])


def test_class_weights_of_the_wrong_length_are_refused(tmp_path):
    with pytest.raises(SceneparseError, match="train.class_weights has 2 values but there are 5 classes"):
        train(tiny_config(tmp_path, "train.class_weights=[1, 2]"))


def test_previous_run_in_output_folder_is_refused_unless_overwrite_or_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "last.pt").write_bytes(b"a checkpoint")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SceneparseError, match="already holds a run") as info:
        prepare_output(out, overwrite=False, resuming=False)
    assert "--resume" in info.value.hint and "--overwrite" in info.value.hint
    assert prepare_output(out, overwrite=False, resuming=True) == []
    assert (out / "metrics.jsonl").exists()
    # --overwrite names the files to replace; they go only once set-up has succeeded
    replaced = prepare_output(out, overwrite=True, resuming=False)
    assert replaced == ["last.pt", "metrics.jsonl"] and (out / "metrics.jsonl").exists()
    clear_previous(out, replaced)
    assert not (out / "metrics.jsonl").exists() and (out / "notes.txt").read_text() == "mine"
    # a run that stopped before its first checkpoint has nothing to continue: it is replaced
    (out / "config.yaml").write_text("model: {}\n")
    assert prepare_output(out, overwrite=False, resuming=False) == ["config.yaml"]
    (out / "best.pt").write_bytes(b"weights")  # but a best.pt is worth keeping, last.pt or not
    with pytest.raises(SceneparseError, match="already holds a run"):
        prepare_output(out, overwrite=False, resuming=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SceneparseError, match="cannot write the run to"):
        prepare_output(blocker / "run", overwrite=False, resuming=False)


def test_a_run_refused_at_set_up_can_be_run_again_corrected(tmp_path, capsys):
    with pytest.raises(SceneparseError, match="smaller than one batch"):
        train(tiny_config(tmp_path, "data.batch_size=200"))
    assert train(tiny_config(tmp_path, "train.iterations=2", "train.val_every=0"))["iterations"] == 2


def test_train_command_overwrites_a_previous_run_only_when_told(tmp_path, capsys):
    from sceneparse.cli.main import main
    from sceneparse.engine.config import save_config

    save_config(tiny_config(tmp_path, "train.iterations=4", "train.val_every=0"), tmp_path / "cfg.yaml")
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    assert main(["train", str(tmp_path / "cfg.yaml"), "train.iterations=2"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "cfg.yaml"), "train.iterations=2", "--overwrite"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [2]  # the second run's alone (log_every 2)


def test_overwrite_keeps_the_earlier_run_when_set_up_fails(tmp_path, capsys):
    from sceneparse.cli.main import main
    from sceneparse.engine.config import save_config

    save_config(tiny_config(tmp_path, "train.iterations=2", "train.val_every=0"), tmp_path / "cfg.yaml")
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert "last.pt" in before and "metrics.jsonl" in before
    # a mistake found during set-up (the class count, after the data is read) costs nothing
    assert main(["train", str(tmp_path / "cfg.yaml"), "model.num_classes=7", "--overwrite"]) == 2
    assert "model.num_classes=7" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    from sceneparse.engine import distributed as D
    from sceneparse.engine.train import locked_output

    cfg = tiny_config(tmp_path, "train.iterations=2", "train.val_every=0")
    with locked_output(tmp_path / "run", D.DistInfo()):  # the first run, still going
        with pytest.raises(SceneparseError, match=f"is in use by another training run \\(process {os.getpid()}\\)"):
            train(cfg)
        assert not (tmp_path / "run" / "config.yaml").exists()  # nothing of the first run was touched
    assert train(cfg)["iterations"] == 2  # the lock goes with the run that held it


def test_a_run_shorter_than_its_warm_up_is_warned_about(tmp_path, capsys):
    train(tiny_config(tmp_path, "train.iterations=2", "train.warmup_iters=5", "train.val_every=0"))
    assert "warning: train.warmup_iters=5 >= train.iterations=2" in capsys.readouterr().err


def test_class_count_mismatch_is_refused(tmp_path):
    with pytest.raises(SceneparseError, match="model.num_classes=7 but the synthetic dataset has 5 classes"):
        train(tiny_config(tmp_path, "model.num_classes=7"))


def test_tiny_run_learns_and_writes_everything(tmp_path, capsys):
    result = train(tiny_config(tmp_path))
    assert "12/12" in capsys.readouterr().err  # the progress bar counted every step
    out = tmp_path / "run"
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "curves.png"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["iter"] for r in train_records] == [2, 4, 6, 8, 10, 12]
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    # the logged lr is the one the step used: poly at step 11 of 12
    assert train_records[-1]["lr"] == pytest.approx(0.05 * (1 - 11 / 12) ** 0.9)
    val = [r for r in records if "val_miou" in r]
    assert [r["iter"] for r in val] == [6, 12]
    assert result["iterations"] == 12 and result["best_miou"] == max(r["val_miou"] for r in val)
    assert math.isclose(result["metrics"]["mean_iou"], val[-1]["val_miou"])

    state = torch.load(out / "last.pt", weights_only=True)["train_state"]
    assert state["iteration"] == 12 and state["best_miou"] == result["best_miou"]
    assert "train_state" not in torch.load(out / "best.pt", weights_only=True)


def test_camvid_baseline_config_trains_on_the_real_data(tmp_path):
    """configs/camvid/baseline.yaml (class_weights: auto, crops) on the real CamVid, 2 iterations."""
    from pathlib import Path

    shared = Path(__file__).resolve().parents[1].parent / "shared"
    camvid = shared / "data" / "camvid"
    if not camvid.is_dir():
        pytest.skip(f"../shared not found: {camvid}")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "camvid" / "baseline.yaml", [
        f"data.root={camvid}", f"output_dir={tmp_path / 'run'}", "data.crop_size=96", "data.batch_size=2",
        "data.num_workers=0", "train.iterations=2", "train.val_every=0",
    ])
    from sceneparse.data import build_dataset

    weights = median_frequency_weights(build_dataset({"kind": "camvid", "root": str(camvid)}, "train"), 11)
    # rare classes (pole 2, sign 6, pedestrian 9, bicyclist 10) outweigh road (3) and sky (0)
    assert min(weights[[2, 6, 9, 10]]) > max(weights[[0, 3]])
    result = train(cfg)
    assert result["iterations"] == 2
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["class_names"][3].lower() == "road"


@pytest.mark.parametrize("batching", ["aspect", "crop"])
def test_each_rank_gets_its_own_equal_share_of_whole_batches(tmp_path, batching):
    """Under torchrun every rank reads other images, as many batches as the others, and with
    `aspect` each batch is still all landscape or all portrait."""
    from sceneparse.engine.distributed import DistInfo

    class Sizes:  # 7 landscape and 6 portrait images: 13 is odd on purpose
        sizes = [(48, 64)] * 7 + [(64, 48)] * 6

        def __len__(self):
            return len(self.sizes)

        def image_sizes(self):
            return self.sizes

    data_cfg = tiny_config(tmp_path, f"data.batching={batching}").data
    per_rank = [epoch_batches_fn(Sizes(), data_cfg, 3, DistInfo(rank=r, world_size=2))(0) for r in (0, 1)]
    index = (lambda item: item[0]) if batching == "aspect" else (lambda item: item)
    images = [[index(item) for batch in batches for item in batch] for batches in per_rank]
    assert len(per_rank[0]) == len(per_rank[1]) >= 2
    assert all(len(batch) == 2 for batches in per_rank for batch in batches)
    assert not set(images[0]) & set(images[1]) and len(set(images[0] + images[1])) == len(images[0] + images[1])
    if batching == "aspect":
        for batches in per_rank:
            for batch in batches:
                assert len({Sizes.sizes[index(item)][1] > Sizes.sizes[index(item)][0] for item in batch}) == 1
                assert len({item[1] for item in batch}) == 1  # one short side per batch
    single = epoch_batches_fn(Sizes(), data_cfg, 3, DistInfo())(0)
    assert len(single) == 6  # 3 landscape + 3 portrait pairs; the two ranks share them 3 + 3


def test_a_broken_dataset_is_refused_at_start_up_with_every_problem(tmp_path):
    """Training runs data check's cheap part first: problems are listed before any iteration."""
    from PIL import Image

    root = tmp_path / "mine"
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    (root / "classes.yaml").write_text("classes: [a, b]\n")
    Image.new("RGB", (32, 24)).save(root / "images" / "ok.png")
    Image.new("L", (32, 24)).save(root / "labels" / "ok.png")
    Image.new("RGB", (32, 24)).save(root / "images" / "wrong size.png")
    Image.new("L", (30, 24)).save(root / "labels" / "wrong size.png")
    Image.new("RGB", (32, 24)).save(root / "images" / "no label.png")
    cfg = tiny_config(tmp_path, "data.kind=folder", f"data.root={root}", "model.num_classes=null")
    # an image without a label: the dataset itself refuses, naming the file and `data check`
    with pytest.raises(SceneparseError, match="no label.png") as info:
        train(cfg)
    assert "sceneparse data check" in str(info.value)
    # pairs complete but a size mismatch: the start-up check refuses before any iteration
    (root / "images" / "no label.png").unlink()
    with pytest.raises(SceneparseError, match=r"data has problems:(.|\n)*wrong size.png") as info:
        train(cfg)
    assert "data check" in info.value.hint
    assert not (tmp_path / "run" / "last.pt").exists()


def test_time_budget_horizon_by_hand():
    from sceneparse.engine.train import TimeBudget

    budget = TimeBudget(100.0, start=0.0)
    assert budget.horizon(10, cap=1000, elapsed=40.0, steps_per_s=2.0) == 130  # 60 s left x 2 steps/s
    assert budget.horizon(10, cap=50, elapsed=40.0, steps_per_s=2.0) == 50  # train.iterations caps it
    assert budget.horizon(10, cap=1000, elapsed=120.0, steps_per_s=2.0) == 10  # time is up: end here
    assert budget.horizon(10, cap=1000, elapsed=5.0, steps_per_s=0.0) == 1000  # no speed known yet
    assert budget.horizon(10, cap=1000, elapsed=101.0, steps_per_s=0.0) == 10
    budget.measured(0, now=5.0)  # the loop starts
    budget.measured(10, now=105.0)  # the first window (warm-up) counts until there is a second
    assert budget.steps_per_s == 0.1
    budget.measured(30, now=115.0)
    budget.measured(40, now=125.0)
    assert budget.steps_per_s == 1.5  # (20 + 10) / (10 + 10)

    resumed = TimeBudget(100.0, start=0.0)  # a resumed run starts from the speed it had measured
    resumed.restore(budget.state())
    assert resumed.steps_per_s == 1.5
    resumed.measured(40, now=200.0)
    resumed.measured(41, now=260.0)  # its own warm-up window is left out again
    assert resumed.steps_per_s == 1.5
    resumed.measured(61, now=270.0)
    assert resumed.steps_per_s == 50 / 30  # (20 + 10 + 20) / (10 + 10 + 10)


def test_time_budget_fits_the_schedule_to_the_clock_and_resumes_with_the_time_spent(tmp_path):
    import time

    overrides = ["train.iterations=100000", "train.time_budget_s=4", "train.log_every=2", "train.val_every=0",
                 "train.checkpoint_every=100000", "train.warmup_iters=0"]
    began = time.perf_counter()
    result = train(tiny_config(tmp_path, *overrides))
    took = time.perf_counter() - began
    assert 4.0 <= took < 30.0  # the whole run: start-up, steps, final save
    done = result["iterations"]
    assert 4 <= done < 100000
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["end_iter"] == done  # the run ended where the fitted schedule ends
    assert records[-1]["lr"] < 0.5 * 0.05  # and the rate decayed towards zero on the way
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["train_state"]
    assert state["iteration"] == done and 3.0 <= state["elapsed_s"] <= took

    # Resumed with 3 more seconds: continues from where it stopped and stops again in time.
    spent = state["elapsed_s"]
    began = time.perf_counter()
    more = train(tiny_config(tmp_path, *overrides[:1], f"train.time_budget_s={spent + 3}", *overrides[2:]),
                 resume=True)
    assert more["iterations"] > done and time.perf_counter() - began < 25.0


def test_resume_with_more_iterations_extends_the_run_and_its_schedule(tmp_path):
    train(tiny_config(tmp_path))  # 12 iterations
    result = train(tiny_config(tmp_path, "train.iterations=16"), resume=True)
    assert result["iterations"] == 16
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    assert last["iter"] == 16 and last["lr"] == pytest.approx(0.05 * (1 - 15 / 16) ** 0.9)
    # Fewer iterations than done: refused before anything in the run folder changes.
    run = tmp_path / "run"
    before = {name: (run / name).read_bytes() for name in ("last.pt", "config.yaml", "metrics.jsonl")}
    with pytest.raises(SceneparseError, match=r"(?s)last.pt is at iteration 16, past train.iterations=10: .*"
                                              r"resume with train.iterations above 16"):
        train(tiny_config(tmp_path, "train.iterations=10"), resume=True)
    assert {name: (run / name).read_bytes() for name in before} == before


def test_other_class_names_in_a_checkpoint_are_told_when_fine_tuning_or_resuming(tmp_path, capsys):
    train(tiny_config(tmp_path, "train.iterations=2", "train.val_every=0"))
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    names = ckpt["class_names"]
    ckpt["class_names"] = ["zebra", *names[1:]]
    torch.save(ckpt, tmp_path / "renamed.pt")
    capsys.readouterr()
    train(tiny_config(tmp_path, "train.iterations=2", "train.val_every=0", f"output_dir={tmp_path / 'tuned'}",
                      f"model.weights={tmp_path / 'renamed.pt'}"))
    assert f"note: 1 class id(s) name other classes in this data than in {tmp_path / 'renamed.pt'} " \
           f"(0: 'zebra' -> {names[0]!r})" in capsys.readouterr().err
    train(tiny_config(tmp_path, "train.iterations=3", "train.val_every=0"), resume=tmp_path / "renamed.pt")
    assert f"was trained with other class names than this dataset's (id: checkpoint / dataset: 0: 'zebra' / " \
           f"{names[0]!r})" in capsys.readouterr().err


def test_an_encnet_run_from_before_the_se_head_resumes_with_the_setting_the_error_names(tmp_path):
    short = ["model.decoder=encnet", "train.iterations=4", "train.val_every=0", "train.checkpoint_every=2"]
    train(tiny_config(tmp_path, *short, "model.decoder_options={se_loss: false}"))
    last = tmp_path / "run" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["model"]["config"]["decoder_options"]  # as written before `se_loss` existed
    torch.save(ckpt, last)
    with pytest.raises(SceneparseError) as err:  # the run's config, as it was then: no se_loss
        train(tiny_config(tmp_path, *short, "train.iterations=6"), resume=True)
    assert "holds a different model than the config (they differ in decoder_options)" in err.value.message
    assert """'model.decoder_options={"se_loss": false}'""" in err.value.hint
    result = train(tiny_config(tmp_path, *short, "train.iterations=6", 'model.decoder_options={"se_loss": false}'),
                   resume=True)
    assert result["iterations"] == 6


def test_resume_takes_the_optimizer_settings_from_the_config(tmp_path):
    """The checkpoint brings the momentum buffers and the schedule's position back; learning
    rates, momentum and weight decay are the config's, from the first resumed step on."""
    train(tiny_config(tmp_path, "train.log_every=1"))  # 12 iterations at lr 0.05, momentum 0.9
    changed = ["train.iterations=16", "train.lr_encoder=0.01", "train.lr_decoder=0.5", "train.momentum=0.5",
               "train.weight_decay=0.001", "train.log_every=1"]
    train(tiny_config(tmp_path, *changed), resume=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["iter"]: r for r in records if "loss" in r}
    assert steps[12]["lr"] == pytest.approx(0.05 * (1 - 11 / 12) ** 0.9)  # the first run's
    for it in (13, 16):  # step `it` runs at schedule position it - 1
        assert steps[it]["lr"] == pytest.approx(0.5 * (1 - (it - 1) / 16) ** 0.9)
        assert steps[it]["lr_encoder"] == pytest.approx(0.01 * (1 - (it - 1) / 16) ** 0.9)
    groups = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["train_state"]["optimizer"]["param_groups"]
    assert {g["momentum"] for g in groups} == {0.5}
    assert {g["name"]: g["weight_decay"] for g in groups} == {
        "encoder": 0.001, "encoder_no_decay": 0.0, "decoder": 0.001, "decoder_no_decay": 0.0}


def test_loss_and_optimizer_settings_reach_the_training_step(tmp_path, monkeypatch):
    """train.loss (OHEM + Dice, class weights) is the criterion of every step, and
    train.optimizer=adamw is the optimizer: its state (exp_avg) is what last.pt holds."""
    from sceneparse.engine import train as train_mod
    from sceneparse.engine.losses import CombinedLoss, OhemCrossEntropy

    seen = []
    real = train_mod.segmentation_loss

    def spy(output, masks, criterion, *weights):
        seen.append(criterion)
        return real(output, masks, criterion, *weights)

    monkeypatch.setattr(train_mod, "segmentation_loss", spy)
    cfg = tiny_config(tmp_path, "train.loss.name=ohem", "train.loss.ohem_min_kept=500", "train.loss.dice_weight=0.5",
                      "train.class_weights=[0.5, 1, 2, 3, 4]", "train.optimizer=adamw", "train.lr_encoder=0.001",
                      "train.lr_decoder=0.001", "train.iterations=4", "train.val_every=0")
    train(cfg)
    assert len(seen) == 4 and all(c is seen[0] for c in seen)
    criterion = seen[0]
    assert isinstance(criterion, CombinedLoss) and isinstance(criterion.main, OhemCrossEntropy)
    assert criterion.main.min_kept == 500 and criterion.dice_weight == 0.5
    assert torch.equal(criterion.weight, torch.tensor([0.5, 1, 2, 3, 4]))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["train_state"]["optimizer"]
    assert all({"exp_avg", "exp_avg_sq"} <= set(s) for s in state["state"].values())
    assert {g["betas"] for g in state["param_groups"]} == {(0.9, 0.999)}


def test_resuming_with_another_optimizer_is_refused(tmp_path):
    train(tiny_config(tmp_path, "train.iterations=4", "train.val_every=0"))  # sgd
    last = tmp_path / "run" / "last.pt"
    with pytest.raises(SceneparseError) as err:
        train(tiny_config(tmp_path, "train.iterations=8", "train.optimizer=adamw"), resume=True)
    assert f"{last} was trained with train.optimizer=sgd" in err.value.message
    assert "resume with train.optimizer=sgd" in err.value.hint and f"model.weights={last}" in err.value.hint
    # a last.pt from before train.optimizer existed was trained with SGD
    ckpt = torch.load(last, weights_only=True)
    del ckpt["train_state"]["config"]["train"]["optimizer"]
    torch.save(ckpt, last)
    with pytest.raises(SceneparseError, match="trained with train.optimizer=sgd"):
        train(tiny_config(tmp_path, "train.iterations=8", "train.optimizer=adamw"), resume=True)
    assert train(tiny_config(tmp_path, "train.iterations=8", "train.val_every=0"), resume=True)["iterations"] == 8


def test_a_new_run_starts_from_a_checkpoints_weights(tmp_path, capsys):
    """model.weights: fine-tuning. With learning rates 0 the parameters stay the checkpoint's
    (BatchNorm's running statistics still move in training mode: buffers are not compared)."""
    train(tiny_config(tmp_path / "a"))
    source = tmp_path / "a" / "run" / "last.pt"
    train(tiny_config(tmp_path / "b", f"model.weights={source}", "train.lr_encoder=0", "train.lr_decoder=0",
                      "train.weight_decay=0", "train.iterations=2", "train.val_every=0"))
    assert f"starting from the weights of {source}" in capsys.readouterr().err
    before = torch.load(source, weights_only=True)["model"]["state_dict"]
    after = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=True)["model"]["state_dict"]
    names = [n for n, _ in build_model("timm:test_efficientnet", "c1_deepsup", 5).named_parameters()]
    assert names and all(torch.equal(before[n], after[n]) for n in names)
    fresh = train(tiny_config(tmp_path / "c", "train.iterations=2", "train.val_every=0"))  # no weights: differs
    other = torch.load(fresh["last"], weights_only=True)["model"]["state_dict"]
    assert not all(torch.equal(before[n], other[n]) for n in names)


def test_initial_weights_with_another_class_count_start_the_classifiers_fresh(tmp_path):
    from sceneparse.engine.checkpoint import load_initial_weights, save_model

    torch.manual_seed(0)
    source = build_model("timm:test_efficientnet", "c1_deepsup", 5)
    save_model(tmp_path / "five.pt", source, [f"c{i}" for i in range(5)], [[i, i, i] for i in range(5)])
    target = build_model("timm:test_efficientnet", "c1_deepsup", 3)
    initial = {k: v.clone() for k, v in target.state_dict().items()}
    loaded = load_initial_weights(target, tmp_path / "five.pt")
    classifiers = ["decoder.conv_last.weight", "decoder.conv_last.bias",
                   "decoder.conv_last_deepsup.weight", "decoder.conv_last_deepsup.bias"]
    assert sorted(loaded["fresh"]) == sorted(classifiers)
    for key, value in target.state_dict().items():
        expected = initial[key] if key in classifiers else source.state_dict()[key]
        assert torch.equal(value, expected), key


def test_initial_weights_of_another_architecture_are_refused_naming_the_difference(tmp_path):
    from sceneparse.engine.checkpoint import load_initial_weights, save_model

    save_model(tmp_path / "c1.pt", build_model("timm:test_efficientnet", "c1", 3), ["a", "b", "c"],
               [[0, 0, 0]] * 3)
    with pytest.raises(SceneparseError) as err:
        load_initial_weights(build_model("timm:test_efficientnet", "c1_deepsup", 3), tmp_path / "c1.pt")
    assert "differ in decoder" in err.value.message and "'model.decoder=\"c1\"'" in err.value.hint
    with pytest.raises(SceneparseError, match="both set"):
        tiny_config(tmp_path, f"model.weights={tmp_path / 'c1.pt'}", "model.encoder_weights=x.pth")
    # options given as a tuple in Python and as a list in YAML are the same model
    save_model(tmp_path / "ppm.pt", build_model("timm:test_efficientnet", "ppm", 3, decoder_options={
        "pool_scales": (1, 2, 3)}), ["a", "b", "c"], [[0, 0, 0]] * 3)
    same = build_model("timm:test_efficientnet", "ppm", 3, decoder_options={"pool_scales": [1, 2, 3]})
    assert load_initial_weights(same, tmp_path / "ppm.pt")["fresh"] == []


def test_a_run_saved_without_fp16_resumes_with_fp16(tmp_path, monkeypatch):
    """Without fp16 the grad scaler saves an empty state; a resumed fp16 run starts a fresh scale."""
    train(tiny_config(tmp_path))
    real = torch.amp.GradScaler
    # fp16 scaling is CUDA-only in the trainer; the CPU scaler takes the same code path
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: real("cpu", enabled=True))
    assert train(tiny_config(tmp_path, "train.iterations=14"), resume=True)["iterations"] == 14
    assert "scale" in torch.load(tmp_path / "run" / "last.pt", weights_only=True)["train_state"]["scaler"]


class FakeClock:
    """`time.perf_counter` for the trainer: one second per training step, `validation_s` per
    validation, nothing else, so a time-budget run is the same every time."""

    def __init__(self, monkeypatch, validation_s: float = 0.0):
        import types

        from sceneparse.engine import train as train_mod

        self.now, self.lrs = 0.0, {}
        monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=lambda: self.now))
        step, validate = train_mod.Trainer._step, train_mod.Trainer._validate

        def timed_step(trainer, it, *args):
            self.now += 1.0
            self.lrs[it] = trainer.optimizer.param_groups[-1]["lr"]
            step(trainer, it, *args)

        def timed_validate(trainer, it):
            self.now += validation_s
            validate(trainer, it)

        monkeypatch.setattr(train_mod.Trainer, "_step", timed_step)
        monkeypatch.setattr(train_mod.Trainer, "_validate", timed_validate)


BUDGET = ["train.iterations=1000", "train.time_budget_s=60", "train.log_every=5", "train.val_every=0",
          "train.checkpoint_every=10", "train.warmup_iters=0"]


def test_a_time_budget_run_resumes_on_its_schedule(tmp_path, monkeypatch):
    """Stopped after its checkpoint at 20 and resumed: the same learning rate at every step as
    the uninterrupted run (the measured speed is saved, not measured anew from nothing)."""
    clock = FakeClock(monkeypatch)
    straight = train(tiny_config(tmp_path / "straight", *BUDGET))
    expected = dict(clock.lrs)

    clock.now, clock.lrs = 0.0, {}
    from sceneparse.engine.logger import RunLogger

    log = RunLogger.log

    def crash_at_23(self, record):
        log(self, record)
        if record.get("iter") == 23:
            raise KeyboardInterrupt  # killed: last.pt is the one of iteration 20

    monkeypatch.setattr(RunLogger, "log", crash_at_23)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "split", *BUDGET, "train.log_every=1"))
    monkeypatch.setattr(RunLogger, "log", log)
    clock.now = 20.0  # the clock when last.pt was written (the fake clock counts steps)
    resumed = train(tiny_config(tmp_path / "split", *BUDGET), resume=True)
    assert resumed["iterations"] == straight["iterations"] == 60  # 60 s at 1 s a step
    assert all(clock.lrs[it] == pytest.approx(expected[it]) for it in range(21, straight["iterations"] + 1))


def test_a_time_budget_run_validates_and_saves_once_at_its_end(tmp_path, monkeypatch):
    """The schedule's end may fall between log steps; the sync there must not move it again (the
    run would validate and save as if done, then train on at a zero learning rate)."""
    clock = FakeClock(monkeypatch, validation_s=4.0)
    result = train(tiny_config(tmp_path, *BUDGET[:1], "train.time_budget_s=50", "train.log_every=8",
                               "train.val_every=10", "train.checkpoint_every=1000"))
    end = result["iterations"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validated = [r["iter"] for r in records if "val_miou" in r]
    assert end % 8 and end % 10  # the end fell on neither a log nor a validation step
    assert validated == [*range(10, end, 10), end]
    assert min(clock.lrs.values()) > 0 and max(clock.lrs) == end


def test_a_training_set_smaller_than_one_batch_is_refused_at_set_up(tmp_path):
    with pytest.raises(SceneparseError, match="smaller than one batch") as info:
        train(tiny_config(tmp_path, "data.batch_size=16"))  # 8 training images
    assert "lower data.batch_size" in info.value.hint and "resume" not in info.value.hint
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_resumed_log_keeps_the_checkpoints_own_points_in_json_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sceneparse.engine.logger import RunLogger

    log = RunLogger(tmp_path)
    for it in (2, 4, 6, 8):  # last.pt saved at 6; killed after logging 8
        log.log({"iter": it, "loss": float(it)})
    log.close()
    log = RunLogger(tmp_path, resume_from=6)
    log.log({"iter": 8, "loss": 80.0})  # redone after the resume
    log.close()
    assert [(r["iter"], r["loss"]) for r in log.records()] == [(2, 2.0), (4, 4.0), (6, 6.0), (8, 80.0)]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(2, 2.0), (4, 4.0), (6, 6.0), (8, 80.0)]


def test_a_run_resumed_to_validate_again_logs_that_validation_once(tmp_path):
    """last.pt saved before the validation at 4, the validation logged, the process killed before
    the second save: the resumed run validates 4 again, and the log must not hold it twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sceneparse.engine.logger import RunLogger

    log = RunLogger(tmp_path)
    log.log({"iter": 2, "loss": 2.0})
    log.log({"iter": 4, "loss": 4.0})
    log.log({"iter": 4, "val_miou": 0.25})
    log.close()
    log = RunLogger(tmp_path, resume_from=4, revalidating=True)
    log.log({"iter": 4, "val_miou": 0.5})  # validated again
    log.log({"iter": 6, "loss": 6.0})
    log.close()
    assert log.records() == [{"iter": 2, "loss": 2.0}, {"iter": 4, "loss": 4.0}, {"iter": 4, "val_miou": 0.5},
                             {"iter": 6, "loss": 6.0}]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/miou")] == [(4, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(2, 2.0), (4, 4.0), (6, 6.0)]


def test_a_budget_run_resumed_with_its_time_used_up_still_validates_and_saves(tmp_path):
    """A SIGTERM near the end of the time budget, then a resume: no step is left, but the run ends
    as a budget run does, validated (best.pt written) at the iteration where it stands."""
    short = ["train.iterations=6", "train.val_every=100", "train.checkpoint_every=3", "train.log_every=3"]
    train(tiny_config(tmp_path, *short))
    last = tmp_path / "run" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["train_state"]["validated_iter"] == 6  # validated at its end: nothing to redo
    (tmp_path / "run" / "best.pt").unlink()
    ckpt["train_state"]["validated_iter"] = -1  # as if stopped by a signal at 6, never validated
    ckpt["train_state"]["best_miou"] = float("-inf")
    torch.save(ckpt, last)
    spent = ckpt["train_state"]["elapsed_s"]
    result = train(tiny_config(tmp_path, *short, f"train.time_budget_s={spent / 2}"), resume=True)
    assert result["iterations"] == 6 and result["best"] and (tmp_path / "run" / "best.pt").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "val_miou" in r] == [6]  # the first run's record made way


def test_a_batch_of_one_with_a_pooled_decoder_is_refused_before_training(tmp_path):
    cfg = tiny_config(tmp_path, "model.decoder=ppm_deepsup", "data.batch_size=1")
    with pytest.raises(SceneparseError, match="data.batch_size=1 cannot train the ppm_deepsup decoder"):
        train(cfg)
    assert not (tmp_path / "run" / "last.pt").exists()
    # what it spares the user: torch's own error at the first step
    model = build_model("timm:test_efficientnet", "ppm_deepsup", 5).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model(torch.randn(1, 3, 64, 64))
    assert train(tiny_config(tmp_path / "c1", "model.decoder=c1_deepsup", "data.batch_size=1",
                             "train.iterations=2", "train.val_every=0"))["iterations"] == 2


def test_overrides_may_follow_the_options(tmp_path):
    """`train CFG --resume PATH key=value` and `train CFG --overwrite key=value`: argparse would end
    the overrides at the first option; docs/distributed.md promises any order."""
    from pathlib import Path

    from sceneparse.cli.main import main

    config = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    common = [*TINY, f"output_dir={tmp_path / 'run'}", "train.val_every=0"]
    assert main(["train", config, "--overwrite", *common, "train.iterations=2"]) == 0
    assert main(["train", config, *common, "--resume", str(tmp_path / "run" / "last.pt"), "train.iterations=4"]) == 0
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["train_state"]["iteration"] == 4
    with pytest.raises(SystemExit):  # words that are no overrides stay an error
        main(["train", config, "--overwrite", "stray"])


def test_a_distributed_runs_resume_command_keeps_torchrun_and_its_process_count(tmp_path):
    from types import SimpleNamespace

    from sceneparse.engine.distributed import DistInfo
    from sceneparse.engine.train import Trainer

    def command(world_size, per_node=1):
        info = DistInfo(rank=0, world_size=world_size, local_world_size=per_node)
        return Trainer.resume_command.fget(SimpleNamespace(info=info, output_dir=tmp_path))

    tail = f"train {tmp_path / 'config.yaml'} --resume {tmp_path / 'last.pt'}"
    assert command(1) == f"sceneparse {tail}"
    assert command(4, per_node=4) == f"torchrun --nproc-per-node 4 -m sceneparse {tail}"
    assert command(16, per_node=8) == (
        f"torchrun --nnodes 2 --nproc-per-node 8 <your rendezvous options> -m sceneparse {tail}")


def test_processes_started_with_different_settings_are_refused_at_start(monkeypatch):
    from sceneparse.engine import distributed as dist_utils
    from sceneparse.engine.distributed import DistInfo
    from sceneparse.engine.train import _check_same_config, _flat_settings

    cfg = load_config(None, TINY)
    other = _flat_settings(OmegaConf.to_container(load_config(None, [*TINY, "train.iterations=10"]), resolve=True))
    same = _flat_settings(OmegaConf.to_container(cfg, resolve=True))
    info = DistInfo(rank=0, world_size=2)
    monkeypatch.setattr(dist_utils, "all_gather_object", lambda obj: [obj, same])
    _check_same_config(cfg, info)  # the same everywhere: fine
    monkeypatch.setattr(dist_utils, "all_gather_object", lambda obj: [obj, other])
    with pytest.raises(SceneparseError) as err:
        _check_same_config(cfg, info)
    assert err.value.message.endswith("rank(s) 1 differ from rank 0 in train.iterations")

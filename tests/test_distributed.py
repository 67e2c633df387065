"""Distributed training and evaluation on CPU: torchrun, gloo, 2 processes.

One real `torchrun --standalone --nproc-per-node 2` launch runs this file as a script (see the
bottom); each rank writes what it computed, and the tests compare it with the same computation
done here in a single process. The same two processes then run `sceneparse train` for a few
iterations, to check what the real command writes under torchrun.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sceneparse.engine import distributed as D
from sceneparse.errors import SceneparseError

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3
SIZE = 32
PER_RANK = 2  # images per process in the training test; the single-process run uses 2 x this
STEPS = 3
EVAL_ITEMS = 5  # odd on purpose: rank 0 evaluates 3 images, rank 1 two
TRAIN_OVERRIDES = [  # `sceneparse train` on tiny synthetic scenes, 4 iterations, 2 x 2 images each
    "model.encoder=timm:test_resnet", "model.decoder=ppm_deepsup",  # ppm: dropout, per-rank RNG
    "data.synthetic={num_images: {train: 8, val: 5}, seed: 0, image_size: 64}",
    "data.scales=[64]", "data.max_size=64", "data.batch_size=2", "train.iterations=4", "train.val_every=4",
    "train.checkpoint_every=4", "train.log_every=2", "train.device=cpu",
]


def tiny_model() -> nn.Module:
    from sceneparse.models import build_model

    torch.manual_seed(0)
    # timm's test_resnet tapped at strides 2..8: a few hundred thousand parameters, real BN layers.
    return build_model("timm:test_resnet", "c1", NUM_CLASSES, encoder_options={"out_indices": (0, 1, 2)})


def freeze_bn(model: nn.Module) -> None:
    """BN on running statistics: otherwise each rank would normalise with its own half-batch
    statistics (plain BN on CPU, no SyncBN there) and the runs could not agree exactly."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def global_batch():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2 * PER_RANK, 3, SIZE, SIZE, generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (2 * PER_RANK, SIZE, SIZE), generator=gen)
    return images, targets


def train_steps(info: D.DistInfo, images, targets):
    """SGD steps the way the trainer runs them: wrap_model, mean cross-entropy, loss averaged over ranks."""
    net = D.wrap_model(tiny_model(), info)
    net.train()
    freeze_bn(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(STEPS):
        loss = F.cross_entropy(net(images), targets, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(D.reduce_mean(loss).item())
    return losses, D.unwrap(net).state_dict()


def eval_items():
    gen = torch.Generator().manual_seed(2)
    items = []
    for _ in range(EVAL_ITEMS):
        image = torch.randn(3, SIZE, SIZE, generator=gen)
        mask = torch.randint(0, NUM_CLASSES, (SIZE, SIZE), generator=gen)
        mask[:4] = 255  # some unlabelled pixels
        items.append((image, mask))
    return items


def confusion(model: nn.Module, items) -> "ConfusionMatrix":  # noqa: F821
    from sceneparse.engine.metrics import ConfusionMatrix

    cm = ConfusionMatrix(NUM_CLASSES)
    model.eval()
    with torch.no_grad():
        for image, mask in items:
            # Predictions from a model with a random classifier hit few classes; shift by pixel
            # position so every cell of the matrix gets counts.
            pred = (model(image[None]).argmax(1) + torch.arange(SIZE)) % NUM_CLASSES
            cm.update(pred, mask[None])
    return cm


def worker(out_dir: Path) -> None:
    """What each torchrun rank does."""
    info = D.init_from_env("cpu")
    result = {"rank": info.rank, "world_size": info.world_size, "is_main": D.is_main()}

    shard = D.shard(eval_items(), info)
    cm = confusion(tiny_model(), shard)
    result["eval_items"] = len(shard)
    cm.all_reduce()
    result["confusion"] = cm.matrix.clone()

    images, targets = global_batch()
    part = slice(info.rank * PER_RANK, (info.rank + 1) * PER_RANK)
    wrapped = D.wrap_model(tiny_model(), info)
    result["wrapped"] = type(wrapped).__name__
    result["bn_types"] = sorted({type(m).__name__ for m in wrapped.modules() if "BatchNorm" in type(m).__name__})
    result["losses"], result["state"] = train_steps(info, images[part], targets[part])

    result["broadcast"] = D.broadcast_object(f"from rank {info.rank}")
    total = D.all_reduce_(torch.tensor([info.rank + 1.0]))
    result["all_reduce"] = total.item()
    D.barrier()
    result.update(train_runs(info, out_dir))
    torch.save(result, out_dir / f"rank{info.rank}.pt")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_runs(info: D.DistInfo, out_dir: Path) -> dict:
    """`sceneparse train` in the same processes, with the process group already up (reused), then
    runs where one rank alone sees a NaN or a stop signal, then a resume that starts its own group."""
    import signal

    from sceneparse.cli.main import main
    from sceneparse.engine import train as train_mod
    from sceneparse.engine.config import load_config

    real_loss = train_mod.segmentation_loss
    seen: list[float] = []
    on_call = {}  # call number -> what this rank does to the loss of that step

    def loss_hook(*args):
        value = real_loss(*args)
        seen.append(value.item())
        action = on_call.get(len(seen))
        if action == "nan":
            value = value * float("nan")
        elif action == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        return value

    train_mod.segmentation_loss = loss_hook

    def run(name, *overrides, hooks=None):
        seen.clear()
        on_call.clear()
        on_call.update(hooks if hooks and info.rank == 1 else {})  # rank 1 alone
        cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                          [*TRAIN_OVERRIDES, f"output_dir={out_dir / name}", *overrides])
        try:
            return train_mod.train(cfg)
        except BaseException as err:  # noqa: BLE001 - what each rank raised is the result
            return f"{type(err).__name__}: {err}"

    out = {}
    assert main(["train", str(ROOT / "configs" / "quickstart.yaml"), *TRAIN_OVERRIDES,
                 f"output_dir={out_dir / 'run'}"]) == 0
    out["run_losses"] = list(seen)
    out["group_kept"] = D.is_initialized()  # train() leaves a group it did not start
    out["skip"] = run("skip", "train.on_nonfinite=skip", "train.log_every=1", hooks={2: "nan"})
    out["nan"] = run("nan", "train.val_every=0", "train.checkpoint_every=2", hooks={3: "nan"})
    # SIGTERM on rank 1 during step 1: both ranks stop together at the next log step (2). Rank 0
    # writes last.pt slowly here: no rank may leave a save before the file is written (one that
    # went on to stop would exit, and torchrun would kill rank 0 in the middle of the write).
    real_save, real_save_last = train_mod.save_model, train_mod.Trainer._save_last
    out["save_times"] = times = {"written": [], "left": []}

    def slow_save(path, *args, **kwargs):
        last = Path(path).name == "last.pt"
        time.sleep(0.5 if last else 0)
        real_save(path, *args, **kwargs)
        if last:
            times["written"].append(time.time())

    def timed_save_last(self, *args, **kwargs):
        real_save_last(self, *args, **kwargs)
        times["left"].append(time.time())

    train_mod.save_model, train_mod.Trainer._save_last = slow_save, timed_save_last
    out["stop"] = run("stop", hooks={1: "sigterm"})
    train_mod.save_model, train_mod.Trainer._save_last = real_save, real_save_last
    # Augmented on the device (whole set there) and fitted to a 3-second budget: the ranks must
    # agree on the clock, else one would wait for the other in a collective until the timeout.
    out["budget"] = run("budget", "data.augment_on=device", "data.cache_in_memory=true", "data.crop_size=48",
                        "data.batching=crop", "train.time_budget_s=3", "train.iterations=100000",
                        "train.log_every=2", "train.val_every=0", "train.checkpoint_every=100000")
    train_mod.segmentation_loss = real_loss
    # Encoder weights from a file: rank 0 alone reads (or downloads) them; DDP copies its model.
    from sceneparse.models import build_model, pretrained

    weights = out_dir / "encoder_weights.pth"
    if info.is_main:
        encoder = build_model("timm:test_resnet", "ppm_deepsup", 5).encoder
        torch.save({k.removeprefix("body."): v for k, v in encoder.state_dict().items()}, weights)
    D.barrier()
    real_load, loads = pretrained.load_encoder_weights, []
    pretrained.load_encoder_weights = lambda *args: (loads.append(args[1]), real_load(*args))[1]
    out["weights_run"] = run("weights", f"model.encoder_weights={weights}")
    out["weights_loads"] = list(loads)
    pretrained.load_encoder_weights = real_load
    # A second process group in these processes gets a store of its own on a fresh port: the
    # agent's store still holds the first group's keys under the same names.
    os.environ["MASTER_PORT"] = str(D.broadcast_object(free_port()))
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"  # rank 0 hosts that store
    D.cleanup()
    # --resume under torchrun, from a clean start: train() starts the group and destroys it.
    out["resume_exit"] = main(["train", str(out_dir / "stop" / "config.yaml"), "--resume"])
    out["group_left_up"] = D.is_initialized()
    return out


def torchrun_env(**env_vars) -> dict:
    """This environment with the checkout importable and no rendezvous variables inherited."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env_vars)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def launch_torchrun(args: list, nproc: int, timeout: int, check: bool = True,
                    **env_vars) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node NPROC ARGS...` (a script and its arguments, or
    `-m sceneparse ...`) from the repo root, with this checkout importable and no rendezvous
    variables inherited; fails the test if it fails (with `check`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=torchrun_env(**env_vars), capture_output=True, text=True,
                          timeout=timeout)
    assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    # free_port() hands back a port it has closed: a test in the other pytest worker may take it
    # before rank 0 binds it. Such a clash is the only failure tried again, in a fresh folder.
    for attempt in (1, 2):
        out = tmp_path_factory.mktemp("dist")
        proc = launch_torchrun([__file__, out], nproc=2, timeout=180, check=False, OMP_NUM_THREADS="1")
        log = proc.stdout + proc.stderr
        if proc.returncode == 0 or attempt == 2 or "address already in use" not in log.lower():
            break
    assert proc.returncode == 0, log[-6000:]
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r in results:
        r["out_dir"], r["log"] = out, proc.stdout + proc.stderr
    return results


def test_ranks_see_torchrun_environment(ranks):
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["is_main"] for r in ranks] == [True, False]
    assert [r["broadcast"] for r in ranks] == ["from rank 0", "from rank 0"]
    assert [r["all_reduce"] for r in ranks] == [3.0, 3.0]


def test_wrap_model_uses_ddp_and_keeps_plain_bn_on_cpu(ranks):
    for r in ranks:
        assert r["wrapped"] == "DistributedDataParallel"
        assert r["bn_types"] == ["BatchNorm2d"]  # SyncBatchNorm runs on GPUs only


def test_distributed_evaluation_equals_single_process(ranks):
    items = eval_items()
    expected = confusion(tiny_model(), items).matrix
    assert [r["eval_items"] for r in ranks] == [3, 2]  # every image exactly once, no padding
    assert int(expected.sum()) == EVAL_ITEMS * (SIZE - 4) * SIZE
    assert (expected > 0).all()
    for r in ranks:
        assert torch.equal(r["confusion"], expected)


def test_ddp_training_equals_single_process_on_global_batch(ranks):
    images, targets = global_batch()
    start = tiny_model().state_dict()
    losses, state = train_steps(D.DistInfo(), images, targets)
    assert losses[-1] < losses[0]
    for r in ranks:
        np.testing.assert_allclose(r["losses"], losses, rtol=1e-5)
        for key, value in state.items():
            torch.testing.assert_close(r["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # The weights did move: the comparison above is not between two untouched copies.
    moved = max((state[k] - start[k]).abs().max().item() for k in state if state[k].is_floating_point())
    assert moved > 1e-2


def test_train_command_under_torchrun_writes_once_from_rank_0(ranks):
    import json

    from sceneparse.engine.checkpoint import load_checkpoint, load_model

    run = ranks[0]["out_dir"] / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [2, 4]  # rank 0 logs, rank 1 does not
    (val,) = [r for r in records if "val_miou" in r]
    assert 0 <= val["val_miou"] <= 1
    assert load_checkpoint(run / "last.pt")["train_state"]["iteration"] == 4
    model = load_model(run / "last.pt")  # unwrapped weights: loads without DDP's "module." prefix
    assert model.config["encoder"] == "timm:test_resnet"


def test_train_command_prints_its_summary_once_and_keeps_a_callers_group(ranks):
    log, out = ranks[0]["log"], ranks[0]["out_dir"]
    # `sceneparse train` ran twice (run, then the resume of stop): rank 0 alone printed each summary
    assert log.count("validation: mIoU") == 2
    assert log.count(f"outputs in {out / 'run'}: last.pt") == 1
    assert log.count(f"training done: 4 iterations; outputs in {out / 'run'} ") == 1
    assert [r["group_kept"] for r in ranks] == [True, True]


def test_time_budget_and_device_augmentation_agree_across_ranks(ranks):
    results = [r["budget"] for r in ranks]
    assert all(isinstance(r, dict) for r in results), results  # no rank failed
    assert results[0]["iterations"] == results[1]["iterations"] < 100000
    state = torch.load(results[0]["last"], weights_only=True)["train_state"]
    assert state["iteration"] == results[0]["iterations"] and state["elapsed_s"] >= 2.0


def test_logged_loss_is_the_mean_over_ranks_and_steps(ranks):
    import json

    records = [json.loads(line) for line in (ranks[0]["out_dir"] / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["loss"] for r in records if "loss" in r]
    per_rank = [r["run_losses"] for r in ranks]  # 4 steps each; logged every 2
    assert per_rank[0] != per_rank[1]  # the ranks saw different images
    expected = [np.mean([losses[i] for losses in per_rank for i in steps]) for steps in ((0, 1), (2, 3))]
    np.testing.assert_allclose(logged, expected, rtol=1e-6)


def test_validation_during_training_equals_single_process_evaluation(ranks):
    import json

    from sceneparse.data import build_dataset
    from sceneparse.engine.checkpoint import load_model
    from sceneparse.engine.config import dataset_settings, load_config
    from sceneparse.engine.evaluate import evaluate

    run = ranks[0]["out_dir"] / "run"
    cfg = load_config(run / "config.yaml")
    val_set = build_dataset(dataset_settings(cfg.data), "val", None)
    metrics = evaluate(load_model(run / "last.pt"), val_set, device="cpu", scales=[None], num_workers=0,
                       mean=list(cfg.data.mean), std=list(cfg.data.std), distributed=False)
    (val,) = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_miou" in r]
    assert val["val_miou"] == pytest.approx(metrics["mean_iou"], abs=1e-12)
    assert val["val_pixel_accuracy"] == pytest.approx(metrics["pixel_accuracy"], abs=1e-12)
    assert metrics["num_images"] == 5


def test_encoder_weights_are_read_by_rank_0_alone(ranks):
    # concurrent downloads of a URL into one cache file would clash; DDP broadcasts rank 0's model
    for r in ranks:
        assert isinstance(r["weights_run"], dict), r["weights_run"]
    assert [len(r["weights_loads"]) for r in ranks] == [1, 0]


def test_a_nan_on_one_rank_is_skipped_by_both(ranks):
    import json

    for r in ranks:
        assert isinstance(r["skip"], dict), r["skip"]
        assert r["skip"]["skipped"] == 1 and r["skip"]["iterations"] == 4
    records = [json.loads(line) for line in (ranks[0]["out_dir"] / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [1, 3, 4]
    assert "iteration 2: non-finite loss, batch skipped (rank 1): synthetic/train/" in ranks[0]["log"]


def test_a_nan_on_one_rank_stops_both_naming_that_ranks_images(ranks):
    from sceneparse.engine.checkpoint import load_checkpoint

    messages = [r["nan"] for r in ranks]
    assert messages[0] == messages[1]
    assert messages[0].startswith("NonFiniteLoss: training loss became nan at iteration 3 on images: synthetic/train/")
    assert "(rank 1)" in messages[0]
    assert load_checkpoint(ranks[0]["out_dir"] / "nan" / "last.pt")["train_state"]["iteration"] == 2


def test_a_signal_on_one_rank_stops_both_at_the_same_step_and_resume_continues(ranks):
    import json

    from sceneparse.engine.checkpoint import load_checkpoint

    assert ranks[1]["stop"].startswith("TrainingInterrupted: SIGTERM received: stopped after iteration 2")
    assert ranks[0]["stop"].startswith("TrainingInterrupted: stop signal on another process received: "
                                       "stopped after iteration 2")
    # the resume command keeps torchrun and its process count (LOCAL_WORLD_SIZE, as torchrun sets it)
    assert "Resume with:\n  torchrun --nproc-per-node 2 -m sceneparse train " in ranks[0]["stop"]
    out = ranks[0]["out_dir"]
    state = load_checkpoint(out / "stop" / "last.pt")["train_state"]
    assert state["iteration"] == 4  # after the resume
    assert [r["resume_exit"] for r in ranks] == [0, 0]
    assert [r["group_left_up"] for r in ranks] == [False, False]  # the resume's own group is gone
    # stopped at 2 + resumed to 4 == the uninterrupted run: same logs and weights (dropout included:
    # each rank's RNG state is saved and restored)
    def rows(name):
        lines = (out / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "img_per_s"} for line in lines]

    assert rows("stop") == rows("run")
    ours, theirs = (load_checkpoint(out / name / "last.pt")["model"]["state_dict"] for name in ("stop", "run"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert len(state["rng_per_rank"]) == 2
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])
    # rank 1 left each save only once rank 0 had written the file (rank 0's write took 0.5 s)
    written, left = ranks[0]["save_times"]["written"], ranks[1]["save_times"]["left"]
    assert len(written) == len(left) >= 1 and all(w <= l for w, l in zip(written, left))


def test_two_machines_train_like_one_machine_with_two_processes(ranks, tmp_path):
    """Multi-node, emulated on this host: two torchrun agents (`--nnodes 2 --nproc-per-node 1`, c10d
    rendezvous, as docs/distributed.md says), so each process has LOCAL_RANK 0 and only RANK tells
    them apart. The run must write once and equal the one-machine, two-process run of the fixture."""
    import json

    from sceneparse.engine.checkpoint import load_checkpoint

    env = torchrun_env(OMP_NUM_THREADS="1")
    endpoint = f"127.0.0.1:{free_port()}"
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "sceneparse-test",
           "-m", "sceneparse", "train", str(ROOT / "configs" / "quickstart.yaml"), *TRAIN_OVERRIDES,
           f"output_dir={run}"]
    agents = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    logs = []
    try:
        for agent in agents:
            logs.append(agent.communicate(timeout=180)[0])
    finally:
        for agent in agents:
            agent.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(log[-3000:] for log in logs)
    summary = f"training done: 4 iterations; outputs in {run} "
    assert sum(log.count(summary) for log in logs) == 1  # printed by global rank 0 alone

    def rows(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "img_per_s"} for line in lines]

    one_machine = ranks[0]["out_dir"] / "run"
    assert len(rows(run)) == 3  # losses at iterations 2 and 4, one validation
    assert rows(run) == rows(one_machine)
    ours, theirs = (load_checkpoint(folder / "last.pt")["model"]["state_dict"] for folder in (run, one_machine))
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_eval_and_predict_commands_under_torchrun_equal_one_process(tmp_path, capsys):
    """`torchrun -m sceneparse eval|predict`: each rank takes every other image; the report (summed
    confusion matrices) and the files written equal a single process's."""
    import json

    from PIL import Image

    from sceneparse.cli.main import main
    from sceneparse.engine.checkpoint import save_model
    from test_evaluate import _write_folder_dataset

    rng = np.random.default_rng(0)
    pairs = {f"img{i}": (rng.integers(0, 256, size=(24 + 4 * i, 32, 3), dtype=np.uint8),
                         rng.integers(0, NUM_CLASSES, size=(24 + 4 * i, 32))) for i in range(EVAL_ITEMS)}
    root = _write_folder_dataset(tmp_path / "data", pairs)
    checkpoint = tmp_path / "model.pt"
    save_model(checkpoint, tiny_model(), ["road", "tree", "sky"], [[255, 0, 0], [0, 255, 0], [0, 0, 255]])
    common = ["--model", checkpoint, "--device", "cpu"]
    evaluate = ["eval", *common, "--data-root", root, "--dataset", "folder", "--workers", "0", "--output"]
    predict = ["predict", *common, root / "images", "--output"]

    two = launch_torchrun(["-m", "sceneparse", *evaluate, tmp_path / "eval2"], nproc=2, timeout=120, OMP_NUM_THREADS="1")
    assert two.stdout.count("overall score") == 1  # rank 0 alone prints and writes
    assert main([*map(str, evaluate), str(tmp_path / "eval1")]) == 0
    one_report, two_report = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("eval1", "eval2"))
    assert two_report["num_images"] == one_report["num_images"] == EVAL_ITEMS
    assert two_report["confusion_matrix"] == one_report["confusion_matrix"]
    assert sum(map(sum, one_report["confusion_matrix"])) == sum(label.size for _, label in pairs.values())
    assert two_report["mean_iou"] == one_report["mean_iou"]

    two = launch_torchrun(["-m", "sceneparse", *predict, tmp_path / "pred2"], nproc=2, timeout=120, OMP_NUM_THREADS="1")
    assert two.stdout.count("wrote 15 files for 5 images") == 1
    assert sum(f"img{i}.png: " in two.stdout for i in range(EVAL_ITEMS)) == EVAL_ITEMS  # each image once
    assert main([*map(str, predict), str(tmp_path / "pred1")]) == 0
    capsys.readouterr()
    written = sorted(p.name for p in (tmp_path / "pred1").iterdir())
    assert len(written) == 15 and sorted(p.name for p in (tmp_path / "pred2").iterdir()) == written
    for name in written:
        one, two_ = (np.asarray(Image.open(tmp_path / folder / name)) for folder in ("pred1", "pred2"))
        assert np.array_equal(one, two_), name


# ------------------------------------------------------------------------- single-process behaviour

def test_single_process_is_a_no_op(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = D.init_from_env("cpu")
    assert info == D.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert info.is_main and not info.distributed
    model = nn.Linear(2, 2)
    assert D.wrap_model(model, info) is model
    assert D.unwrap(model) is model
    t = torch.tensor([2.0])
    assert D.all_reduce_(t) is t and t.item() == 2.0
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.shard([1, 2, 3], info) == [1, 2, 3]
    assert D.is_main()


def test_unwrap_sees_through_compile():
    model = nn.Linear(2, 2)
    assert D.unwrap(torch.compile(model)) is model


def test_world_size_without_rendezvous_is_a_user_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(SceneparseError, match="MASTER_ADDR"):
        D.init_from_env("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_request_without_cuda_is_a_user_error():
    with pytest.raises(SceneparseError, match="CUDA is not available"):
        D.init_from_env("cuda")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda0"])
def test_a_device_name_torch_would_not_parse_is_a_user_error(device):
    with pytest.raises(SceneparseError, match=f"'{device}' is not a device") as err:
        D.resolve_device(device)
    assert "cuda:N" in err.value.hint


def _worker_draws(seed: int, rank: int) -> list[float]:
    dataset = list(range(4))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=1, num_workers=2, generator=D.loader_generator(seed, rank),
        collate_fn=lambda batch: (np.random.rand(), torch.rand(1).item()),
    )
    return [value for pair in loader for value in pair]


def test_a_rank_beyond_the_world_is_refused_and_a_bad_world_size_is_no_crash_at_exit(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    with pytest.raises(SceneparseError, match=r"RANK=5 with WORLD_SIZE=2: ranks are 0 .. 1"):
        D.init_from_env("cpu")
    # an empty WORLD_SIZE (a script's `export WORLD_SIZE=`): a command that needs no process group
    # still exits 0, with no traceback from the exit path
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["WORLD_SIZE"] = ""
    done = subprocess.run([sys.executable, "-m", "sceneparse", "zoo", "list", "--cache-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_worker_seeds_differ_per_worker_and_rank_and_repeat():
    first = _worker_draws(7, rank=0)
    assert _worker_draws(7, rank=0) == first  # reproducible
    assert _worker_draws(7, rank=1) != first  # another rank, other augmentations
    # Items 0 and 1 come from workers 0 and 1: their NumPy draws differ.
    assert first[0] != first[2]
    assert D.rank_seed(7, 0) != D.rank_seed(7, 1) and D.rank_seed(7, 0) == D.rank_seed(7, 0)
    # Each stream its own numbers: rank 0's dropout, epoch 0's crop order and the first sample's
    # augmentation were once all one seed (SeedSequence ignores trailing zeros).
    seeds = {D.rank_seed(7, 0), D.mix_seed("crop order", 7, 0), D.mix_seed("sample", 7, 0, 0, 0),
             D.mix_seed("sample", 7), D.mix_seed("sample", 7, 0)}
    assert len(seeds) == 5


if __name__ == "__main__":  # run by torchrun from the `ranks` fixture
    worker(Path(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as sceneparse.cli.main.entry: no interpreter teardown, which torch's C++ side can abort


def test_parameters_that_never_reach_the_output_are_found_and_frozen_for_ddp(tmp_path, capsys):
    """timm's EfficientNet features keep every block; with out_indices stopping early the last ones
    compute nothing the loss sees, and DDP, waiting for their gradients, fails at the second step."""
    import torch.distributed as dist

    from sceneparse.models import build_model

    model = build_model("timm:test_efficientnet", "c1_deepsup", 5, encoder_options={"out_indices": [0, 1, 2]})
    unreached = D.parameters_without_gradient(model)
    assert unreached and all(n.startswith(("encoder.body.blocks.3.", "encoder.body.blocks.4.")) for n in unreached)
    out = model.train()(torch.randn(2, 3, 64, 64))  # the same answer as a real backward pass
    (out.logits.sum() + out.aux.sum()).backward()
    assert sorted(unreached) == sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert D.parameters_without_gradient(build_model("timm:test_resnet", "ppm_deepsup", 5)) == []

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = D.wrap_model(model, D.init_from_env("cpu"))
        for _ in range(3):  # without the freezing, the second step raises
            out = ddp(torch.randn(2, 3, 64, 64))
            (out.logits.sum() + out.aux.sum()).backward()
    finally:
        dist.destroy_process_group()
    assert "parameters never reach the model's output" in capsys.readouterr().err
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in unreached)


def test_a_rank_started_by_torchrun_leaves_without_interpreter_teardown(monkeypatch):
    """`sceneparse` under torchrun exits through os._exit with main()'s code (the teardown it skips
    sometimes aborted with "terminate called without an active exception", failing the job); run
    alone it exits normally."""
    from sceneparse.cli import main as cli

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exited) as hard:
        cli.entry()
    assert hard.value.args == (3,)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as soft:
        cli.entry()
    assert soft.value.code == 3

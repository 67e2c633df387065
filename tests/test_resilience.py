"""Training that survives: kill -9 and resume, SIGTERM, NaN losses, full disks, vanishing data."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sceneparse.engine import checkpoint as ckpt_mod
from sceneparse.engine import train as train_mod
from sceneparse.engine.config import load_config, save_config
from sceneparse.engine.train import train
from sceneparse.errors import SceneparseError

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.encoder=timm:test_efficientnet", "model.decoder=ppm_deepsup",  # ppm has dropout: RNG matters
    "data.kind=synthetic", "data.synthetic={num_images: {train: 8, val: 4}, seed: 0, image_size: 64}",
    "data.scales=[48, 64]", "data.max_size=64", "data.batch_size=2", "data.num_workers=0",
    "data.color_jitter=0.3", "train.iterations=8", "train.checkpoint_every=3", "train.log_every=1",
    "train.val_every=0", "train.seed=5", "eval.scales=[null]",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Bit-for-bit comparisons below: with several threads some CPU kernels may sum in another
    order from one run to the next (seen: the 7th digit of a loss), which is no resume bug."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(out: Path, *overrides):
    return load_config(None, [*TINY, f"output_dir={out}", *overrides])


def records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]  # timing differs


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]["state_dict"]


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}  # as one_thread() above


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    train(config(out))
    return out


KILL_AFTER_LOGGING = """
import os, signal, sys
from sceneparse.engine.logger import RunLogger
from sceneparse.engine.config import load_config
from sceneparse.engine.train import train

log = RunLogger.log
def log_then_die(self, record):
    log(self, record)
    if record.get("iter") == 5:  # after the checkpoint at 3, with iterations 4 and 5 logged
        os.kill(os.getpid(), signal.SIGKILL)
RunLogger.log = log_then_die
train(load_config(sys.argv[1]))
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted, workers):
    out = tmp_path / "run"
    cfg = config(out, f"data.num_workers={workers}")
    cfg_file = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_file)
    child = subprocess.run([sys.executable, "-c", KILL_AFTER_LOGGING, str(cfg_file)], cwd=tmp_path,
                           env=child_env(), capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert torch.load(out / "last.pt", weights_only=True)["train_state"]["iteration"] == 3
    assert max(r["iter"] for r in records(out)) == 5

    result = train(load_config(cfg_file), resume=True)
    assert result["iterations"] == 8
    # same losses at every iteration (logged 4 and 5 were dropped and redone), same final weights
    assert records(out) == records(uninterrupted)
    ours, theirs = weights(out / "last.pt"), weights(uninterrupted / "last.pt")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_failing_validation_loses_no_training_and_the_run_resumes_exactly(tmp_path, monkeypatch):
    # Validation at 3 and 6, with DataLoader workers (which draw their seeds from the global RNG, as
    # ppm_deepsup's dropout does). The second validation fails (a val image gone bad, say): last.pt
    # must already hold iteration 6, and resuming must give the uninterrupted run's weights.
    from sceneparse.engine import evaluate as evaluate_mod

    validating = ["train.val_every=3", "train.checkpoint_every=100", "data.num_workers=2"]
    straight = tmp_path / "straight"
    train(config(straight, *validating))

    out = tmp_path / "run"
    real_evaluate, calls = evaluate_mod.evaluate, []

    def failing_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise SceneparseError("cannot read val/0003.png: file is truncated")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(evaluate_mod, "evaluate", failing_second_time)
    with pytest.raises(SceneparseError, match="truncated") as err:
        train(config(out, *validating))
    assert f"the training up to iteration 6 is saved: once fixed, `sceneparse train {out / 'config.yaml'} " \
           f"--resume {out / 'last.pt'}` validates, then goes on" in err.value.hint
    assert torch.load(out / "last.pt", weights_only=True)["train_state"]["iteration"] == 6

    monkeypatch.setattr(evaluate_mod, "evaluate", real_evaluate)
    assert train(config(out, *validating), resume=True)["iterations"] == 8
    # the same training, and the same validations: the one that failed ran first on resuming
    assert records(out) == records(straight)
    assert [r["iter"] for r in records(out) if "val_miou" in r] == [3, 6, 8]
    ours, theirs = weights(out / "last.pt"), weights(straight / "last.pt")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_final_validation_that_failed_runs_on_resuming(tmp_path, monkeypatch):
    from sceneparse.engine import evaluate as evaluate_mod

    out, real_evaluate = tmp_path / "run", evaluate_mod.evaluate

    def failing(*args, **kwargs):
        raise SceneparseError("cannot read val/0003.png: file is truncated")

    monkeypatch.setattr(evaluate_mod, "evaluate", failing)
    with pytest.raises(SceneparseError, match="truncated"):
        train(config(out, "train.val_every=8"))
    monkeypatch.setattr(evaluate_mod, "evaluate", real_evaluate)
    result = train(config(out, "train.val_every=8"), resume=True)
    assert result["iterations"] == 8 and result["best_miou"] is not None and (out / "best.pt").exists()
    assert [r["iter"] for r in records(out) if "val_miou" in r] == [8]
    assert not torch.load(out / "last.pt", weights_only=True)["train_state"]["pending_validation"]


def test_sigterm_saves_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    cfg_file = tmp_path / "cfg.yaml"
    save_config(config(out, "train.iterations=100000", "train.checkpoint_every=100000"), cfg_file)
    proc = subprocess.Popen([sys.executable, "-m", "sceneparse", "train", str(cfg_file)], cwd=tmp_path,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]  # 143: the shell's "terminated"
    state = torch.load(out / "last.pt", weights_only=True)["train_state"]
    stopped = state["iteration"]
    assert stopped >= 2 and max(r["iter"] for r in records(out)) == stopped
    command = f"sceneparse train {out / 'config.yaml'} --resume {out / 'last.pt'}"
    assert "SIGTERM received" in stderr and command in stderr

    from sceneparse.cli.main import main

    assert main(["train", str(out / "config.yaml"), f"train.iterations={stopped + 2}",
                 "--resume", str(out / "last.pt")]) == 0
    assert torch.load(out / "last.pt", weights_only=True)["train_state"]["iteration"] == stopped + 2


def _nan_at(call: int, monkeypatch):
    real = train_mod.segmentation_loss
    calls = {"n": 0}

    def loss(*args):
        calls["n"] += 1
        value = real(*args)
        return value * float("nan") if calls["n"] == call else value

    monkeypatch.setattr(train_mod, "segmentation_loss", loss)


def test_nonfinite_loss_stops_naming_iteration_and_files_and_keeps_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _nan_at(5, monkeypatch)
    with pytest.raises(SceneparseError, match=r"became nan at iteration 5 on images: synthetic/train/\d+\.png"):
        train(config(out, "train.checkpoint_every=2", "train.log_every=3"))
    state = torch.load(out / "last.pt", weights_only=True)["train_state"]
    assert state["iteration"] == 4  # the NaN step was never saved
    assert all(torch.isfinite(v).all() for v in weights(out / "last.pt").values() if v.is_floating_point())
    # before any checkpoint: the hint does not point at a last.pt that is not there
    _nan_at(2, monkeypatch)
    with pytest.raises(SceneparseError) as err:
        train(config(tmp_path / "early", "train.checkpoint_every=100", "train.log_every=3"))
    assert not (tmp_path / "early" / "last.pt").exists() and "no checkpoint was saved before it" in err.value.hint


def test_nonfinite_loss_skip_mode_counts_and_goes_on(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _nan_at(3, monkeypatch)
    result = train(config(out, "train.on_nonfinite=skip", "train.iterations=5"))
    assert result["skipped"] == 1 and result["iterations"] == 5
    logged = records(out)
    assert [r["iter"] for r in logged] == [1, 2, 4, 5] and logged[-1]["skipped"] == 1
    assert all(torch.isfinite(v).all() for v in weights(out / "last.pt").values() if v.is_floating_point())


def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def save_until_disk_full(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", save_until_disk_full)
    with pytest.raises(SceneparseError, match=f"could not write checkpoint {out / 'last.pt'}: No space left"):
        train(config(out, "train.checkpoint_every=2", "train.iterations=6"))
    monkeypatch.undo()
    assert torch.load(out / "last.pt", weights_only=True)["train_state"]["iteration"] == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_vanishing_mid_run_names_the_file(tmp_path, monkeypatch, workers):
    from sceneparse.data import Synthetic
    from sceneparse.engine.logger import RunLogger

    root = Synthetic("train", num_images=8, image_size=48).write_folder(tmp_path / "data")
    log = RunLogger.log

    def log_then_delete(self, record):
        log(self, record)
        if record.get("iter") == 2:
            shutil.rmtree(root / "images")

    monkeypatch.setattr(RunLogger, "log", log_then_delete)
    # The way out: a resume when the run has saved a checkpoint (here with workers, at iteration
    # 2), else a fresh start.
    every = 2 if workers else 100
    cfg = config(tmp_path / "run", "data.kind=folder", f"data.root={root}", f"data.num_workers={workers}",
                 "train.iterations=30", f"train.checkpoint_every={every}")
    with pytest.raises(SceneparseError, match=r"reading training data failed at iteration \d+: .*images/train_\d+\.png") as info:
        train(cfg)
    if workers:
        assert info.value.hint.endswith(f"then resume: sceneparse train {tmp_path / 'run' / 'config.yaml'} "
                                        f"--resume {tmp_path / 'run' / 'last.pt'}")
    else:
        assert "start the run again (no checkpoint was saved yet; add --overwrite)" in info.value.hint


def test_resume_from_a_checkpoint_that_does_not_fit_is_refused(tmp_path, uninterrupted):
    out = tmp_path / "run"
    out.mkdir()
    ckpt = torch.load(uninterrupted / "last.pt", weights_only=True)
    ckpt["class_names"], ckpt["palette"] = ckpt["class_names"][:4], ckpt["palette"][:4]
    torch.save(ckpt, out / "other.pt")
    with pytest.raises(SceneparseError, match="other.pt was trained for 4 classes, this config/dataset has 5"):
        train(config(out), resume=out / "other.pt")

    del ckpt["train_state"]
    torch.save(ckpt, out / "weights_only.pt")
    with pytest.raises(SceneparseError, match="weights_only.pt holds weights only"):
        train(config(out), resume=out / "weights_only.pt")

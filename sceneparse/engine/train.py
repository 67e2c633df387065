"""The training loop: `train(cfg) -> dict`, also `sceneparse train CONFIG [key=value ...]`.

CSAIL's recipe by default: SGD with momentum (or `train.optimizer: adamw`), poly learning rate
(power 0.9, optional linear warmup), separate encoder/decoder learning rates, no weight decay on
norms and biases, cross-entropy that ignores IGNORE_INDEX pixels (or `train.loss`: OHEM, focal,
Lovász-softmax, plus Dice or Lovász terms; `engine.losses`) plus 0.4 x the deep-supervision
(auxiliary) loss (and 0.2 x EncNet's SE-loss).

Reproducible and resumable: what each step sees is a pure function of (seed, iteration)
(`engine.feed`), and checkpoints hold the optimizer, scheduler, grad scaler, data position, RNG
states and time spent as well as the weights, so a run resumed from `last.pt` continues exactly
as the uninterrupted run would have. Under torchrun every rank runs the same loop; the ranks
agree once per log window (`Trainer._sync`).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sceneparse.engine import distributed as dist_utils
from sceneparse.engine.checkpoint import (
    config_difference, load_checkpoint, load_initial_weights, model_config, rng_state, save_model, set_rng_state,
)
from sceneparse.engine.config import dataset_settings, save_config
from sceneparse.engine.feed import TrainBatches, build_data, epoch_batches_fn, next_batch, training_feed
from sceneparse.engine.logger import RunLogger
from sceneparse.engine.optim import build_optimizer
from sceneparse.errors import SceneparseError, ensure_writable

# What a previous run leaves in its output folder (an existing one is refused without --overwrite).
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "curves.png", "tb")


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM: the current step finished, `last.pt` was saved; `str()` says how to resume.
    `exit_code` follows the shell's 128 + signal number (130 Ctrl-C, 143 SIGTERM), which job
    schedulers and scripts read as "stopped by that signal"."""

    def __init__(self, message: str, signal_name: str | None = None):
        super().__init__(message)
        self.exit_code = 128 + int(getattr(signal.Signals, signal_name or "SIGINT", signal.SIGINT))


class TimeBudget:
    """`train.time_budget_s`: the poly schedule's end fitted to the clock.

    At each sync point the ranks agree (through the all-reduce they already do) on the elapsed
    time and the speed; the schedule's horizon becomes the iteration the run will reach when the
    time is up, capped at `train.iterations`. Once the time is up the horizon is the current
    iteration: the run validates, saves and ends there. The speed counts whole log windows,
    validations and checkpoints included (they recur, and take their share of the time), and
    leaves out the first window, whose warm-up (cudnn.benchmark, compilation) would make the
    horizon start low; it is used only until a second window is measured. A resumed run starts
    from the speed it had measured (`state()` goes into last.pt), and again leaves its own first
    window out.
    """

    def __init__(self, budget_s: float, start: float):
        self.budget_s = float(budget_s)
        self.start = start  # time.perf_counter() when the run began (earlier runs' time subtracted)
        self.steps_per_s = 0.0  # measured after each sync, sent with the next one
        self._mark: tuple[int, float] | None = None  # (iteration, time) of the last measurement
        self._windows, self._steps, self._seconds = 0, 0, 0.0

    def measured(self, iteration: int, now: float | None = None) -> None:
        """The loop is at `iteration` (call once before the first step, then at every sync)."""
        now = time.perf_counter() if now is None else now
        if self._mark is not None:
            steps, seconds = iteration - self._mark[0], now - self._mark[1]
            self._windows += 1
            if self._windows == 1:  # the warm-up window: a stand-in until a real measurement exists
                if not self._steps:
                    self.steps_per_s = steps / max(seconds, 1e-9)
            else:
                self._steps, self._seconds = self._steps + steps, self._seconds + seconds
                self.steps_per_s = self._steps / max(self._seconds, 1e-9)
        self._mark = (iteration, now)

    def state(self) -> dict:
        return {"steps": self._steps, "seconds": self._seconds, "steps_per_s": self.steps_per_s}

    def restore(self, state: dict | None) -> None:
        if state:  # (an older last.pt has none: the speed is measured anew)
            self._steps, self._seconds, self.steps_per_s = state["steps"], state["seconds"], state["steps_per_s"]

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def horizon(self, iteration: int, cap: int, elapsed: float, steps_per_s: float) -> int:
        remaining = max(0.0, self.budget_s - elapsed)
        if steps_per_s <= 0:  # no speed measured yet: keep the cap until there is one
            return cap if remaining > 0 else iteration
        return int(min(cap, iteration + math.floor(remaining * steps_per_s)))


# --------------------------------------------------------------------------- set-up helpers
def prepare_output(output_dir: Path, overwrite: bool, resuming: bool) -> list[str]:
    """Refuse to mix two runs in one folder; make sure we can write there before training.
    Returns the earlier run's files that this run replaces: `clear_previous` removes them once
    set-up has succeeded (a mistake found during set-up must not cost the earlier run)."""
    previous = [name for name in RUN_FILES if (output_dir / name).exists()]
    if previous and not {"last.pt", "best.pt"} & set(previous) and not resuming:
        # a run that stopped before its first checkpoint (a set-up error, say): nothing to keep
        print(f"note: {output_dir} holds an earlier run that saved no checkpoint ({', '.join(previous)}); "
              "starting afresh", file=sys.stderr)
        overwrite = True
    if previous and not (overwrite or resuming):
        raise SceneparseError(
            f"output folder {output_dir} already holds a run ({', '.join(previous)})",
            "continue it with --resume, start over with --overwrite, or set output_dir=OTHER_FOLDER",
        )
    ensure_writable(output_dir, "the run", "choose a writable output_dir")
    return previous if overwrite and not resuming else []


def clear_previous(output_dir: Path, names: list[str]) -> None:
    for name in names:
        target = output_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


@contextlib.contextmanager
def locked_output(output_dir: Path, info) -> Iterator[None]:
    """Rank 0 holds an exclusive lock on OUTPUT/.lock for the whole run, so a second run into the
    same folder is refused at once instead of clearing the first one's files under it. The OS
    drops the lock with its process: a killed run leaves nothing that blocks the next."""
    handle = dist_utils.run_on_main(lambda: _lock_folder(output_dir), info)
    try:
        yield
    finally:
        if handle is not None:
            import fcntl

            # unlocked explicitly: DataLoader workers forked during the run share the lock, and
            # persistent ones may outlive the run in this process
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()


def _lock_folder(output_dir: Path):
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs are not guarded against each other
        return None
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = open(output_dir / ".lock", "a+", encoding="utf-8")
    except OSError as err:
        raise SceneparseError(f"cannot write to output folder {output_dir}: {err.strerror or err}",
                              "choose a writable output_dir") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise SceneparseError(
            f"output folder {output_dir} is in use by another training run"
            + (f" (process {holder})" if holder else ""),
            "wait for it to finish (or stop it), or set output_dir=OTHER_FOLDER",
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _resumable_checkpoint(path: Path) -> dict:
    """A `last.pt` to resume from; a weights-only file (best.pt, a zoo model) is refused."""
    ckpt = load_checkpoint(path)
    if "train_state" not in ckpt:
        raise SceneparseError(
            f"{path} holds weights only (no training state) and cannot be resumed",
            f"resume from the run's last.pt, or start a new run from these weights: model.weights={path}",
        )
    return ckpt


def median_frequency_weights(dataset, num_classes: int, num_workers: int = 0) -> torch.Tensor:
    """Class weights median(freq) / freq_c (Eigen & Fergus), freq_c = pixels of c / pixels of the
    images where c occurs. Classes never seen get weight 1 (they never appear as targets anyway)."""
    from sceneparse.data import IGNORE_INDEX

    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)
    pixels = torch.zeros(num_classes, dtype=torch.float64)
    image_pixels = torch.zeros(num_classes, dtype=torch.float64)
    for sample in loader:
        mask = sample["mask"].reshape(-1)
        mask = mask[mask != IGNORE_INDEX]
        counts = torch.bincount(mask, minlength=num_classes)[:num_classes].double()
        pixels += counts
        image_pixels += (counts > 0).double() * mask.numel()
    seen = pixels > 0
    freq = torch.where(seen, pixels / image_pixels.clamp(min=1), torch.ones_like(pixels))
    weights = torch.ones(num_classes, dtype=torch.float64)
    weights[seen] = freq[seen].quantile(0.5) / freq[seen]  # the true median (torch.median takes the lower one)
    return weights.float()


def build_criterion(cfg: DictConfig, raw_train_set: Callable, num_classes: int, device) -> nn.Module:
    """The `train.loss` (cross-entropy by default) ignoring IGNORE_INDEX, with `train.class_weights`;
    `raw_train_set()` (untransformed) only for class_weights=auto."""
    from sceneparse.engine.losses import build_loss

    weights = cfg.train.class_weights
    if weights == "auto":
        # One pass over the labels, on rank 0 only; every rank gets the same weights.
        weights = (median_frequency_weights(raw_train_set(), num_classes, cfg.data.num_workers)
                   if dist_utils.is_main() else None)
        weights = dist_utils.broadcast_object(weights)
    elif weights is not None:
        weights = torch.tensor([float(w) for w in weights])
        if len(weights) != num_classes:
            raise SceneparseError(
                f"train.class_weights has {len(weights)} values but there are {num_classes} classes"
            )
    return build_loss(cfg.train.loss, weights).to(device)


def segmentation_loss(output, masks: torch.Tensor, criterion: nn.Module, deepsup_weight: float,
                      se_weight: float = 0.2) -> torch.Tensor:
    """Main loss, plus `deepsup_weight` x the auxiliary head's loss for deep-supervision models, plus
    `se_weight` x the class-presence loss for a model that predicts presence (EncNet's SE-loss)."""
    if not hasattr(output, "aux"):  # a plain logits tensor
        return criterion(output, masks)
    loss = criterion(output.logits, masks) + deepsup_weight * criterion(output.aux, masks)
    if output.presence is not None:  # added even at weight 0: DDP expects every parameter used
        loss = loss + se_weight * presence_loss(output.presence, masks)
    return loss


def presence_loss(presence: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """EncNet's Semantic Encoding Loss: binary cross-entropy of the per-image logits `presence`
    (N x C) against whether each class occurs in the image's label map (void pixels count for no
    class). The target is built by a scatter on the device: no host synchronisation."""
    num_classes = presence.shape[1]
    index = masks.flatten(1).clamp(max=num_classes)  # void (255) -> the extra column, dropped
    present = torch.zeros(masks.shape[0], num_classes + 1, device=masks.device).scatter_(1, index, 1.0)
    return F.binary_cross_entropy_with_logits(presence.float(), present[:, :num_classes])


def _autocast(amp: str, device: torch.device):
    # bf16/fp16 autocast only on CUDA: CPU autocast is slow for convolutions and rarely what's wanted.
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def wrap_model(model: nn.Module, cfg: DictConfig, info) -> nn.Module:
    """Device, memory format, DDP (when launched with torchrun) and torch.compile: one place."""
    if cfg.train.channels_last:  # before DDP, which lays out its gradient buckets by the parameters
        model = model.to(memory_format=torch.channels_last)
    model = dist_utils.wrap_model(model, info)  # .to(device) keeps the memory format
    if cfg.train.compile:
        model = torch.compile(model)
    return model


class _StopSignal:
    """SIGINT/SIGTERM set `received`; the loop finishes its step, saves and stops. A second
    signal gets the default behaviour back (immediate KeyboardInterrupt / termination)."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        self._restore()

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        self._restore()


class NonFiniteLoss(SceneparseError):
    pass


def train(cfg: DictConfig, resume: str | Path | bool | None = None) -> dict:
    """Train as `cfg` says; `resume=True` continues from OUTPUT/last.pt, a path from that file.

    Under torchrun every rank calls this; a process group this call starts is destroyed when it
    returns or fails (one set up by the caller is left to the caller).
    Returns {"output_dir", "last", "best", "curves", "iterations", "metrics" (last validation),
    "best_miou", "skipped", "rank"}.
    """
    with dist_utils.process_group(cfg.train.device) as info, locked_output(Path(cfg.output_dir), info):
        return Trainer(cfg, resume, info).run()


def _check_same_config(cfg: DictConfig, info) -> None:
    """Every process must train with the same settings: a config edited on one machine only would
    make the ranks wait on each other at different steps, silently, until the process group's
    timeout. Refused on every rank at start-up, naming the settings that differ."""
    if not info.distributed:
        return
    mine = _flat_settings(OmegaConf.to_container(cfg, resolve=True))
    everyone = dist_utils.all_gather_object(mine)
    differ = sorted({key for other in everyone for key in mine.keys() | other.keys()
                     if other.get(key) != everyone[0].get(key)})
    if differ:
        ranks = [rank for rank, other in enumerate(everyone) if other != everyone[0]]
        raise SceneparseError(
            f"the processes were started with different settings: rank(s) {', '.join(map(str, ranks))} differ from "
            f"rank 0 in {', '.join(differ[:8])}{' ...' if len(differ) > 8 else ''}",
            "start every process (every machine's torchrun) with the same config file and overrides")


def _flat_settings(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat_settings(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): repr(node)}


class Trainer:
    """One training run. `__init__` sets everything up (a user mistake fails there, before any
    step, on every rank alike); `run()` is the loop. `train()` is the way in."""

    def __init__(self, cfg: DictConfig, resume, info):
        from sceneparse.data import build_dataset

        started = time.perf_counter()  # train.time_budget_s counts from here
        self.cfg, self.info = cfg, info
        tc, dc = cfg.train, cfg.data
        device = info.device
        self.output_dir = output_dir = Path(cfg.output_dir)
        _check_same_config(cfg, info)  # else ranks that disagree (iterations, say) wait on each other forever
        resume_path = (output_dir / "last.pt") if resume is True else (Path(resume) if resume else None)
        # Rank 0 checks/clears the folder while the others wait; then all of them fail alike or go on.
        replaced = dist_utils.run_on_main(lambda: prepare_output(output_dir, cfg.overwrite, resume_path is not None),
                                          info)
        _check_batch_of_one(cfg, info)  # a config mistake: before the data check and any download
        ckpt = _resumable_checkpoint(resume_path) if resume_path is not None else None

        self.train_set, self.val_set, self.num_classes = build_data(cfg, verbose=info.is_main)
        if ckpt is not None and len(ckpt["class_names"]) != self.num_classes:
            raise SceneparseError(
                f"{resume_path} was trained for {len(ckpt['class_names'])} classes, "
                f"this config/dataset has {self.num_classes}",
                "resume with the config the checkpoint was trained with",
            )
        if ckpt is not None and info.is_main and ckpt["class_names"] != list(self.train_set.class_names):
            # a warning, not an error: a corrected spelling in the classes file is a fine reason
            differ = [f"{i}: {a!r} / {b!r}" for i, (a, b) in enumerate(zip(ckpt["class_names"],
                                                                          self.train_set.class_names)) if a != b]
            print(f"warning: {resume_path} was trained with other class names than this dataset's (id: checkpoint "
                  f"/ dataset: {', '.join(differ[:6])}{', ...' if len(differ) > 6 else ''}); the run goes on "
                  "with the dataset's, each id keeping its class layers", file=sys.stderr)
        model = self._build_model(ckpt, resume_path)
        self.optimizer, self.scheduler = build_optimizer(model, tc, fused=device.type == "cuda")
        if info.is_main and tc.warmup_iters >= tc.iterations:  # legal, but rarely meant (a shortened run)
            print(f"warning: train.warmup_iters={tc.warmup_iters} >= train.iterations={tc.iterations}: the run ends "
                  "inside its warm-up and never reaches its learning rate (train.warmup_iters=0 for none)",
                  file=sys.stderr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=tc.amp == "fp16" and device.type == "cuda")

        def raw_train_set():  # labels as stored: the training set itself when it has no transforms
            if self.train_set.transforms is None:  # (augment_on=device: maybe cached in memory already)
                return self.train_set
            return build_dataset({**dataset_settings(dc), "cache_in_memory": False}, dc.train_split, None)

        self.criterion = build_criterion(cfg, raw_train_set, self.num_classes, device)

        self.model = wrap_model(model, cfg, info)
        if info.distributed:
            # DDP has copied rank 0's initial weights everywhere; from here on each rank draws its
            # own random numbers (dropout), else every rank would drop the same units.
            _seed_everything(dist_utils.rank_seed(tc.seed, info.rank))
        self.start_iter, self.position, self.best_miou, self.skipped = 0, (0, 0), float("-inf"), 0
        self.pending_validation, self.validated_iter = False, -1  # (-1: no validation yet)
        if ckpt is not None:
            started -= self._restore(ckpt["train_state"], resume_path)
        if info.is_main:
            clear_previous(output_dir, replaced)  # set-up went through: now the earlier run goes
            save_config(cfg, output_dir / "config.yaml")

        self.sampler = TrainBatches(epoch_batches_fn(self.train_set, dc, tc.seed, info), tc.seed, tc.iterations,
                                    self.start_iter, self.position, info.rank)
        self.started = started
        self._set_schedule(ckpt)
        self.batches = training_feed(self.train_set, self.sampler, dc, device, self.num_classes)
        self.class_names = list(self.train_set.class_names)
        self.palette = [list(c) for c in self.train_set.palette]
        self.normalization = {"mean": list(dc.mean), "std": list(dc.std)}
        self.logger = (RunLogger(output_dir, resume_from=self.start_iter if ckpt is not None else None,
                                 revalidating=self.pending_validation) if info.is_main else None)
        self.last_metrics: dict = {}
        # This log window's per-step losses (on the device), their (iteration, image paths), its start.
        self.window: list[torch.Tensor] = []
        self.window_steps: list[tuple[int, list[str]]] = []
        self.window_time = time.perf_counter()
        self.step_lrs = self._rates()  # the learning rates the latest step used
        self.bar = None

    def _build_model(self, ckpt: dict | None, resume_path: Path | None) -> nn.Module:
        """The Segmenter of `cfg.model`: seeded initialisation, then the encoder weights of a new run
        or the weights of the resumed one (which must be the same model)."""
        from sceneparse.models import build_model
        from sceneparse.models.pretrained import load_encoder_weights

        cfg, tc = self.cfg, self.cfg.train
        _seed_everything(tc.seed)
        # cuDNN's autotuner pays off for fixed-size crops; with CSAIL's per-batch sizes
        # (data.crop_size unset) it would re-tune for every new shape.
        torch.backends.cudnn.benchmark = self.info.device.type == "cuda" and cfg.data.crop_size is not None
        model = build_model(cfg.model.encoder, cfg.model.decoder, self.num_classes,
                            encoder_options=OmegaConf.to_container(cfg.model.encoder_options),
                            decoder_options=OmegaConf.to_container(cfg.model.decoder_options))
        if ckpt is None:
            # Rank 0 alone reads (and maybe downloads or converts) the weights: DDP then copies its
            # model to every rank, and concurrent writes into one cache file would clash. A bad file
            # fails all ranks.
            if cfg.model.encoder_weights:
                dist_utils.run_on_main(lambda: load_encoder_weights(model.encoder, cfg.model.encoder_weights),
                                       self.info)
            if cfg.model.weights:
                dist_utils.run_on_main(lambda: self._start_from(model, cfg.model.weights), self.info)
            return model
        differ, shown = config_difference(model_config(ckpt), dict(model.config))
        if differ:
            raise SceneparseError(
                f"{resume_path} holds a different model than the config (they differ in {', '.join(differ)})",
                f"resume with the checkpoint's settings: {shown}",
            )
        model.load_state_dict(ckpt["model"]["state_dict"])
        return model

    def _start_from(self, model: nn.Module, source: str) -> None:
        """Fine-tuning: the weights of the checkpoint `source`, told on the console."""
        loaded = load_initial_weights(model, source)
        note = f"starting from the weights of {loaded['path']}"
        if loaded["fresh"]:
            note += f"; new class layers (another class count): {', '.join(loaded['fresh'])}"
        print(note, file=sys.stderr)
        renamed = [(i, a, b) for i, (a, b) in enumerate(zip(loaded["class_names"], self.train_set.class_names))
                   if not loaded["fresh"] and a.lower() != b.lower()]
        if renamed:  # the class layers are kept as they are: class i learns the data's class i
            shown = ", ".join(f"{i}: {a!r} -> {b!r}" for i, a, b in renamed[:6])
            print(f"note: {len(renamed)} class id(s) name other classes in this data than in {loaded['path']} "
                  f"({shown}{', ...' if len(renamed) > 6 else ''}); their class layers start from the "
                  "checkpoint's classes of the same ids", file=sys.stderr)
        ours = {"mean": list(self.cfg.data.mean), "std": list(self.cfg.data.std)}
        if loaded["normalization"] != ours:  # not an error: it may be deliberate
            print(f"note: {loaded['path']} was trained with normalization {loaded['normalization']}, this run "
                  f"uses data.mean={ours['mean']} data.std={ours['std']}", file=sys.stderr)

    def _set_schedule(self, ckpt: dict | None) -> None:
        """The poly schedule as the config says, and the time budget's clock (a resumed run's
        spent time counted: no steps at all if it is already used up)."""
        tc = self.cfg.train
        self.schedule = self.scheduler.lr_lambdas[0]  # the PolySchedule every parameter group shares
        # A resumed scheduler's state_dict brought the old run's settings back: the config decides
        # (`train.iterations=MORE --resume` extends a run).
        self.schedule.horizon, self.schedule.power = tc.iterations, tc.poly_power
        self.schedule.warmup_iters = tc.warmup_iters
        self.budget = TimeBudget(tc.time_budget_s, self.started) if tc.time_budget_s else None
        if self.budget is not None and ckpt is not None:
            # The same numbers on every rank (rank 0's), so the same horizon everywhere.
            self.budget.restore(ckpt["train_state"].get("time_budget"))
            spent = ckpt["train_state"].get("elapsed_s", 0.0)
            self.schedule.horizon = self.budget.horizon(self.start_iter, tc.iterations, spent,
                                                        self.budget.steps_per_s)
            used_up = self.schedule.horizon <= self.start_iter
            if used_up and tc.val_every > 0 and self.validated_iter != self.start_iter:
                # the time was up when it stopped (a SIGTERM at the budget's end, say): the run
                # still ends as a budget run does, validated and saved where it stands
                self.pending_validation = True
        # The rates of the next step under the schedule as now set: a resumed run's changed
        # settings apply from its first step (LambdaLR's own formula, so unchanged ones are exact).
        factor = self.schedule(self.scheduler.last_epoch)
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base_lr * factor

    def _restore(self, state: dict, path: Path) -> float:
        """Optimizer, scheduler, scaler, position, RNGs from a `last.pt`; returns the time it had spent.

        The optimizer's state (momentum buffers) and the schedule's position come from the file;
        its settings (learning rates, momentum, weight decay) from the config, as for every other
        setting: `train.lr_decoder=0.005 --resume` takes effect.
        """
        saved = ((state.get("config") or {}).get("train") or {}).get("optimizer", "sgd")  # older files: SGD
        if saved != self.cfg.train.optimizer:  # another optimizer's state would fail at its first step
            raise SceneparseError(
                f"{path} was trained with train.optimizer={saved}, this config says "
                f"{self.cfg.train.optimizer}: an optimizer's state does not carry over to another",
                f"resume with train.optimizer={saved}; or start a new run from its weights with "
                f"{self.cfg.train.optimizer}: model.weights={path} model.encoder_weights=null and another output_dir")
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        if state["scaler"]:  # empty when saved without fp16 (then a resumed fp16 run starts a fresh scale)
            self.scaler.load_state_dict(state["scaler"])
        self.start_iter, self.position = state["iteration"], tuple(state["data_position"])
        if self.start_iter > self.cfg.train.iterations:  # else it would "finish" and record the smaller count
            raise SceneparseError(
                f"{path} is at iteration {self.start_iter}, past train.iterations={self.cfg.train.iterations}: "
                "a resumed run can go on, not back",
                f"to train it further, resume with train.iterations above {self.start_iter}; to use it as it "
                "is, evaluate or predict with it")
        self.pending_validation = bool(state.get("pending_validation")) and self.cfg.train.val_every > 0
        self.best_miou, self.skipped = state["best_miou"], state["skipped"]
        self.validated_iter = state.get("validated_iter", -1)
        # Each rank's own RNG streams (dropout draws differ per rank); rank 0's when the process
        # count changed or the checkpoint predates per-rank states.
        per_rank = state.get("rng_per_rank") or []
        if per_rank and len(per_rank) != self.info.world_size and self.info.is_main:
            batch = self.cfg.data.batch_size
            print(f"note: {path} was trained by {len(per_rank)} process(es), this run has {self.info.world_size}: "
                  f"the global batch changes from {len(per_rank) * batch} to {self.info.world_size * batch} images "
                  "(resume under torchrun with the earlier process count to continue the run unchanged)",
                  file=sys.stderr)
        set_rng_state(per_rank[self.info.rank] if len(per_rank) == self.info.world_size else state["rng"])
        return state.get("elapsed_s", 0.0)

    def _rates(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    @property
    def resume_command(self) -> str:
        """The command that continues this run, under torchrun with the same processes if it ran
        there: resumed by one process, the global batch would silently shrink."""
        command = f"sceneparse train {self.output_dir / 'config.yaml'} --resume {self.output_dir / 'last.pt'}"
        if not self.info.distributed:
            return command
        per_node = max(1, self.info.local_world_size)
        nodes = max(1, self.info.world_size // per_node)
        launcher = (f"torchrun --nproc-per-node {per_node}" if nodes == 1 else
                    f"torchrun --nnodes {nodes} --nproc-per-node {per_node} <your rendezvous options>")
        return f"{launcher} -m {command}"

    # ------------------------------------------------------------------------------- the loop
    def run(self) -> dict:
        from tqdm import tqdm

        tc, info = self.cfg.train, self.info
        self.bar = tqdm(total=self.schedule.horizon, initial=self.start_iter, disable=not info.is_main,
                        desc="train", dynamic_ncols=True, file=sys.stderr)
        self.model.train()
        it, next_position = self.start_iter, self.position
        positions = self.sampler.walk()
        if self.budget is not None:
            self.budget.measured(it)
        with _StopSignal() as stop:
            try:
                if self.pending_validation:  # the run stopped during this validation
                    self._validate(it)
                    self._save_last(it, next_position)
                    self.window_time = time.perf_counter()
                while it < self.schedule.horizon:
                    images, masks, paths = next_batch(self.batches, it + 1, self.output_dir / "last.pt",
                                                       self.resume_command)
                    _, epoch, offset, _ = next(positions)
                    it, next_position = it + 1, (epoch, offset + 1)
                    self._step(it, images, masks, paths)
                    self.bar.update(1)

                    done = it >= self.schedule.horizon
                    validate_now = tc.val_every > 0 and (it % tc.val_every == 0 or done)
                    checkpoint_now = it % tc.checkpoint_every == 0 or done or validate_now
                    # The ranks agree on stopping at log steps and checkpoints only (a signal reaches
                    # them at different steps); a single process reacts to a signal at once.
                    stopping = False
                    if it % tc.log_every == 0 or checkpoint_now or (stop.received and not info.distributed):
                        # also the non-finite check: nothing is saved after a bad step
                        stopping = self._sync(it, stop.received is not None, final=done)
                        if it >= self.schedule.horizon and not done:  # the time budget ran out here
                            done = True
                            validate_now, checkpoint_now = tc.val_every > 0, True
                    # Saved before validating, so a validation that fails (a bad val image, out of
                    # memory, a kill) loses no training: that last.pt says the validation is still
                    # due, and a run resumed from it validates first. Saved again once validated.
                    if checkpoint_now or stopping:
                        self._save_last(it, next_position, pending_validation=validate_now)
                    if validate_now:
                        try:
                            self._validate(it)
                        except SceneparseError as err:  # a bad val image, say: say that nothing is lost
                            raise SceneparseError(
                                err.message, f"{err.hint + '; ' if err.hint else ''}the training up to iteration "
                                f"{it} is saved: once fixed, `{self.resume_command}` validates, then goes on",
                            ) from None
                        self._save_last(it, next_position)
                    if validate_now or checkpoint_now:
                        self.window_time = time.perf_counter()  # the speed measures training steps only
                    if stopping and not done:
                        self._interrupted(it, stop.received)
            finally:
                self.bar.close()
                if self.logger is not None:
                    self.logger.close()
        return self._finish(it)

    def _step(self, it: int, images: torch.Tensor, masks: torch.Tensor, paths: list[str]) -> None:
        """Forward, backward, optimizer and scheduler; the loss stays on the device."""
        tc = self.cfg.train
        if tc.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(tc.amp, self.info.device):
            loss = segmentation_loss(self.model(images), masks, self.criterion, tc.deepsup_weight, tc.se_weight)
        self.step_lrs = self._rates()
        self.optimizer.zero_grad(set_to_none=True)
        if tc.on_nonfinite == "skip" and _skip_step(loss):  # a sync per step, by request
            self.skipped += 1
            self.scheduler.step()
            if not torch.isfinite(loss):  # the rank(s) that read the bad batch name it
                self.bar.write(f"iteration {it}: non-finite loss, batch skipped"
                               + (f" (rank {self.info.rank})" if self.info.distributed else "")
                               + f": {', '.join(paths)}", file=sys.stderr)
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.window.append(loss.detach())
        self.window_steps.append((it, list(paths)))

    def _sync(self, iteration: int, stop_requested: bool, final: bool = False) -> bool:
        """Where the ranks agree, once per log window: one all-reduce and one host sync.

        Sums every rank's losses, counts the ranks whose loss was not finite at each step, the
        ranks asked to stop, and (time budget) the clock. A non-finite loss anywhere raises on
        every rank; the logged loss is the mean over steps and ranks. Returns whether all ranks
        now stop. `final`: the loop is at the schedule's end, which then stays where it is (the
        run validates and saves there once).
        """
        device, world, budget = self.info.device, self.info.world_size, self.budget
        losses = torch.stack(self.window).float() if self.window else torch.zeros(0, device=device)
        finite = torch.isfinite(losses)
        clock = [budget.elapsed(), budget.steps_per_s] if budget is not None else [0.0, 0.0]
        packed = torch.cat([torch.where(finite, losses, torch.zeros_like(losses)), (~finite).float(),
                            torch.tensor([float(stop_requested)] + clock, device=device)])
        packed = dist_utils.all_reduce_(packed).cpu()
        k = len(self.window)
        loss_sums, bad_ranks, stop_votes = packed[:k], packed[k : 2 * k], packed[2 * k]
        if bad_ranks.any():
            raise self._nonfinite_error(int(bad_ranks.nonzero()[0]), losses.cpu())
        elapsed = time.perf_counter() - self.window_time  # the GPU has caught up (.cpu() above)
        if budget is not None and not final:
            # Every rank computes the horizon from the same (rank-averaged) numbers.
            mean_elapsed, mean_speed = (packed[2 * k + 1 :] / world).tolist()
            self.schedule.horizon = budget.horizon(iteration, self.cfg.train.iterations, mean_elapsed, mean_speed)
            self.bar.total = self.schedule.horizon
            budget.measured(iteration)
        if k:
            lrs = self.step_lrs
            record = {"iter": iteration, "loss": loss_sums.sum().item() / (k * world),
                      "lr": lrs[-1], "lr_encoder": lrs[0],
                      "img_per_s": k * self.cfg.data.batch_size * world / max(elapsed, 1e-9),
                      "skipped": self.skipped}
            if budget is not None:
                record["end_iter"] = self.schedule.horizon
            if self.logger is not None:
                self.logger.log(record)
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                     img_s=f"{record['img_per_s']:.1f}")
        self.window.clear()
        self.window_steps.clear()
        self.window_time = time.perf_counter()
        return bool(stop_votes > 0)

    def _nonfinite_error(self, i: int, local_losses: torch.Tensor) -> NonFiniteLoss:
        """Step i of the window went bad on some rank: name that rank's value and images everywhere."""
        iteration_bad, paths = self.window_steps[i]
        value = local_losses[i].item()
        reports = dist_utils.all_gather_object(None if math.isfinite(value) else (value, paths))
        rank = next(r for r, report in enumerate(reports) if report is not None)
        value, paths = reports[rank]
        where = f" (rank {rank})" if self.info.distributed else ""
        last = self.output_dir / "last.pt"
        return NonFiniteLoss(
            f"training loss became {value} at iteration {iteration_bad} on images: {', '.join(paths)}{where}",
            "lower the learning rate, check those files, or set train.on_nonfinite=skip; "
            + (f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was saved before it"),
        )

    def _validate(self, iteration: int) -> None:
        """Distributed evaluation (each rank a share of the images, confusion matrices summed):
        every rank gets the same metrics, so `best_miou` agrees everywhere."""
        from sceneparse.engine.evaluate import evaluate

        cfg, dc = self.cfg, self.cfg.data
        dist_utils.broadcast_buffers(self.model)  # every rank evaluates the model rank 0 saves
        core = dist_utils.unwrap(self.model)  # evaluate() switches to eval mode and back
        # The random state is left as it was (a DataLoader draws its workers' seeds from it): the
        # last.pt saved before this validation then resumes exactly as a run that validated.
        cuda = [self.info.device] if self.info.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            metrics = evaluate(core, self.val_set, device=self.info.device, scales=list(cfg.eval.scales),
                               flip=cfg.eval.flip, max_size=cfg.eval.max_size, mean=list(dc.mean),
                               std=list(dc.std), num_workers=dc.num_workers,
                               progress=self.info.is_main)  # a long validation must not look like a hang
        self.last_metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.validated_iter = iteration
        improved = metrics["mean_iou"] > self.best_miou
        self.best_miou = max(self.best_miou, metrics["mean_iou"])
        if self.logger is not None:
            self.logger.log({"iter": iteration, "val_miou": metrics["mean_iou"],
                             "val_pixel_accuracy": metrics["pixel_accuracy"], "val_score": metrics["score"]})
            self.bar.write(f"iteration {iteration}: val mIoU {metrics['mean_iou']:.4f}, "
                           f"pixel accuracy {metrics['pixel_accuracy']:.4f}")
            if improved:
                save_model(self.output_dir / "best.pt", self.model, self.class_names, self.palette,
                           self.normalization)

    def _save_last(self, iteration: int, next_position, pending_validation: bool = False) -> None:
        """`last.pt` with the training state; every rank calls this (its RNG state is gathered) and
        returns once rank 0 has written the file. A rank that went on (to stop, say) could exit
        first, and torchrun would then kill rank 0 in the middle of the write.
        `pending_validation`: the validation of `iteration` is still to run (a resumed run runs it)."""
        rng_states = dist_utils.all_gather_object(rng_state())
        dist_utils.run_on_main(lambda: self._write_last(iteration, next_position, rng_states, pending_validation),
                               self.info)

    def _write_last(self, iteration: int, next_position, rng_states: list, pending_validation: bool) -> None:
        state = {
            "iteration": iteration, "data_position": list(next_position), "pending_validation": pending_validation,
            "validated_iter": self.validated_iter,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "best_miou": self.best_miou, "skipped": self.skipped,
            "rng": rng_states[0], "rng_per_rank": rng_states, "config": OmegaConf.to_container(self.cfg),
            "elapsed_s": time.perf_counter() - self.started,
            "time_budget": self.budget.state() if self.budget is not None else None,
        }
        save_model(self.output_dir / "last.pt", self.model, self.class_names, self.palette,
                   self.normalization, state)

    def _interrupted(self, it: int, reason: str | None):
        self.bar.close()
        message = (f"{reason or 'stop signal on another process'} received: stopped after iteration {it}, saved "
                   f"{self.output_dir / 'last.pt'}.\nResume with:\n  {self.resume_command}")
        if self.info.is_main:
            print(message, file=sys.stderr)
        raise TrainingInterrupted(message, reason)

    def _finish(self, it: int) -> dict:
        from sceneparse.engine.visualize import save_curves_png

        out, validated = self.output_dir, self.best_miou > float("-inf")
        result = {
            "output_dir": str(out), "last": str(out / "last.pt"), "iterations": it,
            "best": str(out / "best.pt") if validated else None,
            "metrics": self.last_metrics, "best_miou": self.best_miou if validated else None,
            "skipped": self.skipped, "curves": None, "rank": self.info.rank,
        }
        if self.info.is_main:
            result["curves"] = str(save_curves_png(self.logger.records(), out / "curves.png"))
            print(f"training done: {it} iterations; outputs in {out}"
                  + (f" (best mIoU {self.best_miou:.4f})" if validated else ""), file=sys.stderr)
        return result


def _check_batch_of_one(cfg: DictConfig, info) -> None:
    """BatchNorm needs more than one value per channel in training: a branch that pools to 1x1
    (PPM's and UPerNet's scale 1, ASPP's image pooling) gets one per image, so one image per
    process fails at the first step (unless SyncBatchNorm pools the GPUs' statistics). Each
    decoder class says whether it pools so (`pools_to_1x1(options)`); an unknown name is left to
    build_model's error."""
    from sceneparse.models.decoders import DECODERS

    decoder = DECODERS.get(cfg.model.decoder)
    pooled = decoder is not None and decoder.pools_to_1x1(cfg.model.decoder_options)
    synced = info.device.type == "cuda" and info.world_size > 1
    if cfg.data.batch_size == 1 and pooled and not synced:
        unpooled = ", ".join(name for name, cls in DECODERS.items() if not cls.pools_to_1x1({}))
        raise SceneparseError(
            f"data.batch_size=1 cannot train the {cfg.model.decoder} decoder: its 1x1 pooling branch "
            "leaves BatchNorm one value per channel",
            f"use data.batch_size=2 or more (per process), or a decoder without pooling ({unpooled})",
        )


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _skip_step(loss: torch.Tensor) -> bool:
    """train.on_nonfinite=skip: whether any rank's loss is not finite. All ranks must agree
    before the backward pass: DDP's backward is itself a collective, and a rank that skipped it
    would leave the others waiting for its gradients."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    return bool(dist_utils.all_reduce_(bad).item() > 0)

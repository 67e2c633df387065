"""The training loop: `train(cfg) -> dict`, also `sceneparse train CONFIG [key=value ...]`.

CSAIL's recipe: SGD with momentum, poly learning rate (power 0.9, optional linear warmup),
separate encoder/decoder learning rates, no weight decay on norms and biases, cross-entropy that
ignores IGNORE_INDEX pixels plus 0.4 x the deep-supervision (auxiliary) loss.

Reproducible and resumable: batch `i` is a pure function of (seed, i) - which images
(`TrainBatches`) and their augmentations (`SeededDataset` seeds every RNG per sample) - so a run
resumed from `last.pt` sees exactly the batches the uninterrupted run would have, whatever the
number of DataLoader workers. Checkpoints hold the optimizer, scheduler, grad scaler, data
position and RNG states as well as the weights.
"""
from __future__ import annotations

import contextlib
import functools
import math
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sceneparse.engine import distributed as dist_utils
from sceneparse.engine.checkpoint import load_checkpoint, rng_state, save_model, set_rng_state
from sceneparse.engine.config import dataset_settings, save_config
from sceneparse.engine.logger import RunLogger
from sceneparse.engine.optim import build_optimizer
from sceneparse.errors import SceneparseError

# What a previous run leaves in its output folder (an existing one is refused without --overwrite).
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "curves.png", "tb")


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM: the current step finished, `last.pt` was saved; `str()` says how to resume."""


# --------------------------------------------------------------------------- reproducible data
class SeededDataset(torch.utils.data.Dataset):
    """`dataset[(index, seed)]`: the sample with torch, `random` and numpy seeded by `seed`.

    The caller's RNG states are left as they were, so with num_workers=0 the training process's
    own random stream (dropout, ...) does not depend on the data pipeline.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        key, seed = item  # key: an index, or (index, short_side) from AspectRatioBatchSampler
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed)
                return self.dataset[key]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class TrainBatches(torch.utils.data.Sampler):
    """Batch sampler over iterations `start_iter..iterations`, starting at data position `start`.

    `epoch_batches(e)` is epoch e's list of index batches (deterministic in e). Each yielded batch
    is a list of `(index, seed)` pairs for `SeededDataset`; the seed depends on (seed, rank,
    iteration, slot) only. `walk()` replays the same sequence with its (epoch, offset) positions.
    """

    def __init__(self, epoch_batches: Callable[[int], list[list[int]]], seed: int, iterations: int,
                 start_iter: int = 0, start: tuple[int, int] = (0, 0), rank: int = 0):
        self.epoch_batches = epoch_batches
        self.seed, self.rank = seed, rank
        self.iterations, self.start_iter, self.start = iterations, start_iter, tuple(start)

    def walk(self):
        epoch, offset = self.start
        it = self.start_iter
        while it < self.iterations:
            batches = self.epoch_batches(epoch)
            if not batches:
                raise SceneparseError("the training set is smaller than one batch", "lower data.batch_size")
            while offset < len(batches) and it < self.iterations:
                yield it, epoch, offset, batches[offset]
                offset += 1
                it += 1
            epoch, offset = epoch + 1, 0

    def __iter__(self):
        for it, _, _, batch in self.walk():
            yield [(index, dist_utils.mix_seed(self.seed, self.rank, it, slot)) for slot, index in enumerate(batch)]

    def __len__(self) -> int:
        return self.iterations - self.start_iter


def train_transform_options(data_cfg) -> dict:
    """DataConfig -> `build_train_transforms` options: CSAIL short-side resize, or scale + crop."""
    jitter = data_cfg.color_jitter or None
    if data_cfg.crop_size:
        return {"scales": None, "scale_range": list(data_cfg.scale_range), "crop": data_cfg.crop_size,
                "flip": data_cfg.flip, "jitter": jitter}
    return {"scales": list(data_cfg.scales), "max_size": data_cfg.max_size, "flip": data_cfg.flip,
            "jitter": jitter}


def epoch_batches_fn(dataset, data_cfg, seed: int, info) -> Callable[[int], list[list]]:
    """Epoch -> this rank's batches, a pure function of (seed, epoch).

    `aspect`: CSAIL's grouping of landscape/portrait images, one short side drawn per batch
    (items are `(index, short_side)`); `crop`: a plain shuffle (fixed-size crops need no grouping).
    """
    from sceneparse.data.samplers import AspectRatioBatchSampler

    if data_cfg.batching == "aspect":
        sampler = AspectRatioBatchSampler(
            dataset.image_sizes(), data_cfg.batch_size, seed=seed, num_replicas=info.world_size,
            rank=info.rank, scales=None if data_cfg.crop_size else list(data_cfg.scales),
        )
        return functools.lru_cache(maxsize=2)(sampler.batches)

    @functools.lru_cache(maxsize=2)
    def batches(epoch: int) -> list[list[int]]:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(dist_utils.mix_seed(seed, epoch)))
        b = data_cfg.batch_size
        all_batches = [order[i : i + b].tolist() for i in range(0, len(order) - b + 1, b)]
        # Same order on every rank; each takes every world_size-th batch (equal counts).
        per_rank = len(all_batches) // info.world_size
        return all_batches[info.rank :: info.world_size][:per_rank]

    return batches


# --------------------------------------------------------------------------- feeding the loop
def training_feed(train_set, sampler: TrainBatches, data_cfg, device: torch.device, num_classes: int):
    """Yields `(images, masks, paths)` for each step: on `device`, images normalised float32,
    masks int64. How, by `data.augment_on` and `data.cache_in_memory`:

    - workers: DataLoader workers decode and augment; uint8 batches travel through pinned memory
      with non-blocking copies, normalised on the device.
    - device: workers only decode; the batch is augmented on the device (`DeviceAugment`).
    - device + cache_in_memory: the whole training set sits on the device; no workers at all.
    """
    from sceneparse.data import IGNORE_INDEX
    from sceneparse.data.device_augment import DeviceAugment
    from sceneparse.data.transforms import collate_pad, normalize

    dc = data_cfg
    # uint8 masks: 8x less to copy; class ids must then stay below IGNORE_INDEX (255).
    mask_dtype = torch.uint8 if num_classes < IGNORE_INDEX else torch.int64
    augment = None
    if dc.augment_on == "device":
        augment = DeviceAugment(dc.crop_size, dc.scale_range, dc.flip, dc.color_jitter, dc.mean, dc.std)
        if dc.cache_in_memory:
            yield from _device_resident_feed(train_set, sampler, augment, device, mask_dtype)
            return
    loader = torch.utils.data.DataLoader(
        SeededDataset(train_set), batch_sampler=sampler,
        collate_fn=functools.partial(collate_pad, mask_dtype=mask_dtype),
        num_workers=dc.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=dc.num_workers > 0 and len(sampler) > 0,
        generator=torch.Generator(),  # keeps the DataLoader from drawing on the global RNG
    )
    # On the device once: a list would be copied from pageable memory every step (a host sync).
    mean, std = (torch.tensor(list(v), dtype=torch.float32, device=device) for v in (dc.mean, dc.std))
    seeds = iter(sampler)  # the same (index, seed) pairs the loader's workers receive, in order
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True)
        pairs = next(seeds)
        if augment is not None:
            images, masks = augment(images, masks, batch["sizes"], [seed for _, seed in pairs])
        else:
            images, masks = normalize(images, mean, std), masks.long()
        yield images, masks, batch["paths"]


def _device_resident_feed(train_set, sampler, augment, device, mask_dtype):
    """The training set decoded once (from the RAM cache), padded into one uint8 tensor on the
    device; each step gathers its rows and augments them there."""
    from sceneparse.data.transforms import collate_pad

    everything = collate_pad([train_set[i] for i in range(len(train_set))], mask_dtype=mask_dtype)
    images, masks = everything["image"].to(device), everything["mask"].to(device)
    sizes, paths = everything["sizes"], everything["paths"]
    for pairs in sampler:
        rows = [index for index, _ in pairs]
        picked = torch.tensor(rows)
        if device.type == "cuda":  # pinned + non-blocking: no wait for the GPU's queue
            picked = picked.pin_memory()
        picked = picked.to(device, non_blocking=True)
        batch_images, batch_masks = augment(images[picked], masks[picked], [sizes[r] for r in rows],
                                            [seed for _, seed in pairs])
        yield batch_images, batch_masks, [paths[r] for r in rows]


class TimeBudget:
    """`train.time_budget_s`: the poly schedule's end fitted to the clock.

    At each sync point the ranks agree (through the all-reduce they already do) on the elapsed
    time and the steps per second of the previous log window, validation and checkpoint time
    left out; the schedule's horizon becomes the iteration the run will reach when the time is
    up, capped at `train.iterations`. Once the time is up the horizon is the current iteration:
    the run validates, saves and ends there. The speed is the average over all windows but the
    first, whose warm-up (cudnn.benchmark, compilation) would make the horizon start low.
    """

    def __init__(self, budget_s: float, start: float):
        self.budget_s = float(budget_s)
        self.start = start  # time.perf_counter() when the run began (earlier runs' time subtracted)
        self.steps_per_s = 0.0  # measured after each sync, sent with the next one
        self._windows, self._steps, self._seconds = 0, 0, 0.0

    def measured(self, steps: int, seconds: float) -> None:
        """A log window of `steps` training steps took `seconds`."""
        self._windows += 1
        if self._windows == 1:  # warm-up: only until a second window is measured
            self.steps_per_s = steps / max(seconds, 1e-9)
            return
        self._steps, self._seconds = self._steps + steps, self._seconds + seconds
        self.steps_per_s = self._steps / max(self._seconds, 1e-9)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def horizon(self, iteration: int, cap: int, elapsed: float, steps_per_s: float) -> int:
        remaining = max(0.0, self.budget_s - elapsed)
        if steps_per_s <= 0:  # no speed measured yet: keep the cap until there is one
            return cap if remaining > 0 else iteration
        return int(min(cap, iteration + math.floor(remaining * steps_per_s)))


# --------------------------------------------------------------------------- set-up helpers
def prepare_output(output_dir: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse to mix two runs in one folder; make sure we can write there before training."""
    previous = [name for name in RUN_FILES if (output_dir / name).exists()]
    if previous and not (overwrite or resuming):
        raise SceneparseError(
            f"output folder {output_dir} already holds a run ({', '.join(previous)})",
            "continue it with --resume, start over with --overwrite, or set output_dir=OTHER_FOLDER",
        )
    if previous and overwrite and not resuming:
        for name in previous:
            target = output_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write_test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise SceneparseError(
            f"cannot write to output folder {output_dir}: {err.strerror or err}",
            "choose a writable output_dir",
        ) from None


def _data_error_message(err: BaseException) -> str:
    """The useful line of a (possibly DataLoader-worker re-raised) exception: the original error."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if "Original Traceback" in str(err):
        # The re-raised text ends with "<Type>: <message>" (and maybe a "fix:" line): keep those.
        for i in range(len(lines) - 1, -1, -1):
            if not lines[i].startswith(" ") and ": " in lines[i]:
                return "\n".join(lines[i:])
    return "\n".join(lines) or type(err).__name__


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
    """Cross-entropy ignoring IGNORE_INDEX; `raw_train_set()` (untransformed) only for class_weights=auto."""
    from sceneparse.data import IGNORE_INDEX

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
    if weights is not None:
        weights = weights.to(device)
    return nn.CrossEntropyLoss(weight=weights, ignore_index=IGNORE_INDEX)


def segmentation_loss(output, masks: torch.Tensor, criterion: nn.Module, deepsup_weight: float) -> torch.Tensor:
    """Main loss, plus `deepsup_weight` x the auxiliary head's loss for deep-supervision models."""
    if hasattr(output, "aux"):  # SegmenterOutput(logits, aux)
        return criterion(output.logits, masks) + deepsup_weight * criterion(output.aux, masks)
    return criterion(output, masks)


def _autocast(amp: str, device: torch.device):
    # bf16/fp16 autocast only on CUDA: CPU autocast is slow for convolutions and rarely what's wanted.
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def wrap_model(model: nn.Module, cfg: DictConfig, info) -> nn.Module:
    """Device, memory format, DDP (when launched with torchrun) and torch.compile: one place."""
    model = dist_utils.wrap_model(model, info)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
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


def _resume_command(output_dir: Path) -> str:
    return f"sceneparse train {output_dir / 'config.yaml'} --resume {output_dir / 'last.pt'}"


def build_data(cfg: DictConfig, data_settings: dict, verbose: bool = True):
    """Train and val datasets and the class count; a broken dataset is refused before any training."""
    from sceneparse.data import build_dataset
    from sceneparse.data.check import ERROR, quick_check
    from sceneparse.data.transforms import build_train_transforms

    dc = cfg.data
    # augment_on=device: the dataset yields decoded images; DeviceAugment does the rest, batched.
    transforms = None if dc.augment_on == "device" else build_train_transforms(train_transform_options(dc))
    train_set = build_dataset(data_settings, dc.train_split, transforms)
    val_set = build_dataset(data_settings, dc.val_split, None)
    for split_name, dataset in ((dc.train_split, train_set), (dc.val_split, val_set)):
        problems = quick_check(dataset)
        errors = [p for p in problems if p.severity == ERROR]
        if errors:
            raise SceneparseError(
                f"the {split_name} data has problems:\n  - " + "\n  - ".join(map(str, errors[:20]))
                + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""),
                "fix the files, or run `sceneparse data check` for a full report",
            )
        if verbose and problems:
            print("data warnings:\n  - " + "\n  - ".join(map(str, problems)), file=sys.stderr)
    num_classes = cfg.model.num_classes or train_set.num_classes
    if num_classes != train_set.num_classes:
        raise SceneparseError(
            f"model.num_classes={num_classes} but the {dc.kind} dataset has {train_set.num_classes} classes",
            "remove model.num_classes (it is taken from the dataset) or fix the dataset's classes",
        )
    return train_set, val_set, num_classes


def next_batch(batches, iteration: int, output_dir: Path) -> dict:
    """The next batch; a dataset file that vanished or broke mid-run becomes a clear error."""
    try:
        return next(batches)
    except (OSError, SceneparseError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "Original Traceback" not in str(err):
            raise  # a bug, not a data problem (worker errors are re-raised with "Original Traceback")
        raise SceneparseError(
            f"reading training data failed at iteration {iteration}: {_data_error_message(err)}",
            f"restore the dataset files, then resume: {_resume_command(output_dir)}",
        ) from None


def run_on_main(fn: Callable[[], object], info) -> None:
    """Run `fn` on rank 0 alone; if it fails, every rank raises (none is left waiting for it).

    A user error reaches every rank as the same SceneparseError; any other exception is re-raised
    on rank 0 and reported on the others as a pointer to rank 0's traceback."""
    problem, error = None, None
    if info.is_main:
        try:
            fn()
        except SceneparseError as err:
            problem = (err.message, err.hint)
        except Exception as err:  # noqa: BLE001 - re-raised below, after the others are told
            problem, error = (f"rank 0 failed ({type(err).__name__}: {err}); see its traceback", None), err
    problem = dist_utils.broadcast_object(problem)
    if error is not None:
        raise error
    if problem is not None:
        raise SceneparseError(*problem)


def train(cfg: DictConfig, resume: str | Path | bool | None = None) -> dict:
    """Train as `cfg` says; `resume=True` continues from OUTPUT/last.pt, a path from that file.

    Under torchrun every rank calls this; a process group this call starts is destroyed when it
    returns or fails (one set up by the caller is left to the caller).
    Returns {"output_dir", "last", "best", "curves", "iterations", "metrics" (last validation),
    "best_miou", "skipped", "rank"}.
    """
    owns_group = not dist_utils.is_initialized()
    info = dist_utils.init_from_env(cfg.train.device)
    try:
        return _train(cfg, resume, info)
    finally:
        if owns_group:
            dist_utils.cleanup()


def _train(cfg: DictConfig, resume, info) -> dict:
    from sceneparse.data import build_dataset
    from sceneparse.engine.evaluate import evaluate
    from sceneparse.engine.visualize import save_curves_png
    from sceneparse.models import build_model
    from sceneparse.models.pretrained import load_encoder_weights

    started = time.perf_counter()  # train.time_budget_s counts from here
    tc, dc = cfg.train, cfg.data
    device, is_main = info.device, info.is_main
    output_dir = Path(cfg.output_dir)
    resume_path = (output_dir / "last.pt") if resume is True else (Path(resume) if resume else None)
    # Rank 0 checks/clears the folder while the others wait; then all of them fail alike or go on.
    run_on_main(lambda: prepare_output(output_dir, cfg.overwrite, resume_path is not None), info)
    ckpt = load_checkpoint(resume_path) if resume_path is not None else None
    if ckpt is not None and "train_state" not in ckpt:
        raise SceneparseError(
            f"{resume_path} holds weights only (no training state) and cannot be resumed",
            "resume from the run's last.pt, or start a new run from these weights",
        )

    data_settings = dataset_settings(dc)
    train_set, val_set, num_classes = build_data(cfg, data_settings, verbose=is_main)
    if ckpt is not None and len(ckpt["class_names"]) != num_classes:
        raise SceneparseError(
            f"{resume_path} was trained for {len(ckpt['class_names'])} classes, "
            f"this config/dataset has {num_classes}",
            "resume with the config the checkpoint was trained with",
        )

    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_model(cfg.model.encoder, cfg.model.decoder, num_classes,
                        encoder_options=OmegaConf.to_container(cfg.model.encoder_options),
                        decoder_options=OmegaConf.to_container(cfg.model.decoder_options))
    if cfg.model.encoder_weights and ckpt is None:
        # Rank 0 alone reads (and maybe downloads) the weights: DDP then copies its model to every
        # rank, and concurrent downloads into one cache file would clash. A bad file fails all ranks.
        run_on_main(lambda: load_encoder_weights(model.encoder, cfg.model.encoder_weights), info)
    optimizer, scheduler = build_optimizer(model, tc, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=tc.amp == "fp16" and device.type == "cuda")
    criterion = build_criterion(cfg, lambda: build_dataset({**data_settings, "cache_in_memory": False}, dc.train_split, None), num_classes, device)

    start_iter, position, best_miou, skipped = 0, (0, 0), float("-inf"), 0
    if ckpt is not None:
        if ckpt["model"]["config"] != dict(model.config):
            raise SceneparseError(
                f"{resume_path} holds a different model ({ckpt['model']['config']}) than the config "
                f"({dict(model.config)})",
                "resume with the config the checkpoint was trained with",
            )
        model.load_state_dict(ckpt["model"]["state_dict"])
    model = wrap_model(model, cfg, info)
    if info.distributed:
        # DDP has copied rank 0's initial weights everywhere; from here on each rank draws its
        # own random numbers (dropout), else every rank would drop the same units.
        rank_seed = dist_utils.rank_seed(tc.seed, info.rank)
        torch.manual_seed(rank_seed)
        random.seed(rank_seed)
        np.random.seed(rank_seed)
    if ckpt is not None:
        state = ckpt["train_state"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_iter, position = state["iteration"], tuple(state["data_position"])
        best_miou, skipped = state["best_miou"], state["skipped"]
        started -= state.get("elapsed_s", 0.0)
        # Each rank's own RNG streams (dropout draws differ per rank); rank 0's when the process
        # count changed or the checkpoint predates per-rank states.
        per_rank = state.get("rng_per_rank") or []
        set_rng_state(per_rank[info.rank] if len(per_rank) == info.world_size else state["rng"])
    if is_main:
        save_config(cfg, output_dir / "config.yaml")

    sampler = TrainBatches(epoch_batches_fn(train_set, dc, tc.seed, info), tc.seed, tc.iterations,
                           start_iter, position, info.rank)
    schedule = scheduler.lr_lambdas[0]  # the PolySchedule every parameter group shares
    schedule.__init__(tc.iterations, tc.poly_power, tc.warmup_iters)  # resumed: the config's schedule
    budget = TimeBudget(tc.time_budget_s, started) if tc.time_budget_s else None
    if budget is not None and ckpt is not None:  # no steps at all if the time is already spent
        spent = ckpt["train_state"].get("elapsed_s", 0.0)  # the same number on every rank
        schedule.horizon = budget.horizon(start_iter, tc.iterations, spent, 0.0)
    class_names, palette = list(train_set.class_names), [list(c) for c in train_set.palette]
    normalization = {"mean": list(dc.mean), "std": list(dc.std)}
    logger = RunLogger(output_dir, resume_from=start_iter if ckpt is not None else None) if is_main else None

    def save_last(iteration: int, next_position) -> None:
        """`last.pt` with the training state; every rank calls this (its RNG state is gathered)."""
        rng_states = dist_utils.all_gather_object(rng_state())
        if not is_main:
            return
        state = {
            "iteration": iteration, "data_position": list(next_position),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "best_miou": best_miou, "skipped": skipped,
            "rng": rng_states[0], "rng_per_rank": rng_states, "config": OmegaConf.to_container(cfg),
            "elapsed_s": time.perf_counter() - started,
        }
        save_model(output_dir / "last.pt", model, class_names, palette, normalization, state)

    window: list[torch.Tensor] = []  # this log window's per-step losses, on the device
    window_steps: list[tuple[int, list[str]]] = []  # (iteration, image paths) of each
    window_time = time.perf_counter()
    step_lrs = scheduler.get_last_lr()  # the learning rates the latest step used

    def sync(iteration: int, stop_requested: bool) -> bool:
        """Where the ranks agree, once per log window: one all-reduce and one host sync.

        Sums every rank's losses, counts the ranks whose loss was not finite at each step, and
        the ranks asked to stop. A non-finite loss anywhere raises on every rank; the logged
        loss is the mean over steps and ranks. Returns whether all ranks now stop.
        """
        nonlocal window_time
        losses = torch.stack(window).float() if window else torch.zeros(0, device=device)
        finite = torch.isfinite(losses)
        clock = [budget.elapsed(), budget.steps_per_s] if budget is not None else [0.0, 0.0]
        packed = torch.cat([torch.where(finite, losses, torch.zeros_like(losses)), (~finite).float(),
                            torch.tensor([float(stop_requested)] + clock, device=device)])
        packed = dist_utils.all_reduce_(packed).cpu()
        k = len(window)
        loss_sums, bad_ranks, stop_votes = packed[:k], packed[k : 2 * k], packed[2 * k]
        if bad_ranks.any():
            raise nonfinite_error(int(bad_ranks.nonzero()[0]), losses.cpu())
        elapsed = time.perf_counter() - window_time  # the GPU has caught up (.cpu() above)
        if budget is not None:
            # Every rank computes the horizon from the same (rank-averaged) numbers.
            mean_elapsed, mean_speed = (packed[2 * k + 1 :] / info.world_size).tolist()
            schedule.horizon = budget.horizon(iteration, tc.iterations, mean_elapsed, mean_speed)
            bar.total = schedule.horizon
            if k:
                budget.measured(k, elapsed)
        if k:
            lrs = step_lrs
            record = {"iter": iteration, "loss": loss_sums.sum().item() / (k * info.world_size),
                      "lr": lrs[-1], "lr_encoder": lrs[0],
                      "img_per_s": k * dc.batch_size * info.world_size / max(elapsed, 1e-9), "skipped": skipped}
            if budget is not None:
                record["end_iter"] = schedule.horizon
            if logger is not None:
                logger.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                img_s=f"{record['img_per_s']:.1f}")
        window.clear()
        window_steps.clear()
        window_time = time.perf_counter()
        return bool(stop_votes > 0)

    def nonfinite_error(i: int, local_losses: torch.Tensor) -> NonFiniteLoss:
        """Step i of the window went bad on some rank: name that rank's value and images everywhere."""
        iteration_bad, paths = window_steps[i]
        value = local_losses[i].item()
        reports = dist_utils.all_gather_object(None if math.isfinite(value) else (value, paths))
        rank = next(r for r, report in enumerate(reports) if report is not None)
        value, paths = reports[rank]
        where = f" (rank {rank})" if info.distributed else ""
        return NonFiniteLoss(
            f"training loss became {value} at iteration {iteration_bad} on images: {', '.join(paths)}{where}",
            "lower the learning rate, check those files, or set train.on_nonfinite=skip; "
            f"the last good checkpoint is {output_dir / 'last.pt'}",
        )

    last_metrics: dict = {}

    def validate(iteration: int) -> None:
        """Distributed evaluation (each rank a share of the images, confusion matrices summed):
        every rank gets the same metrics, so `best_miou` agrees everywhere."""
        nonlocal best_miou, last_metrics
        dist_utils.broadcast_buffers(model)  # every rank evaluates the model rank 0 saves
        core = dist_utils.unwrap(model)  # evaluate() switches to eval mode and back
        metrics = evaluate(core, val_set, device=device, scales=list(cfg.eval.scales), flip=cfg.eval.flip,
                           max_size=cfg.eval.max_size, mean=list(dc.mean), std=list(dc.std),
                           num_workers=dc.num_workers)
        last_metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        improved = metrics["mean_iou"] > best_miou
        best_miou = max(best_miou, metrics["mean_iou"])
        if logger is not None:
            logger.log({"iter": iteration, "val_miou": metrics["mean_iou"],
                        "val_pixel_accuracy": metrics["pixel_accuracy"], "val_score": metrics["score"]})
            bar.write(f"iteration {iteration}: val mIoU {metrics['mean_iou']:.4f}, "
                      f"pixel accuracy {metrics['pixel_accuracy']:.4f}")
            if improved:
                save_model(output_dir / "best.pt", model, class_names, palette, normalization)

    from tqdm import tqdm

    bar = tqdm(total=tc.iterations, initial=start_iter, disable=not is_main, desc="train",
               dynamic_ncols=True, file=sys.stderr)
    model.train()
    it, next_position = start_iter, position
    positions = sampler.walk()
    batches = training_feed(train_set, sampler, dc, device, num_classes)
    autocast = _autocast(tc.amp, device)
    with _StopSignal() as stop:
        try:
            while it < schedule.horizon:
                images, masks, paths = next_batch(batches, it + 1, output_dir)
                _, epoch, offset, _ = next(positions)
                it, next_position = it + 1, (epoch, offset + 1)
                if tc.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast:
                    loss = segmentation_loss(model(images), masks, criterion, tc.deepsup_weight)
                step_lrs = scheduler.get_last_lr()
                if tc.on_nonfinite == "skip" and _skip_step(loss):  # a sync per step, by request
                    skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    if not torch.isfinite(loss):  # the rank(s) that read the bad batch name it
                        bar.write(f"iteration {it}: non-finite loss, batch skipped"
                                  + (f" (rank {info.rank})" if info.distributed else "")
                                  + f": {', '.join(paths)}", file=sys.stderr)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    window.append(loss.detach())
                    window_steps.append((it, list(paths)))
                bar.update(1)

                done = it >= schedule.horizon
                validate_now = tc.val_every > 0 and (it % tc.val_every == 0 or done)
                checkpoint_now = it % tc.checkpoint_every == 0 or done or validate_now
                # The ranks agree on stopping at log steps and checkpoints only (a signal reaches
                # them at different steps); a single process reacts to a signal at once.
                stopping = False
                if it % tc.log_every == 0 or checkpoint_now or (stop.received and not info.distributed):
                    # also the non-finite check: nothing is saved after a bad step
                    stopping = sync(it, stop.received is not None)
                    if it >= schedule.horizon and not done:  # the time budget ran out here
                        done = True
                        validate_now, checkpoint_now = tc.val_every > 0, True
                if validate_now:
                    validate(it)
                if checkpoint_now or stopping:
                    save_last(it, next_position)
                if validate_now or checkpoint_now:
                    window_time = time.perf_counter()  # the speed measures training steps only
                if stopping and not done:
                    bar.close()
                    reason = stop.received or "stop signal on another process"
                    message = (f"{reason} received: stopped after iteration {it}, saved "
                               f"{output_dir / 'last.pt'}.\nResume with:\n  {_resume_command(output_dir)}")
                    if is_main:
                        print(message, file=sys.stderr)
                    raise TrainingInterrupted(message)
        finally:
            bar.close()
            if logger is not None:
                logger.close()

    result = {
        "output_dir": str(output_dir), "last": str(output_dir / "last.pt"), "iterations": it,
        "best": str(output_dir / "best.pt") if best_miou > float("-inf") else None,
        "metrics": last_metrics, "best_miou": best_miou if best_miou > float("-inf") else None,
        "skipped": skipped, "curves": None, "rank": info.rank,
    }
    if is_main:
        result["curves"] = str(save_curves_png(logger.records(), output_dir / "curves.png"))
        print(f"training done: {it} iterations; outputs in {output_dir}"
              + (f" (best mIoU {best_miou:.4f})" if result["best_miou"] is not None else ""),
              file=sys.stderr)
    return result


def _skip_step(loss: torch.Tensor) -> bool:
    """train.on_nonfinite=skip: whether any rank's loss is not finite. All ranks must agree
    before the backward pass: DDP's backward is itself a collective, and a rank that skipped it
    would leave the others waiting for its gradients."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    return bool(dist_utils.all_reduce_(bad).item() > 0)

"""What each training step sees, and how it reaches the device.

- `TrainBatches` + `SeededDataset`: batch `i` is a pure function of (seed, i) - which images, and
  every random number of their augmentation (each sample gets its own seed) - so a resumed run
  sees exactly the batches the uninterrupted run would have, whatever the number of workers.
- `build_data`: the train/val datasets from the config, refused at start-up when broken.
- `training_feed`: normalised device batches from one of three pipelines (workers augment;
  workers decode and the device augments; the whole training set on the device).
"""
from __future__ import annotations

import functools
import random
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig

from sceneparse.engine import distributed as dist_utils
from sceneparse.errors import SceneparseError, user_message


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
        if start_iter < iterations:  # refused at set-up, not in a DataLoader at the first step
            self._check(epoch_batches(self.start[0]))

    @staticmethod
    def _check(batches: list) -> None:
        if not batches:
            raise SceneparseError(
                "the training set is smaller than one batch (data.batch_size images; under torchrun, "
                "one batch for each process)", "lower data.batch_size, or add images")

    def walk(self):
        epoch, offset = self.start
        it = self.start_iter
        while it < self.iterations:
            batches = self.epoch_batches(epoch)
            self._check(batches)
            while offset < len(batches) and it < self.iterations:
                yield it, epoch, offset, batches[offset]
                offset += 1
                it += 1
            epoch, offset = epoch + 1, 0

    def __iter__(self):
        for it, _, _, batch in self.walk():
            yield [(index, dist_utils.mix_seed("sample", self.seed, self.rank, it, slot))
                   for slot, index in enumerate(batch)]

    def __len__(self) -> int:
        return self.iterations - self.start_iter


def train_transform_options(data_cfg) -> dict:
    """DataConfig -> `build_train_transforms` options: CSAIL short-side resize, or scale + crop."""
    jitter = data_cfg.color_jitter or None
    if data_cfg.crop_size:
        return {"scales": None, "scale_range": list(data_cfg.scale_range), "base_size": data_cfg.base_size,
                "crop": data_cfg.crop_size, "flip": data_cfg.flip, "jitter": jitter}
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
        shuffle = torch.Generator().manual_seed(dist_utils.mix_seed("crop order", seed, epoch))
        order = torch.randperm(len(dataset), generator=shuffle)
        b = data_cfg.batch_size
        all_batches = [order[i : i + b].tolist() for i in range(0, len(order) - b + 1, b)]
        # Same order on every rank; each takes every world_size-th batch (equal counts).
        per_rank = len(all_batches) // info.world_size
        return all_batches[info.rank :: info.world_size][:per_rank]

    return batches


def build_train_set(data_cfg):
    """The training split of a `data:` config section, with the worker-side transforms unless
    augment_on=device (then it yields decoded images and `DeviceAugment` does the rest, batched)."""
    from sceneparse.data import build_dataset
    from sceneparse.data.transforms import build_train_transforms
    from sceneparse.engine.config import dataset_settings

    dc = data_cfg
    transforms = None if dc.augment_on == "device" else build_train_transforms(train_transform_options(dc))
    return build_dataset(dataset_settings(dc), dc.train_split, transforms)


def build_data(cfg: DictConfig, verbose: bool = True):
    """Train and val datasets and the class count; a broken dataset is refused before any training."""
    from sceneparse.data import build_dataset
    from sceneparse.data.check import ERROR, overlap_problems, quick_check
    from sceneparse.engine.config import dataset_settings

    dc = cfg.data
    train_set = build_train_set(dc)
    val_set = build_dataset(dataset_settings(dc), dc.val_split, None)
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
    if verbose and cfg.train.val_every > 0:  # a recipe that trains on val on purpose does not validate
        named = [(f"the training split {dc.train_split!r}", train_set), (f"the validation split {dc.val_split!r}", val_set)]
        for problem in overlap_problems(named):
            print(f"data warning: {problem}", file=sys.stderr)
    num_classes = cfg.model.num_classes or train_set.num_classes
    if num_classes != train_set.num_classes:
        raise SceneparseError(
            f"model.num_classes={num_classes} but the {dc.kind} dataset has {train_set.num_classes} classes",
            f"set model.num_classes=null (taken from the dataset) or model.num_classes={train_set.num_classes}, "
            "or fix the dataset's classes",
        )
    return train_set, val_set, num_classes


def training_feed(train_set, sampler: TrainBatches, data_cfg, device: torch.device, num_classes: int):
    """An iterator of `(images, masks, paths)`, one per step: on `device`, images normalised
    float32, masks int64. How, by `data.augment_on` and `data.cache_in_memory`:

    - workers: DataLoader workers decode and augment; uint8 batches travel through pinned memory
      with non-blocking copies, normalised on the device.
    - device: workers only decode; the batch is augmented on the device (`DeviceAugment`).
    - device + cache_in_memory: the whole training set sits on the device; no workers at all.
    """
    from sceneparse.data import IGNORE_INDEX
    from sceneparse.data.device_augment import DeviceAugment

    dc = data_cfg
    # uint8 masks: 8x less to copy; class ids must then stay below IGNORE_INDEX (255).
    mask_dtype = torch.uint8 if num_classes < IGNORE_INDEX else torch.int64
    augment = None
    if dc.augment_on == "device":
        augment = DeviceAugment(dc.crop_size, dc.scale_range, dc.flip, dc.color_jitter, dc.mean, dc.std,
                                base_size=dc.base_size)
        if dc.cache_in_memory:  # set up now: a set too large for the device fails before any step
            return _device_resident_feed(train_set, sampler, augment, device, mask_dtype)
    return _loader_feed(train_set, sampler, dc, device, mask_dtype, augment)


PREFETCH_FACTOR = 2  # batches each DataLoader worker keeps ready (torch's default)


def prefetched_batches(data_cfg) -> int:
    """How many batches the feed holds ready beyond the one being trained on: the workers'
    queue (none when the whole set lives on the device). A benchmark must drain them first, or
    it times a queue filled while it was not looking instead of the pipeline."""
    if data_cfg.augment_on == "device" and data_cfg.cache_in_memory:
        return 0
    return data_cfg.num_workers * PREFETCH_FACTOR


def _loader_feed(train_set, sampler, dc, device, mask_dtype, augment):
    """DataLoader workers decode (and augment, unless `augment` is given: then the device does)."""
    from sceneparse.data.transforms import collate_pad, normalize

    workers = dc.num_workers
    loader = torch.utils.data.DataLoader(
        SeededDataset(train_set), batch_sampler=sampler,
        collate_fn=functools.partial(collate_pad, mask_dtype=mask_dtype),
        num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0 and len(sampler) > 0,
        prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
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

    sizes = train_set.image_sizes()
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    needed = len(sizes) * height * width * (3 + mask_dtype.itemsize)  # padded to the largest image
    free = free_memory(device)
    if needed > free // 2:
        raise SceneparseError(
            f"data.augment_on=device with data.cache_in_memory would keep the {len(sizes)} training "
            f"images on {device} as one {len(sizes)} x {height} x {width} tensor: {needed / 2**30:.1f} GiB, "
            f"more than half of the {free / 2**30:.1f} GiB free there",
            "set data.cache_in_memory=false (workers decode, the device still augments), or "
            "data.augment_on=workers",
        )
    everything = collate_pad([train_set[i] for i in range(len(train_set))], mask_dtype=mask_dtype)
    images, masks = everything["image"].to(device), everything["mask"].to(device)
    return _gather_and_augment(images, masks, everything["sizes"], everything["paths"], sampler, augment, device)


def _gather_and_augment(images, masks, sizes, paths, sampler, augment, device):
    """Per step: the batch's rows of the device-resident set, augmented there."""
    for pairs in sampler:
        rows = [index for index, _ in pairs]
        picked = torch.tensor(rows)
        if device.type == "cuda":  # pinned + non-blocking: no wait for the GPU's queue
            picked = picked.pin_memory()
        picked = picked.to(device, non_blocking=True)
        batch_images, batch_masks = augment(images[picked], masks[picked], [sizes[r] for r in rows],
                                            [seed for _, seed in pairs])
        yield batch_images, batch_masks, [paths[r] for r in rows]


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the GPU's own count, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as info:  # MemAvailable counts reclaimable caches too
            fields = dict(line.split(":", 1) for line in info)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 62  # unknown (not Linux): do not refuse


def next_batch(batches, iteration: int, checkpoint: Path, resume_command: str):
    """The next batch; a dataset file that vanished or broke mid-run becomes a clear error, whose
    way out is a resume from `checkpoint` if the run has saved one yet."""
    try:
        return next(batches)
    except (OSError, SceneparseError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "Original Traceback" not in str(err):
            raise  # a bug, not a data problem (worker errors are re-raised with "Original Traceback")
        way_out = (f"resume: {resume_command}" if checkpoint.exists()
                   else "start the run again (no checkpoint was saved yet; add --overwrite)")
        raise SceneparseError(
            f"reading training data failed at iteration {iteration}: {user_message(err)}",
            f"fix or restore the dataset files, then {way_out}",
        ) from None

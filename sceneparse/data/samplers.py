"""Batch samplers: aspect-ratio grouping (as CSAIL), per-batch scales, exact resume.

`AspectRatioBatchSampler` puts landscape (W >= H) and portrait images in separate batches, so a
padded batch wastes little, and everything it does is a pure function of `seed` and the epoch:
`batches(epoch)` is the full list of this rank's batches, which is how the trainer resumes
mid-epoch exactly (it skips the batches already consumed; see `engine.feed.TrainBatches`).

Per-batch scale (CSAIL draws one short side per batch): with `scales=[300, ...]` each batch is a
list of `(index, short_side)` pairs; `SegmentationDataset.__getitem__` forwards the short side to
the `PairTransform` from `build_train_transforms`, whose CSAIL resize step then uses it. The draw
comes from the same seeded generator, so it is reproducible and identical after a resume.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class AspectRatioBatchSampler(Sampler):
    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        scales: Sequence[int] | None = None,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.sizes = [(int(h), int(w)) for h, w in sizes]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.scales = list(scales) if scales else None
        self.epoch = 0
        groups = {True: [], False: []}
        for index, (h, w) in enumerate(self.sizes):
            groups[w >= h].append(index)
        self.groups = [g for g in (groups[True], groups[False]) if g]

    def _generator(self, epoch: int) -> torch.Generator:
        # a distinct stream per (seed, epoch); same on every rank so the split is consistent
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def batches(self, epoch: int) -> list[list]:
        """This rank's batches of `epoch` (a pure function of seed and epoch)."""
        gen = self._generator(epoch)
        all_batches = []
        for group in self.groups:
            order = [group[i] for i in torch.randperm(len(group), generator=gen)] if self.shuffle else list(group)
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    all_batches.append(batch)
        if self.shuffle:
            all_batches = [all_batches[i] for i in torch.randperm(len(all_batches), generator=gen)]
        if self.scales:
            picks = torch.randint(len(self.scales), (len(all_batches),), generator=gen).tolist()
            all_batches = [[(i, self.scales[p]) for i in b] for b, p in zip(all_batches, picks)]
        return self._shard(all_batches)

    def _shard(self, all_batches: list[list]) -> list[list]:
        replicas = self.num_replicas
        if replicas == 1:
            return all_batches
        if self.drop_last or not all_batches:
            per_rank = len(all_batches) // replicas
        else:  # every rank gets as many: repeat batches from the start (cyclically) to fill the last round
            per_rank = -(-len(all_batches) // replicas)
            all_batches = [all_batches[i % len(all_batches)] for i in range(per_rank * replicas)]
        return all_batches[self.rank: per_rank * replicas: replicas]

    def set_epoch(self, epoch: int) -> None:
        """Iterate `epoch`'s batches next (as DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list]:
        yield from self.batches(self.epoch)

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        total = 0
        for group in self.groups:
            full, rest = divmod(len(group), self.batch_size)
            total += full + (1 if rest and not self.drop_last else 0)
        if self.num_replicas == 1:
            return total
        return total // self.num_replicas if self.drop_last else -(-total // self.num_replicas)

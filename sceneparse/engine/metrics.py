"""Segmentation metrics: one confusion matrix, every number derived from it.

`ConfusionMatrix` counts (ground truth, prediction) pairs on the device the predictions live on,
without any host synchronisation, so it can sit inside a GPU evaluation loop. `compute()` turns the
counts into the usual scores:

- pixel_accuracy: correct labelled pixels / labelled pixels (pixels whose target is
  IGNORE_INDEX do not count, whatever was predicted there).
- per-class iou: TP / (TP + FP + FN); accuracy: TP / (TP + FN) (the class's recall).
  A class that occurs neither in the targets nor in the predictions has iou NaN; a class absent
  from the targets has accuracy NaN (written as null in JSON reports).
- mean_iou: the mean over classes that occur in the targets or the predictions (NaN-free mean).
  CSAIL's evaluation averages IoU over *all* classes, counting absent ones as 0; on ADE20K val every
  one of the 150 classes occurs, so the two agree there. On small subsets ours does not penalise a
  model for classes that simply are not in the data.
- mean_accuracy: mean of per-class accuracy over classes present in the targets.
- score: (mean_iou + pixel_accuracy) / 2, the "overall score" of the ADE20K / CSAIL benchmark.
"""
from __future__ import annotations

import math

import torch

from sceneparse.data.meta import IGNORE_INDEX
from sceneparse.engine.distributed import all_reduce_
from sceneparse.errors import SceneparseError


class ConfusionMatrix:
    """A `num_classes x num_classes` int64 count matrix: rows are targets, columns predictions."""

    def __init__(self, num_classes: int, device: torch.device | str | None = None,
                 ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # Two extra bins after the C*C cells: pixels with an ignored target, and pixels whose target
        # or prediction is out of range. Routing them to bins (instead of boolean indexing) keeps
        # update() free of data-dependent shapes, hence of host syncs.
        self._counts = torch.zeros(num_classes * num_classes + 2, dtype=torch.int64, device=device)

    @property
    def matrix(self) -> torch.Tensor:
        """The C x C counts (a view; row = target class, column = predicted class)."""
        c = self.num_classes
        return self._counts[: c * c].view(c, c)

    @property
    def device(self) -> torch.device:
        return self._counts.device

    def reset(self) -> None:
        self._counts.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch: `pred` and `target` are integer tensors of the same shape (any layout)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        c = self.num_classes
        pred = pred.reshape(-1).to(self.device, torch.int64)
        target = target.reshape(-1).to(self.device, torch.int64)
        ignored = target == self.ignore_index
        in_range = (target >= 0) & (target < c) & (pred >= 0) & (pred < c)
        index = torch.where(in_range, target * c + pred, c * c + 1)
        index = torch.where(ignored, c * c, index)
        # scatter_add_ rather than torch.bincount: CUDA's bincount reads the input's max on the host
        # to size its output, a sync per batch; here the output size is fixed.
        self._counts.scatter_add_(0, index, torch.ones_like(index))

    def all_reduce(self) -> None:
        """Sum the counts over all ranks (a no-op unless torch.distributed is initialised)."""
        all_reduce_(self._counts)

    def compute(self) -> dict:
        """All metrics as plain Python values (floats, lists); see the module docstring."""
        counts = self._counts.cpu()
        c = self.num_classes
        bad = int(counts[c * c + 1])
        if bad:
            raise SceneparseError(
                f"{bad} pixels had a label or prediction outside 0..{c - 1} (and not the ignore "
                f"value {self.ignore_index})",
                hint="check that the dataset's labels and the model's number of classes match",
            )
        m = counts[: c * c].view(c, c).double()
        tp = m.diagonal()
        target_pixels = m.sum(dim=1)
        pred_pixels = m.sum(dim=0)
        union = target_pixels + pred_pixels - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        acc = torch.where(target_pixels > 0, tp / target_pixels.clamp(min=1), nan)
        labelled = float(m.sum())
        pixel_accuracy = float(tp.sum()) / labelled if labelled else math.nan
        mean_iou = float(iou.nanmean())
        return {
            "pixel_accuracy": pixel_accuracy,
            "mean_iou": mean_iou,
            "mean_accuracy": float(acc.nanmean()),
            "score": (mean_iou + pixel_accuracy) / 2,
            "iou": iou.tolist(),
            "accuracy": acc.tolist(),
            "class_pixels": [int(x) for x in target_pixels.tolist()],
            "labelled_pixels": int(labelled),
            "ignored_pixels": int(counts[c * c]),
        }

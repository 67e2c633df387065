"""Pictures of results: coloured label maps, overlays, confusion matrices and training curves.

Images here are numpy `H x W x 3` uint8 arrays (what PIL writes); label maps are integer
`H x W` arrays or tensors. Matplotlib is used through its object API (no pyplot, no global backend).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

IGNORE_COLOR = (0, 0, 0)


def _as_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def colorize(labels, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Label map `H x W` -> `H x W x 3` uint8; ids without a palette entry (e.g. 255) are black."""
    labels = _as_numpy(labels).astype(np.int64)
    lut = np.zeros((max(len(palette), int(labels.max(initial=0)) + 1), 3), dtype=np.uint8)
    lut[:] = IGNORE_COLOR
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return lut[labels.clip(min=0)]


def overlay(image, labels, palette: Sequence[Sequence[int]], alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured labels over `image` (`3 x H x W` tensor or `H x W x 3` array).

    `alpha` is the weight of the colours; pixels without a palette entry show the image unchanged.
    """
    # the layout follows the type, not the shape: a 3-pixel-wide 3 x H x 3 tensor is still CHW
    image = _as_numpy(image).transpose(1, 2, 0) if isinstance(image, torch.Tensor) else np.asarray(image)
    labels = _as_numpy(labels).astype(np.int64)
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image size {image.shape[:2]} != label size {labels.shape}")
    colors = colorize(labels, palette).astype(np.float32)
    known = ((labels >= 0) & (labels < len(palette)))[..., None]
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colors
    return np.where(known, blended, image).round().clip(0, 255).astype(np.uint8)


def save_confusion_png(matrix, class_names: Sequence[str], path: str | Path,
                       max_named: int = 40) -> Path:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction) as a PNG.

    Each row shows where a class's pixels went; rows of absent classes stay empty. Class names
    label the axes when there are at most `max_named` classes, indices otherwise.
    """
    from matplotlib.figure import Figure

    m = _as_numpy(matrix).astype(np.float64)
    rows = m.sum(axis=1, keepdims=True)
    normalized = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    n = len(m)
    side = min(4 + 0.25 * n, 24) if n <= max_named else 12
    fig = Figure(figsize=(side + 1.5, side), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(normalized, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the class's pixels")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    if n <= max_named:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_title("Confusion matrix (row-normalised)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def save_curves_png(records: list[dict], path: str | Path) -> Path:
    """Training curves from JSON-lines records (keys `iter` and any of `loss`, `lr`, `val_miou`).

    One panel per quantity present; records missing a key are skipped for that panel.
    """
    from matplotlib.figure import Figure

    panels = [("loss", "training loss"), ("lr", "learning rate"), ("val_miou", "validation mIoU")]
    present = [(k, title) for k, title in panels
               if any(k in r and r[k] is not None and "iter" in r for r in records)]
    fig = Figure(figsize=(5 * max(len(present), 1), 3.5), dpi=100)
    if not present:
        fig.text(0.5, 0.5, "no training records yet", ha="center", va="center")
    for i, (key, title) in enumerate(present, start=1):
        points = [(r["iter"], r[key]) for r in records
                  if "iter" in r and r.get(key) is not None and math.isfinite(r[key])]
        ax = fig.add_subplot(1, len(present), i)
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, ys, marker="o" if key == "val_miou" else None, markersize=3)
        ax.set_xlabel("iteration")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path

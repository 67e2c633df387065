"""Datasets, metadata, transforms, samplers and the data check.

Conventions (docs/architecture.md): class ids 0..C-1, `IGNORE_INDEX` (255) for unlabelled pixels;
samples are `{"image": Image uint8 3xHxW, "mask": Mask int64 HxW, "path": str}`.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from sceneparse.data.datasets import (
    ADE20K, VOC, CamVid, Cityscapes, COCOStuff, Folder, LabelMapper, PascalContext, PascalContext60,
    SegmentationDataset, find_classes_file, join_splits,
)
from sceneparse.data.meta import IGNORE_INDEX, builtin_meta, make_palette
from sceneparse.data.synthetic import Synthetic
from sceneparse.errors import SceneparseError

__all__ = [
    "ADE20K", "COCOStuff", "DATASETS", "IGNORE_INDEX", "VOC", "CamVid", "Cityscapes", "Folder", "LabelMapper",
    "PascalContext", "PascalContext60", "SegmentationDataset", "Synthetic", "build_dataset", "builtin_meta", "join_splits",
    "make_palette",
]


# kind -> dataset class; `cls.from_config(data_cfg, split, transforms, strict)` builds one
# (strict=False keeps a broken listing for the data check), `cls.splits_on_disk(data_cfg)` says
# which splits a dataset folder has.
DATASETS: dict[str, type[SegmentationDataset]] = {
    cls.kind: cls
    for cls in (ADE20K, CamVid, VOC, PascalContext, PascalContext60, Cityscapes, COCOStuff, Folder, Synthetic)
}


def build_dataset(data_cfg, split: str, transforms=None) -> SegmentationDataset:
    """The dataset of `split` described by a config's `data:` section (a mapping or OmegaConf node)
    with keys `kind` (a key of `DATASETS`), `root`, `odgt` (ade20k; a path or
    {train: path, val: path}), `classes_file` (folder), `seed`, `num_images`, `image_size` (synthetic),
    `cache_in_memory` (decode everything once, keep it in RAM).

    `split` may join several splits with '+' ("train+val"): one dataset with all their samples."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(data_cfg, DictConfig):
        data_cfg = OmegaConf.to_container(data_cfg, resolve=True)
    if not isinstance(data_cfg, Mapping):
        raise SceneparseError(f"the data settings must be a mapping, got {type(data_cfg).__name__}")
    kind = data_cfg.get("kind")
    if kind not in DATASETS:
        raise SceneparseError(f"unknown dataset kind {kind!r} (`data.kind`)", f"use one of: {', '.join(DATASETS)}")
    splits = split.split("+") if isinstance(split, str) else [split]
    try:
        parts = [DATASETS[kind].from_config(dict(data_cfg), name.strip(), transforms) for name in splits]
    except SceneparseError as err:
        raise _with_folder_kind_hint(err, data_cfg) from None
    dataset = parts[0] if len(parts) == 1 else join_splits(parts)
    if data_cfg.get("cache_in_memory"):
        dataset.cache_in_memory()
    return dataset


def _with_folder_kind_hint(err: SceneparseError, data_cfg: Mapping) -> SceneparseError:
    """A built-in kind's reader failed on a root that holds a classes file, the mark of a dataset of
    the user's own: most likely `data.kind=folder` was forgotten (a config made for ADE20K, say),
    and the reader's own message (no annotations folder, images without labels) would not say so."""
    root = data_cfg.get("root")
    classes = find_classes_file(Path(root).expanduser()) if root and data_cfg.get("kind") != "folder" else None
    if classes is None or data_cfg.get("kind") == "synthetic":
        return err
    hint = f"{classes} marks a dataset of your own: if this is one, set data.kind=folder"
    return SceneparseError(err.message, f"{err.hint}; or, {hint}" if err.hint else hint)

"""Datasets, metadata, transforms, samplers and the data check.

Conventions (docs/architecture.md): class ids 0..C-1, `IGNORE_INDEX` (255) for unlabelled pixels;
samples are `{"image": Image uint8 3xHxW, "mask": Mask int64 HxW, "path": str}`.
"""
from __future__ import annotations

from collections.abc import Mapping

from sceneparse.data.datasets import (
    ADE20K, VOC, CamVid, Cityscapes, COCOStuff, Folder, LabelMapper, PascalContext, SegmentationDataset,
    join_splits,
)
from sceneparse.data.meta import IGNORE_INDEX, builtin_meta, make_palette
from sceneparse.data.synthetic import Synthetic
from sceneparse.errors import SceneparseError

__all__ = [
    "ADE20K", "COCOStuff", "DATASETS", "IGNORE_INDEX", "VOC", "CamVid", "Cityscapes", "Folder", "LabelMapper",
    "PascalContext", "SegmentationDataset", "Synthetic", "build_dataset", "builtin_meta", "join_splits",
    "make_palette",
]


def _ade20k(cfg: dict, split: str, transforms, strict: bool = True):
    return ADE20K(cfg.get("root"), split, odgt=cfg.get("odgt"), transforms=transforms, strict=strict)


def _camvid(cfg: dict, split: str, transforms, strict: bool = True):
    return CamVid(cfg.get("root"), split, transforms=transforms, strict=strict)


def _voc(cfg: dict, split: str, transforms, strict: bool = True):
    return VOC(cfg.get("root"), split, transforms=transforms, strict=strict)


def _cityscapes(cfg: dict, split: str, transforms, strict: bool = True):
    return Cityscapes(cfg.get("root"), split, transforms=transforms, strict=strict)


def _pascal_context(cfg: dict, split: str, transforms, strict: bool = True):
    return PascalContext(cfg.get("root"), split, transforms=transforms, strict=strict)


def _coco_stuff(cfg: dict, split: str, transforms, strict: bool = True):
    return COCOStuff(cfg.get("root"), split, transforms=transforms, strict=strict)


def _folder(cfg: dict, split: str, transforms, strict: bool = True):
    return Folder(
        cfg.get("root"), split, classes_file=cfg.get("classes_file"), transforms=transforms, strict=strict
    )


def _synthetic(cfg: dict, split: str, transforms, strict: bool = True):
    count = cfg.get("num_images")
    if isinstance(count, Mapping):  # {train: 100, val: 30}
        count = count.get(split)
    return Synthetic(
        split, num_images=count, seed=cfg.get("seed") or 0,
        image_size=cfg.get("image_size") or 128, transforms=transforms,
    )


# kind -> builder(cfg, split, transforms, strict); strict=False keeps a broken listing for the data check
DATASETS = {
    "ade20k": _ade20k, "camvid": _camvid, "voc": _voc, "pascal_context": _pascal_context,
    "cityscapes": _cityscapes, "coco_stuff": _coco_stuff, "folder": _folder, "synthetic": _synthetic,
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
    parts = [DATASETS[kind](dict(data_cfg), name.strip(), transforms) for name in splits]
    dataset = parts[0] if len(parts) == 1 else join_splits(parts)
    if data_cfg.get("cache_in_memory"):
        dataset.cache_in_memory()
    return dataset

"""File-backed segmentation datasets: ADE20K, CamVid, Pascal VOC (+ SBD), PASCAL-Context,
Cityscapes, COCO-Stuff and a folder of the user's own data.

Every dataset returns `{"image": Image uint8 3xHxW, "mask": Mask int64 HxW, "path": str}` with
class ids `0..C-1` and `IGNORE_INDEX` for unlabelled pixels (each dataset translates its own
label encoding through a `LabelMapper`), and exposes `class_names`, `palette`, `num_classes`,
`files` [(image, label)] and `image_sizes()`.

Labels are validated on every load (values, size against the image). Constructors refuse broken
listings (images without labels, files named by a list that do not exist); `strict=False` keeps
them in `listing` instead, which is what `sceneparse data check` reports from.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from sceneparse.data.io import (
    IMAGE_EXTENSIONS,
    LABEL_EXTENSIONS,
    exif_orientation,
    image_size,
    read_image,
    read_label,
    read_list_file,
)
from sceneparse.data.meta import IGNORE_INDEX, builtin_meta, make_palette
from sceneparse.errors import SceneparseError


@dataclass
class Listing:
    """What a dataset found on disk."""

    pairs: list[tuple[Path, Path]]
    images_without_labels: list[Path] = field(default_factory=list)
    labels_without_images: list[Path] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)  # named by a list file, absent on disk
    sizes: list[tuple[int, int]] | None = None  # (H, W) per pair when a list file gives them
    where: str = ""  # the folders or list file searched, for messages
    # image without label -> a file with its label's stem in a format labels cannot be (e.g. JPEG)
    unsupported_labels: dict[Path, Path] = field(default_factory=dict)

    def no_label_message(self, image: Path) -> str:
        """Why `image` (one of images_without_labels) has no label: none at all, or one in a
        format that is not read."""
        other = self.unsupported_labels.get(image)
        if other is None:
            return f"image {image} has no label file"
        lossy = " (JPEG is lossy: its compression changes the ids along every edge)" if other.suffix.lower() in (
            ".jpg", ".jpeg") else ""
        return (f"image {image} has no usable label: {other} has its stem but is in an unsupported "
                f"format{lossy}; save labels as PNG ({', '.join(LABEL_EXTENSIONS)} are read)")


class LabelMapper:
    """Raw label values -> sceneparse ids through a lookup table.

    Raw values `offset .. offset+C-1` become `0..C-1` (or, with `raw_ids`, raw value `raw_ids[k]`
    becomes class k: Cityscapes' label ids), the dataset's ignore values become `IGNORE_INDEX`;
    any other value is an error naming the file and the values.
    """

    def __init__(
        self,
        num_classes: int,
        offset: int = 0,
        ignore_values: tuple[int, ...] = (IGNORE_INDEX,),
        raw_ids: tuple[int, ...] | None = None,
    ):
        if not 1 <= num_classes <= IGNORE_INDEX:
            raise SceneparseError(
                f"{num_classes} classes: sceneparse supports 1..{IGNORE_INDEX} classes "
                f"({IGNORE_INDEX} is the ignore label)"
            )
        self.num_classes = num_classes
        self.offset = offset
        self.ignore_values = tuple(int(v) for v in ignore_values)
        self.raw_ids = tuple(int(v) for v in raw_ids) if raw_ids is not None else None
        if self.raw_ids is not None and len(self.raw_ids) != num_classes:
            raise ValueError(f"{len(self.raw_ids)} raw ids for {num_classes} classes")
        self._lut = self._build(256)

    def _build(self, size: int) -> np.ndarray:
        lut = np.full(size, -1, dtype=np.int64)
        raw_ids = self.raw_ids or range(self.offset, self.offset + self.num_classes)
        for class_id, value in enumerate(raw_ids):
            if value < size:
                lut[value] = class_id
        for value in self.ignore_values:
            if 0 <= value < size:
                lut[value] = IGNORE_INDEX
        return lut

    def describe(self) -> str:
        if self.raw_ids is not None:
            ids = _ranges(self.raw_ids)
        else:
            ids = f"{self.offset}..{self.offset + self.num_classes - 1}"
        ignore = _ranges(self.ignore_values) or "none"
        return f"expected class values {ids}, ignore value {ignore}"

    def map_values(self, raw: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """(mapped ids with -1 where invalid, sorted invalid raw values)."""
        raw = np.asarray(raw)
        if raw.size == 0:
            return raw.astype(np.int64), []
        vmax = int(raw.max())
        lut = self._lut if vmax < len(self._lut) else self._build(vmax + 1)
        if raw.dtype.kind == "i" and raw.min() < 0:
            mapped = np.full(raw.shape, -1, dtype=np.int64)
            mapped[raw >= 0] = lut[raw[raw >= 0]]
        else:
            mapped = lut[raw]
        if mapped.min() >= 0:
            return mapped, []
        return mapped, [int(v) for v in np.unique(raw[mapped < 0])]

    def __call__(self, raw: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
        mapped, bad = self.map_values(raw)
        if bad:
            shown = ", ".join(map(str, bad[:12])) + (" ..." if len(bad) > 12 else "")
            raise SceneparseError(
                f"label file {path} has values outside the {self.num_classes} classes: {shown} "
                f"({self.describe()})",
                "fix the label file, or declare the value as the ignore value / add the class",
            )
        return mapped


TURNED_LABEL_FIX = "remove the image's orientation tag (keeping its pixels), or turn the label to match"


def label_fits_stored_pixels(orientation: int, image_hw: tuple, label_hw: tuple) -> bool:
    """A non-square image read turned by 90 degrees (EXIF 5-8) whose label has the size of the
    pixels as stored, i.e. was drawn on them."""
    return (orientation in (5, 6, 7, 8) and tuple(image_hw)[0] != tuple(image_hw)[1]
            and tuple(label_hw) == tuple(image_hw)[::-1])


def _size_mismatch(image_path, image_hw: tuple, label_path, label_hw: tuple,
                   orientation: int | None = None) -> SceneparseError:
    """The error for an image and label of different sizes (training and `data check` say the
    same). Images are read with their EXIF orientation applied; a label that fits the stored
    (unrotated) pixels needs the tag removed, not the image turned. `orientation`: the image's
    EXIF tag when the caller has it (else read from the file)."""
    if orientation is None:
        orientation = exif_orientation(image_path)
    problem = (f"image {image_path} is {image_hw[0]}x{image_hw[1]} (HxW) but its label {label_path} "
               f"is {label_hw[0]}x{label_hw[1]}")
    if label_fits_stored_pixels(orientation, image_hw, label_hw):
        return SceneparseError(
            f"{problem}: the image has EXIF orientation {orientation}, so it is read turned by 90 degrees, "
            "and its label fits the pixels as stored",
            f"{TURNED_LABEL_FIX}; `sceneparse data check` lists every such image")
    return SceneparseError(problem, "a label must have its image's size; `sceneparse data check` lists every mismatch")


class SegmentationDataset(Dataset):
    """Base class: pairs of (image, label) files, metadata and the label mapping."""

    kind = "base"
    layout = ""
    on_disk = True
    _memory: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # see cache_in_memory()

    def __init__(
        self,
        listing: Listing,
        class_names: list[str],
        palette: list[list[int]],
        mapper: LabelMapper,
        transforms=None,
        label_colors: dict[tuple[int, int, int], int] | None = None,
        strict: bool = True,
    ):
        if len(class_names) != mapper.num_classes or len(palette) != len(class_names):
            raise SceneparseError(
                f"{len(class_names)} class names, {len(palette)} palette colours and "
                f"{mapper.num_classes} label classes do not agree"
            )
        self.listing = listing
        self.files = [(str(image), str(label)) for image, label in listing.pairs]
        self.class_names = list(class_names)
        self.palette = [[int(c) for c in colour] for colour in palette]
        self.mapper = mapper
        self.transforms = transforms
        self.label_colors = label_colors
        self._sizes = listing.sizes
        if strict:
            self.raise_if_broken()

    @classmethod
    def from_config(cls, data: Mapping, split: str | None, transforms=None, strict: bool = True):
        """The dataset of `split` from a config's `data:` settings (a plain mapping)."""
        return cls(data.get("root"), split, transforms=transforms, strict=strict)

    @classmethod
    def splits_on_disk(cls, data: Mapping) -> list:
        """The splits a dataset folder has, each checked once by `sceneparse data check`."""
        return ["train", "val"]

    def _init_builtin(self, listing: Listing, mapper: LabelMapper, transforms, strict: bool) -> None:
        """__init__ of a built-in kind: class names and palette from `meta/<kind>.json`."""
        meta = builtin_meta(self.kind)
        SegmentationDataset.__init__(
            self, listing, meta["class_names"], meta["palette"], mapper, transforms, strict=strict
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def raise_if_broken(self) -> None:
        listing = self.listing
        if listing.missing:
            raise SceneparseError(
                f"{len(listing.missing)} files listed for the {self.kind} dataset do not exist, "
                f"e.g. {_some(listing.missing)}",
                f"check the dataset root and list file ({listing.where})",
            )
        if listing.images_without_labels:
            unsupported = [p for p in listing.images_without_labels if p in listing.unsupported_labels]
            if unsupported:  # the label is there, in a format that is not read: say that, not "no label"
                more = len(listing.images_without_labels) - 1
                raise SceneparseError(
                    listing.no_label_message(unsupported[0])
                    + (f" ({more} more images have no usable label)" if more else ""),
                    "save the labels as PNG (lossless), same file stem; `sceneparse data check` lists every problem",
                )
            raise SceneparseError(
                f"{len(listing.images_without_labels)} images have no label file: "
                f"{_some(listing.images_without_labels)}",
                "add the labels (same file stem, in the labels folder) or remove the images; "
                "`sceneparse data check` lists every problem",
            )
        if not listing.pairs:
            raise SceneparseError(
                f"no image/label pairs found for the {self.kind} dataset in {listing.where}",
                f"expected layout: {self.layout}",
            )

    def read_raw_label(self, label_path: str | Path) -> np.ndarray:
        return read_label(label_path, self.label_colors)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image uint8 3xHxW and mask int64 HxW (mapped and validated) of sample `index`."""
        image_path, label_path = self.files[index]
        image = read_image(image_path)
        raw = self.read_raw_label(label_path)
        if tuple(image.shape[-2:]) != raw.shape:
            raise _size_mismatch(image_path, tuple(image.shape[-2:]), label_path, raw.shape)
        return image, torch.from_numpy(self.mapper(raw, label_path))

    def cache_in_memory(self, threads: int | None = None) -> "SegmentationDataset":
        """Decode every sample once (in threads) and serve them from RAM from now on; masks are kept
        as uint8 (ids < 255 and IGNORE_INDEX fit). Returns self."""
        if self._memory is None:
            with ThreadPoolExecutor(max_workers=threads or min(16, os.cpu_count() or 1)) as pool:
                samples = list(pool.map(self.load, range(len(self))))
            self._memory = [(image, mask.to(torch.uint8)) for image, mask in samples]
        return self

    def __getitem__(self, key):
        """`dataset[i]`, or `dataset[(i, short_side)]` from a batch sampler that picks one scale per
        batch (see `samplers.AspectRatioBatchSampler`): the transforms then resize to it."""
        index, short_side = key if isinstance(key, tuple) else (key, None)
        if self._memory is not None:
            image, mask = self._memory[index][0], self._memory[index][1].long()
        else:
            image, mask = self.load(index)
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
        if short_side is not None:
            if not getattr(self.transforms, "accepts_short_side", False):
                raise ValueError("a per-batch short side needs transforms from build_train_transforms")
            image, mask = self.transforms(image, mask, short_side=short_side)
        elif self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return {"image": image, "mask": mask, "path": self.sample_path(index)}

    def sample_path(self, index: int) -> str:
        return self.files[index][0]

    def image_sizes(self) -> list[tuple[int, int]]:
        """(H, W) per sample, from a list file or the image headers (cached)."""
        if self._sizes is None:
            self._sizes = [image_size(path) for path, _ in self.files]
        return list(self._sizes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples, {self.num_classes} classes)"


def join_splits(parts: list[SegmentationDataset]) -> SegmentationDataset:
    """One dataset holding the samples of several splits of the same dataset (e.g. train + val),
    in order: a copy of the first with the listings concatenated."""
    first = parts[0]
    if not all(p.on_disk for p in parts):  # generated samples depend on their split: no joining
        raise SceneparseError(f"the {first.kind} dataset cannot join splits", "use a single split")
    joined = copy.copy(first)
    joined.listing = _merge([p.listing for p in parts])
    sizes = [p._sizes for p in parts]  # a part's sizes may have been read from the headers since
    joined.listing.sizes = None if any(s is None for s in sizes) else [hw for s in sizes for hw in s]
    joined.files = [f for p in parts for f in p.files]
    joined._sizes = joined.listing.sizes
    joined._memory = None
    return joined


# --------------------------------------------------------------------------- helpers


def _some(paths, n: int = 5) -> str:
    shown = ", ".join(str(p) for p in list(paths)[:n])
    return shown + (f" (and {len(paths) - n} more)" if len(paths) > n else "")


def _ranges(values) -> str:
    """"0-6, 9-10, 14" for (0, 1, 2, 3, 4, 5, 6, 9, 10, 14): Cityscapes ignores 15 label ids."""
    parts, values = [], sorted(set(values))
    for v in values:
        if parts and v == parts[-1][1] + 1:
            parts[-1][1] = v
        else:
            parts.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def _existing_root(root, layout: str) -> Path:
    if root is None or str(root) == "":
        raise SceneparseError("the dataset root is not set (`data.root`)", f"expected layout: {layout}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise SceneparseError(f"dataset root {path} does not exist or is not a folder", f"expected layout: {layout}")
    return path


def _files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
    )


def pair_folders(image_dir: Path, label_dir: Path, keep=None) -> Listing:
    """Pair images and labels by file stem (`a.jpg` <-> `a.png`); `keep(path)` filters images."""
    images = [p for p in _files(image_dir, IMAGE_EXTENSIONS) if keep is None or keep(p)]
    labels: dict[str, Path] = {}
    if label_dir.is_dir():
        for p in _files(label_dir, LABEL_EXTENSIONS):
            # prefer a PNG when two label files share a stem
            if p.stem not in labels or p.suffix.lower() == ".png":
                labels[p.stem] = p
    stems = {p.stem for p in images}
    pairs = [(p, labels[p.stem]) for p in images if p.stem in labels]
    unlabelled = [p for p in images if p.stem not in labels]
    orphans = sorted(p for stem, p in labels.items() if stem not in stems and (keep is None or keep(p)))
    return Listing(pairs, unlabelled, orphans, where=f"{image_dir} + {label_dir}",
                   unsupported_labels=_unsupported_labels(unlabelled, label_dir))


def _unsupported_labels(unlabelled: list[Path], label_dir: Path) -> dict[Path, Path]:
    """For images without a label: a file of the label's stem in another format (labels saved as
    JPEG), so that the message says why it is not taken instead of "no label file"."""
    if not unlabelled or not label_dir.is_dir():
        return {}
    others = {p.stem: p for p in sorted(label_dir.iterdir(), reverse=True)
              if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in LABEL_EXTENSIONS}
    return {image: others[image.stem] for image in unlabelled if image.stem in others}


def _split(split: str | None, names: Mapping[str, str], kind: str) -> str:
    if split not in names:
        raise SceneparseError(
            f"unknown {kind} split {split!r}", f"use one of: {', '.join(sorted(set(names)))}"
        )
    return names[split]


# --------------------------------------------------------------------------- ADE20K


class ADE20K(SegmentationDataset):
    """ADE20K SceneParsing (ADEChallengeData2016): 150 classes, raw 0 = unlabelled.

    Raw label 0 -> IGNORE_INDEX, raw k (1..150) -> k-1. Files come from the official folders, from
    flat `images/` + `annotations/` folders (split picked by the `ADE_train_`/`ADE_val_` prefix),
    or from `.odgt` lists (JSON lines with fpath_img, fpath_segm, width, height): `odgt` is a
    mapping {train: path, val: path}, a folder holding training.odgt / validation.odgt, or one
    file used whatever the split.
    """

    kind = "ade20k"
    layout = (
        "ROOT/ADEChallengeData2016/images/{training,validation}/*.jpg and "
        "ROOT/ADEChallengeData2016/annotations/{training,validation}/*.png "
        "(ROOT may also be ADEChallengeData2016 itself), or an .odgt list (`data.odgt`)"
    )
    SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
    PREFIX = {"training": "ADE_train_", "validation": "ADE_val_"}

    def __init__(self, root, split: str = "train", odgt=None, transforms=None, strict: bool = True):
        sub = _split(split, self.SPLITS, self.kind)
        if isinstance(odgt, Mapping):  # {train: path, val: path}
            odgt = odgt.get(split) or odgt.get(sub)
        elif odgt and Path(odgt).expanduser().is_dir():  # a folder with the official list names
            odgt = Path(odgt).expanduser() / f"{sub}.odgt"
        if odgt:
            listing = read_odgt(odgt, root)
        else:
            listing = self._scan(_existing_root(root, self.layout), sub)
        mapper = LabelMapper(150, offset=1, ignore_values=(0,))
        self._init_builtin(listing, mapper, transforms, strict)

    @classmethod
    def from_config(cls, data: Mapping, split: str | None, transforms=None, strict: bool = True):
        return cls(data.get("root"), split, odgt=data.get("odgt"), transforms=transforms, strict=strict)

    @classmethod
    def splits_on_disk(cls, data: Mapping) -> list:
        odgt = data.get("odgt")
        if odgt and not isinstance(odgt, Mapping) and Path(odgt).is_file():
            return ["train"]  # one list file serves every split: check it once
        return ["train", "val"]

    def _scan(self, root: Path, sub: str) -> Listing:
        base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
        if not (base / "images").is_dir():
            raise SceneparseError(f"{root} has no ADE20K images folder", f"expected layout: {self.layout}")
        if (base / "images" / sub).is_dir():
            return pair_folders(base / "images" / sub, base / "annotations" / sub)
        # flat folders: the official file names say the split
        prefix = self.PREFIX[sub]
        names = [p.name for p in _files(base / "images", IMAGE_EXTENSIONS)]
        if any(n.startswith(("ADE_train_", "ADE_val_")) for n in names):
            return pair_folders(base / "images", base / "annotations", keep=lambda p: p.name.startswith(prefix))
        return pair_folders(base / "images", base / "annotations")


def read_odgt(odgt, root) -> Listing:
    """Pairs and sizes from an .odgt list; paths are relative to `root` (or its parent, so that
    `root` may be ADEChallengeData2016 itself while the paths start with that folder's name)."""
    odgt = Path(odgt).expanduser()
    if not odgt.is_file():
        raise SceneparseError(f"odgt list {odgt} does not exist", "set `data.odgt` to an existing .odgt file")
    base = Path(root).expanduser() if root else odgt.parent
    pairs, sizes, missing, unlabelled = [], [], [], []
    for number, line in enumerate(read_list_file(odgt), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            img_rel, seg_rel = record["fpath_img"], record["fpath_segm"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SceneparseError(
                f"{odgt} line {number} is not an odgt record",
                'each line must be JSON like {"fpath_img": ..., "fpath_segm": ..., "width": W, "height": H}',
            ) from None
        image = _resolve(base, img_rel)
        label = _resolve(base, seg_rel)
        if not image.is_file():
            missing.append(image)
            continue
        if not label.is_file():
            unlabelled.append(image)
            continue
        pairs.append((image, label))
        if "width" in record and "height" in record:
            sizes.append((int(record["height"]), int(record["width"])))
    return Listing(
        pairs, unlabelled, [], missing, sizes if len(sizes) == len(pairs) else None, where=str(odgt)
    )


def _resolve(base: Path, rel: str) -> Path:
    path = Path(rel)
    if path.is_absolute():
        return path
    first = base / path
    if first.exists() or len(path.parts) < 2 or path.parts[0] != base.name:
        return first
    return base.parent / path


# --------------------------------------------------------------------------- CamVid


class CamVid(SegmentationDataset):
    """CamVid, 11 classes: raw 0..10 are the classes, raw 11 (void) -> IGNORE_INDEX."""

    kind = "camvid"
    layout = "ROOT/{train,val,test}/images/*.jpg|png and ROOT/{train,val,test}/labels/*.png (same stems)"
    SPLITS = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": "test"}

    def __init__(self, root, split: str = "train", transforms=None, strict: bool = True):
        root = _existing_root(root, self.layout)
        sub = _split(split, self.SPLITS, self.kind)
        if not (root / sub / "images").is_dir():
            raise SceneparseError(f"{root / sub / 'images'} does not exist", f"expected layout: {self.layout}")
        listing = pair_folders(root / sub / "images", root / sub / "labels")
        mapper = LabelMapper(11, offset=0, ignore_values=(11,))
        self._init_builtin(listing, mapper, transforms, strict)

    @classmethod
    def splits_on_disk(cls, data: Mapping) -> list:
        root = Path(data.get("root") or ".")
        return [s for s in ("train", "val", "test") if (root / s / "images").is_dir()] or ["train"]


# --------------------------------------------------------------------------- Pascal VOC


class VOC(SegmentationDataset):
    """Pascal VOC 2012 segmentation: 21 classes (0 = background), raw 255 (object outlines and
    difficult regions) -> IGNORE_INDEX. Labels are palette PNGs, read by index.

    Splits are the official lists `ImageSets/Segmentation/<split>.txt` (train 1,464 images, val
    1,449, trainval). `train_aug` is the SBD-augmented training set (10,582 images, none of val):
    labels in `SegmentationClassAug/` listed by `ImageSets/Segmentation/train_aug.txt`, as
    `sceneparse convert sbd` writes them, or as DeepLab's widely shared copy has them (its lines
    `/JPEGImages/x.jpg /SegmentationClassAug/x.png` are read too).
    """

    kind = "voc"
    layout = (
        "ROOT/VOCdevkit/VOC2012/ (or ROOT/VOC2012/, or ROOT itself) holding JPEGImages/*.jpg, "
        "SegmentationClass/*.png and ImageSets/Segmentation/{train,val,trainval}.txt; for train_aug, "
        "SegmentationClassAug/*.png and ImageSets/Segmentation/train_aug.txt (`sceneparse convert sbd`)"
    )
    SPLITS = {
        "train": "train", "training": "train", "val": "val", "validation": "val",
        "trainval": "trainval", "train_aug": "train_aug",
    }

    def __init__(self, root, split: str = "train", transforms=None, strict: bool = True):
        base = voc_base(_existing_root(root, self.layout))
        sub = _split(split, self.SPLITS, self.kind)
        list_file = base / "ImageSets" / "Segmentation" / f"{sub}.txt"
        if not list_file.is_file():
            hint = (
                "make it from SBD's extra labels with `sceneparse convert sbd`, or train on VOC's "
                "own 1,464 images (data.train_split=train)" if sub == "train_aug"
                else f"expected layout: {self.layout}"
            )
            raise SceneparseError(f"the VOC list {list_file} does not exist", hint)
        labels = base / ("SegmentationClassAug" if sub == "train_aug" else "SegmentationClass")
        listing = _listed_pairs(list_file, base / "JPEGImages", labels)
        mapper = LabelMapper(21, offset=0, ignore_values=(IGNORE_INDEX,))
        self._init_builtin(listing, mapper, transforms, strict)

    @classmethod
    def splits_on_disk(cls, data: Mapping) -> list:
        """The lists present; not trainval (train + val) nor train when train_aug (which holds it) is there."""
        lists = voc_base(Path(data.get("root") or ".")) / "ImageSets" / "Segmentation"
        found = [s for s in ("train", "val", "train_aug") if (lists / f"{s}.txt").is_file()]
        if "train_aug" in found and "train" in found:
            found.remove("train")
        return found or ["train"]


def voc_base(root: Path, year: str = "VOC2012", layout: str = VOC.layout) -> Path:
    """The VOC folder under a dataset root (ROOT/VOCdevkit/VOC2012, ROOT/VOC2012 or ROOT)."""
    for base in _voc_candidates(root, year):
        if (base / "JPEGImages").is_dir():
            return base
    raise SceneparseError(f"{root} has no {year} JPEGImages folder", f"expected layout: {layout}")


def _voc_candidates(root: Path, year: str) -> tuple[Path, ...]:
    """Where a VOC-style download may put its year folder: the tarball's layout, or one level in."""
    return root / "VOCdevkit" / year, root / year, root


class PascalContext(SegmentationDataset):
    """PASCAL-Context, the 59-class benchmark: VOC2010 photos labelled in full. Raw 1..59 are the
    59 most frequent classes; raw 0 (background: every other label) is ignored, as the benchmark's
    59-class mIoU does. Reads the PNG layout of the common conversion of the official release
    (`SegmentationClassContext/*.png`, lists in `ImageSets/SegmentationContext/`); sceneparse
    does not convert the official JSON itself."""

    kind = "pascal_context"
    layout = (
        "ROOT/VOCdevkit/VOC2010/ (or ROOT/VOC2010/, or ROOT itself) holding JPEGImages/*.jpg, "
        "SegmentationClassContext/*.png (0 background, 1..59 the classes) and "
        "ImageSets/SegmentationContext/{train,val}.txt"
    )
    SPLITS = {"train": "train", "training": "train", "val": "val", "validation": "val"}

    def __init__(self, root, split: str = "train", transforms=None, strict: bool = True):
        base = voc_base(_existing_root(root, self.layout), "VOC2010", self.layout)
        sub = _split(split, self.SPLITS, self.kind)
        list_file = base / "ImageSets" / "SegmentationContext" / f"{sub}.txt"
        if not list_file.is_file():
            raise SceneparseError(f"the PASCAL-Context list {list_file} does not exist", f"expected layout: {self.layout}")
        listing = _listed_pairs(list_file, base / "JPEGImages", base / "SegmentationClassContext")
        self._init_builtin(listing, self.label_mapper(), transforms, strict)

    @staticmethod
    def label_mapper() -> LabelMapper:
        return LabelMapper(59, offset=1, ignore_values=(0, IGNORE_INDEX))

    @classmethod
    def splits_on_disk(cls, data: Mapping) -> list:
        lists = voc_base(Path(data.get("root") or "."), "VOC2010", cls.layout) / "ImageSets" / "SegmentationContext"
        return [s for s in ("train", "val") if (lists / f"{s}.txt").is_file()] or ["train"]


class PascalContext60(PascalContext):
    """PASCAL-Context with background as a class (60 classes: the other benchmark, MMSegmentation's
    `PascalContextDataset`): the same files, raw 0 is class 0 `background`, raw 1..59 keep their
    values. Only 255 is ignored."""

    kind = "pascal_context60"

    @staticmethod
    def label_mapper() -> LabelMapper:
        return LabelMapper(60)


def _listed_pairs(list_file: Path, image_dir: Path, label_dir: Path) -> Listing:
    """Pairs for the image ids of a VOC-style list (one id, or an `image label` path pair, a line);
    images may have any image extension, labels are `<id>.png`."""
    images = {p.stem: p for p in _files(image_dir, IMAGE_EXTENSIONS)} if image_dir.is_dir() else {}
    pairs, missing, unlabelled = [], [], []
    for line in read_list_file(list_file):
        if not line.strip():
            continue
        stem = Path(line.split()[0]).stem
        image, label = images.get(stem), label_dir / f"{stem}.png"
        if image is None:
            missing.append(image_dir / f"{stem}.jpg")
        elif not label.is_file():
            unlabelled.append(image)
        else:
            pairs.append((image, label))
    return Listing(pairs, unlabelled, [], missing, where=str(list_file))


# --------------------------------------------------------------------------- Cityscapes


class Cityscapes(SegmentationDataset):
    """Cityscapes, fine annotations: the 19 evaluated classes. The `*_gtFine_labelIds.png` files
    hold Cityscapes' 34 label ids; the 19 classes' ids become 0..18 (Cityscapes' trainIds) and the
    other 15 (unlabelled, ego vehicle, ground, parking, rail track, guard rail, ...) are ignored,
    as the official evaluation does. The coarse annotations (gtCoarse) are not read."""

    kind = "cityscapes"
    layout = (
        "ROOT/leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png and "
        "ROOT/gtFine/{train,val,test}/<city>/*_gtFine_labelIds.png"
    )
    SPLITS = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": "test"}
    NUM_LABEL_IDS = 34  # Cityscapes' label ids 0..33 (the licence plate's -1 is never drawn)

    def __init__(self, root, split: str = "train", transforms=None, strict: bool = True):
        root = _existing_root(root, self.layout)
        sub = _split(split, self.SPLITS, self.kind)
        image_dir, label_dir = root / "leftImg8bit" / sub, root / "gtFine" / sub
        if not image_dir.is_dir():
            raise SceneparseError(f"{image_dir} does not exist", f"expected layout: {self.layout}")
        label_ids = builtin_meta("cityscapes")["label_ids"]
        # 255 too: sceneparse's own ignore value, which some tools write for unlabelled pixels
        ignored = (*(v for v in range(self.NUM_LABEL_IDS) if v not in label_ids), IGNORE_INDEX)
        mapper = LabelMapper(19, ignore_values=ignored, raw_ids=tuple(label_ids))
        self._init_builtin(_cityscapes_pairs(image_dir, label_dir), mapper, transforms, strict)

    @classmethod
    def splits_on_disk(cls, data: Mapping) -> list:
        # not test: gtFine's test labels are placeholders (the benchmark server keeps the real ones)
        root = Path(data.get("root") or ".")
        return [s for s in ("train", "val") if (root / "leftImg8bit" / s).is_dir()] or ["train"]


def _cityscapes_pairs(image_dir: Path, label_dir: Path) -> Listing:
    image_tail, label_tail = "_leftImg8bit.png", "_gtFine_labelIds.png"
    images = sorted(image_dir.glob(f"*/*{image_tail}"))
    labels = sorted(label_dir.glob(f"*/*{label_tail}")) if label_dir.is_dir() else []
    frames = {p.parent.name + "/" + p.name[: -len(image_tail)] for p in images}
    pairs, unlabelled = [], []
    for image in images:
        label = label_dir / image.parent.name / (image.name[: -len(image_tail)] + label_tail)
        if label.is_file():
            pairs.append((image, label))
        else:
            unlabelled.append(image)
    orphans = [p for p in labels if p.parent.name + "/" + p.name[: -len(label_tail)] not in frames]
    return Listing(pairs, unlabelled, orphans, where=f"{image_dir} + {label_dir}")


# --------------------------------------------------------------------------- COCO-Stuff


class COCOStuff(SegmentationDataset):
    """COCO-Stuff 164k: 80 thing + 91 stuff classes on the COCO 2017 photos. The official
    `stuffthingmaps_trainval2017` PNGs hold the COCO-Stuff id minus 1 (0 person .. 181 wood) and
    255 for unlabelled pixels; the 11 ids COCO dropped (street sign, hat, shoe, ...) are no class
    and are ignored, the other 171 become 0..170 in id order."""

    kind = "coco_stuff"
    layout = (
        "ROOT/images/{train2017,val2017}/*.jpg and ROOT/annotations/{train2017,val2017}/*.png "
        "(stuffthingmaps_trainval2017)"
    )
    SPLITS = {"train": "train2017", "training": "train2017", "train2017": "train2017",
              "val": "val2017", "validation": "val2017", "val2017": "val2017"}

    def __init__(self, root, split: str = "train", transforms=None, strict: bool = True):
        root = _existing_root(root, self.layout)
        sub = _split(split, self.SPLITS, self.kind)
        if not (root / "images" / sub).is_dir():
            raise SceneparseError(f"{root / 'images' / sub} does not exist", f"expected layout: {self.layout}")
        listing = pair_folders(root / "images" / sub, root / "annotations" / sub)
        label_ids = builtin_meta("coco_stuff")["label_ids"]
        dropped = tuple(v for v in range(182) if v not in label_ids)
        mapper = LabelMapper(171, ignore_values=(*dropped, IGNORE_INDEX), raw_ids=tuple(label_ids))
        self._init_builtin(listing, mapper, transforms, strict)

    @classmethod
    def splits_on_disk(cls, data: Mapping) -> list:
        root = Path(data.get("root") or ".")
        return [s for s in ("train", "val") if (root / "images" / f"{s}2017").is_dir()] or ["train"]


# --------------------------------------------------------------------------- Folder

CLASSES_FILE_NAMES = ("classes.yaml", "classes.yml", "classes.json")
CLASSES_FILE_EXAMPLE = (
    "a classes.yaml such as:\n"
    "    classes: [background, person, car]   # class ids 0, 1, 2 in the label files\n"
    "    palette: [[0, 0, 0], [220, 20, 60], [0, 0, 142]]   # optional\n"
    "    ignore_index: 255   # optional: the label value of unlabelled pixels (default 255)"
)
_CLASSES_KEYS = {"classes", "palette", "ignore_index", "label_colors", "ignore_colors"}


@dataclass
class ClassesSpec:
    names: list[str]
    palette: list[list[int]]
    ignore_index: int | None
    label_colors: dict[tuple[int, int, int], int] | None


def load_classes_file(path: str | Path) -> ClassesSpec:
    """Read a folder dataset's classes file (YAML or JSON).

    Keys: `classes` (list of names, id = position), `palette` (optional, one [r, g, b] per class;
    generated when absent), `ignore_index` (label value of unlabelled pixels, default 255, null for
    none), `label_colors` (optional: the label files are colour-coded, RGB or palette PNGs read by
    their colours; `true` to use the palette, or one [r, g, b] per class) with `ignore_colors`
    (colours meaning unlabelled). Without it, palette PNGs are read by index (VOC's layout).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SceneparseError(f"classes file {path} does not exist", f"write {CLASSES_FILE_EXAMPLE}")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SceneparseError(f"cannot parse classes file {path}: {err}") from None
    if isinstance(spec, list):
        spec = {"classes": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("classes"), list) or not spec["classes"]:
        raise SceneparseError(f"classes file {path} has no `classes` list", f"write {CLASSES_FILE_EXAMPLE}")
    unknown = sorted(set(spec) - _CLASSES_KEYS)
    if unknown:
        raise SceneparseError(
            f"classes file {path}: unknown key(s) {', '.join(unknown)}",
            f"known keys: {', '.join(sorted(_CLASSES_KEYS))}",
        )
    names = [str(n) for n in spec["classes"]]
    palette = spec.get("palette") or make_palette(len(names))
    if len(palette) != len(names) or not all(_is_rgb(c) for c in palette):
        raise SceneparseError(
            f"classes file {path}: `palette` needs one [r, g, b] (0..255) per class "
            f"({len(names)} classes, {len(palette)} colours)"
        )
    ignore = spec.get("ignore_index", IGNORE_INDEX)
    if ignore is not None and (not isinstance(ignore, int) or ignore < 0 or ignore < len(names)):
        raise SceneparseError(
            f"classes file {path}: `ignore_index` {ignore!r} must be an integer >= the number of classes "
            f"({len(names)}), or null"
        )
    colors = None
    spec_colors = spec.get("label_colors")
    if spec_colors:
        per_class = palette if spec_colors is True else spec_colors
        ignore_colors = spec.get("ignore_colors") or []
        if len(per_class) != len(names) or not all(_is_rgb(c) for c in [*per_class, *ignore_colors]):
            raise SceneparseError(f"classes file {path}: `label_colors` needs one [r, g, b] per class")
        if ignore_colors and ignore is None:
            raise SceneparseError(f"classes file {path}: `ignore_colors` needs an `ignore_index`")
        colors = {tuple(int(v) for v in c): i for i, c in enumerate(per_class)}
        colors.update({tuple(int(v) for v in c): ignore for c in ignore_colors})
    return ClassesSpec(names, [list(map(int, c)) for c in palette], ignore, colors)


def _is_rgb(colour) -> bool:
    return (
        isinstance(colour, (list, tuple)) and len(colour) == 3
        and all(isinstance(v, int) and 0 <= v <= 255 for v in colour)
    )


def find_classes_file(root: Path) -> Path | None:
    return next((root / n for n in CLASSES_FILE_NAMES if (root / n).is_file()), None)


class Folder(SegmentationDataset):
    """The user's own data: images and labels paired by file stem, plus a classes file, in one of
    two trees:

    - `ROOT/images/...` + `ROOT/labels/...`: either split subfolders `images/<split>/` +
      `labels/<split>/` (then ROOT/images holds folders, no images), or flat folders with split
      lists `ROOT/<split>.txt` (one image stem or file name per line), or flat folders alone:
      then every split is the whole folder.
    - `ROOT/<split>/images/` + `ROOT/<split>/labels/` (CamVid's tree).

    When `ROOT/images/` exists it is the dataset and `ROOT/<split>/` folders are not read. A folder
    with split subfolders or lists refuses a split it does not have (a typo would otherwise
    silently train or validate on everything).
    Labels hold class ids 0..C-1 (palette PNGs: the palette indices) and the classes file's
    `ignore_index` for unlabelled pixels, or colours with `label_colors`.
    """

    kind = "folder"
    layout = (
        "ROOT/classes.yaml and one of these trees (an image and its label share a file stem; labels are PNG):\n"
        "    ROOT/images/<split>/*  +  ROOT/labels/<split>/*.png     "
        "e.g. ROOT/images/train/a.jpg + ROOT/labels/train/a.png\n"
        "    ROOT/<split>/images/*  +  ROOT/<split>/labels/*.png     "
        "e.g. ROOT/train/images/a.jpg + ROOT/train/labels/a.png\n"
        "    ROOT/images/*  +  ROOT/labels/*.png, with lists ROOT/<split>.txt (one image name a line), or\n"
        "      without lists (then every split is the whole folder)\n"
        "  when ROOT/images/ exists, ROOT/<split>/ folders are not read"
    )
    # list files that make a folder "split by lists": asking for another split is then an error
    LIST_SPLITS = ("train", "training", "val", "valid", "validation", "test", "trainval", "dev")

    def __init__(self, root, split: str | None = "train", classes_file=None, transforms=None, strict: bool = True):
        root = _existing_root(root, self.layout)
        classes_path = Path(classes_file).expanduser() if classes_file else find_classes_file(root)
        if classes_path is None:
            raise SceneparseError(
                f"{root} has no classes file ({' / '.join(CLASSES_FILE_NAMES)})",
                f"write {CLASSES_FILE_EXAMPLE}\nor point at one: `data.classes_file=PATH` in a training "
                "config, `--classes-file PATH` for `sceneparse eval` and `sceneparse data check`",
            )
        spec = load_classes_file(classes_path)
        self.classes_file = classes_path
        listing = self._scan(root, split)
        ignore = () if spec.ignore_index is None else (spec.ignore_index,)
        mapper = LabelMapper(len(spec.names), offset=0, ignore_values=ignore)
        super().__init__(
            listing, spec.names, spec.palette, mapper, transforms, label_colors=spec.label_colors, strict=strict
        )

    @classmethod
    def from_config(cls, data: Mapping, split: str | None, transforms=None, strict: bool = True):
        return cls(data.get("root"), split, classes_file=data.get("classes_file"), transforms=transforms,
                   strict=strict)

    @classmethod
    def splits_on_disk(cls, data: Mapping) -> list:
        """Split subfolders (either tree), then list files (not trainval beside its parts), else
        everything as one split (None)."""
        root = Path(data.get("root") or ".")
        if not (root / "images").is_dir():
            return _split_tree_dirs(root) or [None]
        lists = [s for s in cls.LIST_SPLITS if (root / f"{s}.txt").is_file()]
        if "trainval" in lists and len(lists) > 1:
            lists.remove("trainval")
        return _image_subfolders(root) or lists or [None]

    def _scan(self, root: Path, split: str | None) -> Listing:
        images = root / "images"
        if not images.is_dir():
            splits = _split_tree_dirs(root)
            if not splits:
                raise SceneparseError(f"{root} has neither an images/ folder nor <split>/images/ folders",
                                      f"expected layout: {self.layout}")
            if split is None:  # every split
                return _merge([pair_folders(root / s / "images", root / s / "labels") for s in splits])
            if split not in splits:
                raise self._no_split(root, split, root / split / "images", f"folders {root}/<split>/images", splits,
                                     f"make {root / split / 'images'} and {root / split / 'labels'}")
            return pair_folders(root / split / "images", root / split / "labels")
        if split and (images / split).is_dir():
            return pair_folders(images / split, root / "labels" / split)
        subfolders = _image_subfolders(root)
        if split and subfolders:
            raise self._no_split(root, split, images / split, f"subfolders of {images}", subfolders,
                                 f"make {images / split} and {root / 'labels' / split}")
        listing = pair_folders(images, root / "labels")
        list_file = root / f"{split}.txt" if split else None
        if list_file is None or not list_file.is_file():
            lists = [s for s in self.LIST_SPLITS if (root / f"{s}.txt").is_file()]
            if split and lists:
                raise self._no_split(root, split, list_file, f"lists {root}/<split>.txt",
                                     [f"{s} ({s}.txt)" for s in lists],
                                     f"write {list_file} naming that split's images, one a line")
            return listing  # no lists: every split is the whole folder
        wanted = [line.strip() for line in read_list_file(list_file) if line.strip()]
        by_stem = {image.stem: (image, label) for image, label in listing.pairs}
        unlabelled = {p.stem: p for p in listing.images_without_labels}
        pairs, missing, no_label = [], [], []
        for entry in wanted:
            stem = Path(entry).stem
            if stem in by_stem:
                pairs.append(by_stem[stem])
            elif stem in unlabelled:
                no_label.append(unlabelled[stem])
            else:
                missing.append(root / "images" / entry)
        unsupported = {p: listing.unsupported_labels[p] for p in no_label if p in listing.unsupported_labels}
        # labels no image has (a renamed label, say) belong to no list; told for each split, once by
        # the data check: next to "image has no label file" they show the name that went wrong
        return Listing(pairs, no_label, listing.labels_without_images, missing, where=str(list_file),
                       unsupported_labels=unsupported)

    @staticmethod
    def _no_split(root: Path, split: str, missing: Path, what: str, have: list[str], make: str) -> SceneparseError:
        return SceneparseError(
            f"the folder dataset {root} has no split {split!r}: {missing} does not exist; "
            f"the splits it has ({what}): {', '.join(have)}",
            "name one of those splits (data.train_split / data.val_split for training, --split for "
            f"`sceneparse eval` and `sceneparse data check`), or {make}",
        )


def _image_subfolders(root: Path) -> list[str]:
    """The split subfolders of ROOT/images: its folders, when it holds no images itself (flat
    images make any folder beside them something else)."""
    images = root / "images"
    if not images.is_dir() or _files(images, IMAGE_EXTENSIONS):
        return []
    return sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_tree_dirs(root: Path) -> list[str]:
    """The splits of the ROOT/<split>/images tree."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / "images").is_dir())


def _merge(listings: list[Listing]) -> Listing:
    """One listing holding several (splits joined)."""
    sizes = [listing.sizes for listing in listings]
    return Listing(
        pairs=[pair for listing in listings for pair in listing.pairs],
        images_without_labels=[x for listing in listings for x in listing.images_without_labels],
        labels_without_images=[x for listing in listings for x in listing.labels_without_images],
        missing=[x for listing in listings for x in listing.missing],
        sizes=None if any(s is None for s in sizes) else [hw for s in sizes for hw in s],
        where=" + ".join(listing.where for listing in listings),
        unsupported_labels={k: v for listing in listings for k, v in listing.unsupported_labels.items()},
    )


def detect_kind(root: Path) -> str | None:
    """Guess a folder's dataset layout (a kind of `DATASETS`; None when unknown)."""
    root = Path(root)
    # the classes file is the folder kind's own: it wins over a tree that also looks like another
    # kind (ROOT/{train,val}/{images,labels} is CamVid's too)
    if find_classes_file(root) is not None:
        return "folder"
    if any((root / "images" / s).is_dir() and (root / "annotations" / s).is_dir() for s in ("train2017", "val2017")):
        return "coco_stuff"
    context = any((b / "SegmentationClassContext").is_dir() for b in _voc_candidates(root, "VOC2010"))
    voc = any((b / "JPEGImages").is_dir() for b in _voc_candidates(root, "VOC2012"))
    if context != voc:  # both (one VOCdevkit holding VOC2010 and VOC2012): the caller must say which
        return "pascal_context" if context else "voc"
    if context:
        return None
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return "cityscapes"
    if (root / "ADEChallengeData2016").is_dir() or ((root / "images").is_dir() and (root / "annotations").is_dir()):
        return "ade20k"
    if any((root / s / "images").is_dir() and (root / s / "labels").is_dir() for s in ("train", "val", "test")):
        return "camvid"
    if (root / "images").is_dir():
        return "folder"
    return None

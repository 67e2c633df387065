"""SBD (Hariharan et al., Semantic Boundaries Dataset) -> VOC's `train_aug` split.

SBD's release (benchmark_RELEASE/dataset) has `img/*.jpg`, `cls/<id>.mat` and `train.txt` /
`val.txt`; each `.mat` holds a MATLAB struct `GTcls` whose `Segmentation` field is an HxW map of
VOC's 21 class ids (no void). SBD's images are VOC photos, so only the labels are converted.

`train_aug` is DeepLab's training set: (VOC train + SBD train + SBD val) - VOC val, 10,582 images
with the full releases. Each image's label is VOC's own where VOC has one (it marks outlines void,
which SBD does not), else SBD's. The labels become palette PNGs (index = class id, VOC's colours)
in `VOC2012/SegmentationClassAug/`, listed by `VOC2012/ImageSets/Segmentation/train_aug.txt`,
the layout the `voc` dataset reads.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from sceneparse.data.datasets import voc_base
from sceneparse.data.io import read_list_file
from sceneparse.data.meta import builtin_meta
from sceneparse.errors import SceneparseError

SBD_LAYOUT = (
    "SBD_ROOT/benchmark_RELEASE/dataset/ (or SBD_ROOT/dataset/, or SBD_ROOT itself) holding cls/*.mat, "
    "train.txt, val.txt"
)


def sbd_base(root: str | Path) -> Path:
    root = Path(root).expanduser()
    for base in (root / "benchmark_RELEASE" / "dataset", root / "dataset", root):
        if (base / "cls").is_dir():
            return base
    raise SceneparseError(f"{root} has no SBD cls/ folder", f"expected layout: {SBD_LAYOUT}")


def read_sbd_label(path: str | Path) -> np.ndarray:
    """The class-id map (uint8 HxW) of one SBD `cls/<id>.mat` file."""
    if not Path(path).is_file():
        raise SceneparseError(f"SBD label {path} does not exist, though SBD's lists name it",
                              "the SBD download is incomplete (a partial extraction?): unpack it again")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise SceneparseError(
            "reading SBD's .mat labels needs scipy", "pip install 'sceneparse[sbd]' (or: pip install scipy)"
        ) from None
    try:
        segmentation = loadmat(path, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
    except Exception as err:  # noqa: BLE001 - any failure to read is this file's fault
        raise SceneparseError(
            f"cannot read SBD label {path}: {err}",
            "the file is corrupt or not SBD's cls/*.mat: download SBD again",
        ) from None
    labels = np.asarray(segmentation)
    if labels.ndim != 2 or labels.size == 0 or labels.min() < 0 or labels.max() > 20:
        values = f", values {labels.min()}..{labels.max()}" if labels.size else ""
        raise SceneparseError(f"SBD label {path} is not an HxW map of VOC's class ids 0..20 (shape {labels.shape}{values})")
    return labels.astype(np.uint8)


def _ids(list_file: Path) -> list[str]:
    if not list_file.is_file():
        raise SceneparseError(f"{list_file} does not exist", f"expected VOC's and SBD's split lists ({SBD_LAYOUT})")
    return [Path(line.split()[0]).stem for line in read_list_file(list_file) if line.strip()]


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def convert_sbd(sbd_root: str | Path, voc_root: str | Path, progress: bool = True) -> tuple[Path, int, int]:
    """Write VOC2012/SegmentationClassAug/*.png and ImageSets/Segmentation/train_aug.txt under
    `voc_root`; returns (the list file, images listed, labels taken from VOC). The list is written
    last, so an interrupted conversion leaves no list naming missing labels; running it again
    redoes the conversion."""
    voc, sbd = voc_base(Path(voc_root).expanduser()), sbd_base(sbd_root)
    lists = voc / "ImageSets" / "Segmentation"
    voc_train, voc_val = _ids(lists / "train.txt"), set(_ids(lists / "val.txt"))
    sbd_ids = set(_ids(sbd / "train.txt")) | set(_ids(sbd / "val.txt"))
    ids = sorted((set(voc_train) | sbd_ids) - voc_val)
    images = {p.stem for p in (voc / "JPEGImages").iterdir()}
    no_image = [i for i in ids if i not in images]
    if no_image:
        raise SceneparseError(
            f"{len(no_image)} train_aug images are not in {voc / 'JPEGImages'}, e.g. {', '.join(no_image[:5])}",
            "point --voc-root at the full VOC2012 release (17,125 JPEG images)",
        )
    out = voc / "SegmentationClassAug"
    try:
        out.mkdir(exist_ok=True)
        from_voc = _write_labels(ids, voc, sbd, sbd_ids, out, progress)
        list_file = lists / "train_aug.txt"
        _write_atomic(list_file, lambda tmp: tmp.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8"))
    except OSError as err:  # disk full, read-only dataset folder
        raise SceneparseError(
            f"cannot write the converted labels under {voc}: {err}",
            "free disk space or make the VOC2012 folder writable, then run the conversion again",
        ) from None
    return list_file, len(ids), from_voc


def _write_labels(ids, voc: Path, sbd: Path, sbd_ids: set, out: Path, progress: bool) -> int:
    palette = [v for colour in builtin_meta("voc")["palette"] for v in colour]
    from_voc = 0
    for image_id in tqdm(ids, desc="SBD -> SegmentationClassAug", unit="label", disable=not progress):
        target, voc_label = out / f"{image_id}.png", voc / "SegmentationClass" / f"{image_id}.png"
        if voc_label.is_file():  # VOC's own label: finer, with its void outlines
            _write_atomic(target, lambda tmp: shutil.copyfile(voc_label, tmp))
            from_voc += 1
            continue
        if image_id not in sbd_ids:
            raise SceneparseError(
                f"VOC lists {image_id} for training but has no label {voc_label}", "check the VOC2012 download"
            )
        png = Image.fromarray(read_sbd_label(sbd / "cls" / f"{image_id}.mat"), mode="P")
        png.putpalette(palette)
        _write_atomic(target, lambda tmp: png.save(tmp, format="PNG"))
    return from_voc

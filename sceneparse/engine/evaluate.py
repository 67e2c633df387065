"""Evaluate a model on a dataset: one ConfusionMatrix over every image, at the original label size.

Images are predicted one at a time (multi-scale inputs differ in size per image) by a `Predictor`;
a DataLoader decodes the next images in worker processes meanwhile. Under torch.distributed every
rank evaluates its share of the images and the counts are summed, so every rank gets the same report.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from sceneparse.engine.distributed import DistInfo, shard, unwrap
from sceneparse.engine.infer import Predictor
from sceneparse.engine.metrics import ConfusionMatrix
from sceneparse.errors import SceneparseError

REPORT_FORMAT = "sceneparse-eval/1"
# name -> how a Predictor is made for it; options are Predictor's (csail: also single_scale)
PROTOCOLS = {"default": Predictor, "csail": Predictor.csail}


def model_num_classes(model: nn.Module) -> int | None:
    """Number of classes a model predicts, from what it says about itself."""
    core = unwrap(model)
    for value in (getattr(core, "num_classes", None), (getattr(core, "config", None) or {}).get("num_classes")):
        if value is not None:
            return int(value)
    names = getattr(core, "class_names", None)
    return len(names) if names is not None else None


def check_num_classes(model: nn.Module, dataset, model_source: str = "the model",
                      data_source: str = "the dataset") -> list[tuple[int, str, str]]:
    """SceneparseError naming both numbers and both sources when the class counts differ, or when
    the model and the dataset name the same classes in another order (every IoU would be reported
    under the wrong name). Returns the (id, model's name, dataset's name) pairs that differ
    otherwise (a renamed class: for the caller to warn about)."""
    ours, theirs = model_num_classes(model), dataset.num_classes
    if ours is not None and ours != theirs:
        raise SceneparseError(
            f"class count mismatch: {model_source} predicts {ours} classes but {data_source} has "
            f"{theirs} classes",
            "evaluate a model trained for this dataset (or fine-tune one on it with `sceneparse train`)",
        )
    names = getattr(unwrap(model), "class_names", None)
    if names is None or getattr(dataset, "class_names", None) is None:
        return []
    differ = [(i, a, b) for i, (a, b) in enumerate(zip(names, dataset.class_names)) if a.lower() != b.lower()]
    if differ and sorted(map(str.lower, names)) == sorted(map(str.lower, dataset.class_names)):
        shown = "; ".join(f"id {i}: {a!r} in the model, {b!r} in the data" for i, a, b in differ[:4])
        raise SceneparseError(
            f"{model_source} and {data_source} name the same classes in another order ({shown}"
            f"{'; ...' if len(differ) > 4 else ''})",
            "list the classes in the model's order (its checkpoint's class_names) in the dataset's classes file",
        )
    return differ


def warn_renamed_classes(differ: list[tuple[int, str, str]]) -> None:
    """The warning for `check_num_classes`'s renamed classes (the report names classes as the dataset does)."""
    if differ:
        shown = ", ".join(f"{i}: {a!r} / {b!r}" for i, a, b in differ[:6])
        print(f"warning: {len(differ)} class id(s) have other names in the model than in the dataset "
              f"(id: model / dataset: {shown}{', ...' if len(differ) > 6 else ''}); check that they mean "
              "the same classes", file=sys.stderr)


def _first(batch):
    return batch[0]


def evaluate(
    model: nn.Module,
    dataset,
    predictor_opts: dict | None = None,
    device: torch.device | str | None = None,
    *,
    protocol: str = "default",
    num_workers: int = 2,
    max_images: int | None = None,
    progress: bool = False,
    distributed: bool | None = None,
    mean=None,
    std=None,
    **predictor_kwargs,
) -> dict:
    """Score `model` on `dataset` (samples `{"image", "mask", ...}` at full size).

    `predictor_opts` and extra keywords are Predictor options (scales, flip, max_size, window,
    amp_dtype, channels_last, ...); `mean`/`std` are shorthand for `normalization`.
    `protocol="csail"` uses `Predictor.csail` (then `single_scale` is an option too).
    `distributed=None` splits the images over ranks when torch.distributed is initialised (every
    rank must call this then). The model's train/eval mode is restored afterwards.

    Returns the report: the metrics of `ConfusionMatrix.compute()` at the top level, plus
    `classes` (per-class rows), `confusion_matrix`, `settings`, `num_images`, `seconds`.
    """
    if protocol not in PROTOCOLS:
        raise SceneparseError(f"unknown evaluation protocol {protocol!r}", f"use one of: {', '.join(PROTOCOLS)}")
    options = {**(predictor_opts or {}), **predictor_kwargs}
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        options["normalization"] = {"mean": list(mean), "std": list(std)}
    check_num_classes(model, dataset)
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()

    fixed = {"csail": ("scales", "max_size", "resize"), "default": ("single_scale",)}[protocol]
    clash = sorted(set(fixed) & set(options))
    if clash:
        raise SceneparseError(f"option(s) {', '.join(clash)} do not apply to protocol {protocol!r}",
                              "the csail protocol fixes scales, max_size and resizing (single_scale picks "
                              "450 alone); the default protocol takes scales and max_size")
    was_training = model.training
    predictor = PROTOCOLS[protocol](model, device=device, **options)
    device = predictor.device
    cm = ConfusionMatrix(dataset.num_classes, device=device)
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size()) if distributed else DistInfo()
    images = shard(Subset(dataset, range(count)), info)
    loader = DataLoader(images, batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=_first,
                        pin_memory=device.type == "cuda")
    start = time.perf_counter()
    try:
        for sample in tqdm(loader, desc="eval", disable=not progress, file=sys.stderr, dynamic_ncols=True):
            labels = predictor.predict(sample["image"])
            cm.update(labels, sample["mask"].as_subclass(torch.Tensor).to(device, non_blocking=True))
        if distributed:
            cm.all_reduce()
        metrics = cm.compute()
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    num_images = len(images)
    if distributed:
        count = torch.tensor([num_images], device=device)
        dist.all_reduce(count)
        num_images = int(count)

    names = list(dataset.class_names)
    classes = [
        {"id": i, "name": names[i], "iou": metrics["iou"][i], "accuracy": metrics["accuracy"][i],
         "pixels": metrics["class_pixels"][i]}
        for i in range(len(names))
    ]
    return {
        "format": REPORT_FORMAT,
        **{k: v for k, v in metrics.items() if k not in ("iou", "accuracy", "class_pixels")},
        "num_classes": len(names),
        "num_images": num_images,
        "seconds": seconds,
        "classes": classes,
        "confusion_matrix": cm.matrix.cpu().tolist(),
        "settings": {
            "protocol": protocol,
            "scales": list(predictor.scales),
            "flip": predictor.flip,
            "max_size": predictor.max_size,
            "pad_multiple": predictor.pad_multiple,
            "resize": predictor.resize,
            "window": predictor.window,
            "normalization": {"mean": predictor.mean, "std": predictor.std},
            "amp_dtype": None if predictor.amp_dtype is None else str(predictor.amp_dtype).removeprefix("torch."),
        },
    }


def _json_safe(value):
    """NaN/inf -> None (JSON null), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(report: dict, path: str | Path) -> Path:
    """The report as strict JSON (absent classes' NaN scores become null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(report), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def format_table(report: dict) -> str:
    """Per-class IoU/accuracy table and the summary lines, as printed by `sceneparse eval`."""
    width = max(12, *(len(c["name"]) for c in report["classes"]))
    lines = [f"{'id':>4}  {'class':<{width}}  {'IoU %':>7}  {'acc %':>7}  {'pixels':>12}"]
    for c in report["classes"]:
        lines.append(f"{c['id']:>4}  {c['name']:<{width}}  {_pct(c['iou']):>7}  {_pct(c['accuracy']):>7}"
                     f"  {c['pixels']:>12}")
    lines.append("")
    lines.append(
        f"pixel accuracy {_pct(report['pixel_accuracy'])} %   mean IoU {_pct(report['mean_iou'])} %   "
        f"mean accuracy {_pct(report['mean_accuracy'])} %   overall score {_pct(report['score'])} %"
    )
    lines.append(f"{report['num_images']} images in {report['seconds']:.1f} s "
                 f"(mean IoU over classes present in labels or predictions)")
    return "\n".join(lines)

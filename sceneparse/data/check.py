"""Dataset checks: the cheap start-up check the trainer runs, and the full `sceneparse data check`.

`quick_check(dataset)`: files exist and pair up, headers readable, image and label sizes agree,
no EXIF-rotated image (no pixel decoding). `check_datasets(...)`: reads every file once, in a thread pool, and reports
every problem below plus the per-class pixel histogram.

Problem codes (severity): missing_file, image_without_label, unreadable_image, unreadable_label,
size_mismatch, color_label, bad_label_values, exif_rotated, no_files (errors); label_without_image,
duplicate_files, split_overlap, unused_classes (warnings).
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sceneparse.data.datasets import TURNED_LABEL_FIX, Folder, _size_mismatch, label_fits_stored_pixels
from sceneparse.data.io import ColorLabelError, decode_image_bytes, exif_orientation, image_header, label_size
from sceneparse.data.meta import IGNORE_INDEX
from sceneparse.errors import SceneparseError

ERROR, WARNING = "error", "warning"


@dataclass
class Problem:
    code: str
    severity: str
    message: str
    files: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


def _listing_problems(dataset) -> list[Problem]:
    listing = dataset.listing
    problems = [
        Problem("missing_file", ERROR, f"{p} is listed ({listing.where}) but does not exist", [str(p)])
        for p in listing.missing
    ]
    problems += [
        Problem("image_without_label", ERROR, listing.no_label_message(p),
                [str(p)] + ([str(listing.unsupported_labels[p])] if p in listing.unsupported_labels else []))
        for p in listing.images_without_labels
    ]
    problems += [
        Problem("label_without_image", WARNING, f"label {p} has no image (ignored)", [str(p)])
        for p in listing.labels_without_images
    ]
    if not listing.pairs and not listing.missing and not listing.images_without_labels:
        problems.append(Problem("no_files", ERROR, f"no image/label pairs in {listing.where}"))
    return problems


def _quick_pair(pair: tuple[str, str]) -> list[Problem]:
    image, label = pair
    problems = []
    try:
        image_hw, orientation = image_header(image)
    except SceneparseError as err:
        return [Problem("unreadable_image", ERROR, err.message, [image])]
    try:
        label_hw = label_size(label)
    except SceneparseError as err:
        return [Problem("unreadable_label", ERROR, err.message, [label])]
    return problems + _size_problems(image, label, orientation, image_hw, label_hw)


def _size_problems(image, label, orientation: int, image_hw, label_hw) -> list[Problem]:
    """Size and EXIF problems of a pair. Images are read with their orientation applied (as photo
    viewers and labelling tools show them). For a non-square image turned by 90 degrees
    (orientations 5-8) the label's size tells which view it was drawn on: the turned one is right,
    the stored one is one problem (remove the tag or turn the label), any other is a size mismatch.
    Otherwise nothing tells: a 180-degree turn (3) or a mirror (2, 4) keeps the size, so a label
    drawn on the stored pixels passes every size check and is silently misaligned."""
    image_hw, label_hw = tuple(image_hw), tuple(label_hw)
    if label_fits_stored_pixels(orientation, image_hw, label_hw):  # the same words as training's error
        err = _size_mismatch(image, image_hw, label, label_hw, orientation)
        return [Problem("exif_rotated", ERROR, f"{err.message} ({TURNED_LABEL_FIX})", [str(image), str(label)],
                        {"orientation": orientation, "image_size": list(image_hw), "label_size": list(label_hw)})]
    problems = [] if image_hw == label_hw else [_size_problem(image, image_hw, label, label_hw)]
    turned = orientation in (5, 6, 7, 8) and image_hw[0] != image_hw[1]
    if orientation == 1 or turned:
        return problems
    return [Problem(
        "exif_rotated", ERROR,
        f"image {image} has EXIF orientation {orientation}: it is read rotated/mirrored, and nothing "
        f"tells whether its label {label} was drawn on the stored pixels or on the rotated view "
        "(save the image upright, e.g. with Pillow's ImageOps.exif_transpose, with its label to match)",
        [image, label], {"orientation": orientation},
    ), *problems]


def _size_problem(image, image_hw, label, label_hw) -> Problem:
    return Problem(
        "size_mismatch", ERROR,
        f"image {image} is {image_hw[0]}x{image_hw[1]} (HxW) but its label {label} is {label_hw[0]}x{label_hw[1]}",
        [str(image), str(label)], {"image_size": list(image_hw), "label_size": list(label_hw)},
    )


def quick_check(dataset, workers: int | None = None) -> list[Problem]:
    """The cheap checks (listing, headers, sizes) of a dataset; [] when nothing is wrong.

    The trainer runs it at start-up and refuses a dataset with any problem of severity "error".
    """
    if not getattr(dataset, "on_disk", True):
        return []
    problems = _listing_problems(dataset)
    with ThreadPoolExecutor(max_workers=workers or _default_workers()) as pool:
        for found in pool.map(_quick_pair, dataset.files, chunksize=64):
            problems.extend(found)
    return problems


def _default_workers() -> int:
    return min(8, (os.cpu_count() or 2) * 2)


# --------------------------------------------------------------------------- full check


@dataclass
class _PairResult:
    image: str
    digest: str | None = None
    counts: np.ndarray | None = None  # pixels per class id, then the ignore count last
    problems: list[Problem] = field(default_factory=list)


def _full_pair(dataset, image: str, label: str) -> _PairResult:
    result = _PairResult(image)
    data = b""
    try:
        data = Path(image).read_bytes()  # read once: hashed, decoded, EXIF parsed from memory
        result.digest = hashlib.sha1(data).hexdigest()
        image_hw = tuple(decode_image_bytes(data, image).shape[-2:])
    except (OSError, SceneparseError) as err:
        message = err.message if isinstance(err, SceneparseError) else f"cannot read image {image}: {err}"
        result.problems.append(Problem("unreadable_image", ERROR, message, [image]))
        image_hw = None
    orientation = exif_orientation(data) if image_hw else 1
    try:
        raw = dataset.read_raw_label(label)
    except ColorLabelError as err:  # training's words, fix included (label_colors: in classes.yaml)
        result.problems.append(Problem("color_label", ERROR, f"{err.message} (fix: {err.hint})", [label]))
        return result
    except SceneparseError as err:
        result.problems.append(Problem("unreadable_label", ERROR, err.message, [label]))
        return result
    if image_hw is not None:
        result.problems += _size_problems(image, label, orientation, image_hw, raw.shape)
    mapped, bad = dataset.mapper.map_values(raw)
    if bad:
        result.problems.append(Problem(
            "bad_label_values", ERROR,
            f"label {label} has values {', '.join(map(str, bad[:12]))} that are neither a class nor "
            f"the ignore value ({dataset.mapper.describe()})",
            [label], {"values": bad},
        ))
    valid = mapped[mapped >= 0]
    counts = np.bincount(valid.ravel(), minlength=IGNORE_INDEX + 1)
    result.counts = np.append(counts[: dataset.num_classes], counts[IGNORE_INDEX])
    return result


@dataclass
class CheckReport:
    kind: str
    root: str
    splits: dict[str, int]  # split -> number of image/label pairs
    class_names: list[str]
    pixel_counts: list[int]  # per class id
    ignore_pixels: int
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {
            "ok": self.ok, "kind": self.kind, "root": self.root, "splits": self.splits,
            "num_errors": len(self.errors), "num_warnings": len(self.warnings),
            "problems": [asdict(p) for p in self.problems],
            "classes": [
                {"id": i, "name": n, "pixels": c} for i, (n, c) in enumerate(zip(self.class_names, self.pixel_counts))
            ],
            "ignore_pixels": self.ignore_pixels,
        }

    def format_text(self, max_per_code: int = 20) -> str:
        lines = [f"{self.kind} dataset at {self.root}: "
                 + ", ".join(f"{split} {n} pairs" for split, n in self.splits.items())]
        for title, group in (("errors", self.errors), ("warnings", self.warnings)):
            if not group:
                continue
            lines.append(f"{title} ({len(group)}):")
            by_code = defaultdict(list)
            for problem in group:
                by_code[problem.code].append(problem)
            for code, items in by_code.items():
                lines += [f"  {p}" for p in items[:max_per_code]]
                if len(items) > max_per_code:
                    lines.append(f"  [{code}] ... and {len(items) - max_per_code} more (--json lists all)")
        total = sum(self.pixel_counts) + self.ignore_pixels
        if total:
            lines.append("pixels per class:")
            rows = [(str(i), n, c) for i, (n, c) in enumerate(zip(self.class_names, self.pixel_counts))]
            rows.append(("-", "(ignored)", self.ignore_pixels))
            width = max(len(name) for _, name, _ in rows)  # "(ignored)" too, or its row sticks out
            for ident, name, count in rows:
                lines.append(f"  {ident:>3}  {name:<{width}}  {count:>12,}  {100 * count / total:6.2f}%")
        lines.append(f"result: {len(self.errors)} errors, {len(self.warnings)} warnings"
                     + ("" if self.ok else " -> fix the errors before training"))
        return "\n".join(lines)

    def save_histogram(self, path: str | Path) -> Path:
        """Bar chart of pixels per class (log scale) as a PNG."""
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        n = len(self.class_names)
        fig = Figure(figsize=(max(6.0, 0.18 * n + 2), 4.5))
        ax = fig.add_subplot()
        ax.bar(range(n), [max(c, 0) for c in self.pixel_counts], color="tab:blue")
        ax.set_yscale("symlog")
        ax.set_xticks(range(n))
        ax.set_xticklabels(self.class_names, rotation=90, fontsize=7 if n > 40 else 9)
        ax.set_ylabel("pixels")
        ax.set_title(f"{self.kind}: pixels per class ({', '.join(self.splits)}); ignored: {self.ignore_pixels:,}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return path


def check_datasets(datasets: dict, root: str = "", workers: int | None = None, progress: bool = True) -> CheckReport:
    """Full check of `{split: dataset}` (same kind and classes): every file read once, even when
    two splits hold it (a folder without split lists is every split), each problem told once."""
    from tqdm import tqdm

    first = next(iter(datasets.values()))
    problems: list[Problem] = []
    counts = np.zeros(first.num_classes + 1, dtype=np.int64)
    digests: dict[str, dict[str, None]] = defaultdict(dict)  # content -> its files, each once, in order
    jobs, queued = [], set()
    for dataset in datasets.values():
        if getattr(dataset, "on_disk", True):
            problems += _listing_problems(dataset)
            pairs = [pair for pair in dataset.files if pair not in queued]
            queued.update(pairs)
            jobs += [(dataset, image, label) for image, label in pairs]
    problems += overlap_problems(list(datasets.items()))
    with ThreadPoolExecutor(max_workers=workers or _default_workers()) as pool:
        results = pool.map(lambda job: _full_pair(*job), jobs)
        for result in tqdm(results, total=len(jobs), desc="checking", unit="pair", disable=not progress):
            problems += result.problems
            if result.counts is not None:
                counts += result.counts
            if result.digest:
                digests[result.digest][result.image] = None
    for files in map(list, digests.values()):  # one file in two splits is split_overlap's, not this
        if len(files) > 1:
            problems.append(Problem(
                "duplicate_files", WARNING, f"{len(files)} images have the same content: {', '.join(files)}", files
            ))
    class_counts = counts[:-1].tolist()
    unused = [name for name, c in zip(first.class_names, class_counts) if c == 0]
    if jobs and unused:
        problems.append(Problem(
            "unused_classes", WARNING,
            f"{len(unused)} classes never occur: {', '.join(unused[:30])}" + (" ..." if len(unused) > 30 else ""),
            details={"classes": unused},
        ))
    told = {(p.code, p.message): p for p in problems}  # two splits sharing a listing share its problems
    return CheckReport(
        first.kind, str(root), {split: len(ds) for split, ds in datasets.items()},
        list(first.class_names), class_counts, int(counts[-1]), list(told.values()),
    )


def overlap_problems(splits: list[tuple[str, object]]) -> list[Problem]:
    """The same image files in two of the `(name, dataset)` splits (e.g. a folder without split
    lists, read as both train and val; or one split named twice): validation would score images
    the model trained on."""
    files = [(name, {str(image) for image, _ in ds.files}) for name, ds in splits
             if getattr(ds, "on_disk", True) and hasattr(ds, "files")]
    problems = []
    for i, (a, in_a) in enumerate(files):
        for b, in_b in files[i + 1:]:
            shared = sorted(in_a & in_b)
            if shared:
                problems.append(Problem(
                    "split_overlap", WARNING,
                    f"{len(shared)} {'image is' if len(shared) == 1 else 'images are'} in both {a} and {b} "
                    f"(e.g. {shared[0]}): validating on {b} after training on {a} would score images the "
                    "model has seen; give each split its own files (a folder dataset: ROOT/images/train/ + "
                    "ROOT/labels/train/ and ROOT/images/val/ + ROOT/labels/val/, or ROOT/train/{images,labels}/ "
                    "and ROOT/val/{images,labels}/, or train.txt and val.txt lists at ROOT; other kinds: "
                    "docs/datasets.md), or set train.val_every=0 when training on them is meant",
                    shared,
                ))
    return problems


# --------------------------------------------------------------------------- what to check

def datasets_to_check(target, kind: str | None = None, split: str | None = None, classes_file=None) -> tuple[dict, str]:
    """`({split: dataset}, root)` for a dataset folder (layout auto-detected unless `kind`) or a
    YAML config (its `data:` section), built without refusing broken listings."""
    from sceneparse.data import DATASETS
    from sceneparse.data.datasets import detect_kind

    target = Path(target).expanduser()
    if target.is_file() and target.suffix.lower() in (".yaml", ".yml"):
        from sceneparse.engine.config import dataset_settings, load_config

        # the data settings training would read: defaults, the file's `base:` files, the file
        data = dataset_settings(load_config(target).data)
        if kind:
            data["kind"] = kind
        if classes_file:
            data["classes_file"] = classes_file
    elif target.is_dir():
        data = {"kind": kind or detect_kind(target), "root": str(target), "classes_file": classes_file}
        if data["kind"] is None:
            raise SceneparseError(
                f"cannot tell the dataset layout of {target}",
                f"pass --kind ({', '.join(k for k in DATASETS if k != 'synthetic')}) or point at a "
                f"YAML config; a folder dataset is {Folder.layout}",
            )
    else:
        raise SceneparseError(f"{target} is neither a dataset folder nor a YAML config", "check the path")
    if data["kind"] not in DATASETS:
        raise SceneparseError(f"unknown dataset kind {data['kind']!r}", f"use one of: {', '.join(DATASETS)}")
    splits = [split] if split else _splits(data)
    built = {(s or "all"): DATASETS[data["kind"]].from_config(data, s, None, strict=False) for s in splits}
    return built, str(data.get("root") or target)


def _splits(data: dict) -> list:
    """The splits a training config names ("train+val" is checked split by split; a config read by
    load_config always names them), else those the dataset finds on disk."""
    from sceneparse.data import DATASETS

    named = [s for k in ("train_split", "val_split") if data.get(k) for s in str(data[k]).split("+")]
    return list(dict.fromkeys(named)) or DATASETS[data["kind"]].splits_on_disk(data)

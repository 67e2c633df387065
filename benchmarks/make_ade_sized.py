"""ADE20K-sized training data for the end-to-end benchmark, made from a few real ADE20K samples.

    python benchmarks/make_ade_sized.py SAMPLES ODGT OUT [--count 512] [--seed 0] [--workers N]

SAMPLES holds real ADE20K pairs (`images/*.jpg`, `annotations/*.png`; ../shared/data/ade20k_samples),
ODGT is ADE20K's training list (../shared/data/ade20k_meta/training.odgt), whose width/height
fields give the real size distribution. OUT receives `ADEChallengeData2016/{images,annotations}/
training/` with COUNT pairs: each a real sample (cycled) resized to a size drawn from the list, so
JPEG decoding and augmentation cost what they cost on ADE20K (natural images, real sizes), which
CamVid's small 480x360 frames do not show. Then:

    sceneparse bench ... --tasks train,train-data --data OUT --data-kind ade20k

Why not the real training set: it cannot be downloaded here (nor on the GPU machines).
"""
from __future__ import annotations

import argparse
import json
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image


def odgt_sizes(odgt: Path) -> list[tuple[int, int]]:
    """(width, height) of every record of an ADE20K .odgt list."""
    sizes = []
    with open(odgt, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                sizes.append((int(record["width"]), int(record["height"])))
    return sizes


def sample_pairs(samples: Path) -> list[tuple[Path, Path]]:
    pairs = [(image, samples / "annotations" / f"{image.stem}.png")
             for image in sorted((samples / "images").glob("*.jpg"))]
    pairs = [(image, label) for image, label in pairs if label.is_file()]
    if not pairs:
        raise SystemExit(f"no image/label pairs in {samples}/images and {samples}/annotations")
    return pairs


def _write(job: tuple[int, Path, Path, tuple[int, int], Path]) -> None:
    index, image_path, label_path, size, out = job
    name = f"ADE_train_{index + 1:08d}"
    with Image.open(image_path) as image:
        image.convert("RGB").resize(size, Image.BILINEAR).save(
            out / "images" / "training" / f"{name}.jpg", quality=90)
    with Image.open(label_path) as label:  # class ids: nearest neighbour, never blended
        label.resize(size, Image.NEAREST).save(out / "annotations" / "training" / f"{name}.png")


def make(samples: Path, odgt: Path, out: Path, count: int, seed: int = 0, workers: int | None = None) -> Path:
    """Writes the dataset under `out`; returns its ADEChallengeData2016 folder."""
    rng = random.Random(seed)
    sizes = rng.choices(odgt_sizes(odgt), k=count)
    pairs = sample_pairs(samples)
    root = out / "ADEChallengeData2016"
    for kind in ("images", "annotations"):
        (root / kind / "training").mkdir(parents=True, exist_ok=True)
    jobs = [(i, *pairs[i % len(pairs)], sizes[i], root) for i in range(count)]
    if workers == 1:
        for job in jobs:
            _write(job)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_write, jobs, chunksize=16))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", type=Path)
    parser.add_argument("odgt", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    args = parser.parse_args()
    root = make(args.samples, args.odgt, args.out, args.count, args.seed, args.workers)
    print(f"{args.count} ADE20K-sized pairs in {root}")


if __name__ == "__main__":
    main()

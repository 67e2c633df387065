"""Synthetic outdoor "scenes" for the quickstart: generated in memory, deterministic from a seed.

Five classes (sky, building, tree, road, grass). Each image has a random horizon, building blocks
with window grids standing on it, trees (blobby canopies and trunks) in front, a road trapezoid
running to a vanishing point, and grass elsewhere. Colours vary per image and every region carries
its own texture (sky gradient and clouds, window grids, leafy blotches, road grain and centre
dashes, grass streaks) plus sensor noise, so classes are told apart by colour *and* texture and
context, not by one constant colour. A small CNN learns it in minutes on a CPU.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as nnf

from sceneparse.data.datasets import LabelMapper, Listing, SegmentationDataset
from sceneparse.errors import SceneparseError

SKY, BUILDING, TREE, ROAD, GRASS = range(5)
CLASS_NAMES = ["sky", "building", "tree", "road", "grass"]
PALETTE = [[70, 130, 180], [128, 64, 64], [34, 139, 34], [128, 64, 128], [152, 251, 152]]
DEFAULT_NUM_IMAGES = {"train": 100, "val": 30}
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def _noise(gen: torch.Generator, cells: int, height: int, width: int) -> torch.Tensor:
    """Smooth noise in about [-1, 1]: a `cells` x `cells` random grid upsampled bilinearly."""
    grid = torch.rand(1, 1, cells, cells, generator=gen) * 2 - 1
    return nnf.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def _u(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _i(gen: torch.Generator, low: int, high: int) -> int:
    """Integer in [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=gen))


def _rgb(gen: torch.Generator, base, spread: float) -> torch.Tensor:
    return torch.tensor([c + _u(gen, -spread, spread) for c in base]).view(3, 1, 1)


def generate_scene(gen: torch.Generator, size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """One scene: image uint8 3 x size x size and mask int64 size x size (class ids 0..4)."""
    h = w = size
    ys = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    xs = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    horizon = _u(gen, 0.3, 0.6) * h
    mask = torch.where(ys < horizon, SKY, GRASS)

    # sky: vertical gradient from deep to pale blue, with soft clouds
    top, bottom = _rgb(gen, (60, 110, 200), 25), _rgb(gen, (170, 200, 235), 20)
    t = (ys / max(horizon, 1.0)).clamp(0, 1)
    image = top * (1 - t) + bottom * t
    clouds = (_noise(gen, 5, h, w) - _u(gen, 0.0, 0.5)).clamp(min=0) * 255
    image = image + clouds * 0.8

    # grass: yellow-green with fine horizontal streaks and patches
    grass = _rgb(gen, (95, 150, 55), 20)
    streaks = _noise(gen, 48, h, w) * 20 + _noise(gen, 6, h, w) * 15
    image = torch.where(mask == GRASS, grass + streaks, image)

    # buildings: blocks standing on the horizon, each with a window grid
    for _ in range(_i(gen, 1, 4)):
        bw = _u(gen, 0.12, 0.35) * w
        x0 = _u(gen, -0.1, 0.95) * w
        y0 = horizon - _u(gen, 0.15, 0.5) * h
        inside = (xs >= x0) & (xs < x0 + bw) & (ys >= y0) & (ys < horizon + 1)
        base = [(150, 80, 60), (140, 140, 140), (200, 180, 140)][_i(gen, 0, 2)]
        wall = _rgb(gen, base, 20)
        period, glass = _i(gen, 6, 10), _rgb(gen, (40, 50, 70), 10)
        window = (((xs - x0) % period) < period / 2) & (((ys - y0) % period) < period / 2)
        wall_px = torch.where(window, glass, wall) + _noise(gen, 24, h, w) * 8
        image = torch.where(inside, wall_px, image)
        mask = torch.where(inside, BUILDING, mask)

    # road: trapezoid from the bottom edge to a vanishing point on the horizon, dashed centre line
    if float(torch.rand((), generator=gen)) < 0.85:
        cx, half = _u(gen, 0.3, 0.7) * w, _u(gen, 0.25, 0.45) * w
        vx, vhalf = cx + _u(gen, -0.2, 0.2) * w, _u(gen, 0.01, 0.05) * w
        s = ((ys - horizon) / (h - horizon)).clamp(0, 1)  # 0 at the horizon, 1 at the bottom
        centre = vx + (cx - vx) * s
        width_here = vhalf + (half - vhalf) * s
        inside = (ys >= horizon) & ((xs - centre).abs() <= width_here)
        asphalt = _rgb(gen, (105, 105, 110), 15) + _noise(gen, 64, h, w) * 12
        dash = ((xs - centre).abs() <= 0.6 + 1.2 * s) & (((ys * (1.2 - 0.8 * s)) % 12) < 6)
        road_px = torch.where(dash, torch.full((3, 1, 1), 235.0), asphalt)
        image = torch.where(inside, road_px, image)
        mask = torch.where(inside, ROAD, mask)

    # trees: dark, blotchy canopies on brown trunks, in front of everything
    for _ in range(_i(gen, 1, 3)):
        r = _u(gen, 0.07, 0.16) * h
        tx = _u(gen, 0.0, 1.0) * w
        ty = horizon - r * _u(gen, 1.0, 2.2)
        canopy = ((xs - tx) / r) ** 2 + ((ys - ty) / (r * _u(gen, 0.9, 1.3))) ** 2 <= 1 + _noise(gen, 16, h, w) * 0.3
        trunk = ((xs - tx).abs() <= max(1.0, r * 0.15)) & (ys >= ty) & (ys < horizon + r * 0.3)
        inside = canopy | trunk
        leaves = _rgb(gen, (35, 85, 35), 12) + _noise(gen, 40, h, w) * 25
        tree_px = torch.where(trunk & ~canopy, _rgb(gen, (90, 60, 35), 10), leaves)
        image = torch.where(inside, tree_px, image)
        mask = torch.where(inside, TREE, mask)

    image = image * _u(gen, 0.8, 1.2) + torch.randn(3, h, w, generator=gen) * 6
    return image.round().clamp(0, 255).to(torch.uint8), mask.to(torch.int64)


class Synthetic(SegmentationDataset):
    """`num_images` synthetic scenes of `image_size`^2, generated on first access and cached.

    Sample `i` of a split depends only on (seed, split, i), so workers and reruns agree.
    """

    kind = "synthetic"
    layout = "(generated in memory)"
    on_disk = False

    @classmethod
    def from_config(cls, data: Mapping, split: str | None, transforms=None, strict: bool = True):
        count = data.get("num_images")
        if isinstance(count, Mapping):  # {train: 100, val: 30}
            count = count.get(split)
        return cls(split, num_images=count, seed=data.get("seed") or 0, image_size=data.get("image_size") or 128,
                   transforms=transforms)

    def __init__(self, split: str = "train", num_images: int | None = None, seed: int = 0,
                 image_size: int = 128, transforms=None):
        if split not in _SPLIT_CODE:
            raise SceneparseError(f"unknown synthetic split {split!r}", f"use one of: {', '.join(_SPLIT_CODE)}")
        count = DEFAULT_NUM_IMAGES.get(split, 30) if num_images is None else int(num_images)
        self.split, self.seed, self.image_size = split, int(seed), int(image_size)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(Listing([]), CLASS_NAMES, PALETTE, LabelMapper(len(CLASS_NAMES)), transforms, strict=False)
        self.files = [(f"synthetic/{split}/{i:04d}.png", "") for i in range(count)]
        self._sizes = [(self.image_size, self.image_size)] * count

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index not in self._cache:
            code = _SPLIT_CODE[self.split]
            gen = torch.Generator().manual_seed((self.seed * 3 + code) * 10_000_019 + index)
            # hundreds of tiny ops: intra-op threads only add overhead (10x on a busy machine)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                self._cache[index] = generate_scene(gen, self.image_size)
            finally:
                torch.set_num_threads(threads)
        image, mask = self._cache[index]
        return image.clone(), mask.clone()

    def write_folder(self, root: str | Path) -> Path:
        """Save as a folder dataset (`images/`, `labels/` palette PNGs, `classes.yaml`)."""
        import numpy as np
        from PIL import Image

        root = Path(root)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        flat_palette = [c for colour in PALETTE for c in colour]
        for i in range(len(self)):
            image, mask = self.load(i)
            name = f"{self.split}_{i:04d}"
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "images" / f"{name}.png")
            label = Image.fromarray(mask.numpy().astype(np.uint8), mode="P")
            label.putpalette(flat_palette)
            label.save(root / "labels" / f"{name}.png")
        lines = ["classes: [" + ", ".join(CLASS_NAMES) + "]", f"palette: {PALETTE}", "ignore_index: 255", ""]
        (root / "classes.yaml").write_text("\n".join(lines), encoding="utf-8")
        return root


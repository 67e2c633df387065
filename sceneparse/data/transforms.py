"""Transforms on (tv_tensors.Image uint8, tv_tensors.Mask int64) pairs, built from config.

Geometry goes through torchvision.transforms.v2, which resizes masks with nearest neighbour and
lets padding use a per-type fill: images are padded with 0, masks with `IGNORE_INDEX` (never a
class id). Normalisation is not a transform: the engine calls `normalize` on the device, batched.

Training recipes:
- CSAIL (default): the short side is drawn from `scales` (300..600), the long side capped at
  `max_size` (1000), random horizontal flip. CSAIL draws *one* size per batch; to do the same,
  give the scales to `AspectRatioBatchSampler(scales=...)`: it then yields `(index, short_side)`
  pairs, the dataset passes `short_side` on, and the pipeline resizes to it instead of drawing.
- Crop-based: `scale_range` (e.g. [0.5, 2.0]) of `base_size` (or of the image itself), `crop`
  [h, w] with padding, optional photometric `jitter`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

from sceneparse.data.meta import IGNORE_INDEX
from sceneparse.errors import SceneparseError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CSAIL_SCALES = (300, 375, 450, 525, 600)
CSAIL_MAX_SIZE = 1000
PAD_FILL = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 N x 3 x H x W (any device) -> float32 `(x / 255 - mean) / std`."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def short_side_size(height: int, width: int, short_side: float, max_size: int | None) -> tuple[int, int]:
    """Output (H, W) with the short side at `short_side` unless that makes the long side exceed
    `max_size` (then the long side is `max_size`), aspect ratio kept."""
    scale = short_side / min(height, width)
    if max_size is not None:
        scale = min(scale, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


class RandomShortSideResize(v2.Transform):
    """CSAIL's training resize: short side drawn from `sizes`, long side at most `max_size`."""

    def __init__(self, sizes: Sequence[int] = CSAIL_SCALES, max_size: int | None = CSAIL_MAX_SIZE):
        super().__init__()
        self.sizes = [int(s) for s in sizes]
        self.max_size = max_size

    def make_params(self, flat_inputs):
        height, width = query_size(flat_inputs)
        short = self.sizes[int(torch.randint(len(self.sizes), ()))]
        return {"size": short_side_size(height, width, short, self.max_size)}

    def transform(self, inpt, params):
        return resize(inpt, params["size"])

    def resize_to(self, image, mask, short_side: int):
        """Deterministic version: the short side given (chosen per batch by the sampler)."""
        size = short_side_size(*image.shape[-2:], short_side, self.max_size)
        return resize(image, size), resize(mask, size)


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from `ratio_range`, of the image itself or, with
    `base_size`, so that the short side is `base_size * ratio`."""

    def __init__(self, ratio_range: Sequence[float] = (0.5, 2.0), base_size: int | None = None):
        super().__init__()
        self.low, self.high = (float(r) for r in ratio_range)
        self.base_size = base_size

    def make_params(self, flat_inputs):
        height, width = query_size(flat_inputs)
        ratio = self.low + (self.high - self.low) * float(torch.rand(()))
        short = (self.base_size or min(height, width)) * ratio
        return {"size": short_side_size(height, width, short, None)}

    def transform(self, inpt, params):
        return resize(inpt, params["size"])


def resize(inpt, size: Sequence[int]):
    """Images: bilinear, antialiased. Masks: nearest neighbour at the pixel centres ("nearest-exact":
    output pixel i reads source pixel floor((i + 0.5) * in / out)), so label boundaries stay where
    the resized image has them; torchvision's default for masks, legacy "nearest" (floor(i * in /
    out)), shifts them by up to half a source pixel towards the top left."""
    if isinstance(inpt, tv_tensors.Mask):  # (F.resize_mask takes no interpolation before torchvision 0.29)
        mask = inpt.as_subclass(torch.Tensor)
        flat = mask.ndim == 2
        out = F.resize_image(mask[None] if flat else mask, list(size), interpolation=InterpolationMode.NEAREST_EXACT)
        return tv_tensors.wrap(out[0] if flat else out, like=inpt)
    return F.resize(inpt, list(size), antialias=True)


class PairTransform:
    """A pipeline of v2 transforms applied to (image, mask); `short_side=` forces the CSAIL resize
    step (if any) to that size instead of a random one."""

    accepts_short_side = True

    def __init__(self, steps: Sequence):
        self.steps = list(steps)

    def __call__(self, image, mask, short_side: int | None = None):
        if short_side is not None and not any(isinstance(s, RandomShortSideResize) for s in self.steps):
            raise ValueError("a per-batch short side was given but the pipeline has no `scales` resize step")
        for step in self.steps:
            if short_side is not None and isinstance(step, RandomShortSideResize):
                image, mask = step.resize_to(image, mask, short_side)
            else:
                image, mask = step(image, mask)
        return image, mask

    def __repr__(self) -> str:
        return "PairTransform(" + ", ".join(repr(s) for s in self.steps) + ")"


TRAIN_DEFAULTS = {
    "scales": list(CSAIL_SCALES),  # CSAIL short sides; null or [] to disable
    "max_size": CSAIL_MAX_SIZE,
    "flip": True,
    "scale_range": None,  # e.g. [0.5, 2.0]
    "base_size": None,  # short side that scale_range multiplies (None: the image's own)
    "crop": None,  # int or [h, w]: random crop, padding smaller images
    "jitter": None,  # float strength, or {brightness, contrast, saturation, hue}
}


def _options(cfg, defaults: dict, what: str) -> dict:
    if cfg is None:
        return dict(defaults)
    if not isinstance(cfg, Mapping):
        from omegaconf import DictConfig, OmegaConf

        if not isinstance(cfg, DictConfig):
            raise SceneparseError(f"{what} settings must be a mapping, got {type(cfg).__name__}")
        cfg = OmegaConf.to_container(cfg, resolve=True)
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise SceneparseError(
            f"unknown {what} setting(s): {', '.join(map(str, unknown))}",
            f"known settings: {', '.join(defaults)}",
        )
    return {**defaults, **{k: v for k, v in cfg.items()}}


def build_train_transforms(cfg=None) -> PairTransform:
    """Training pipeline from a mapping with the keys of `TRAIN_DEFAULTS` (missing keys: defaults)."""
    opts = _options(cfg, TRAIN_DEFAULTS, "augmentation")
    steps: list = []
    if opts["scales"]:
        steps.append(RandomShortSideResize(opts["scales"], opts["max_size"]))
    if opts["scale_range"]:
        steps.append(RandomScale(opts["scale_range"], opts["base_size"]))
    if opts["crop"]:
        crop = opts["crop"]
        size = [int(crop), int(crop)] if isinstance(crop, (int, float)) else [int(c) for c in crop]
        steps.append(v2.RandomCrop(size, pad_if_needed=True, fill=PAD_FILL))
    if opts["flip"]:
        steps.append(v2.RandomHorizontalFlip())
    jitter = opts["jitter"]
    if jitter:
        if isinstance(jitter, Mapping):
            steps.append(v2.ColorJitter(**jitter))
        else:
            strength = 0.4 if jitter is True else float(jitter)
            steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
    return PairTransform(steps)


def collate_pad(samples: Sequence[dict], mask_dtype: torch.dtype = torch.int64) -> dict:
    """Stack samples of different sizes, padding bottom/right to the batch maximum.

    Returns `{"image": uint8 N x 3 x H x W, "mask": N x H x W, "paths": [...],
    "sizes": [(h, w), ...]}`; image padding is 0, mask padding `IGNORE_INDEX`. `mask_dtype=torch.uint8`
    (fine while class ids stay below IGNORE_INDEX = 255) makes the host-to-device copy 8x smaller.
    """
    height = max(s["image"].shape[-2] for s in samples)
    width = max(s["image"].shape[-1] for s in samples)
    images = torch.zeros(len(samples), 3, height, width, dtype=torch.uint8)
    masks = torch.full((len(samples), height, width), IGNORE_INDEX, dtype=mask_dtype)
    sizes = []
    for i, sample in enumerate(samples):
        h, w = sample["image"].shape[-2:]
        images[i, :, :h, :w] = sample["image"]
        masks[i, :h, :w] = sample["mask"]
        sizes.append((int(h), int(w)))
    return {"image": images, "mask": masks, "paths": [s["path"] for s in samples], "sizes": sizes}

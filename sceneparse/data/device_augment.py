"""Batched training augmentation on the training device (`data.augment_on: device`).

The crop recipe of `transforms.build_train_transforms` (random rescale, random crop with padding,
horizontal flip, brightness/contrast/saturation jitter in random order), done for a whole batch of
uint8 images at once, with the worker pipeline's arithmetic:

- Rescale, crop and flip only move rows and columns, so per sample they are two resampling
  matrices: `crop = Wy @ image @ Wx^T`, two batched matrix products for the whole batch. The
  rows of Wy and Wx are torch's antialiased bilinear weights (those of `F.resize(...,
  antialias=True)` in the worker pipeline: a triangle filter widened by the shrink factor), so a
  shrunk image is filtered, not aliased. Rows outside the rescaled image are zero (black padding).
- Masks are gathered with torch's "nearest-exact" indices (`floor((i + 0.5) * in / out)`: pixel
  centres, as `transforms.resize` does for masks); padding is `IGNORE_INDEX`.
- The jitter factors and their order are drawn as torchvision's `ColorJitter` draws them.

So, given the same random draws, a sample equals the worker pipeline's to within its uint8
rounding (tests/test_device_augment.py checks this against torchvision's own functions). On a GPU
this costs far less than a step and frees the data-loader workers from the most expensive part of
their work (the resize); with `data.cache_in_memory` the whole training set lives on the device
and no workers run at all.

Randomness: each sample's parameters come from its own seed (the `(index, seed)` pairs of
`engine.feed.TrainBatches`), drawn on the CPU, so a batch is a pure function of its seeds - on any
device, with any batch composition - and resumed runs see the same batches.
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import permutations

import torch
from torchvision.transforms.v2.functional import rgb_to_grayscale

from sceneparse.data.meta import IGNORE_INDEX
from sceneparse.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Per-sample parameters, one row each: scale, crop offset fractions (y, x), flip, jitter factors,
# and the jitter order (the first, second and third of 0 brightness, 1 contrast, 2 saturation).
PARAMS = ("scale", "offset_y", "offset_x", "flip", "brightness", "contrast", "saturation",
          "step_1", "step_2", "step_3")
_ORDERS = list(permutations(range(3)))


class DeviceAugment:
    """`augment(images, masks, sizes, seeds) -> (normalised float images, int64 masks)`.

    images: uint8 N x 3 x H x W, masks: uint8/int64 N x H x W, both on the device and padded
    bottom/right; `sizes[i] = (h, w)`, the valid part of sample i; `seeds[i]`, its seed.
    Output: N x 3 x crop_h x crop_w normalised images and N x crop_h x crop_w masks, where pixels
    outside the rescaled image are black (before normalisation) and `IGNORE_INDEX`.
    """

    def __init__(self, crop: int | Sequence[int], scale_range: Sequence[float] = (0.5, 2.0),
                 flip: bool = True, jitter: float | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 base_size: int | None = None):
        sides = [int(crop)] if isinstance(crop, (int, float)) else [int(c) for c in crop]
        self.crop_h, self.crop_w = sides * 2 if len(sides) == 1 else sides  # an int or [s]: square
        self.scale_low, self.scale_high = (float(s) for s in scale_range)
        self.flip = bool(flip)
        self.jitter = float(jitter or 0.0)
        self.mean, self.std = list(mean), list(std)
        self.base_size = base_size  # as transforms.RandomScale: the short side the factor multiplies

    def draw(self, seed: int) -> list[float]:
        """One sample's parameters (see `PARAMS`) from its seed, on the CPU."""
        g = torch.Generator().manual_seed(int(seed))
        u = torch.rand(8, generator=g, dtype=torch.float64).tolist()
        scale = self.scale_low + (self.scale_high - self.scale_low) * u[0]
        flip = float(self.flip and u[3] < 0.5)
        # torchvision's ColorJitter(j) draws each factor from [max(0, 1 - j), 1 + j] and applies
        # the steps in a random order.
        low, high = max(0.0, 1.0 - self.jitter), 1.0 + self.jitter
        order = _ORDERS[min(int(u[7] * len(_ORDERS)), len(_ORDERS) - 1)]
        return [scale, u[1], u[2], flip] + [low + (high - low) * v for v in u[4:7]] + [float(i) for i in order]

    def layout(self, params: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """Per sample (float64, N x 4): the rescaled size `round(h * scale)`, `round(w * scale)`
        (with `base_size`: scale = factor * base_size / min(h, w), as `transforms.RandomScale`),
        and the crop's offset in it (y, x), drawn like a random crop: in [0, scaled - crop] when the
        rescaled image is larger than the crop, in [scaled - crop, 0] (the image placed inside a
        padded crop) when it is smaller."""
        scale = params[:, 0:1]
        if self.base_size:
            scale = scale * self.base_size / sizes.min(dim=1, keepdim=True).values
        scaled = (sizes * scale).round().clamp(min=1)
        crop = torch.tensor([self.crop_h, self.crop_w], dtype=torch.float64)
        fractions = params[:, 1:3]
        offset = torch.where(scaled >= crop, torch.floor((scaled - crop + 1) * fractions),
                             -torch.floor((crop - scaled + 1) * fractions))
        return torch.cat([scaled, offset], dim=1)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, sizes, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        device = images.device
        n, _, height, width = images.shape
        params = torch.tensor([self.draw(s) for s in seeds], dtype=torch.float64).reshape(n, len(PARAMS))
        limits = torch.as_tensor([list(s) for s in sizes], dtype=torch.float64).reshape(n, 2)
        # Everything the step needs from the CPU in one small copy; pinned + non-blocking on CUDA
        # (a pageable copy would wait for the GPU's queue to drain).
        packed = torch.cat([limits, self.layout(params, limits), params[:, 3:]], dim=1)
        if device.type == "cuda":
            packed = packed.pin_memory()
        packed = packed.to(device, non_blocking=True)
        (h, w, scaled_h, scaled_w, offset_y, offset_x, flip), factors, order = (
            packed[:, :7].unbind(1), packed[:, 7:10].float(), packed[:, 10:].long())

        rows = torch.arange(self.crop_h, device=device, dtype=torch.float64) + offset_y[:, None]
        cols = torch.arange(self.crop_w, device=device, dtype=torch.float64)
        cols = torch.where(flip[:, None] > 0, self.crop_w - 1 - cols, cols) + offset_x[:, None]
        weights_y, index_y, valid_y = _resampling(rows, h, scaled_h, height)
        weights_x, index_x, valid_x = _resampling(cols, w, scaled_w, width)

        # On a GPU the two products run in float16 on the tensor cores: pixel values 0..255 are
        # exact in float16, and its rounding (2^-11, relative) costs at most about a third of a
        # grey level, less than the worker pipeline's uint8 rounding (half of one). float32
        # elsewhere (CPUs have no fast float16 products).
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        out, weights_y, weights_x = images.to(dtype), weights_y.to(dtype), weights_x.to(dtype)
        # (Wy @ image) @ Wx^T or Wy @ (image @ Wx^T): whichever multiplies less.
        if self.crop_h * width * (height + self.crop_w) <= self.crop_w * height * (width + self.crop_h):
            out = (weights_y[:, None] @ out) @ weights_x[:, None].transpose(-1, -2)
        else:
            out = weights_y[:, None] @ (out @ weights_x[:, None].transpose(-1, -2))
        out = out.float() / 255.0
        label = masks.gather(1, index_y[:, :, None].expand(n, self.crop_h, width))
        label = label.gather(2, index_x[:, None, :].expand(n, self.crop_h, self.crop_w))
        label = torch.where(valid_y[:, :, None] & valid_x[:, None, :], label.long(), IGNORE_INDEX)
        if self.jitter:
            out = _jitter(out, factors, order)
        mean, std = self._normalisation(device)
        return (out - mean) / std, label

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as 1 x 3 x 1 x 1 tensors on `device`, made once."""
        if getattr(self, "_norm_device", None) != device:
            self._norm = tuple(torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1).to(device)
                               for v in (self.mean, self.std))
            self._norm_device = device
        return self._norm


def _resampling(positions: torch.Tensor, size: torch.Tensor, scaled: torch.Tensor, padded: int):
    """One axis of the resize-then-crop, for N samples: `positions` (N x crop) are output pixels'
    indices in the rescaled axis of length `scaled` (N), resized from `size` (N) source pixels in
    a padded axis of length `padded`. Returns the image weights (N x crop x padded, float32), the
    mask's source indices (N x crop, int64) and whether each output pixel lies in the image.

    The weights are torch's antialiased bilinear ones (aten's upsample_bilinear2d_aa): output pixel
    i reads source pixel j with weight max(0, 1 - |j + 0.5 - c| / support), c = (i + 0.5) * size /
    scaled, support = max(size / scaled, 1), normalised over the source pixels. The indices are
    torch's "nearest-exact": floor((i + 0.5) * (size / scaled)), the ratio rounded to float32
    first, as aten does.
    """
    valid = (positions >= 0) & (positions < scaled[:, None])
    ratio = (size / scaled).float()[:, None]
    # float32 from here: the N x crop x padded weights are the only sizeable tensors made.
    centre = ((positions + 0.5) * ratio.double()).float()
    source = torch.arange(padded, device=positions.device, dtype=torch.float32) + 0.5
    weights = (1 - (source - centre[:, :, None]).abs() / ratio.clamp(min=1)[:, :, None]).clamp(min=0)
    weights = weights * (source < size[:, None, None]) * valid[:, :, None]
    weights = weights / weights.sum(dim=2, keepdim=True).clamp(min=1e-12)
    nearest = torch.floor((positions.float() + 0.5) * ratio).long()
    index = torch.minimum(nearest.clamp(min=0), size[:, None].long() - 1)
    return weights, index, valid


def _jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_brightness / adjust_contrast / adjust_saturation on [0, 1] floats,
    batched, one factor per sample each, each sample in its own order (`order[i]`: step indices).

    Each step is torchvision's blend, `clamp(factor * image + (1 - factor) * reference, 0, 1)`,
    whose reference is black (brightness), the image's mean grey level (contrast) or its grey
    image (saturation): one blend per round serves every sample, whatever step it is at."""
    for step in order.T:  # the first steps of all samples, then the second ones, then the third
        factor = factors.gather(1, step[:, None]).view(-1, 1, 1, 1)
        step = step.view(-1, 1, 1, 1)
        gray = rgb_to_grayscale(images)  # torchvision's own, as its adjust_* functions use
        reference = torch.where(step == 2, gray, torch.where(step == 1, gray.mean(dim=(1, 2, 3), keepdim=True), 0.0))
        images = (factor * images + (1 - factor) * reference).clamp(0, 1)
    return images

"""Batched training augmentation on the training device (`data.augment_on: device`).

The crop recipe of `transforms.build_train_transforms` (random rescale, random crop with padding,
horizontal flip, brightness/contrast/saturation jitter), done for a whole batch of uint8 images at
once: rescale, crop and flip are one affine map per sample, so the batch is resampled by a single
`grid_sample` (bilinear for images, nearest for masks). On a GPU this costs far less than a step
and frees the data-loader workers from the most expensive part of their work (the resize); with
`data.cache_in_memory` the whole training set lives on the device and no workers run at all.

Randomness: each sample's parameters come from its own seed (the `(index, seed)` pairs of
`engine.feed.TrainBatches`), drawn on the CPU, so a batch is a pure function of its seeds - on any
device, with any batch composition - and resumed runs see the same batches.

Differences from the worker pipeline, by design: no antialiasing when shrinking (scale factors
below 1 sample bilinearly; the default range stops at 0.5), and the jitter steps run in a fixed
order (brightness, contrast, saturation) rather than torchvision's random one.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sceneparse.data.meta import IGNORE_INDEX
from sceneparse.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Per-sample parameters, one row each: scale, crop offset fractions (y, x), flip, jitter factors.
_PARAMS = ("scale", "offset_y", "offset_x", "flip", "brightness", "contrast", "saturation")


class DeviceAugment:
    """`augment(images, masks, sizes, seeds) -> (normalised float images, int64 masks)`.

    images: uint8 N x 3 x H x W, masks: uint8/int64 N x H x W, both on the device and padded
    bottom/right; `sizes[i] = (h, w)`, the valid part of sample i; `seeds[i]`, its seed.
    Output: N x 3 x crop_h x crop_w normalised images and N x crop_h x crop_w masks, where pixels
    outside the rescaled image are black (before normalisation) and `IGNORE_INDEX`.
    """

    def __init__(self, crop: int | Sequence[int], scale_range: Sequence[float] = (0.5, 2.0),
                 flip: bool = True, jitter: float | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.crop_h, self.crop_w = (int(crop), int(crop)) if isinstance(crop, (int, float)) else map(int, crop)
        self.scale_low, self.scale_high = (float(s) for s in scale_range)
        self.flip = bool(flip)
        self.jitter = float(jitter or 0.0)
        self.mean, self.std = list(mean), list(std)

    def draw(self, seed: int) -> list[float]:
        """One sample's parameters (see `_PARAMS`) from its seed, on the CPU."""
        g = torch.Generator().manual_seed(int(seed))
        u = torch.rand(7, generator=g, dtype=torch.float64).tolist()
        scale = self.scale_low + (self.scale_high - self.scale_low) * u[0]
        flip = float(self.flip and u[3] < 0.5)
        # torchvision's ColorJitter(j) draws each factor from [max(0, 1 - j), 1 + j].
        low, high = max(0.0, 1.0 - self.jitter), 1.0 + self.jitter
        return [scale, u[1], u[2], flip] + [low + (high - low) * v for v in u[4:7]]

    def geometry(self, params: torch.Tensor, sizes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Affine maps (N x 2 x 3, for `F.affine_grid`) from crop coordinates to the padded batch.

        In pixel-edge units (a pixel's centre at i + 0.5): crop x -> rescaled image x + offset ->
        source (x + offset) * w / scaled_w, the rescaled image being `round(w * scale)` wide. The
        offset is drawn like a random crop: in [0, scaled - crop] when the image is larger than the
        crop, in [scaled - crop, 0] (the image placed inside a padded crop) when it is smaller.
        """
        scale, frac_y, frac_x, flip = params[:, 0], params[:, 1], params[:, 2], params[:, 3]
        h, w = sizes[:, 0].double(), sizes[:, 1].double()
        scaled_h, scaled_w = (h * scale).round().clamp(min=1), (w * scale).round().clamp(min=1)
        offset_y = torch.where(scaled_h >= self.crop_h,
                               torch.floor((scaled_h - self.crop_h + 1) * frac_y),
                               -torch.floor((self.crop_h - scaled_h + 1) * frac_y))
        offset_x = torch.where(scaled_w >= self.crop_w,
                               torch.floor((scaled_w - self.crop_w + 1) * frac_x),
                               -torch.floor((self.crop_w - scaled_w + 1) * frac_x))
        # Normalised coordinates (align_corners=False): n = 2 * edge / size - 1, on both sides.
        ax = self.crop_w * w / (scaled_w * width)
        bx = (self.crop_w + 2 * offset_x) * w / (scaled_w * width) - 1
        ay = self.crop_h * h / (scaled_h * height)
        by = (self.crop_h + 2 * offset_y) * h / (scaled_h * height) - 1
        ax = torch.where(flip > 0, -ax, ax)  # mirror the crop: output x reads crop x at -x
        theta = torch.zeros(len(params), 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = ax, bx, ay, by
        return theta

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, sizes, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        device = images.device
        n, _, height, width = images.shape
        params = torch.tensor([self.draw(s) for s in seeds], dtype=torch.float64)
        limits = torch.as_tensor([list(s) for s in sizes], dtype=torch.float64).reshape(n, 2)
        theta = self.geometry(params, limits, height, width)
        # Everything the step needs from the CPU in one small copy; pinned + non-blocking on CUDA
        # (a pageable copy would wait for the GPU's queue to drain).
        packed = torch.cat([theta.reshape(n, 6), limits, params[:, 4:]], dim=1)
        if device.type == "cuda":
            packed = packed.pin_memory()
        packed = packed.to(device, non_blocking=True)
        theta, limits, factors = packed[:, :6].view(n, 2, 3), packed[:, 6:8], packed[:, 8:].float()
        grid = F.affine_grid(theta, [n, 1, self.crop_h, self.crop_w], align_corners=False)
        # Inside the sample's valid h x w part (not the batch padding, not beyond the tensor)?
        edge_x = (grid[..., 0] + 1) * (width / 2)
        edge_y = (grid[..., 1] + 1) * (height / 2)
        valid = ((edge_x >= 0) & (edge_y >= 0)
                 & (edge_x < limits[:, 1, None, None]) & (edge_y < limits[:, 0, None, None]))
        grid = grid.float()
        out = F.grid_sample(images.float() / 255.0, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out = out * valid.unsqueeze(1)  # black outside the image, as the worker pipeline pads
        label = F.grid_sample(masks.unsqueeze(1).float(), grid, mode="nearest", padding_mode="border",
                              align_corners=False)
        label = torch.where(valid, label.squeeze(1).long(), IGNORE_INDEX)
        if self.jitter:
            out = self._jitter(out, factors)
        mean, std = self._normalisation(device)
        return (out - mean) / std, label

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as 1 x 3 x 1 x 1 tensors on `device`, made once."""
        if getattr(self, "_norm_device", None) != device:
            self._norm = tuple(torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1).to(device)
                               for v in (self.mean, self.std))
            self._norm_device = device
        return self._norm

    @staticmethod
    def _jitter(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """torchvision's adjust_brightness / adjust_contrast / adjust_saturation on [0, 1] floats,
        batched, one factor per sample each."""
        b, c, s = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
        images = (images * b).clamp(0, 1)
        gray = _grayscale(images)
        images = (c * images + (1 - c) * gray.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
        return (s * images + (1 - s) * _grayscale(images)).clamp(0, 1)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, as torchvision's rgb_to_grayscale: N x 1 x H x W."""
    r, g, b = images.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)

"""Batched augmentation on the device (data.augment_on=device), checked against direct slicing,
torch's own resizing and torchvision's colour functions, and in training runs."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from sceneparse.data import IGNORE_INDEX
from sceneparse.data.device_augment import DeviceAugment
from sceneparse.data.transforms import resize, short_side_size
from sceneparse.engine.train import train
from sceneparse.errors import SceneparseError

from test_train import tiny_config

RAW = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # outputs in [0, 1], easy to compare


@pytest.fixture
def sample():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 12, 16), dtype=torch.uint8, generator=g)
    mask = torch.randint(0, 5, (1, 12, 16), dtype=torch.uint8, generator=g)
    return image, mask


def test_unit_scale_crops_are_exact_slices_at_every_possible_offset(sample):
    image, mask = sample
    augment = DeviceAugment((6, 8), (1.0, 1.0), flip=False, **RAW)
    offsets = set()
    for seed in range(400):
        out, label = augment(image, mask, [(12, 16)], [seed])
        matches = [(y, x) for y in range(7) for x in range(9)
                   if torch.allclose(out[0], image[0, :, y : y + 6, x : x + 8] / 255.0, atol=1e-6)
                   and torch.equal(label[0], mask[0, y : y + 6, x : x + 8].long())]
        assert len(matches) == 1, seed
        offsets.add(matches[0])
    assert offsets == {(y, x) for y in range(7) for x in range(9)}  # every crop position occurs


def test_a_one_sided_crop_is_square(sample):
    image, mask = sample
    for crop in (6, [6]):
        out, label = DeviceAugment(crop, (1.0, 1.0), flip=False, **RAW)(image, mask, [(12, 16)], [0])
        assert out.shape == (1, 3, 6, 6) and label.shape == (1, 6, 6)


def test_flip_mirrors_image_and_mask_together(sample):
    image, mask = sample
    augment = DeviceAugment((12, 16), (1.0, 1.0), flip=True, **RAW)
    seen = set()
    for seed in range(20):
        out, label = augment(image, mask, [(12, 16)], [seed])
        flipped = torch.allclose(out[0], image[0].flip(-1) / 255.0, atol=1e-6)
        assert flipped or torch.allclose(out[0], image[0] / 255.0, atol=1e-6)
        assert torch.equal(label[0], (mask[0].flip(-1) if flipped else mask[0]).long())
        seen.add(flipped)
    assert seen == {True, False}


def test_doubling_matches_torch_interpolate(sample):
    image, mask = sample
    out, label = DeviceAugment((24, 32), (2.0, 2.0), flip=False, **RAW)(image, mask, [(12, 16)], [5])
    expected = F.interpolate(image / 255.0, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(label, F.interpolate(mask[:, None].float(), scale_factor=2, mode="nearest")[:, 0].long())


def test_halving_places_the_image_inside_a_padded_crop_antialiased(sample):
    image, mask = sample
    out, label = DeviceAugment((12, 16), (0.5, 0.5), flip=False, **RAW)(image, mask, [(12, 16)], [3])
    inside = label[0] != IGNORE_INDEX
    rows, cols = inside.nonzero()[:, 0], inside.nonzero()[:, 1]
    top, left = int(rows.min()), int(cols.min())
    assert inside.sum() == 6 * 8 and int(rows.max()) == top + 5 and int(cols.max()) == left + 7
    # Antialiased like the worker pipeline's resize: at half size each output pixel reads 4 x 4
    # source pixels with weights (1, 3, 3, 1) / 8 per axis (edge rows renormalised), not a 2 x 2 mean.
    block = out[0, :, top : top + 6, left : left + 8]
    weights = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    y, x = 2, 3  # an interior output pixel: source rows 3..6, columns 5..8
    by_hand = (weights[:, None] * weights[None, :] * image[0, :, 3:7, 5:9] / 255.0).sum(dim=(1, 2))
    assert torch.allclose(block[:, y, x], by_hand, atol=1e-6)
    expected = F.interpolate(image / 255.0, size=(6, 8), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(block, expected[0], atol=1e-6)
    assert not torch.allclose(block, F.avg_pool2d(image / 255.0, 2)[0], atol=1e-3)  # not aliased
    assert torch.equal(label[0, top : top + 6, left : left + 8], mask[0, 1::2, 1::2].long())  # floor(2i + 1)
    assert out[0][:, ~inside].abs().max() == 0  # black padding


def test_each_sample_keeps_to_its_own_size_in_a_padded_batch(sample):
    image, mask = sample
    images = torch.full((2, 3, 12, 16), 255, dtype=torch.uint8)  # padding full of white ...
    masks = torch.full((2, 12, 16), 3, dtype=torch.uint8)  # ... and of a real class id
    images[0], masks[0] = image[0], mask[0]
    images[1, :, :8, :10], masks[1, :8, :10] = image[0, :, :8, :10], mask[0, :8, :10]
    augment = DeviceAugment((12, 16), (1.0, 1.0), flip=False, **RAW)
    out, label = augment(images, masks, [(12, 16), (8, 10)], [1, 2])
    inside = label[1] != IGNORE_INDEX
    assert inside.sum() == 8 * 10
    rows, cols = inside.nonzero()[:, 0], inside.nonzero()[:, 1]
    top, left = int(rows.min()), int(cols.min())
    assert torch.equal(label[1, top : top + 8, left : left + 10], mask[0, :8, :10].long())
    assert torch.allclose(out[1, :, top : top + 8, left : left + 10], image[0, :, :8, :10] / 255.0, atol=1e-6)
    assert out[1][:, ~inside].abs().max() == 0
    # sample 0 fills the crop: unaffected by its neighbour; alone it comes out the same
    alone = augment(images[:1], masks[:1], [(12, 16)], [1])
    assert torch.equal(alone[0][0], out[0]) and torch.equal(alone[1][0], label[0])


ADJUST = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)


def test_colour_jitter_matches_torchvision_in_a_random_order(sample):
    image, mask = sample
    augment = DeviceAugment((12, 16), (1.0, 1.0), flip=False, jitter=0.4, **RAW)
    orders = set()
    for seed in range(40):
        out, _ = augment(image, mask, [(12, 16)], [seed])
        params = augment.draw(seed)
        factors, order = params[4:7], [int(i) for i in params[7:]]
        assert all(0.6 <= f <= 1.4 for f in factors) and sorted(order) == [0, 1, 2]
        expected = image[0] / 255.0
        for step in order:
            expected = ADJUST[step](expected, factors[step])
        assert torch.allclose(out[0], expected, atol=1e-5)
        orders.add(tuple(order))
    assert len(orders) == 6  # every order occurs, as in torchvision's ColorJitter


@pytest.mark.parametrize("base_size", [None, 21])
def test_a_batch_equals_torchvision_resize_pad_crop_flip_and_jitter(base_size):
    """The device path against the worker pipeline's own functions, sample by sample,
    given the same draws: rescales from 0.5 to 2 (shrinking antialiased; of each image's own short
    side, or of `base_size`), crops inside and padded around the image, flips, jitter in each
    sample's order. The reference runs on floats (the worker path's uint8 rounding aside, the
    arithmetic is the same): images agree to float precision, masks exactly."""
    g = torch.Generator().manual_seed(1)
    sizes = [(30, 40), (23, 37), (40, 27), (17, 19)]
    images = torch.zeros(4, 3, 40, 40, dtype=torch.uint8)
    masks = torch.full((4, 40, 40), 7, dtype=torch.uint8)  # batch padding holds a class id: must not leak
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        masks[i, :h, :w] = torch.randint(0, 6, (h, w), dtype=torch.uint8, generator=g)
    augment = DeviceAugment((24, 32), (0.5, 2.0), flip=True, jitter=0.3, base_size=base_size, **RAW)
    checked_scales, flips = [], set()
    for seeds in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]):
        out, label = augment(images, masks, sizes, seeds)
        layout = augment.layout(torch.tensor([augment.draw(s) for s in seeds], dtype=torch.float64),
                                torch.tensor(sizes, dtype=torch.float64))
        for i, ((h, w), seed) in enumerate(zip(sizes, seeds)):
            params = augment.draw(seed)
            scaled_h, scaled_w, top, left = (int(v) for v in layout[i])
            # the size the worker pipeline's RandomScale gives for this factor
            assert (scaled_h, scaled_w) == short_side_size(h, w, (base_size or min(h, w)) * params[0], None)
            image = resize(images[i, :, :h, :w] / 255.0, [scaled_h, scaled_w])
            mask = resize(tv_tensors.Mask(masks[i, :h, :w]), [scaled_h, scaled_w])
            # RandomCrop(pad_if_needed): the crop window at (top, left) of the rescaled image,
            # with black / IGNORE_INDEX where it reaches beyond it.
            pad = [max(0, -left), max(0, -top), max(0, left + 32 - scaled_w), max(0, top + 24 - scaled_h)]
            image = TF.crop(TF.pad(image, pad, fill=0), top + pad[1], left + pad[0], 24, 32)
            mask = TF.crop(TF.pad(mask, pad, fill=IGNORE_INDEX), top + pad[1], left + pad[0], 24, 32)
            if params[3]:
                image, mask = TF.horizontal_flip(image), TF.horizontal_flip(mask)
            for step in (int(k) for k in params[7:]):
                image = ADJUST[step](image, params[4 + step])
            assert torch.equal(label[i], mask.long()), (seed, params[0])
            assert torch.allclose(out[i], image, atol=1e-5), (seed, params[0])
            checked_scales.append(params[0])
            flips.add(params[3])
    assert min(checked_scales) < 0.8 and max(checked_scales) > 1.5 and flips == {0.0, 1.0}


def test_normalisation_and_seeds(sample):
    image, mask = sample
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    normalised, _ = DeviceAugment((12, 16), (0.5, 2.0), jitter=0.2, mean=mean, std=std)(image, mask, [(12, 16)], [9])
    raw, _ = DeviceAugment((12, 16), (0.5, 2.0), jitter=0.2, **RAW)(image, mask, [(12, 16)], [9])
    expected = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(normalised, expected, atol=1e-5)
    other, _ = DeviceAugment((12, 16), (0.5, 2.0), jitter=0.2, **RAW)(image, mask, [(12, 16)], [10])
    assert not torch.allclose(raw, other)


DEVICE = ["data.augment_on=device", "data.crop_size=48", "data.batching=crop", "data.color_jitter=0.2"]


class Crash(Exception):
    pass


@pytest.mark.parametrize("cached", [True, False], ids=["on-device", "workers-decode"])
def test_training_with_device_augmentation_learns_and_resumes_exactly(tmp_path, monkeypatch, cached):
    from sceneparse.engine.logger import RunLogger

    overrides = [*DEVICE, f"data.cache_in_memory={cached}", "train.val_every=0", "train.log_every=1"]
    full = train(tiny_config(tmp_path / "full", *overrides))
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "full" / "run" / "metrics.jsonl")]
    assert sum(losses[-4:]) < sum(losses[:4])

    # The same run, crashing at iteration 6 (last.pt is from 4), then resumed: same batches, weights.
    log = RunLogger.log

    def crash_at_6(self, record):
        log(self, record)
        if record.get("iter") == 6:
            raise Crash

    monkeypatch.setattr(RunLogger, "log", crash_at_6)
    with pytest.raises(Crash):
        train(tiny_config(tmp_path / "split", *overrides))
    monkeypatch.setattr(RunLogger, "log", log)
    resumed = train(tiny_config(tmp_path / "split", *overrides), resume=True)
    assert resumed["iterations"] == full["iterations"] == 12
    a = torch.load(full["last"], weights_only=True)["model"]["state_dict"]
    b = torch.load(resumed["last"], weights_only=True)["model"]["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_training_set_too_large_for_the_device_is_refused_with_the_fix(tmp_path, monkeypatch):
    from sceneparse.engine import feed

    monkeypatch.setattr(feed, "free_memory", lambda device: 100_000)  # 8 x 64 x 64 x 4 B = 131 kB > half
    with pytest.raises(SceneparseError, match="data.cache_in_memory would keep the 8 training images") as info:
        train(tiny_config(tmp_path, *DEVICE, "data.cache_in_memory=true"))
    assert "data.cache_in_memory=false" in info.value.hint


def test_device_augmentation_needs_a_crop_size(tmp_path):
    with pytest.raises(SceneparseError, match="data.augment_on=device needs data.crop_size"):
        tiny_config(tmp_path, "data.augment_on=device")


def test_the_feed_gives_device_augmentation_the_configs_base_size(tmp_path, monkeypatch):
    from sceneparse.engine import feed

    monkeypatch.setattr(feed, "_loader_feed", lambda *args: args[-1])  # returns the augmentation
    cfg = tiny_config(tmp_path, *DEVICE, "data.base_size=40", "data.cache_in_memory=false")
    augment = feed.training_feed(None, None, cfg.data, torch.device("cpu"), 6)
    assert isinstance(augment, DeviceAugment) and augment.base_size == 40

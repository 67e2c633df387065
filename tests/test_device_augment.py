"""Batched augmentation on the device (data.augment_on=device), checked against direct slicing,
torch's own resizing and torchvision's colour functions, and in training runs."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from sceneparse.data import IGNORE_INDEX
from sceneparse.data.device_augment import DeviceAugment
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


def test_halving_places_the_image_inside_a_padded_crop(sample):
    image, mask = sample
    out, label = DeviceAugment((12, 16), (0.5, 0.5), flip=False, **RAW)(image, mask, [(12, 16)], [3])
    inside = label[0] != IGNORE_INDEX
    rows, cols = inside.nonzero()[:, 0], inside.nonzero()[:, 1]
    top, left = int(rows.min()), int(cols.min())
    assert inside.sum() == 6 * 8 and int(rows.max()) == top + 5 and int(cols.max()) == left + 7
    # bilinear at exactly half size averages each 2x2 block
    block = out[0, :, top : top + 6, left : left + 8]
    assert torch.allclose(block, F.avg_pool2d(image / 255.0, 2)[0], atol=1e-6)
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


def test_colour_jitter_matches_torchvision(sample):
    image, mask = sample
    augment = DeviceAugment((12, 16), (1.0, 1.0), flip=False, jitter=0.4, **RAW)
    for seed in range(5):
        out, _ = augment(image, mask, [(12, 16)], [seed])
        brightness, contrast, saturation = augment.draw(seed)[4:]
        assert all(0.6 <= f <= 1.4 for f in (brightness, contrast, saturation))
        expected = TF.adjust_brightness(image[0] / 255.0, brightness)
        expected = TF.adjust_contrast(expected, contrast)
        expected = TF.adjust_saturation(expected, saturation)
        assert torch.allclose(out[0], expected, atol=1e-5)


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

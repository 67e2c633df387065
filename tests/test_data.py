"""Datasets (real samples and tmp files), build_dataset, transforms, collate and samplers."""
from __future__ import annotations

import csv
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torchvision import tv_tensors

from sceneparse.data import ADE20K, IGNORE_INDEX, CamVid, Folder, Synthetic, build_dataset, builtin_meta
from sceneparse.data.samplers import AspectRatioBatchSampler
from sceneparse.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomShortSideResize,
    build_train_transforms,
    collate_pad,
    normalize,
)
from sceneparse.errors import SceneparseError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"


def need_shared(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared not found: {path} is needed for this test")
    return path


def raw_png(path) -> np.ndarray:
    return np.array(Image.open(path))


# --------------------------------------------------------------------------- ADE20K


def _official_ade_layout(tmp_path: Path) -> Path:
    """ROOT/ADEChallengeData2016/{images,annotations}/{training,validation} linking the samples."""
    samples = need_shared("ade20k_samples")
    base = tmp_path / "ADEChallengeData2016"
    for kind, ext in (("images", "jpg"), ("annotations", "png")):
        for sub, prefix in (("training", "ADE_train_"), ("validation", "ADE_val_")):
            (base / kind / sub).mkdir(parents=True)
            for f in sorted((samples / kind).glob(f"{prefix}*.{ext}")):
                os.symlink(f, base / kind / sub / f.name)
    return tmp_path


def _check_ade_mapping(ds: ADE20K):
    for i in range(len(ds)):
        sample = ds[i]
        raw = raw_png(ds.files[i][1]).astype(np.int64)
        expected = np.where(raw == 0, IGNORE_INDEX, raw - 1)
        assert sample["mask"].dtype == torch.int64
        np.testing.assert_array_equal(sample["mask"].numpy(), expected)
        assert sample["image"].dtype == torch.uint8
        assert tuple(sample["image"].shape) == (3, *raw.shape)
        assert isinstance(sample["image"], tv_tensors.Image) and isinstance(sample["mask"], tv_tensors.Mask)


def test_ade20k_official_layout_and_label_mapping(tmp_path):
    root = _official_ade_layout(tmp_path)
    val = ADE20K(root, "val")
    assert len(val) == 5 and len(ADE20K(root, "train")) == 1
    assert [Path(p).name for p, _ in val.files][:2] == ["ADE_val_00000001.jpg", "ADE_val_00000002.jpg"]
    _check_ade_mapping(val)
    # ROOT may point at ADEChallengeData2016 itself
    assert ADE20K(root / "ADEChallengeData2016", "validation").files == val.files
    assert val.image_sizes() == [raw_png(lbl).shape for _, lbl in val.files]


def test_ade20k_flat_samples_split_by_name():
    samples = need_shared("ade20k_samples")
    train, val = ADE20K(samples, "train"), ADE20K(samples, "val")
    assert [Path(p).name for p, _ in train.files] == ["ADE_train_00000036.jpg"]
    assert len(val) == 5
    _check_ade_mapping(train)


def test_ade20k_odgt_gives_files_and_sizes(tmp_path):
    root = _official_ade_layout(tmp_path)
    lines = [
        {"fpath_img": "ADEChallengeData2016/images/validation/ADE_val_00000002.jpg",
         "fpath_segm": "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png", "width": 999, "height": 7},
        {"fpath_img": "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg",
         "fpath_segm": "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png", "width": 5, "height": 6},
    ]
    odgt = tmp_path / "validation.odgt"
    odgt.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    for base in (root, root / "ADEChallengeData2016"):  # paths resolve from ROOT or its parent
        ds = build_dataset({"kind": "ade20k", "root": str(base), "odgt": {"val": str(odgt)}}, "val")
        assert [Path(p).name for p, _ in ds.files] == ["ADE_val_00000002.jpg", "ADE_val_00000001.jpg"]
        assert ds.image_sizes() == [(7, 999), (6, 5)]  # from the list, not the headers
    # a folder of official list names picks the split's list
    assert ADE20K(root, "val", odgt=tmp_path).image_sizes() == [(7, 999), (6, 5)]
    with pytest.raises(SceneparseError, match="training.odgt"):
        ADE20K(root, "train", odgt=tmp_path)
    lines[0]["fpath_img"] = "ADEChallengeData2016/images/validation/nope.jpg"
    odgt.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.raises(SceneparseError, match="nope.jpg"):
        ADE20K(root, "val", odgt=odgt)


def test_ade20k_builtin_metadata():
    meta = builtin_meta("ade20k")
    assert len(meta["class_names"]) == 150 and len(meta["palette"]) == 150
    assert meta["class_names"][:3] == ["wall", "building", "sky"] and meta["palette"][0] == [120, 120, 120]
    assert meta["class_names"][64] == "coffee table" and meta["class_names"][136] == "traffic light"


def test_ade20k_builtin_metadata_equals_csails_files():
    meta, meta_dir = builtin_meta("ade20k"), need_shared("ade20k_meta")
    with open(meta_dir / "object150_info.csv", newline="") as f:
        rows = [row["Name"] for row in csv.DictReader(f)]
    # The CSV joins every word with ';' ("coffee;table;cocktail;table"), so a built-in name is a
    # prefix of its row's words; multi-word names must be restored, not cut to "coffee".
    for name, row in zip(meta["class_names"], rows, strict=True):
        assert row.replace(";", " ").startswith(name) or name == "television receiver", (name, row)
    assert meta["palette"] == json.loads((meta_dir / "color150.json").read_text())


# --------------------------------------------------------------------------- CamVid, VOC as a folder


def test_camvid_loads_with_void_ignored():
    root = need_shared("camvid")
    ds = CamVid(root, "val")
    assert len(ds) == 101 and ds.num_classes == 11
    assert ds.class_names[0] == "sky" and ds.palette[3] == [128, 64, 128]
    for i in (0, 50):
        raw = raw_png(ds.files[i][1]).astype(np.int64)
        assert (raw == 11).any()  # these frames have void pixels
        expected = np.where(raw == 11, IGNORE_INDEX, raw)
        np.testing.assert_array_equal(ds[i]["mask"].numpy(), expected)
    assert set(ds.image_sizes()) == {(360, 480)}


VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


def test_voc_samples_as_a_folder_dataset(tmp_path):
    voc = need_shared("voc_samples")
    os.symlink(voc / "JPEGImages", tmp_path / "images")
    os.symlink(voc / "SegmentationClass", tmp_path / "labels")
    (tmp_path / "voc.yaml").write_text(f"classes: {VOC_CLASSES}\nignore_index: 255\n")
    ds = build_dataset(OmegaConf.create({"kind": "folder", "root": str(tmp_path), "classes_file": str(tmp_path / "voc.yaml")}), "val")
    assert len(ds) == 14 and ds.num_classes == 21 and len(ds.palette) == 21
    for i in range(0, 14, 5):
        raw = raw_png(ds.files[i][1])
        assert Image.open(ds.files[i][1]).mode == "P"
        assert (raw == 255).any() and raw.max() == 255
        np.testing.assert_array_equal(ds[i]["mask"].numpy(), raw.astype(np.int64))


# --------------------------------------------------------------------------- folder, build_dataset errors


def _write_pair(root: Path, stem: str, sub: str = "", size=(6, 8), value: int = 1):
    for kind in ("images", "labels"):
        (root / kind / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), 100, np.uint8)).save(root / "images" / sub / f"{stem}.jpg")
    Image.fromarray(np.full(size, value, np.uint8)).save(root / "labels" / sub / f"{stem}.png")


def test_folder_splits_from_subfolders_and_list_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for stem in ("x", "y"):
        _write_pair(a, stem, "train")
    _write_pair(a, "z", "val")
    (a / "classes.yaml").write_text("classes: [bg, thing]\n")
    assert len(Folder(a, "train")) == 2 and len(Folder(a, "val")) == 1
    for stem in ("x", "y", "z"):
        _write_pair(b, stem)
    (b / "classes.json").write_text('{"classes": ["bg", "thing"]}')
    (b / "val.txt").write_text("z\n")
    assert [Path(p).stem for p, _ in Folder(b, "val").files] == ["z"]
    assert len(Folder(b, None)) == 3


def test_folder_image_without_label_is_an_error(tmp_path):
    _write_pair(tmp_path, "ok")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "lonely one.png")
    (tmp_path / "classes.yaml").write_text("classes: [bg, thing]\n")
    with pytest.raises(SceneparseError, match="lonely one.png"):
        Folder(tmp_path, None)


def test_folder_without_classes_file_explains(tmp_path):
    _write_pair(tmp_path, "a")
    with pytest.raises(SceneparseError, match="classes file") as info:
        Folder(tmp_path, None)
    assert "classes:" in str(info.value)  # the hint shows an example


def test_build_dataset_errors(tmp_path):
    with pytest.raises(SceneparseError, match="unknown dataset kind 'coco'"):
        build_dataset({"kind": "coco"}, "train")
    missing = tmp_path / "not here"
    with pytest.raises(SceneparseError, match="not here") as info:
        build_dataset({"kind": "camvid", "root": str(missing)}, "train")
    assert "expected layout" in str(info.value)
    (tmp_path / "empty" / "train" / "images").mkdir(parents=True)
    with pytest.raises(SceneparseError, match="no image/label pairs"):
        build_dataset({"kind": "camvid", "root": str(tmp_path / "empty")}, "train")
    with pytest.raises(SceneparseError, match="split"):
        build_dataset({"kind": "ade20k", "root": str(tmp_path)}, "tarin")


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_covers_the_classes():
    cfg = {"kind": "synthetic", "seed": 3, "num_images": {"train": 12, "val": 4}, "image_size": 64}
    train = build_dataset(cfg, "train")
    again = build_dataset(OmegaConf.create(cfg), "train")
    other = build_dataset({**cfg, "seed": 4}, "train")
    val = build_dataset(cfg, "val")
    assert len(train) == 12 and len(val) == 4 and train.num_classes == 5
    a, b = train[5], again[5]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], other[5]["image"])
    assert not torch.equal(train[0]["image"], val[0]["image"])
    assert a["image"].shape == (3, 64, 64) and a["image"].dtype == torch.uint8
    counts = sum(torch.bincount(train[i]["mask"].flatten(), minlength=5) for i in range(len(train)))
    assert (counts > 0).all() and counts.numel() == 5
    assert train.image_sizes() == [(64, 64)] * 12
    # a class is not one constant colour: its pixels vary within an image
    sky = a["image"][:, a["mask"] == 0].float()
    assert sky.std(dim=1).min() > 3


def test_synthetic_writes_a_folder_dataset(tmp_path):
    ds = Synthetic("val", num_images=2, image_size=32)
    ds.write_folder(tmp_path)
    folder = Folder(tmp_path, None)
    assert folder.class_names == ds.class_names and len(folder) == 2
    assert torch.equal(folder[0]["mask"], ds[0]["mask"]) and torch.equal(folder[0]["image"], ds[0]["image"])


# --------------------------------------------------------------------------- transforms


def _pair(h: int, w: int):
    image = torch.arange(3 * h * w, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, h, w)
    mask = torch.arange(h * w).remainder(3).view(h, w)
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


def test_normalize_matches_formula():
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    out = normalize(x)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std)
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    "size, short, max_size, expected",
    [((20, 40), 30, 1000, (30, 60)), ((20, 40), 30, 50, (25, 50)), ((40, 10), 5, 1000, (20, 5))],
)
def test_short_side_resize_sizes(size, short, max_size, expected):
    image, mask = _pair(*size)
    out_image, out_mask = RandomShortSideResize([short], max_size)(image, mask)
    assert tuple(out_image.shape[-2:]) == expected and tuple(out_mask.shape) == expected
    assert set(out_mask.unique().tolist()) <= {0, 1, 2}  # nearest: no invented class ids


def test_masks_are_resized_at_the_pixel_centres():
    """Output pixel i takes the class of the source pixel under its centre, (i + 0.5) * in / out:
    7 -> 4 columns reads 0.875, 2.625, 4.375, 6.125 (torchvision's legacy mask resize reads
    floor(i * 7 / 4) = 0, 1, 3, 5: boundaries shifted towards the top left)."""
    from sceneparse.data.transforms import resize

    mask = tv_tensors.Mask(torch.arange(7).repeat(2, 1))
    out = resize(mask, (2, 4))
    assert isinstance(out, tv_tensors.Mask) and out.tolist() == [[0, 2, 4, 6]] * 2
    assert resize(mask, (2, 11)).tolist()[0] == [int((i + 0.5) * 7 / 11) for i in range(11)]
    image = tv_tensors.Image(torch.arange(7, dtype=torch.float32).repeat(3, 2, 1))
    assert resize(image, (2, 4)).tolist()[0][0] == pytest.approx(  # the image: antialiased bilinear
        F.interpolate(image[None], size=(2, 4), mode="bilinear", antialias=True)[0, 0, 0].tolist())


def test_per_batch_short_side_overrides_the_random_draw():
    pipeline = build_train_transforms({"scales": [30, 60], "max_size": 100, "flip": False})
    image, mask = _pair(10, 20)
    for _ in range(3):
        out_image, out_mask = pipeline(image, mask, short_side=45)
        assert tuple(out_image.shape[-2:]) == (45, 90) and tuple(out_mask.shape) == (45, 90)
    seen = {tuple(pipeline(image, mask)[0].shape[-2:]) for _ in range(30)}
    assert seen == {(30, 60), (50, 100)}  # 60 would make the long side 120 > max_size 100


def test_crop_pads_with_zero_and_ignore():
    pipeline = build_train_transforms({"scales": None, "flip": False, "crop": [10, 12]})
    image, mask = _pair(4, 5)
    out_image, out_mask = pipeline(image, mask)
    assert tuple(out_image.shape) == (3, 10, 12) and tuple(out_mask.shape) == (10, 12)
    assert (out_mask == IGNORE_INDEX).sum() == 10 * 12 - 4 * 5
    assert (out_image[:, out_mask == IGNORE_INDEX] == 0).all()
    assert sorted(out_mask[out_mask != IGNORE_INDEX].tolist()) == sorted(mask.flatten().tolist())


def test_base_size_from_the_config_sets_the_rescaled_short_side():
    """data.base_size reaches the worker pipeline: the short side becomes base_size * factor,
    whatever the image's own size (here factor 1, so a 30x40 image becomes 20x27 before a crop
    that covers it)."""
    from sceneparse.engine.config import load_config
    from sceneparse.engine.feed import train_transform_options

    cfg = load_config(None, ["data.crop_size=[40,40]", "data.scale_range=[1.0,1.0]", "data.base_size=20",
                             "data.flip=false"])
    pipeline = build_train_transforms(train_transform_options(cfg.data))
    image, mask = _pair(30, 40)
    _, out_mask = pipeline(image, mask)
    assert int((out_mask != IGNORE_INDEX).sum()) == 20 * 27  # round(40 * 20 / 30) = 27
    with pytest.raises(SceneparseError, match="data.base_size=0: expected a positive short side"):
        load_config(None, ["data.crop_size=40", "data.base_size=0"])
    with pytest.raises(SceneparseError, match="data.base_size=512, data.crop_size=None: expected data.base_size "
                                              "with data.crop_size"):
        load_config(None, ["data.base_size=512"])  # the CSAIL resize (data.scales) has no base size


def test_flip_moves_image_and_mask_together():
    pipeline = build_train_transforms({"scales": None, "flip": True, "jitter": 0.3, "scale_range": [0.5, 2.0]})
    h, w = 32, 48
    mask = tv_tensors.Mask((torch.arange(w) >= 12).long().expand(h, w).clone())
    image = tv_tensors.Image((mask * 200 + 20).to(torch.uint8).expand(3, h, w).clone())
    flipped = 0
    for _ in range(20):
        out_image, out_mask = pipeline(image, mask)
        bright = out_image.float().mean(0) > 110
        agree = (bright == (out_mask == 1)).float().mean()
        assert agree > 0.9
        flipped += int(out_mask[:, 0].float().mean() > 0.5)
    assert 0 < flipped < 20


def test_unknown_transform_setting_is_an_error():
    with pytest.raises(SceneparseError, match="scalez"):
        build_train_transforms({"scalez": [1]})


def test_collate_pad():
    a = {"image": _pair(2, 3)[0], "mask": torch.zeros(2, 3, dtype=torch.int64), "path": "a"}
    b = {"image": _pair(4, 2)[0], "mask": torch.ones(4, 2, dtype=torch.int64), "path": "b"}
    batch = collate_pad([a, b])
    assert batch["image"].shape == (2, 3, 4, 3) and batch["image"].dtype == torch.uint8
    assert batch["mask"].shape == (2, 4, 3) and batch["mask"].dtype == torch.int64
    assert batch["paths"] == ["a", "b"] and batch["sizes"] == [(2, 3), (4, 2)]
    assert torch.equal(batch["image"][0, :, :2, :3], a["image"]) and (batch["image"][0, :, 2:] == 0).all()
    assert (batch["mask"][0, 2:] == IGNORE_INDEX).all() and (batch["mask"][1, :, 2] == IGNORE_INDEX).all()
    assert (batch["mask"][1, :, :2] == 1).all()


# --------------------------------------------------------------------------- samplers

# indices 0..4 landscape, 5..7 portrait
SIZES = [(10, 20), (10, 10), (30, 40), (5, 6), (10, 15), (20, 10), (40, 30), (15, 10)]
LANDSCAPE, PORTRAIT = set(range(5)), set(range(5, 8))


def _flat(batches):
    return [i for b in batches for i in b]


def test_sampler_groups_by_orientation_and_is_deterministic():
    sampler = AspectRatioBatchSampler(SIZES, batch_size=2, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3  # 5 landscape -> 2 full batches, 3 portrait -> 1
    for batch in batches:
        assert set(batch) <= LANDSCAPE or set(batch) <= PORTRAIT
    assert len(set(_flat(batches))) == 6
    assert batches == AspectRatioBatchSampler(SIZES, batch_size=2, seed=1).batches(0)
    orders = {tuple(map(tuple, sampler.batches(e))) for e in range(6)}
    assert len(orders) > 1  # epochs reshuffle
    keep = AspectRatioBatchSampler(SIZES, batch_size=2, drop_last=False, shuffle=False)
    assert keep.batches(0) == [[0, 1], [2, 3], [4], [5, 6], [7]] and len(keep) == 5


def test_sampler_shards_disjointly_with_equal_counts():
    sizes = SIZES * 3  # 15 landscape, 9 portrait -> 7 + 4 = 11 batches of 2
    shards = [AspectRatioBatchSampler(sizes, 2, seed=5, num_replicas=3, rank=r).batches(2) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert len(AspectRatioBatchSampler(sizes, 2, num_replicas=3, rank=0)) == 3
    flat = [_flat(s) for s in shards]
    assert all(not set(a) & set(b) for a, b in itertools.combinations(flat, 2))
    padded = [AspectRatioBatchSampler(sizes, 2, drop_last=False, num_replicas=3, rank=r).batches(0) for r in range(3)]
    assert [len(s) for s in padded] == [5, 5, 5]  # 8 + 5 batches (partial ones kept), padded to 15
    # fewer batches than processes: each still gets as many as len() says (repeated ones)
    few = [AspectRatioBatchSampler([(4, 6)], 2, drop_last=False, num_replicas=4, rank=r) for r in range(4)]
    assert [b.batches(0) for b in few] == [[[0]]] * 4 and [len(b) for b in few] == [1] * 4


def test_sampler_epochs_and_per_batch_scales():
    sampler = AspectRatioBatchSampler(SIZES * 2, 2, seed=7, scales=[300, 450])
    full = sampler.batches(3)
    assert all(isinstance(i, tuple) for b in full for i in b)
    assert all(len({s for _, s in b}) == 1 for b in full)  # one scale per batch
    assert {s for b in full for _, s in b} <= {300, 450}
    assert full == AspectRatioBatchSampler(SIZES * 2, 2, seed=7, scales=[300, 450]).batches(3)
    sampler.set_epoch(3)
    assert list(sampler) == full


def test_dataset_with_sampler_and_collate(tmp_path):
    for stem, size in (("wide", (20, 30)), ("tall", (30, 20)), ("wide2", (10, 30)), ("tall2", (40, 20))):
        _write_pair(tmp_path, stem, size=size)
    (tmp_path / "classes.yaml").write_text("classes: [bg, thing]\n")
    ds = Folder(tmp_path, None, transforms=build_train_transforms({"scales": [16, 24], "flip": True}))
    sampler = AspectRatioBatchSampler(ds.image_sizes(), 2, seed=0, scales=[16, 24])
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_pad)
    batches = list(loader)
    assert len(batches) == 2
    for batch, indices in zip(batches, sampler.batches(0)):
        short = indices[0][1]
        assert min(batch["sizes"][0]) == short or max(batch["sizes"][0]) == 1000
        assert min(min(s) for s in batch["sizes"]) == short
        assert set(batch["mask"].unique().tolist()) <= {1, IGNORE_INDEX}


class _BadLabels(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise SceneparseError(f"label file x{index}.png has values outside the 3 classes: 7", "fix the label file")


def test_an_error_raised_in_a_dataloader_worker_is_shown_as_the_user_error():
    """torch re-raises a worker's exception with the worker's traceback as its message; the CLI
    shows the original message and its fix only (errors.user_message)."""
    from sceneparse.errors import user_message

    batches = iter(torch.utils.data.DataLoader(_BadLabels(), batch_size=None, num_workers=1))
    try:
        next(batches)
        raise AssertionError("the worker's error did not reach the main process")
    except SceneparseError as caught:
        err = caught.with_traceback(None)  # (a kept traceback would keep the workers alive)
    del batches  # shuts the worker down now, not at some later garbage collection
    assert "Original Traceback" in str(err)  # what torch makes of it
    assert user_message(err) == "label file x0.png has values outside the 3 classes: 7\n  fix: fix the label file"
    assert user_message(SceneparseError("plain", "hint")) == "plain\n  fix: hint"

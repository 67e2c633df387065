"""Predictor: scales, flips, sliding windows, stripes, speed paths and CSAIL's test protocol."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sceneparse.engine.infer import (
    CSAIL_SCALES,
    Predictor,
    _linear_weights,
    csail_resize_shape,
    model_pad_multiple,
    round_up,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ADE_SAMPLES = SHARED / "data" / "ade20k_samples"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]



def _need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"../shared not found: {path}")
    return path


class ConvNet(nn.Module):
    """Stand-in for a Segmenter: normalised N x 3 x H x W -> logits N x C x H x W."""

    def __init__(self, num_classes: int = 4, kernel: int = 1, limit: int | None = None, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, num_classes, kernel, padding=kernel // 2)
        self.limit = limit

    def forward(self, x):
        if self.limit is not None and max(x.shape[-2:]) > self.limit:
            raise MemoryError(f"input {tuple(x.shape)} larger than {self.limit}")
        return self.conv(x) * 4  # sharper probabilities than a bare random conv


def _random_image(h: int, w: int, seed: int = 0, cell: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth-ish content: an upsampled random pattern, so resizing changes it gradually
    small = torch.rand((1, 3, h // cell + 1, w // cell + 1), generator=g)
    return (F.interpolate(small, size=(h, w), mode="bilinear") * 255).round().to(torch.uint8)[0]


def _norm(x_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x_uint8.float() / 255 - mean) / std


# --------------------------------------------------------------------------- CSAIL sizes
def test_round_up():
    assert [round_up(x, 8) for x in (1, 7, 8, 9, 450)] == [8, 8, 8, 16, 456]


def test_csail_resize_shape_on_real_ade_sizes():
    odgt = _need_shared(SHARED / "data" / "ade20k_meta" / "validation.odgt")
    sizes = {}
    with open(odgt) as f:
        for line in f:
            rec = json.loads(line)
            sizes[Path(rec["fpath_img"]).name] = (rec["height"], rec["width"])
    # ADE_val_00000001: 512 x 683 (h x w).
    h, w = sizes["ADE_val_00000001.jpg"]
    assert (h, w) == (512, 683)
    # short 450: scale = min(450/512, 1000/683) = 0.87890625; 512*s = 450.0, 683*s = 600.29 -> (450, 600)
    # rounded up to 8: 450 -> 456, 600 -> 600; to 32: 450 -> 480, 600 -> 608
    assert csail_resize_shape(h, w, 450, 1000, 8) == (456, 600)
    assert csail_resize_shape(h, w, 450, 1000, 32) == (480, 608)
    # short 300: scale = 300/512 = 0.5859375; 300.0 and 400.195 -> (300, 400) -> 8: (304, 400)
    assert csail_resize_shape(h, w, 300, 1000, 8) == (304, 400)
    # short 600: scale = 1.171875; 600.0 and 800.39 -> (600, 800), already multiples of 8
    assert csail_resize_shape(h, w, 600, 1000, 8) == (600, 800)

    # ADE_val_00000035: 512 x 916, the long-side cap binds at short 600:
    # scale = min(600/512 = 1.1719, 1000/916 = 1.0917) = 1.0917; 512*s = 558.95 -> 558, 916*s = 1000.0 -> 1000
    # rounded up to 8: 558 -> 560, 1000 -> 1000; to 32: 576, 1024
    h, w = sizes["ADE_val_00000035.jpg"]
    assert (h, w) == (512, 916)
    assert csail_resize_shape(h, w, 600, 1000, 8) == (560, 1000)
    assert csail_resize_shape(h, w, 600, 1000, 32) == (576, 1024)

    # ADE_val_00000017: portrait 380 x 204.
    # short 450: scale = min(450/204 = 2.2059, 1000/380 = 2.6316) = 2.2059; 838.24 -> 838, 450.0 -> 450
    # rounded up to 8: 838 -> 840, 450 -> 456
    h, w = sizes["ADE_val_00000017.jpg"]
    assert (h, w) == (380, 204)
    assert csail_resize_shape(h, w, 450, 1000, 8) == (840, 456)
    # short 600: the cap binds, scale = 1000/380 = 2.6316; 1000.0 -> 1000, 536.84 -> 536 (both /8)
    assert csail_resize_shape(h, w, 600, 1000, 8) == (1000, 536)


# --------------------------------------------------------------------------- stand-in models
def test_original_size_single_scale_is_softmax_of_model():
    model = ConvNet(kernel=3)
    image = _random_image(37, 53)
    probs = Predictor(model).probabilities(image)
    expected = model(_norm(image[None]))[0].softmax(0)
    assert probs.shape == (4, 37, 53)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(Predictor(model).predict(image), expected.argmax(0))


def test_given_normalization_is_applied_on_every_path():
    # the identity "model" shows its normalised input: softmax((x / 255 - mean) / std) over channels
    mean, std = [0.2, 0.5, 0.7], [0.5, 0.25, 0.125]
    image = _random_image(24, 32, seed=3)
    x = image.float() / 255
    expected = ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)).softmax(0)
    for resize in ("torch", "pil"):  # the original size needs no resizing in either mode
        pred = Predictor(nn.Identity(), normalization={"mean": mean, "std": std}, resize=resize)
        torch.testing.assert_close(pred.probabilities(image), expected, rtol=1e-5, atol=1e-6)
    # twice the short side: pil resizes the uint8 image, then normalises with the same mean/std
    pred = Predictor(nn.Identity(), scales=48, normalization={"mean": mean, "std": std}, resize="pil")
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((64, 48), Image.BILINEAR)
    resized = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
    logits = (resized - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    expected = F.interpolate(logits[None], size=(24, 32), mode="bilinear", align_corners=False)[0].softmax(0)
    torch.testing.assert_close(pred.probabilities(image), expected, rtol=1e-5, atol=1e-6)


def test_the_models_own_normalisation_is_used_by_every_protocol_and_sizes_must_be_positive():
    model = nn.Identity()
    model.normalization = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}  # as load_model sets it
    for predictor in (Predictor(model), Predictor.csail(model, pad_multiple=8)):
        assert predictor.mean == [0.5] * 3 and predictor.std == [0.25] * 3
    assert Predictor.csail(nn.Identity(), pad_multiple=8).mean == [0.485, 0.456, 0.406]  # CSAIL's models
    for bad in ({"scales": (0,)}, {"scales": (450, -1)}, {"scales": 450, "max_size": 0}):
        with pytest.raises(ValueError, match="must be positive"):
            Predictor(model, **bad)


def test_multi_scale_and_flip_average_probabilities():
    model = ConvNet(kernel=3)  # a 3x3 random kernel is not mirror-symmetric: flipping matters
    image = _random_image(40, 60)
    pred = Predictor(model, scales=(20, 50), flip=True, max_size=1000)
    x = _norm(image[None])
    expected = torch.zeros(4, 40, 60)
    # short side 20: 40x60 -> 20x30; short side 50: 40x60 -> 50x75 (no rounding, pad_multiple=None)
    for size in [(20, 30), (50, 75)]:
        xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        for flipped in (False, True):
            inp = xs.flip(-1) if flipped else xs
            logits = model(inp)
            if flipped:
                logits = logits.flip(-1)
            expected += F.interpolate(logits, size=(40, 60), mode="bilinear", align_corners=False)[0].softmax(0)
    expected /= 4
    torch.testing.assert_close(pred.probabilities(image), expected, rtol=1e-5, atol=1e-6)
    assert [pred.input_size(40, 60, s) for s in pred.scales] == [(20, 30), (50, 75)]


def test_max_size_and_pad_multiple_in_sizes():
    pred = Predictor(ConvNet(), scales=(None, 300), max_size=400, pad_multiple=32)
    # None: original 100x250 rounded up to 32 -> 128x256
    assert pred.input_size(100, 250, None) == (128, 256)
    # 300: scale = min(300/100, 400/250) = 1.6 -> 160x400 -> rounded up to 32: 160, 416
    assert pred.input_size(100, 250, 300) == (160, 416)


def test_sliding_window_matches_whole_image_for_a_local_model():
    image = _random_image(150, 230)
    whole = Predictor(ConvNet()).probabilities(image)
    # the limited model refuses inputs above 64 px: the predictor must tile
    windowed = Predictor(ConvNet(limit=64), window=64).probabilities(image)
    torch.testing.assert_close(windowed, whole, rtol=1e-4, atol=1e-6)
    with pytest.raises(MemoryError):
        Predictor(ConvNet(limit=64)).probabilities(image)


def test_sliding_window_accumulates_at_reduced_resolution_under_a_budget():
    image = _random_image(150, 230, cell=16)  # content coarser than the reduction
    whole = Predictor(ConvNet()).predict(image)
    # 4 classes x 150 x 230 x 4 bytes = 552 kB; a 60 kB budget makes the average ~3x coarser per side
    small = Predictor(ConvNet(limit=64), window=64, max_prob_bytes=60_000)
    assert (small.predict(image) == whole).float().mean() > 0.98
    passes = small._passes(image)
    # f = (552000 / 60000) ** 0.5 = 3.033: 150 / f = 49.45 -> 49, 230 / f = 75.8 -> 76
    assert passes[0].shape[-2:] == (49, 76)


def test_sliding_window_with_context_model_and_flip_is_close():
    # a 3x3 model sees different borders at window edges; overlapping windows keep it close
    image = _random_image(120, 200)
    whole = Predictor(ConvNet(kernel=3), flip=True).predict(image)
    windowed = Predictor(ConvNet(kernel=3, limit=64), window=64, flip=True).predict(image)
    assert (windowed == whole).float().mean() > 0.98


def test_stripes_give_the_same_labels_as_full_probabilities():
    image = _random_image(90, 130)
    model = ConvNet(num_classes=5, kernel=3)
    full = Predictor(model, scales=(50, 70), flip=True)
    striped = Predictor(model, scales=(50, 70), flip=True, max_prob_bytes=5 * 130 * 4 * 2 * 7)  # 7-row bands
    expected = full.probabilities(image).argmax(0)
    assert (striped.predict(image) == expected).float().mean() > 0.999


@pytest.mark.parametrize("n_in,n_out", [(7, 19), (19, 7), (10, 10), (1, 5)])
def test_linear_weights_match_interpolate(n_in, n_out):
    x = torch.randn(1, 1, n_in, 3)
    i0, i1, w = _linear_weights(n_in, n_out, "cpu")
    ours = x[0, 0, i0] * (1 - w[:, None]) + x[0, 0, i1] * w[:, None]
    ref = F.interpolate(x, size=(n_out, 3), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_accepts_paths_and_tv_tensors(tmp_path):
    from torchvision import tv_tensors

    image = _random_image(33, 44)
    path = tmp_path / "bild ä.png"
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    pred = Predictor(ConvNet())
    ref = pred.predict(image)
    assert torch.equal(pred.predict(path), ref)
    assert torch.equal(pred.predict(str(path)), ref)
    assert torch.equal(pred.predict(tv_tensors.Image(image)), ref)
    with pytest.raises(ValueError, match="uint8"):
        pred.predict(image.float())
    # the numpy / Pillow layout, HxWx3
    hwc = image.permute(1, 2, 0).numpy()
    assert torch.equal(pred.predict(hwc), ref)
    with Image.open(path) as pil:
        assert torch.equal(pred.predict(pil), ref)
    assert torch.equal(pred.predict(Image.fromarray(hwc).convert("RGBA")), ref)
    with pytest.raises(ValueError, match="HxWx3 numpy"):
        pred.predict(image.numpy())  # a CHW array: numpy arrays are HxWx3
    with pytest.raises(ValueError, match="the image is empty"):
        pred.predict(torch.zeros(3, 0, 0, dtype=torch.uint8))


def test_pil_resize_mode_uses_pillow_bilinear():
    model = ConvNet()
    image = _random_image(48, 64)
    pred = Predictor(model, scales=(30,), pad_multiple=8, resize="pil")
    # 48x64 at short 30: scale 0.625 -> 30x40 -> rounded up to 8: 32x40
    resized = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((40, 32), Image.BILINEAR)
    x = _norm(torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)[None])
    expected = F.interpolate(model(x), size=(48, 64), mode="bilinear", align_corners=False)[0].softmax(0)
    torch.testing.assert_close(pred.probabilities(image), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- real models
def _real_image(h: int, w: int) -> torch.Tensor:
    path = _need_shared(ADE_SAMPLES / "images" / "ADE_val_00000002.jpg")
    img = Image.open(path).convert("RGB").resize((w, h), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="module")
def fitted_model():
    """A small real Segmenter with decisive predictions, made in seconds: BatchNorm statistics
    taken from a real ADE20K image, then the 1x1 classifier fitted to that image's annotation
    (its five largest classes + "other") on frozen features. A random model's class scores are
    near-ties everywhere, which says nothing about numerical agreement."""
    from sceneparse.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse one_thread fixture
    torch.manual_seed(0)
    image = _real_image(96, 128)
    label = np.asarray(Image.open(ADE_SAMPLES / "annotations" / "ADE_val_00000002.png").resize((16, 12), Image.NEAREST))
    values, counts = np.unique(label, return_counts=True)
    target = np.full(label.shape, 5, dtype=np.int64)
    for new_id, value in enumerate(values[np.argsort(-counts)][:5]):
        target[label == value] = new_id
    model = build_model("resnet18dilated", "c1", num_classes=6)
    x = _norm(image[None])
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics
    with torch.no_grad():
        model.train()(x)
        feats = model.eval().decoder.cbr(model.encoder(x)[-1])
    head = model.decoder.conv_last
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(100):
        loss = F.cross_entropy(head(feats), torch.from_numpy(target)[None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval(), image


def test_bf16_autocast_and_channels_last_agree_with_plain(fitted_model):
    model, image = fitted_model
    plain = Predictor(model).predict(image)
    assert len(plain.unique()) >= 4  # a real, varied prediction
    fast = Predictor(model, amp_dtype=torch.bfloat16, channels_last=True).predict(image)
    assert (fast == plain).float().mean() >= 0.99
    model.to(memory_format=torch.contiguous_format)
    channels_last = Predictor(model, channels_last=True).predict(image)
    assert (channels_last == plain).float().mean() >= 0.99
    model.to(memory_format=torch.contiguous_format)


def test_segmenter_decoder_path_and_padding(fitted_model):
    model, image = fitted_model
    assert model_pad_multiple(model) == 8
    # 64x96 is a multiple of 8: the decoder's 1/8-resolution logits go straight to the output size
    crop = image[:, :64, :96]
    x = _norm(crop[None])
    with torch.no_grad():
        direct = F.interpolate(model.decoder(model.encoder(x)), size=(64, 96), mode="bilinear",
                               align_corners=False)[0].softmax(0)
        via_forward = model(x)[0].softmax(0)
    probs = Predictor(model).probabilities(crop)
    torch.testing.assert_close(probs, direct, rtol=1e-4, atol=1e-5)
    # 61x90 is not a multiple of 8: the Segmenter pads, so this is its forward's output
    odd = image[:, :61, :90]
    with torch.no_grad():
        expected = model(_norm(odd[None]))[0].softmax(0)
    torch.testing.assert_close(Predictor(model).probabilities(odd), expected, rtol=1e-4, atol=1e-5)
    # the two routes (one interpolation or two) agree on nearly all labels
    assert len(probs.argmax(0).unique()) >= 3
    assert (via_forward.argmax(0) == probs.argmax(0)).float().mean() > 0.97


def test_csail_protocol_matches_mit_semseg_pipeline():
    """Predictor.csail against CSAIL's own ValDataset resizing and their eval averaging."""
    dataset_mod = pytest.importorskip("mit_semseg.dataset")
    from types import SimpleNamespace

    from sceneparse.models import build_model

    img_path = _need_shared(ADE_SAMPLES / "images" / "ADE_val_00000002.jpg")
    seg_path = ADE_SAMPLES / "annotations" / "ADE_val_00000002.png"
    torch.manual_seed(0)
    model = build_model("mobilenetv2dilated", "c1", num_classes=7).eval()
    opt = SimpleNamespace(imgSizes=(300,), imgMaxSize=1000, padding_constant=8)
    val = dataset_mod.ValDataset("/", [{"fpath_img": str(img_path), "fpath_segm": str(seg_path)}], opt)
    sample = val[0]
    h, w = sample["seg_label"].shape[-2:]
    with torch.no_grad():
        ref = sum(F.interpolate(model.decoder(model.encoder(x)), size=(h, w), mode="bilinear",
                                align_corners=False).softmax(1) for x in sample["img_data"])[0] / len(opt.imgSizes)
    image = torch.from_numpy(sample["img_ori"].copy()).permute(2, 0, 1)  # Pillow-decoded, as CSAIL
    pred = Predictor.csail(model, single_scale=True)
    assert pred.scales == (450,) and pred.pad_multiple == 8 and pred.resize == "pil"
    assert Predictor.csail(model).scales == CSAIL_SCALES
    pred.scales = (300,)  # the same protocol at one smaller scale keeps the test fast
    # our resized inputs are CSAIL's, value for value
    ours = list(pred._inputs(image))
    assert ours[0].shape == sample["img_data"][0].shape
    torch.testing.assert_close(ours[0], sample["img_data"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(pred.probabilities(image), ref, rtol=1e-4, atol=1e-5)

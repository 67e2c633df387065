"""Inference at the original image size: multi-scale, flip, sliding windows, CSAIL's protocol.

For each test scale the image is resized (short side = scale, long side at most `max_size`,
optionally rounded up to a multiple by resizing, as CSAIL does), run through the model, and the
logits are upsampled bilinearly (align_corners=False) to the original size and turned into
probabilities with a softmax; the probabilities are averaged over scales and flips. This is CSAIL's
evaluation procedure (their decoders upsample logits to the label size, then softmax; eval.py
averages over scales).

When the model is a Segmenter and the network input is already a multiple of its pad multiple, the
decoder's feature-resolution logits are upsampled straight to the original size (one interpolation,
exactly as CSAIL's decoders do) instead of going through the input size first.

Memory: the class probabilities at the original size cost C x H x W floats; above
`max_prob_bytes`, `predict()` builds the label map in horizontal stripes instead, and network
inputs larger than `window` pixels on a side run as overlapping windows (probabilities averaged),
so large photographs do not run out of memory.
"""
from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sceneparse.data.transforms import CSAIL_MAX_SIZE, CSAIL_SCALES, IMAGENET_MEAN, IMAGENET_STD, normalize
from sceneparse.engine.distributed import unwrap

# CSAIL's ADE20K test sizes are its training scales (mit_semseg config imgSizes, imgMaxSize);
# single-scale evaluation uses 450 alone.
CSAIL_SINGLE_SCALE = (450,)
IMAGENET_NORMALIZATION = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
RESIZE_MODES = ("torch", "pil")


def round_up(x: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= x (CSAIL's round2nearest_multiple)."""
    return ((x - 1) // multiple + 1) * multiple


def csail_resize_shape(h: int, w: int, short_side: int, max_size: int = CSAIL_MAX_SIZE,
                       multiple: int = 8) -> tuple[int, int]:
    """The network input size CSAIL's ValDataset uses for an `h x w` image at one test scale.

    Scale so the short side becomes `short_side` unless that makes the long side exceed
    `max_size`; truncate to integers; round each side *up* to `multiple` (the image is then resized
    to exactly that size, slightly changing its aspect ratio).
    """
    scale = min(short_side / float(min(h, w)), max_size / float(max(h, w)))
    th, tw = int(h * scale), int(w * scale)
    return round_up(th, multiple), round_up(tw, multiple)


def model_pad_multiple(model: nn.Module) -> int:
    """What the model's input sides must be multiples of (1 when it does not say)."""
    encoder = getattr(unwrap(model), "encoder", None)
    return int(getattr(encoder, "pad_multiple", 1) or 1)


class Predictor:
    """Class probabilities / labels of one image at its original size.

    Args:
        model: a Segmenter (or any module mapping normalised `N x 3 x H x W` to logits
            `N x C x H x W`). It is put in eval mode (and moved to `device`, converted to
            channels-last when asked) in place.
        scales: short sides to test at; `None` entries (the default `(None,)`) mean the original size.
        flip: also run each scale on the horizontally flipped image.
        max_size: cap on the resized long side (ignored for the original size).
        pad_multiple: round every network input size up to this multiple *by resizing* (CSAIL);
            `None` leaves sizes as they are (the Segmenter pads internally).
        normalization: `{"mean": [...], "std": [...]}` on the 0..1 scale; default: the model's
            `normalization` attribute (set by load_model), else ImageNet's.
        device: where to run; default: where the model's parameters are.
        window: network inputs with a side above this run as overlapping `window x window` tiles.
        window_overlap: fraction of a window shared with its neighbour.
        amp_dtype: run the model under autocast with this dtype (e.g. torch.bfloat16).
        channels_last: run the model in channels-last memory format.
        compile: `torch.compile` the network: True (default mode) or a mode name, e.g.
            "reduce-overhead" (CUDA graphs, one per input size: for many images of one size on a
            GPU). Each new input size compiles first (slow), so it pays off over many images.
        resize: "torch" (bilinear with antialiasing, on the device) or "pil" (Pillow's bilinear on
            the uint8 image, as CSAIL's imresize does).
        max_prob_bytes: above this size of the C x H x W probability map, `predict()` works in stripes.
    """

    def __init__(
        self,
        model: nn.Module,
        scales: Iterable[int | None] | int | None = (None,),
        flip: bool = False,
        max_size: int = CSAIL_MAX_SIZE,
        pad_multiple: int | None = None,
        normalization: dict | None = None,
        device: torch.device | str | None = None,
        window: int | None = None,
        window_overlap: float = 1 / 3,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        compile: bool | str = False,
        resize: str = "torch",
        max_prob_bytes: int = 1 << 30,
    ):
        if scales is None or isinstance(scales, int):
            scales = (scales,)
        self.scales = tuple(None if s is None else int(s) for s in scales)
        if not self.scales:
            raise ValueError("scales must not be empty")
        if any(s is not None and s < 1 for s in self.scales) or max_size < 1:
            raise ValueError(f"scales and max_size must be positive, got {self.scales} and {max_size}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if window is not None and window < 32:
            raise ValueError(f"window must be at least 32 pixels, got {window}")
        if not 0 <= window_overlap < 1:
            raise ValueError(f"window_overlap must be in [0, 1), got {window_overlap}")
        self.flip = flip
        self.max_size = max_size
        self.pad_multiple = pad_multiple
        self.window = window
        self.window_overlap = window_overlap
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        self.resize = resize
        self.max_prob_bytes = max_prob_bytes
        if device is None:
            param = next(model.parameters(), None)
            device = param.device if param is not None else "cpu"
        self.device = torch.device(device)
        model.to(self.device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self._encoder, self._decoder, self._net = _compiled(model, compile)
        # compile's CUDA graphs reuse their output memory at the next run of the same graph
        self._copy_outputs = compile in ("reduce-overhead", "max-autotune")
        norm = normalization or getattr(unwrap(model), "normalization", None) or IMAGENET_NORMALIZATION
        self.mean = [float(x) for x in norm["mean"]]
        self.std = [float(x) for x in norm["std"]]
        # on the device once, so normalising an image copies nothing from the host
        self._mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(self.std, dtype=torch.float32, device=self.device)

    @classmethod
    def csail(cls, model: nn.Module, single_scale: bool = False, flip: bool = False,
              pad_multiple: int | None = None, **options) -> "Predictor":
        """CSAIL's ADE20K test protocol: short sides 300..600 (450 alone for single scale), long side
        at most 1000, sizes rounded up to the model's pad multiple by Pillow bilinear resizing.
        Normalisation as for any Predictor: the model's own (ImageNet's for CSAIL's models)."""
        return cls(
            model,
            scales=CSAIL_SINGLE_SCALE if single_scale else CSAIL_SCALES,
            flip=flip,
            max_size=CSAIL_MAX_SIZE,
            pad_multiple=pad_multiple or model_pad_multiple(model),
            resize="pil",
            **options,
        )

    # ------------------------------------------------------------------ sizes and inputs
    def input_size(self, h: int, w: int, scale: int | None) -> tuple[int, int]:
        """Network input size for an `h x w` image at one scale."""
        if scale is None:
            multiple = self.pad_multiple or 1
            return round_up(h, multiple), round_up(w, multiple)
        return csail_resize_shape(h, w, scale, self.max_size, self.pad_multiple or 1)

    def _load(self, image) -> torch.Tensor:
        """A path, a PIL image, a numpy `H x W x 3` uint8 array (the numpy/Pillow layout) or a torch
        `3 x H x W` uint8 tensor (torchvision's) -> the tensor."""
        from PIL import Image

        if isinstance(image, (str, Path)):
            from sceneparse.data.io import read_image

            image = read_image(image)
        elif isinstance(image, Image.Image):
            from sceneparse.data.io import pil_image_to_tensor

            image = pil_image_to_tensor(image)  # as read_image reads files (orientation, 16 bits)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected a uint8 HxWx3 numpy image, got {image.dtype} {image.shape}")
            # torch refuses to share a read-only array's memory (warns): copy those
            image = torch.from_numpy(image if image.flags.writeable else image.copy()).permute(2, 0, 1)
        image = torch.as_tensor(image).as_subclass(torch.Tensor)  # drop tv_tensors wrappers
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 3xHxW image tensor, got {image.dtype} {tuple(image.shape)}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"the image is empty: {tuple(image.shape)}")
        return image

    def _inputs(self, image: torch.Tensor):
        """Yield the normalised `1 x 3 x th x tw` network input of each scale."""
        h, w = image.shape[-2:]
        full = None
        for scale in self.scales:
            size = self.input_size(h, w, scale)
            if self.resize == "pil" and size != (h, w):
                from PIL import Image

                pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
                resized = np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR))
                x = torch.from_numpy(resized.copy()).permute(2, 0, 1)[None].to(self.device)
                yield normalize(x, self._mean, self._std)
                continue
            if full is None:  # normalising commutes with bilinear resizing: do it once
                full = normalize(image[None].to(self.device, non_blocking=True), self._mean, self._std)
            if size == (h, w):
                yield full
            else:
                yield F.interpolate(full, size=size, mode="bilinear", align_corners=False, antialias=True)

    # ------------------------------------------------------------------ network passes
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        """Logits covering the input `x`, at the decoder's resolution when that is exact."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        multiple = getattr(getattr(self.model, "encoder", None), "pad_multiple", 0)
        if self._copy_outputs:  # the previous run's outputs were copied: the graphs may reuse them
            torch.compiler.cudagraph_mark_step_begin()
        with self._autocast():
            if self._decoder is not None and multiple and x.shape[-2] % multiple == 0 and x.shape[-1] % multiple == 0:
                # no padding needed: the Segmenter would only resize these logits to the input size
                out = self._decoder(self._encoder(x))
            else:
                out = self._net(x)
        if isinstance(out, tuple):  # a training-style output; the main logits come first
            out = out[0]
        return out.float().clone() if self._copy_outputs else out.float()

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of `x` from overlapping windows (probabilities averaged).

        The average is kept on a coarser grid when the full resolution would exceed
        `max_prob_bytes`: probabilities are smooth (decoders predict at 1/4 to 1/8 of the input),
        and a huge photograph must not need C x H x W floats at once. Each window's logits are
        sampled (bilinearly) at the centres of the grid cells it covers.
        """
        n, _, h, w = x.shape
        win = self.window
        stride = max(1, int(win * (1 - self.window_overlap)))
        total = counts = None
        for top in _starts(h, win, stride):
            for left in _starts(w, win, stride):
                tile = x[..., top:top + win, left:left + win]
                logits = self._network(tile)
                if total is None:
                    factor = max(1.0, (n * logits.shape[1] * h * w * 4 / self.max_prob_bytes) ** 0.5)
                    grid_h, grid_w = max(1, round(h / factor)), max(1, round(w / factor))
                    total = x.new_zeros((n, logits.shape[1], grid_h, grid_w))
                    counts = x.new_zeros((1, 1, grid_h, grid_w))
                r0, r1, ys = _cell_centres(top, tile.shape[-2], h / grid_h, grid_h, x.device)
                c0, c1, xs = _cell_centres(left, tile.shape[-1], w / grid_w, grid_w, x.device)
                grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).expand(n, -1, -1, -1)
                probs = F.grid_sample(logits, grid, mode="bilinear", padding_mode="border",
                                      align_corners=False).softmax(dim=1)
                total[..., r0:r1, c0:c1] += probs
                counts[..., r0:r1, c0:c1] += 1
        return (total / counts).clamp(min=1e-12).log()

    @torch.inference_mode()
    def _passes(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Logits `C x h x w` of every (scale, flip) pass, un-flipped, each covering the image."""
        outs = []
        for x in self._inputs(image):
            if self.flip:
                x = torch.cat([x, x.flip(-1)])
            big = self.window is not None and max(x.shape[-2:]) > self.window
            logits = self._windows(x) if big else self._network(x)
            outs.append(logits[0])
            if self.flip:
                outs.append(logits[1].flip(-1))
        return outs

    @staticmethod
    def _average(passes: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Mean over passes of softmax(logits upsampled to `size`): `C x H x W`."""
        probs = None
        for logits in passes:
            p = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0].softmax(dim=0)
            probs = p if probs is None else probs.add_(p)
        return probs.div_(len(passes))

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def probabilities(self, image) -> torch.Tensor:
        """Class probabilities `C x H x W` (float32, on `self.device`) of an image: a path, a PIL
        image, a uint8 HxWx3 numpy array or a uint8 3xHxW tensor."""
        image = self._load(image)
        return self._average(self._passes(image), tuple(image.shape[-2:]))

    @torch.inference_mode()
    def predict(self, image) -> torch.Tensor:
        """Label map `H x W` (int64, on `self.device`): argmax of `probabilities()`, computed in
        bands of rows when the full probability map would exceed `max_prob_bytes`."""
        image = self._load(image)
        size = tuple(image.shape[-2:])
        passes = self._passes(image)
        if passes[0].shape[0] * size[0] * size[1] * 4 <= self.max_prob_bytes:
            return self._average(passes, size).argmax(dim=0)
        return _labels_in_stripes(passes, size, self.max_prob_bytes)

    __call__ = predict


def _compiled(model: nn.Module, compile: bool | str):
    """(encoder, decoder, whole model) to call, each wrapped by torch.compile when asked (lazily:
    only the paths that run are compiled). Encoder and decoder are None for a plain module."""
    encoder, decoder = getattr(model, "encoder", None), getattr(model, "decoder", None)
    if decoder is None:
        encoder = None
    if compile is False:
        return encoder, decoder, model
    from torch._inductor import list_mode_options

    if compile is not True and compile not in list_mode_options():
        raise ValueError(f"compile must be True, False or one of {sorted(list_mode_options())}, got {compile!r}")
    options = {} if compile is True else {"mode": compile}
    wrap = functools.partial(torch.compile, **options)
    return (None if encoder is None else wrap(encoder)), (None if decoder is None else wrap(decoder)), wrap(model)


def _starts(length: int, window: int, stride: int) -> list[int]:
    """Window start offsets covering [0, length): regular steps plus one flush with the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


@functools.lru_cache(maxsize=256)  # the same windows/sizes recur image after image
def _cell_centres(start: int, length: int, cell: float, n: int, device) -> tuple[int, int, torch.Tensor]:
    """Grid cells (of `cell` pixels, `n` in all) whose centres lie in [start, start + length):
    their index range and their centres in grid_sample's coordinates for that window (-1..1 =
    the window's outer edges, as align_corners=False)."""
    first = max(0, math.ceil(start / cell - 0.5))
    stop = min(n, math.ceil((start + length) / cell - 0.5))
    # float64 on the CPU for exact coordinates (MPS has no float64), then float32 on the device
    centres = (torch.arange(first, stop, dtype=torch.float64) + 0.5) * cell - start
    return first, stop, (centres * 2 / length - 1).float().to(device)


@functools.lru_cache(maxsize=256)  # the same windows/sizes recur image after image
def _linear_weights(in_size: int, out_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of 1-D linear resizing with align_corners=False (as F.interpolate)."""
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0.to(device), i1.to(device), (src - i0).float().to(device)


def _labels_in_stripes(passes: list[torch.Tensor], size: tuple[int, int], budget: int) -> torch.Tensor:
    """argmax of the averaged upsampled softmax, computed a band of output rows at a time."""
    h, w = size
    num_classes = passes[0].shape[0]
    device = passes[0].device
    rows = max(1, budget // (num_classes * w * 4 * 2))  # two C x rows x W buffers alive at once
    cols = [_linear_weights(p.shape[-1], w, device) for p in passes]
    lines = [_linear_weights(p.shape[-2], h, device) for p in passes]
    labels = torch.empty((h, w), dtype=torch.int64, device=device)
    for top in range(0, h, rows):
        band = slice(top, min(top + rows, h))
        total = None
        for logits, (r0, r1, rw), (c0, c1, cw) in zip(passes, lines, cols):
            rw_band = rw[band].view(1, -1, 1)
            x = logits[:, r0[band]] * (1 - rw_band) + logits[:, r1[band]] * rw_band
            x = x[..., c0] * (1 - cw) + x[..., c1] * cw
            p = x.softmax(dim=0)
            total = p if total is None else total.add_(p)
        labels[band] = total.argmax(dim=0)
    return labels


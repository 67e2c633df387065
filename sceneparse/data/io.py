"""Reading images and label maps, with errors that name the file.

Images: torchvision's decoders (JPEG, PNG, WebP, GIF, AVIF...), EXIF orientation applied, always
returned as RGB `uint8` 3xHxW (grayscale, RGBA, palette, CMYK and 16-bit inputs included). Formats
torchvision cannot decode (BMP, TIFF...) fall back to Pillow.

Labels: Pillow, because a palette PNG must be read as its palette *indices* (the class ids), not as
colours. A label is one channel of ids; an RGB label whose channels differ is a colour-coded label
and is refused unless a colour -> id mapping is given.
"""
from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sceneparse.errors import SceneparseError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
LABEL_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".pgm", ".gif")
EXIF_ORIENTATION_TAG = 0x0112

# torchvision 0.29 warns on every decode that its decoders will move to TorchCodec; they are the
# decoders this project uses (torchcodec is not a dependency), so silence just that message.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

# torchvision raises RuntimeError on undecodable data; Pillow raises these.
_PIL_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


class ColorLabelError(SceneparseError):
    """A label file holds RGB colours where class ids were expected."""


def read_image(path: str | Path) -> torch.Tensor:
    """RGB `uint8` tensor 3xHxW with the EXIF orientation applied."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SceneparseError(f"cannot read image {path}: {err.strerror or err}") from None
    return decode_image_bytes(data, path)


def decode_image_bytes(data: bytes, path: str | Path) -> torch.Tensor:
    """`read_image` on a file's bytes (`path` names it in errors)."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import to_dtype

    if not data:
        raise SceneparseError(f"image {path} is an empty file", "re-export it or remove it from the dataset")
    # torchvision applies EXIF orientation to JPEG and PNG only: an oriented WebP (or other) goes to
    # Pillow, which rotates every format
    exif_by_torchvision = data.startswith((b"\xff\xd8", b"\x89PNG"))
    if not exif_by_torchvision and exif_orientation(data) != 1:
        return _decode_image_pil(data, Path(path))
    try:
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        image = decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as err:
        if "Unsupported image file" not in str(err):
            raise SceneparseError(
                f"cannot decode image {path}: {_short(err)}",
                "the file is corrupt or truncated: re-export it or remove it from the dataset",
            ) from None
        image = _decode_image_pil(data, Path(path))
    if image.ndim == 4:  # an animated GIF: its frames; the first is the picture, as viewers show it
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNG: keep the top 8 bits
        image = to_dtype(image, torch.uint8, scale=True)
    return image


def _decode_image_pil(data: bytes, path: Path) -> torch.Tensor:
    """Formats torchvision does not decode (BMP, TIFF, PPM...), and oriented ones it would not turn."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return pil_image_to_tensor(img)
    except _PIL_ERRORS as err:
        raise SceneparseError(
            f"cannot decode image {path}: {_pil_reason(err)}",
            "the file is corrupt, truncated or not an image: re-export it or remove it from the dataset",
        ) from None


def pil_image_to_tensor(img: Image.Image) -> torch.Tensor:
    """A Pillow image (its first frame) as `read_image` reads files: EXIF orientation applied,
    16-bit values reduced to their top 8 bits, RGB `uint8` 3xHxW."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(img).astype(np.int64)
        if array.max() > 255:  # 16-bit: keep the top 8 bits, as for PNG above
            array = array >> 8
        img = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    array = np.asarray(img.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_label(path: str | Path, colors: dict[tuple[int, int, int], int] | None = None) -> np.ndarray:
    """Raw label values as an HxW integer array (palette PNGs: palette indices).

    `colors` maps RGB triples to raw values for colour-coded label files (palette PNGs included:
    then their colours count, not their indices); without it an RGB label raises `ColorLabelError`
    (an RGB file whose three channels are equal is read as ids).
    """
    path = Path(path)
    palette_file = False
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if colors is not None and mode in ("P", "PA"):
                mode, palette_file = "RGB", True
            if mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr", "HSV", "LAB"):
                array = np.asarray(img.convert("RGB") if mode != "LA" else img)
            else:
                array = np.asarray(img)  # L, P (indices), 1, I;16, I, F
    except FileNotFoundError:
        raise SceneparseError(f"label file {path} does not exist") from None
    except _PIL_ERRORS as err:
        raise _unreadable("label file", path, err, "decode") from None
    if mode == "LA":
        return array[..., 0]
    if array.ndim == 3:
        if colors is not None and palette_file:
            try:
                return colors_to_ids(array, colors, path)
            except SceneparseError as err:  # e.g. VOC's: indices are the ids, colours only for show
                raise SceneparseError(err.message, f"{err.hint}; or, if this palette PNG's indices are the "
                                      "class ids, drop `label_colors` (palette PNGs are then read by index)") from None
        if colors is not None:
            return colors_to_ids(array, colors, path)
        if (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all():
            return array[..., 0].copy()  # ids saved as a grey RGB image
        raise ColorLabelError(
            f"label file {path} is an RGB colour image; sceneparse expects one channel of class ids",
            "convert the colours to class ids (a single-channel or palette PNG), or, for a folder "
            "dataset, map each colour to its class with `label_colors:` in its classes file (classes.yaml)",
        )
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind == "f":  # float TIFFs (mode F): ids only if every value is a whole number
        whole = np.isfinite(array) & (array == np.round(array))
        if not whole.all():
            raise SceneparseError(
                f"label file {path} holds non-integer values (e.g. {array[~whole].flat[0]:g}): "
                "a label holds whole class ids",
                "save the labels as integer class ids (an 8-bit or 16-bit PNG), not as floating point",
            )
        return array.astype(np.int64)
    return array


def colors_to_ids(rgb: np.ndarray, colors: dict[tuple[int, int, int], int], path: Path) -> np.ndarray:
    """Colour-coded HxWx3 label -> raw ids via `colors`; unknown colours are an error naming them."""
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    keys = np.array([(r << 16) | (g << 8) | b for (r, g, b) in colors], dtype=np.int64)
    values = np.array(list(colors.values()), dtype=np.int64)
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    pos = np.clip(np.searchsorted(keys, code), 0, len(keys) - 1)
    known = keys[pos] == code
    if not known.all():
        bad = np.unique(code[~known])[:8]
        names = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in bad)
        raise SceneparseError(
            f"label file {path} has colours that are not in `label_colors`: {names}",
            "add them to `label_colors` (or to the ignore colours) in the classes file",
        )
    return values[pos]


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) as `read_image` will return it, read from the header only (EXIF rotation included)."""
    return image_header(path)[0]


def image_header(path: str | Path) -> tuple[tuple[int, int], int]:
    """((H, W) as `read_image` will return it, EXIF orientation), from the header only."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = _orientation(img)
    except FileNotFoundError:
        raise SceneparseError(f"image {path} does not exist") from None
    except _PIL_ERRORS as err:
        raise _unreadable("image", path, err, "read the header of") from None
    # rotated by 90 or 270 degrees: width and height swap (Pillow's TIFF reader, in Pillow 13 at least,
    # already reports the turned size: then its size differs from the stored width and length tags)
    tags = getattr(img, "tag_v2", None)
    already_turned = tags is not None and (width, height) != (tags.get(256), tags.get(257))
    if orientation in (5, 6, 7, 8) and not already_turned:
        return (width, height), orientation
    return (height, width), orientation


def label_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of a label file from its header (labels are never EXIF-rotated)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        raise SceneparseError(f"label file {path} does not exist") from None
    except _PIL_ERRORS as err:
        raise _unreadable("label file", path, err, "read the header of") from None
    return height, width


def exif_orientation(source: str | Path | bytes) -> int:
    """The EXIF orientation tag of a file or its bytes (1 = upright, also when absent or unreadable)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return _orientation(img)
    except _PIL_ERRORS:
        return 1


def _orientation(img: Image.Image) -> int:
    with warnings.catch_warnings():  # Pillow warns about odd EXIF blocks; the tag is all we need
        warnings.simplefilter("ignore")
        try:
            return int(img.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block means "no orientation"
            return 1


def _unreadable(what: str, path: Path, err: Exception, action: str) -> SceneparseError:
    """The error for a file Pillow cannot open: an empty file says so (Pillow only says it cannot
    identify it)."""
    try:
        empty = path.stat().st_size == 0
    except OSError:
        empty = False
    if empty:
        return SceneparseError(f"{what} {path} is an empty file", "re-export it or remove it from the dataset")
    return SceneparseError(
        f"cannot {action} {what} {path}: {_pil_reason(err)}",
        "the file is corrupt, truncated or not an image: re-export it or remove it from the dataset",
    )


def _pil_reason(err: Exception) -> str:
    """Pillow's message without what it names the file by (the caller names the path): a path
    repeated, or the repr of the in-memory buffer the bytes were read from."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image format Pillow or torchvision can read"
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err)).strip() or type(err).__name__


def read_list_file(path: str | Path) -> list[str]:
    """The lines of a split list (one image id or file name a line; blank lines kept, so that an
    index is a line number - 1). Must be UTF-8 (a BOM is allowed); anything else is an error naming
    the file and the line, not a bare UnicodeDecodeError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SceneparseError(f"cannot read list file {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        start = err.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)  # err.start counts after the BOM
        line = data.count(b"\n", 0, start) + 1
        text = data[data.rfind(b"\n", 0, start) + 1:].split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
        raise SceneparseError(
            f"list file {path} is not UTF-8 text: line {line} ({text!r}) has the byte 0x{data[start]:02x}",
            "save the list as UTF-8 (e.g. `iconv -f latin1 -t utf-8 OLD > NEW`, or your editor's "
            "'save with encoding UTF-8'), with the file names spelled as on disk",
        ) from None


def _short(err: Exception) -> str:
    # torchvision prefixes its messages with "function, source.cpp:line, "; keep the readable part
    return re.sub(r"^[^,]*, [^,]*:\d+, ", "", str(err).strip()) or type(err).__name__

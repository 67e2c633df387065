"""Built-in dataset metadata (class names, palettes) and the label conventions.

`meta/<name>.json` holds `class_names` and `palette` (one RGB triple per class id 0..C-1), a
`name` and a `source`, and for datasets whose label files hold other ids (Cityscapes, COCO-Stuff)
`label_ids`: the raw value of each class.
"""
from __future__ import annotations

import colorsys
import json
from functools import lru_cache
from importlib import resources

# Label value for unlabelled / void / padding pixels everywhere inside sceneparse.
IGNORE_INDEX = 255


@lru_cache(maxsize=None)
def builtin_meta(name: str) -> dict:
    """The metadata of a built-in dataset kind (`meta/<name>.json`: ade20k, camvid, voc, ...)."""
    text = resources.files("sceneparse.data").joinpath("meta", f"{name}.json").read_text("utf-8")
    meta = json.loads(text)
    assert len(meta["class_names"]) == len(meta["palette"]), name
    return meta


def make_palette(num_classes: int) -> list[list[int]]:
    """A deterministic palette of distinct, saturated colours (golden-ratio hue steps)."""
    palette = []
    for i in range(num_classes):
        hue = (i * 0.618033988749895) % 1.0
        # alternate lightness/saturation so neighbouring hues stay distinguishable
        light = 0.45 if i % 2 == 0 else 0.6
        sat = 0.9 if i % 3 else 0.65
        r, g, b = colorsys.hls_to_rgb(hue, light, sat)
        palette.append([round(r * 255), round(g * 255), round(b * 255)])
    return palette

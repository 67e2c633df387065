"""The published CSAIL ADE20K models: names, where their files live, and CSAIL's own scores.

Every number below is copied from the "Performance" table of the README of
CSAILVision/semantic-segmentation-pytorch (master, commit 9aff40de31ee4b21f18514d31e5d6e4ba056924d),
evaluated by CSAIL on ADE20K val (2,000 images, 150 classes). Values are percentages.
A number CSAIL did not publish stays None. No checksums are published, so none are listed here:
the download cache records each file's SHA-256 on first download instead (see download.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from sceneparse.errors import SceneparseError

DEFAULT_BASE_URL = "http://sceneparsing.csail.mit.edu/model/pytorch"
BASE_URL_ENV = "SCENEPARSE_ZOO_URL"  # e.g. a mirror, or a local server in tests


@dataclass(frozen=True)
class Scores:
    """CSAIL's published ADE20K val scores, in percent."""

    mean_iou: float | None
    pixel_accuracy: float | None
    overall: float | None  # CSAIL's "Overall Score": (mIoU + pixel accuracy) / 2


@dataclass(frozen=True)
class ZooEntry:
    name: str  # CSAIL's model folder name without the "ade20k-" prefix
    encoder: str  # CSAIL's arch_encoder
    decoder: str  # CSAIL's arch_decoder
    epoch: int  # the checkpoint CSAIL published: {encoder,decoder}_epoch_<epoch>.pth
    csail_row: str  # the row's label in CSAIL's README table
    single_scale: Scores
    multi_scale: Scores
    num_classes: int = 150

    @property
    def folder(self) -> str:
        return f"ade20k-{self.name}"

    @property
    def filenames(self) -> tuple[str, str]:
        return f"encoder_epoch_{self.epoch}.pth", f"decoder_epoch_{self.epoch}.pth"

    def folder_url(self, base_url: str | None = None) -> str:
        return f"{(base_url or base_url_from_env()).rstrip('/')}/{self.folder}"

    def urls(self, base_url: str | None = None) -> tuple[str, str]:
        """(encoder URL, decoder URL)."""
        folder = self.folder_url(base_url)
        return tuple(f"{folder}/{f}" for f in self.filenames)


def base_url_from_env() -> str:
    return os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL


_ENTRIES = [
    # NOTE: CSAIL's single-scale row for this model is internally inconsistent:
    # (34.84 + 75.75) / 2 = 55.30, not 54.07. An older README revision (commit 0100431a) listed
    # mIoU 32.39 for the same row, which does give 54.07. Kept as currently published.
    ZooEntry("mobilenetv2dilated-c1_deepsup", "mobilenetv2dilated", "c1_deepsup", 20,
             "MobileNetV2dilated + C1_deepsup",
             Scores(34.84, 75.75, 54.07), Scores(33.84, 76.80, 55.32)),
    ZooEntry("resnet18dilated-ppm_deepsup", "resnet18dilated", "ppm_deepsup", 20,
             "ResNet18dilated + PPM_deepsup",
             Scores(38.00, 78.64, 58.32), Scores(38.81, 79.29, 59.05)),
    ZooEntry("resnet50dilated-ppm_deepsup", "resnet50dilated", "ppm_deepsup", 20,
             "ResNet50dilated + PPM_deepsup",
             Scores(41.26, 79.73, 60.50), Scores(42.14, 80.13, 61.14)),
    ZooEntry("resnet101dilated-ppm_deepsup", "resnet101dilated", "ppm_deepsup", 25,
             "ResNet101dilated + PPM_deepsup",
             Scores(42.19, 80.59, 61.39), Scores(42.53, 80.91, 61.72)),
    ZooEntry("resnet50-upernet", "resnet50", "upernet", 30,
             "UperNet50",
             Scores(40.44, 79.80, 60.12), Scores(41.55, 80.23, 60.89)),
    ZooEntry("resnet101-upernet", "resnet101", "upernet", 50,
             "UperNet101",
             Scores(42.00, 80.79, 61.40), Scores(42.66, 81.01, 61.84)),
    ZooEntry("hrnetv2-c1", "hrnetv2", "c1", 30,
             "HRNetV2",
             Scores(42.03, 80.77, 61.40), Scores(43.20, 81.47, 62.34)),
]

ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in _ENTRIES}


def get_entry(name: str) -> ZooEntry:
    """The zoo entry called `name` (the "ade20k-" prefix is accepted too)."""
    key = name.removeprefix("ade20k-")
    if key not in ZOO:
        raise SceneparseError(
            f"unknown model name {name!r}; the published models are: " + ", ".join(ZOO),
            hint="use one of these names (`sceneparse zoo list`), or the path of an existing checkpoint file",
        )
    return ZOO[key]

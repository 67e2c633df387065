"""Pretrained models: CSAIL's published ADE20K models, their download cache, and conversion.

    from sceneparse import zoo
    zoo.ZOO["resnet50dilated-ppm_deepsup"].single_scale.mean_iou   # CSAIL's published 41.26
    path = zoo.download_model("resnet50dilated-ppm_deepsup")       # ~/.cache/sceneparse/<name>.pt

`from_csail` (conversion of CSAIL state dicts) is imported on first use: it needs torch and the model
code, the registry and the download cache do not.
"""
from __future__ import annotations

from sceneparse.zoo.download import (
    OfflineError,
    cache_state,
    checkpoint_path,
    default_cache_dir,
    download_model,
    fetch,
    missing_model_message,
    raw_paths,
    resolve,
)
from sceneparse.zoo.registry import ZOO, Scores, ZooEntry, get_entry

_LAZY = {"from_csail": "sceneparse.zoo.csail", "convert_csail_files": "sceneparse.zoo.csail"}

__all__ = [
    "ZOO", "OfflineError", "Scores", "ZooEntry", "cache_state", "checkpoint_path", "convert_csail_files",
    "default_cache_dir", "download_model", "fetch", "from_csail", "get_entry", "missing_model_message",
    "raw_paths", "resolve",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sceneparse.zoo' has no attribute {name!r}")

"""sceneparse: semantic segmentation (scene parsing) in PyTorch.

Two lines to a model::

    import sceneparse
    model = sceneparse.build_model(encoder="resnet50dilated", decoder="ppm_deepsup", num_classes=150)

The public API is imported lazily so that `import sceneparse` (and the CLI's start-up) stays fast.
"""
from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "build_model": "sceneparse.models",
    "Segmenter": "sceneparse.models",
    "load_model": "sceneparse.engine.checkpoint",
    "save_model": "sceneparse.engine.checkpoint",
    "Predictor": "sceneparse.engine.infer",
    "SceneparseError": "sceneparse.errors",
}

__all__ = [*sorted(_API), "zoo", "__version__"]


def __getattr__(name: str):
    import importlib

    if name == "zoo":
        return importlib.import_module("sceneparse.zoo")
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'sceneparse' has no attribute {name!r}")

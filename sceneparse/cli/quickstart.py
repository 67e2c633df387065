"""`sceneparse quickstart [--output DIR]`: generate a small dataset, train, evaluate, predict. Offline, CPU.

The settings are `QUICKSTART` below (configs/quickstart.yaml holds the same, for `sceneparse
train`; a test keeps the two equal). The whole run takes well under 3 minutes on a 2-core CPU
(about 35 s measured, mIoU 0.885 on its validation scenes).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from sceneparse.errors import SceneparseError, ensure_writable

# Overrides onto the config defaults; mirrored by configs/quickstart.yaml.
QUICKSTART = {
    "model": {"encoder": "timm:resnet18", "decoder": "c1", "encoder_options": {"out_indices": [0, 1, 2]}},
    "data": {
        "kind": "synthetic",
        "synthetic": {"num_images": {"train": 100, "val": 30}, "seed": 0, "image_size": 128},
        "scales": [128], "max_size": 128, "flip": True, "batch_size": 8, "num_workers": 0,
        "batching": "crop",
    },
    "train": {"iterations": 120, "lr_encoder": 0.02, "lr_decoder": 0.02, "warmup_iters": 10,
              "val_every": 60, "checkpoint_every": 60, "log_every": 10, "seed": 0},
    "eval": {"scales": [None]},
    "output_dir": "quickstart_output",
}
NUM_PREDICTIONS = 6  # validation images drawn as image | ground truth | prediction


def quickstart_config(output_dir: str | Path | None = None, overrides: list[str] = ()):
    from omegaconf import OmegaConf

    from sceneparse.engine.config import default_config, load_config

    cfg = OmegaConf.merge(default_config(), QUICKSTART)
    extra = [f"output_dir={output_dir}"] if output_dir is not None else []
    merged = load_config(None, [*extra, *overrides])  # validates the overrides
    for item in [*extra, *overrides]:
        key = item.split("=", 1)[0]
        OmegaConf.update(cfg, key, OmegaConf.select(merged, key), merge=False)
    return cfg


def save_predictions(model, dataset, folder: Path, count: int = NUM_PREDICTIONS) -> list[Path]:
    """`count` side-by-side PNGs: the image, its ground truth and the model's prediction, coloured."""
    import numpy as np
    import torch
    from PIL import Image

    from sceneparse.engine.infer import Predictor
    from sceneparse.engine.visualize import colorize

    folder.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(model)
    written = []
    for i in range(min(count, len(dataset))):
        sample = dataset[i]
        image = sample["image"].as_subclass(torch.Tensor)  # a plain uint8 tensor, not a tv_tensors.Image
        labels = predictor.predict(image).cpu()
        row = np.concatenate([image.permute(1, 2, 0).numpy(), colorize(sample["mask"], model.palette),
                              colorize(labels, model.palette)], axis=1)
        path = folder / f"val_{i:03d}.png"
        Image.fromarray(row).save(path)
        written.append(path)
    return written


def run_quickstart(output_dir: str | Path = "quickstart_output", overrides: list[str] = ()) -> dict:
    """Train on generated scenes, evaluate `best.pt`, draw predictions; returns what it made."""
    import torch

    start = time.perf_counter()
    # Half the CPUs: OpenMP threads that outnumber the free cores spin and slow a small model down
    # several-fold (measured: 50 s with 1 thread vs 176 s with 2 on a busy 2-core machine).
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, cpus // 2)))
    try:
        return _run(output_dir, overrides, start)
    finally:
        torch.set_num_threads(threads)


def _run(output_dir, overrides, start: float) -> dict:
    import torch

    from sceneparse.data import build_dataset
    from sceneparse.engine.checkpoint import load_model
    from sceneparse.engine.config import dataset_settings
    from sceneparse.engine.evaluate import evaluate
    from sceneparse.engine.train import train

    cfg = quickstart_config(output_dir, ["overwrite=true", *overrides])
    out = Path(cfg.output_dir)
    _refuse_another_run(out)  # overwrite=true replaces an earlier quickstart, never a real run
    ensure_writable(out, "the quickstart", "choose a writable --output folder")
    print(f"quickstart: training {cfg.model.encoder} + {cfg.model.decoder} on "
          f"{cfg.data.synthetic.num_images.train} generated street scenes ({cfg.train.iterations} iterations)",
          file=sys.stderr)
    result = train(cfg)
    model = load_model(out / "best.pt")
    val_set = build_dataset(dataset_settings(cfg.data), cfg.data.val_split)
    with torch.inference_mode():
        report = evaluate(model, val_set, scales=list(cfg.eval.scales), num_workers=0)
        predictions = save_predictions(model, val_set, out / "predictions")
    return {
        "output_dir": out, "mean_iou": report["mean_iou"], "pixel_accuracy": report["pixel_accuracy"],
        "checkpoint": out / "best.pt", "curves": Path(result["curves"]), "predictions": predictions,
        "metrics": out / "metrics.jsonl", "seconds": time.perf_counter() - start,
    }


def _refuse_another_run(folder: Path) -> None:
    """A quickstart replaces the run files of an earlier quickstart in its folder: refuse a folder
    whose run trained on anything but generated scenes (`--output runs/r50d` by mistake)."""
    from omegaconf import OmegaConf

    from sceneparse.engine.train import RUN_FILES

    found = [name for name in RUN_FILES if (folder / name).exists()]
    if not found:
        return
    try:
        kind = OmegaConf.select(OmegaConf.load(folder / "config.yaml"), "data.kind")
    except Exception:  # noqa: BLE001 - absent or unreadable: not known to be a quickstart's
        kind = None
    if kind != "synthetic":
        raise SceneparseError(
            f"{folder} holds a training run that is not a quickstart's ({', '.join(found)}"
            + (f"; it trained on data.kind={kind}" if kind else "") + "): the quickstart would replace it",
            "choose another --output folder")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="train and evaluate a small model on generated scenes (offline, CPU, minutes)",
        description="Generate a small synthetic street-scene dataset, train a small model on it, "
        "evaluate it and write coloured predictions. Needs no download and no GPU. Files of a "
        "previous quickstart in the output folder are replaced; a folder holding another training "
        "run is refused.",
    )
    parser.add_argument("--output", default="quickstart_output", help="output folder (default: quickstart_output)")
    parser.set_defaults(func=run)


def run(args) -> int:
    r = run_quickstart(args.output)
    out = r["output_dir"]
    print(f"\nvalidation mIoU {r['mean_iou']:.3f}, pixel accuracy {r['pixel_accuracy']:.3f} "
          f"({r['seconds']:.0f} s)")
    print(f"wrote to {out}/:")
    print(f"  {r['checkpoint'].name:<16} the trained model (sceneparse predict --model {r['checkpoint']} IMAGES)")
    print(f"  {'last.pt':<16} the last training state (for --resume)")
    print(f"  {r['curves'].name:<16} training curves")
    print(f"  {r['metrics'].name:<16} training log (JSON lines); TensorBoard: tensorboard --logdir {out / 'tb'}")
    print(f"  {'predictions/':<16} {len(r['predictions'])} images: input | ground truth | prediction")
    return 0

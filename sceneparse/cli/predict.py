"""`sceneparse predict --model M INPUTS... --output DIR`: label, colour and overlay PNGs per image."""
from __future__ import annotations

import glob
import sys
from pathlib import Path

from sceneparse.cli.options import (
    add_inference_speed_args,
    add_prediction_args,
    build_predictor,
    check_prediction_args,
    compile_errors_explained,
    inference_speed_options,
)
from sceneparse.errors import SceneparseError, ensure_writable


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="segment images: label, colour and overlay PNGs",
        description=(
            "Segment image files, folders (searched recursively) or glob patterns. For each image "
            "writes <stem>_labels.png (class ids; 16-bit when there are more than 255 classes), "
            "<stem>_color.png (the model's palette) and <stem>_overlay.png into OUTPUT (images found "
            "in a folder keep their subfolders), and prints the largest classes. An unreadable image "
            "is skipped and named; the exit status is then 1."
        ),
    )
    p.add_argument("--model", required=True, help="checkpoint path or model-zoo name")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("--output", default="outputs/predict", help="folder for the result PNGs (default: outputs/predict)")
    add_prediction_args(p)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the colours in the overlay (default: 0.5)")
    p.add_argument("--top", type=int, default=5, help="how many of the largest classes to print (default: 5)")
    add_inference_speed_args(p)
    p.set_defaults(func=run)


def expand_inputs(items: list[str], exclude: Path | None = None) -> list[tuple[Path, str]]:
    """(image file, output name) for the images named by `items` (files, folders searched
    recursively, glob patterns), in order, without duplicates. Images that a folder or pattern finds
    under `exclude` (the output folder: an earlier run's outputs) are left out; files named one by
    one are always taken. The output name is the file's stem; an image found in a folder keeps its
    subfolders (`city/x.png` -> `city/x`), so a dataset's tree comes out with the same shape."""
    from sceneparse.data.io import IMAGE_EXTENSIONS

    def is_image(path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS

    found: list[tuple[Path, str, bool]] = []  # (file, output name, named one by one)
    for item in items:
        path = Path(item).expanduser()
        if path.is_file():
            found.append((path, path.stem, True))  # named explicitly: taken whatever its extension
        elif path.is_dir():
            found.extend((p, p.relative_to(path).with_suffix("").as_posix(), False)
                         for p in sorted(p for p in path.rglob("*") if is_image(p)))
        elif glob.has_magic(item):
            found.extend((p, p.stem, False)
                         for p in map(Path, sorted(glob.glob(str(path), recursive=True))) if is_image(p))
        else:
            raise SceneparseError(f"input {item!r} does not exist", "check the file name, folder or pattern")
    excluded = exclude.resolve() if exclude is not None else None
    unique, seen, in_output = [], set(), 0
    for path, name, named in found:
        resolved = path.resolve()
        if resolved in seen:
            continue
        if not named and excluded is not None and resolved.is_relative_to(excluded):
            in_output += 1
            continue
        seen.add(resolved)
        unique.append((path, name))
    if not unique and in_output:
        raise SceneparseError(f"the {in_output} image(s) found in {' '.join(items)} lie inside the output folder "
                              f"{exclude}, which is left out of searches (it holds the predictions)",
                              "choose another --output folder, or name the image files one by one")
    if not unique:
        raise SceneparseError(f"no images found in {' '.join(items)}",
                              f"give image files ({', '.join(IMAGE_EXTENSIONS)}), folders or glob patterns")
    return unique


def output_stems(names: list[str]) -> list[str]:
    """Output names made unique with -2, -3... when two inputs share one (a/x.jpg and b/x.png
    given as files, or x.jpg and x.png in one folder)."""
    stems, counts = [], {}
    for name in names:
        n = counts.get(name, 0) + 1
        counts[name] = n
        stems.append(name if n == 1 else f"{name}-{n}")
    return stems


def top_classes(labels, class_names: list[str], top: int) -> list[tuple[str, float]]:
    """The `top` largest classes of a label map as (name, fraction of the image)."""
    import torch

    counts = torch.bincount(labels.reshape(-1).cpu(), minlength=len(class_names)).double()
    fractions = counts / counts.sum()
    order = fractions.argsort(descending=True)[:top]
    return [(class_names[i], float(fractions[i])) for i in order.tolist() if fractions[i] > 0]


def save_label_png(labels, num_classes: int, path: Path) -> None:
    """Raw class ids as a PNG: 8-bit up to 255 classes, 16-bit beyond."""
    import numpy as np
    from PIL import Image

    dtype = np.uint8 if num_classes <= 255 else np.uint16
    Image.fromarray(labels.cpu().numpy().astype(dtype)).save(path)


def run(args) -> int:
    from sceneparse.engine import distributed as dist_utils

    if not 0 <= args.alpha <= 1:
        raise SceneparseError(f"--alpha must be between 0 and 1, got {args.alpha}")
    check_prediction_args(args)
    speed = inference_speed_options(args)
    output = Path(args.output).expanduser()
    inputs = expand_inputs(args.inputs, exclude=output)
    # Under torchrun each process segments every world_size-th image (names from the whole list).
    with dist_utils.process_group(args.device) as info:
        return _predict(args, info, inputs, output, speed)


def _predict(args, info, inputs: list[tuple[Path, str]], output: Path, speed: dict) -> int:
    import torch
    from PIL import Image

    from sceneparse.data.io import read_image
    from sceneparse.data.meta import make_palette
    from sceneparse.engine.checkpoint import load_model, resolve_model
    from sceneparse.engine.distributed import all_reduce_, barrier, broadcast_object, run_on_main
    from sceneparse.engine.visualize import colorize, overlay

    # before loading the model; on rank 0 alone, since every rank would race for the same probe file
    run_on_main(lambda: ensure_writable(output, "the predictions", "choose a writable --output folder"), info)
    # a zoo name's cached files are converted by rank 0 alone; then every rank reads the checkpoint
    model = load_model(broadcast_object(run_on_main(lambda: str(resolve_model(args.model)), info)), device=info.device)
    num_classes = len(model.class_names)
    palette = getattr(model, "palette", None) or make_palette(num_classes)
    predictor = build_predictor(model, args, info.device, **speed)

    jobs = list(zip([path for path, _ in inputs], output_stems([name for _, name in inputs])))
    skipped = 0
    for path, stem in jobs[info.rank :: info.world_size]:
        try:
            image = read_image(path)
        except SceneparseError as err:  # one unreadable file does not stop the others
            print(f"skipped: {err.message}", file=sys.stderr)
            skipped += 1
            continue
        try:
            with compile_errors_explained(speed["compile"]):
                labels = predictor.predict(image).cpu()
        except torch.OutOfMemoryError:
            raise SceneparseError(
                f"out of memory segmenting {path} ({image.shape[-2]}x{image.shape[-1]} pixels)",
                "use a smaller --window, --scales 450 (resize the image first), or --device cpu",
            ) from None
        try:
            (output / stem).parent.mkdir(parents=True, exist_ok=True)
            save_label_png(labels, num_classes, output / f"{stem}_labels.png")
            Image.fromarray(colorize(labels, palette)).save(output / f"{stem}_color.png")
            Image.fromarray(overlay(image, labels, palette, args.alpha)).save(output / f"{stem}_overlay.png")
        except OSError as err:
            raise SceneparseError(f"cannot write results for {path} to {output}: {err.strerror or err}") from None
        main = ", ".join(f"{name} {100 * frac:.1f}%" for name, frac in top_classes(labels, model.class_names, args.top))
        print(f"{path}: {main}")
    # every rank's files are written before the summary, which counts every rank's skips
    skipped = int(all_reduce_(torch.tensor([skipped], device=info.device)).item())
    barrier()
    done = len(jobs) - skipped
    if info.is_main:
        print(f"wrote {3 * done} files for {done} image{'s' if done != 1 else ''} to {output}")
        if skipped:
            print(f"error: {skipped} of {len(jobs)} input{'s' if len(jobs) > 1 else ''} could not be read "
                  "(each named above as 'skipped')", file=sys.stderr)
    return 1 if skipped else 0

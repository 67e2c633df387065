"""`sceneparse eval --model M (--config CFG | --data-root ROOT --dataset KIND)`: score a model."""
from __future__ import annotations

from pathlib import Path

from sceneparse.cli.options import (
    DATASET_KINDS,
    add_inference_speed_args,
    compile_errors_explained,
    inference_speed_options,
)
from sceneparse.errors import SceneparseError, ensure_writable


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on a dataset (mIoU, pixel accuracy)",
        description=(
            "Evaluate a checkpoint or zoo model on a dataset's split at the original label size. "
            "Prints per-class IoU/accuracy, pixel accuracy, mean IoU and the overall score "
            "(mIoU + pixel accuracy) / 2, and writes OUTPUT/report.json and OUTPUT/confusion.png. "
            "`--protocol csail` reproduces CSAIL's ADE20K test protocol (short sides 300..600, long "
            "side <= 1000, sizes rounded to the model's multiple, Pillow bilinear resizing)."
        ),
    )
    p.add_argument("--model", required=True, help="checkpoint path or model-zoo name")
    data = p.add_argument_group("data (either --config, or --data-root and --dataset)")
    data.add_argument("--config", help="training config YAML: its data section (and eval defaults)")
    data.add_argument("--data-root", help="dataset root folder")
    data.add_argument("--dataset", choices=DATASET_KINDS,
                      help="dataset kind of --data-root (generated data, kind synthetic: use --config)")
    data.add_argument("--classes-file", help="classes file of a folder dataset (default: ROOT/classes.yaml, "
                                             "or the config's data.classes_file)")
    data.add_argument("--split", default=None, help="split to evaluate (default: the config's val split, or val)")
    p.add_argument("--output", help="folder for report.json and confusion.png (default: outputs/eval/<run folder>-<checkpoint>-<split>)")
    p.add_argument("--protocol", choices=["default", "csail"], default="default",
                   help="csail: CSAIL's exact ADE20K test protocol (default: default)")
    p.add_argument("--single-scale", action="store_true", help="with --protocol csail: short side 450 alone")
    p.add_argument("--scales", type=int, nargs="+", metavar="SHORT",
                   help="test short sides, e.g. 300 375 450 525 600 (default: the config's eval.scales, "
                        "else the original size)")
    p.add_argument("--flip", action="store_true", help="also average horizontally flipped predictions")
    p.add_argument("--max-size", type=int, default=None, help="cap on the resized long side (default 1000)")
    p.add_argument("--window", type=int, default=None,
                   help="run network inputs larger than this many pixels as overlapping windows")
    add_inference_speed_args(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default: 2)")
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    p.set_defaults(func=run)


def _data(args):
    """(data settings for build_dataset, split, eval defaults dict, description for messages)."""
    if args.config:
        if args.data_root or args.dataset:
            raise SceneparseError("give either --config or --data-root/--dataset, not both")
        from sceneparse.engine.config import dataset_settings, load_config

        cfg = load_config(args.config)
        settings = dataset_settings(cfg.data)
        if args.classes_file:  # the flag wins over the config's data.classes_file
            settings["classes_file"] = args.classes_file
        split = args.split or cfg.data.val_split
        defaults = {"scales": list(cfg.eval.scales), "flip": bool(cfg.eval.flip), "max_size": int(cfg.eval.max_size)}
        where = f"the {settings['kind']} dataset of {args.config} ({settings.get('root')}, split {split})"
        return settings, split, defaults, where
    if not (args.data_root and args.dataset):
        missing = " (--data-root is missing)" if args.dataset else " (--dataset is missing)" if args.data_root else ""
        raise SceneparseError(f"no dataset given{missing}",
                              f"pass --config CFG.yaml, or --data-root ROOT --dataset {'|'.join(DATASET_KINDS)}")
    settings = {"kind": args.dataset, "root": args.data_root}
    if args.classes_file:
        settings["classes_file"] = args.classes_file
    split = args.split or "val"
    return settings, split, {}, f"the {args.dataset} dataset at {args.data_root} (split {split})"


def _predictor_options(args, defaults: dict) -> dict:
    options: dict = {}
    if args.protocol == "csail":
        for flag, given in (("--scales", args.scales), ("--max-size", args.max_size)):
            if given:
                raise SceneparseError(f"{flag} cannot be combined with --protocol csail (it fixes the scales "
                                      "and the 1000-pixel cap)", f"drop {flag}, or use --protocol default")
        options["single_scale"] = args.single_scale
    else:
        if args.single_scale:
            raise SceneparseError("--single-scale belongs to --protocol csail",
                                  "add --protocol csail, or give --scales 450")
        scales = args.scales or defaults.get("scales")
        options["scales"] = tuple(scales) if scales else (None,)
        options["max_size"] = args.max_size or defaults.get("max_size") or 1000
    options["flip"] = args.flip or bool(defaults.get("flip"))
    options["window"] = args.window
    options.update(inference_speed_options(args))
    return options


def run(args) -> int:
    from sceneparse.engine import distributed as dist_utils

    for name in ("workers", "max_images", "max_size"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "workers" else 1):
            raise SceneparseError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.scales and min(args.scales) < 1:
        raise SceneparseError(f"--scales must be positive short sides, got {' '.join(map(str, args.scales))}")
    if args.window is not None and args.window < 32:  # the Predictor's minimum, as in `sceneparse predict`
        raise SceneparseError(f"--window must be at least 32 pixels, got {args.window}")
    settings, split, defaults, where = _data(args)
    options = _predictor_options(args, defaults)
    # Under torchrun every process evaluates its share of the images and the confusion matrices
    # are summed: the report is the whole split's, written once by rank 0.
    with dist_utils.process_group(args.device) as info:
        return _evaluate(args, info, settings, split, options, where)


def _evaluate(args, info, settings: dict, split: str, options: dict, where: str) -> int:
    from sceneparse.data import build_dataset
    from sceneparse.engine.checkpoint import load_model, resolve_model
    from sceneparse.engine.distributed import broadcast_object, run_on_main
    from sceneparse.engine.evaluate import (
        check_num_classes, evaluate, format_table, warn_renamed_classes, write_report,
    )
    from sceneparse.engine.visualize import save_confusion_png

    output = Path(args.output) if args.output else _default_output(args.model, split)
    # before the evaluation, not after it
    run_on_main(lambda: ensure_writable(output, "the evaluation results", "choose a writable --output folder"), info)
    dataset = build_dataset(settings, split)
    # a zoo name's cached files are converted by rank 0 alone; then every rank reads the checkpoint
    path = broadcast_object(run_on_main(lambda: str(resolve_model(args.model)), info))
    model = load_model(path, device=info.device)
    classes_file = getattr(dataset, "classes_file", None)
    renamed = check_num_classes(model, dataset, model_source=f"the model {args.model}",
                                data_source=where + (f" with classes file {classes_file}" if classes_file else ""))
    if info.is_main:
        warn_renamed_classes(renamed)
    with compile_errors_explained(options["compile"]):
        report = evaluate(model, dataset, options, info.device, protocol=args.protocol, num_workers=args.workers,
                          max_images=args.max_images, progress=info.is_main)
    if not info.is_main:
        return 0
    report["model"] = str(args.model)
    report["dataset"] = {"kind": settings["kind"], "root": str(settings.get("root")), "split": split}

    print(format_table(report))  # first: the numbers are on screen even if writing fails
    try:
        output.mkdir(parents=True, exist_ok=True)
        report_path = write_report(report, output / "report.json")
        png_path = save_confusion_png(report["confusion_matrix"], dataset.class_names, output / "confusion.png")
    except OSError as err:
        raise SceneparseError(f"cannot write the evaluation results to {output}: {err.strerror or err}",
                              "choose a writable --output folder") from None
    print(f"wrote {report_path} and {png_path}")
    return 0


def _default_output(model: str, split: str) -> Path:
    """outputs/eval/<run folder>-<checkpoint stem>-<split>: two runs' best.pt (or one model's two
    splits) get two folders. A zoo name is its own folder name."""
    path = Path(str(model))
    parent = path.parent.name if path.suffix else ""
    return Path("outputs") / "eval" / "-".join(part for part in (parent, path.stem, split) if part)

"""`sceneparse train CONFIG [key=value ...] [--resume [PATH]] [--overwrite]`."""
from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train a segmentation model. Settings come from CONFIG (YAML) and dotted "
        "key=value overrides, e.g. `sceneparse train configs/camvid/baseline.yaml train.iterations=2000`. "
        "Ctrl-C finishes the current step, saves OUTPUT/last.pt and prints the resume command.",
    )
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                        help="continue a run from PATH (default: OUTPUT/last.pt)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous run in the output folder")
    parser.set_defaults(func=run)


def run(args) -> int:
    from sceneparse.cli.options import compile_errors_explained
    from sceneparse.engine.config import load_config
    from sceneparse.engine.train import train

    overrides = list(args.overrides) + (["overwrite=true"] if args.overwrite else [])
    resume = args.resume
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        # `--resume key=value`: argparse took an override for the optional PATH
        overrides.append(resume)
        resume = True
    cfg = load_config(args.config, overrides)
    # The first step compiles: a failure there has saved nothing yet; a later one keeps last.pt.
    with compile_errors_explained(cfg.train.compile, "train.compile=false (add --resume if last.pt exists)"):
        result = train(cfg, resume=resume)
    if result["rank"] != 0:  # under torchrun, rank 0 reports for all
        return 0
    if result.get("metrics"):
        m = result["metrics"]
        print(f"validation: mIoU {m['mean_iou']:.4f}  pixel accuracy {m['pixel_accuracy']:.4f}")
    print(f"outputs in {result['output_dir']}: last.pt"
          + (", best.pt" if result.get("best") else "") + ", metrics.jsonl, curves.png, tb/")
    return 0

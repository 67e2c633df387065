"""`sceneparse bench`: inference latency/throughput, training and evaluation speed of a model."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from sceneparse.cli.options import DATASET_KINDS
from sceneparse.errors import SceneparseError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure inference, training and evaluation speed",
        description=(
            "Measure a model's speed at a fixed input size: latency (batch 1), inference throughput, "
            "training steps, training with real data loading (--data), evaluation. Every speed option "
            "given (--amp, --channels-last, --compile, --cuda-graphs) is measured alone and combined, "
            "next to fp32 eager in the same process."
        ),
    )
    model = p.add_argument_group("model (either --model, or --encoder and --decoder)")
    model.add_argument("--model", help="checkpoint path or model-zoo name")
    model.add_argument("--encoder", help="encoder name, e.g. resnet50dilated")
    model.add_argument("--decoder", help="decoder name, e.g. ppm_deepsup")
    model.add_argument("--num-classes", type=int, default=150, help="with --encoder (default 150)")
    p.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"),
                   help="input size (default 512 512)")
    p.add_argument("--batch", type=int, default=16, help="batch size of all but the latency task (default 16)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated subset of latency,throughput,train,train-data,data,eval "
                        "(default: all but train-data and data, plus train-data with --data)")
    p.add_argument("--amp", choices=["bf16", "fp16"], help="also measure autocast with this dtype")
    p.add_argument("--channels-last", action="store_true", help="also measure channels-last memory format")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also measure CUDA graphs (inference; with --compile: mode reduce-overhead)")
    p.add_argument("--variants", metavar="LIST",
                   help="instead of the four options above: exactly these comma-separated variants "
                        "(fp32 eager is always measured first), e.g. "
                        "fp32-eager,bf16+channels-last,bf16+channels-last+compile+cuda-graphs")
    p.add_argument("--data", metavar="ROOT", help="dataset root for the train-data and data tasks")
    p.add_argument("--data-kind", choices=DATASET_KINDS, help="dataset kind of --data (default: detected)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes for train-data (default 4)")
    p.add_argument("--augment-on", choices=("workers", "device"), default="workers",
                   help="train-data: augment in the workers (default) or batched on the device")
    p.add_argument("--cache-in-memory", action="store_true",
                   help="train-data: decode the training set once (with --augment-on device: keep it on the device)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (default 5)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per repeat (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; the median is reported (default 3)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.set_defaults(func=run)


def _load(args):
    """(model, num_classes, normalization) from --model or --encoder/--decoder."""
    if args.model:
        if args.encoder or args.decoder:
            raise SceneparseError("give either --model or --encoder/--decoder, not both")
        from sceneparse.engine.checkpoint import load_model

        model = load_model(args.model)
        num_classes = len(model.class_names)
        norm = getattr(model, "normalization", None)
        normalization = (norm["mean"], norm["std"]) if norm else None
        return model, num_classes, normalization
    if not (args.encoder and args.decoder):
        raise SceneparseError("no model given",
                              "pass --model CKPT_OR_ZOO_NAME, or --encoder NAME --decoder NAME")
    from sceneparse.models import build_model

    return build_model(args.encoder, args.decoder, args.num_classes), args.num_classes, None


def run(args) -> int:
    from sceneparse.engine.bench import (
        BenchSettings,
        check_json_path,
        explicit_variants,
        format_table,
        run_benchmark,
        variants_for,
        write_json,
    )
    from sceneparse.engine.distributed import resolve_device

    for name in ("batch", "warmup", "iters", "repeats"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            raise SceneparseError(f"--{name} must be positive, got {getattr(args, name)}")
    if min(args.size) < 1:
        raise SceneparseError(f"--size must be positive, got {args.size}")
    if args.tasks:
        tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    else:
        tasks = ("latency", "throughput", "train", "eval") + (("train-data",) if args.data else ())
    data = None
    if args.data:
        from sceneparse.data.datasets import detect_kind

        if not Path(args.data).expanduser().is_dir():
            raise SceneparseError(f"--data {args.data}: no such folder", "pass the folder that holds the dataset")
        kind = args.data_kind or detect_kind(args.data)
        if kind is None:
            raise SceneparseError(f"cannot tell the dataset layout of {args.data}",
                                  f"pass --data-kind {'|'.join(DATASET_KINDS)}")
        data = {"kind": kind, "root": args.data, "workers": args.workers, "augment_on": args.augment_on,
                "cache_in_memory": args.cache_in_memory}
    if args.variants:
        if args.amp or args.channels_last or args.compile or args.cuda_graphs:
            raise SceneparseError("--variants replaces --amp/--channels-last/--compile/--cuda-graphs",
                                  "give one or the other")
        variants = explicit_variants(args.variants.split(","))
    else:
        variants = variants_for(args.amp, args.channels_last, args.compile, args.cuda_graphs)
    if args.json:
        check_json_path(args.json)
    device = resolve_device(args.device)
    model, num_classes, normalization = _load(args)
    settings = BenchSettings(
        size=tuple(args.size),
        batch=args.batch,
        tasks=tasks,
        warmup=args.warmup,
        iters=args.iters,
        repeats=args.repeats,
        data=data,
        variants=variants,
    )

    def describe(report: dict) -> dict:
        if sys.argv[1:2] == ["bench"]:  # launched from the shell (not through main(argv) in-process)
            report["meta"]["command"] = "sceneparse " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        report["meta"]["model_name"] = args.model or f"{args.encoder}-{args.decoder}"
        return report

    # With --json, the file is rewritten after every row: a run cut short keeps what it measured.
    progress = (lambda partial: write_json(describe(partial), args.json)) if args.json else None
    report = describe(run_benchmark(model, num_classes, settings, device, normalization,
                                    log=lambda msg: print(msg, file=sys.stderr, flush=True),
                                    progress=progress))
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0

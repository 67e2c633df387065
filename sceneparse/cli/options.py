"""Command-line options that several sub-commands share, defined once."""
from __future__ import annotations

import contextlib

from sceneparse.errors import SceneparseError

AMP_CHOICES = ("none", "bf16", "fp16")
# The file-backed kinds of sceneparse.data.DATASETS, spelled out so that `--help` needs no torch
# import (tests/test_voc_cityscapes.py checks that they agree).
DATASET_KINDS = ("ade20k", "camvid", "voc", "pascal_context", "pascal_context60", "cityscapes", "coco_stuff",
                 "folder")


def add_prediction_args(parser) -> None:
    """--scales, --max-size, --flip, --window, --device: how `predict` and `serve` run the Predictor."""
    parser.add_argument("--scales", type=int, nargs="+", metavar="SHORT",
                        help="test short sides, e.g. 450 or 300 450 600 (default: the original size)")
    parser.add_argument("--max-size", type=int, default=1000,
                        help="cap on the resized long side with --scales (default: 1000)")
    parser.add_argument("--flip", action="store_true", help="also average horizontally flipped predictions")
    parser.add_argument("--window", type=int, default=1024,
                        help="network inputs larger than this run as overlapping windows, bounding memory "
                             "(default: 1024)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--protocol", choices=["default", "csail"], default="default",
                        help="csail: CSAIL's ADE20K test protocol, as `sceneparse eval --protocol csail` (short "
                             "sides 300..600, long side <= 1000, Pillow resizing; --scales and --max-size do "
                             "not apply)")
    parser.add_argument("--single-scale", action="store_true", help="with --protocol csail: short side 450 alone")


def check_prediction_args(args) -> None:
    """The sizes and the protocol of `add_prediction_args`, refused before any model is loaded."""
    if args.window < 32:
        raise SceneparseError(f"--window must be at least 32 pixels, got {args.window}")
    if (args.scales and min(args.scales) < 1) or args.max_size < 1:
        raise SceneparseError("--scales and --max-size must be positive sizes in pixels")
    if args.protocol == "csail" and args.scales:
        raise SceneparseError("--scales cannot be combined with --protocol csail (it fixes the scales)",
                              "drop --scales (--single-scale: 450 alone), or use --protocol default")
    if args.single_scale and args.protocol != "csail":
        raise SceneparseError("--single-scale belongs to --protocol csail", "add --protocol csail, or give --scales 450")


def build_predictor(model, args, device, **speed):
    """The Predictor that `add_prediction_args`' options describe (`speed`: inference_speed_options)."""
    from sceneparse.engine.infer import Predictor

    if args.protocol == "csail":
        return Predictor.csail(model, single_scale=args.single_scale, flip=args.flip, device=device,
                               window=args.window, **speed)
    return Predictor(model, scales=tuple(args.scales) if args.scales else (None,), flip=args.flip,
                     max_size=args.max_size, device=device, window=args.window, **speed)


def add_inference_speed_args(parser) -> None:
    """--amp, --channels-last, --compile, --cuda-graphs for commands that run a Predictor."""
    parser.add_argument("--amp", choices=AMP_CHOICES, default="none",
                        help="autocast dtype (default: none, i.e. fp32)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network; each new input size compiles first, so it pays "
                             "off over many images")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="with --compile, on a GPU: replay a CUDA graph per input size (compile mode "
                             "reduce-overhead), for many images of one size")


def inference_speed_options(args) -> dict:
    """The Predictor keyword arguments those options stand for."""
    import torch

    if args.cuda_graphs and not args.compile:
        raise SceneparseError("--cuda-graphs works through torch.compile", "add --compile")
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    compile = "reduce-overhead" if args.cuda_graphs else args.compile
    return {"amp_dtype": dtype, "channels_last": args.channels_last, "compile": compile}


@contextlib.contextmanager
def compile_errors_explained(compiling, switch_off: str = "--compile/--cuda-graphs"):
    """A torch.compile failure (no C++ compiler for inductor on a CPU, an unsupported op) becomes
    one message with the way out (`switch_off`: how this command turns compile off), instead of a
    compiler's traceback."""
    try:
        yield
    except Exception as err:
        import torch._dynamo.exc

        if not compiling or not isinstance(err, torch._dynamo.exc.TorchDynamoException):
            raise
        cause = getattr(err, "inner_exception", None) or err  # the backend's own error, when it raised one
        first = next((line for line in str(cause).splitlines() if line.strip()), "")
        raise SceneparseError(
            f"torch.compile failed: {type(cause).__name__}: {first}",
            f"run without {switch_off} (the model runs as it is); on a CPU, inductor also needs a "
            "C++ compiler (g++)",
        ) from None

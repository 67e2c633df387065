"""Command-line options that several sub-commands share, defined once."""
from __future__ import annotations

import contextlib

from sceneparse.errors import SceneparseError

AMP_CHOICES = ("none", "bf16", "fp16")
# The file-backed kinds of sceneparse.data.DATASETS, spelled out so that `--help` needs no torch
# import (tests/test_voc_cityscapes.py checks that they agree).
DATASET_KINDS = ("ade20k", "camvid", "voc", "pascal_context", "cityscapes", "coco_stuff", "folder")


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

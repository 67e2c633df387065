"""Command-line options that several sub-commands share, defined once."""
from __future__ import annotations

AMP_CHOICES = ("none", "bf16", "fp16")


def add_inference_speed_args(parser) -> None:
    """--amp and --channels-last for commands that run a Predictor (eval, predict)."""
    parser.add_argument("--amp", choices=AMP_CHOICES, default="none",
                        help="autocast dtype (default: none, i.e. fp32)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")


def inference_speed_options(args) -> dict:
    """The Predictor keyword arguments those options stand for."""
    import torch

    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    return {"amp_dtype": dtype, "channels_last": args.channels_last}

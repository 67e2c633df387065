"""`sceneparse export --model M --output FILE`: an ONNX or torch.export (.pt2) file for deployment."""
from __future__ import annotations

from pathlib import Path

from sceneparse.errors import SceneparseError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a model to ONNX or torch.export (.pt2) for deployment, and verify it",
        description=(
            "Export a checkpoint or zoo model (eval mode) to one file a deployment runs without "
            "sceneparse: it takes RGB images N x 3 x H x W with values 0..255 (uint8 by default), "
            "normalises them inside with the checkpoint's mean/std, and returns logits N x C x H x W "
            "at the input size (or, with --argmax, class ids N x H x W). Class names, palette and "
            "normalisation are stored in the file (ONNX metadata_props; .pt2: sceneparse.json). "
            "The file is then run (onnxruntime / torch.export.load) and compared with the eager "
            "model; a disagreement beyond the tolerance is an error. See docs/deploy.md."
        ),
    )
    p.add_argument("--model", required=True, help="checkpoint path or model-zoo name")
    p.add_argument("--output", required=True, metavar="FILE", help="file to write, e.g. model.onnx or model.pt2")
    p.add_argument("--format", choices=["onnx", "pt2"], default=None,
                   help="onnx or pt2 (default: from the --output suffix, .pt2 -> pt2, else onnx)")
    p.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"),
                   help="input size: fixed, or with --dynamic the example size (default 512 512)")
    p.add_argument("--dynamic", action="store_true",
                   help="dynamic batch, height and width (the example input is --size)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default: the exporter's); an error if the exporter cannot convert the model to it")
    p.add_argument("--input-dtype", choices=["uint8", "float32"], default="uint8",
                   help="dtype of the image input, values 0..255 either way (default uint8)")
    p.add_argument("--argmax", action="store_true", help="output class ids N x H x W (int64) instead of logits")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest accepted |exported - eager| logit difference: TOLERANCE x max(1, largest "
                        "|logit|), so never below TOLERANCE itself (default 1e-3)")
    p.set_defaults(func=run)


def run(args) -> int:
    from sceneparse.engine.checkpoint import load_model
    from sceneparse.engine.export import export_model

    if args.tolerance <= 0:
        raise SceneparseError(f"--tolerance must be positive, got {args.tolerance}")
    output = Path(args.output).expanduser()
    fmt = args.format or ("pt2" if output.suffix.lower() == ".pt2" else "onnx")
    if fmt == "pt2" and output.suffix.lower() != ".pt2":  # torch.export.load wants the name to say so
        raise SceneparseError(f"--format pt2 writes a .pt2 file, not {output.name}",
                              f"name the output {output.with_suffix('.pt2').name}")
    if args.opset is not None and fmt != "onnx":
        raise SceneparseError("--opset applies to --format onnx only")
    model = load_model(args.model)
    export_model(model, output, format=fmt, size=tuple(args.size), dynamic=args.dynamic, opset=args.opset,
                 input_dtype=args.input_dtype, argmax=args.argmax, tolerance=args.tolerance)
    print(f"verified {output}: it matches the eager model")
    return 0

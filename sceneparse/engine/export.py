"""Export a Segmenter for deployment (ONNX or a torch.export `.pt2` file), then verify the file.

What the exported graph takes and returns (the same for both formats, see docs/deploy.md):

- input `image`: RGB `N x 3 x H x W`, values 0..255, uint8 (default) or float32. The checkpoint's
  normalisation (mean/std) is inside the graph, so a deployment feeds decoded pixels and needs
  nothing else from sceneparse.
- output `logits`: float32 `N x C x H x W` at the input size (what `Segmenter.forward` returns),
  or with `argmax=True` output `labels`: int64 class ids `N x H x W`.
- a dynamic ONNX file names N, H and W `batch`, `height` and `width`, in the input and output alike.

Metadata (class names, palette, normalisation, model config, input/output description) goes inside
the file: ONNX `metadata_props` (one JSON-encoded value per key), and for `.pt2` an extra file
`sceneparse.json` in the archive. `read_metadata(path)` reads either back.

Both formats come from one `torch.export.export` capture: ONNX through the torch.export-based
exporter (`torch.onnx.export(exported_program)`, the default since torch 2.9; it needs `onnxscript`
and `onnx`). The legacy TorchScript exporter still runs in torch 2.14 but warns that it will be
removed. `onnxruntime` runs the verification.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sceneparse.data.transforms import normalize
from sceneparse.errors import SceneparseError, first_line
from sceneparse.models.layers import resize

FORMATS = ("onnx", "pt2")
INPUT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
METADATA_FILE = "sceneparse.json"  # the extra file inside a .pt2 archive
INSTALL_HINT = "pip install 'sceneparse[export]'"
# The exporters' own names for what ONNX needs; each is imported lazily.
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
MIN_OPSET = 7  # the oldest opset torch's ONNX exporters ever wrote
# Layers through which torch.export cannot keep height and width symbolic, (module, class) -> what
# defeats it. Swin (v1, v2, v2-cr) pads each feature map to a multiple of its window and cuts it
# into windows: torch.export cannot prove the padded size divisible, guards on the example's size
# and fails with "Constraints violated (height, width)", but only after minutes of symbolic
# reasoning on a CPU (2 to 4 for the tiny models with one block per stage, torch 2.14, timm 1.0.31).
# Known here, a dynamic export of them is refused at once. A class that timm renames or moves only
# brings the slow refusal (by the capture) back; drop an entry once a torch release captures it.
DYNAMIC_CAPTURE_FAILS = {
    ("timm.models.swin_transformer", "SwinTransformerBlock"): "Swin's window partitioning",
    ("timm.models.swin_transformer_v2", "SwinTransformerV2Block"): "Swin's window partitioning",
    ("timm.models.swin_transformer_v2_cr", "SwinTransformerV2CrBlock"): "Swin's window partitioning",
}


class DeployModule(nn.Module):
    """Segmenter + the checkpoint's normalisation, written so that torch.export keeps H and W symbolic.

    It computes what `Segmenter.forward(normalize(image))` computes in eval mode (verification
    checks that against the eager Segmenter), with two differences in *how*: the input is always
    padded (by zero rows when it is already a multiple: Segmenter's `if pad_h or pad_w` branch
    would specialise the graph to one case), and the crop back to H x W is an `index_select`
    (a slice view makes torch.export guard on the padding being zero or not, its contiguity).
    """

    def __init__(self, model: nn.Module, mean, std, argmax: bool = False):
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder
        self.multiple = int(model.encoder.pad_multiple)
        self.argmax = argmax
        self.register_buffer("mean", torch.tensor([float(m) for m in mean], dtype=torch.float32))
        self.register_buffer("std", torch.tensor([float(s) for s in std], dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        m = self.multiple
        x = normalize(image, self.mean, self.std)  # the Predictor's own normalisation: same ops
        x = F.pad(x, (0, (width + m - 1) // m * m - width, 0, (height + m - 1) // m * m - height))
        logits = resize(self.decoder(self.encoder(x)), x.shape[-2:])
        rows = torch.arange(height, device=image.device)
        cols = torch.arange(width, device=image.device)
        logits = logits.index_select(2, rows).index_select(3, cols)
        return logits.argmax(dim=1) if self.argmax else logits


def model_metadata(model: nn.Module, size, dynamic: bool, input_dtype: str, argmax: bool) -> dict:
    """What a deployment needs to know about the exported graph (all JSON-serialisable)."""
    num_classes = int(model.num_classes)
    names = list(getattr(model, "class_names", None) or [f"class_{i}" for i in range(num_classes)])
    palette = getattr(model, "palette", None)
    if palette is None:
        from sceneparse.data.meta import make_palette

        palette = make_palette(num_classes)
    norm = _normalization(model)
    return {
        "format": "sceneparse-export/1",
        "model_config": dict(model.config or {}),
        "class_names": names,
        "palette": [[int(c) for c in rgb] for rgb in palette],
        "normalization": {"mean": norm[0], "std": norm[1], "scale": "applied inside the graph to x / 255"},
        "input": {"name": "image", "dtype": input_dtype, "layout": "NCHW", "channels": "RGB", "range": "0..255"},
        "output": ({"name": "labels", "dtype": "int64", "shape": "N x H x W", "meaning": "class ids"} if argmax
                   else {"name": "logits", "dtype": "float32", "shape": "N x C x H x W",
                         "meaning": "class logits at the input size (softmax -> probabilities)"}),
        "size": [int(s) for s in size],
        "dynamic": bool(dynamic),
        "min_side": int(model.encoder.pad_multiple) + 1 if dynamic else None,
        "pad_multiple": int(model.encoder.pad_multiple),
    }


def _normalization(model) -> tuple[list[float], list[float]]:
    from sceneparse.engine.infer import IMAGENET_NORMALIZATION

    norm = getattr(model, "normalization", None) or IMAGENET_NORMALIZATION
    return [float(x) for x in norm["mean"]], [float(x) for x in norm["std"]]


def _require_onnx() -> None:
    """Import what ONNX export and its verification need; a missing one is a user error."""
    import importlib

    for name in ONNX_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            raise SceneparseError(f"ONNX export needs the Python package {name!r}, which is not installed",
                                  f"{INSTALL_HINT} (or export with --format pt2, which needs only torch)") from None


class MatrixAdaptiveAvgPool2d(nn.Module):
    """`nn.AdaptiveAvgPool2d(output_size)` computed as `rows @ x @ cols^T`, with averaging matrices
    built from the input's own height and width inside the graph.

    ONNX has no adaptive pooling operator: the exporter turns a pool to more than 1x1 cells (PPM's
    2, 3 and 6) into a fixed-kernel AveragePool sized for the example input, so the graph is only
    right at that size. These matrices keep H and W symbolic. Cells are PyTorch's own:
    `[floor(i * H / n), ceil((i + 1) * H / n))`, so the result equals the layer it replaces (to float
    rounding; the export's verification checks it against the eager model).
    """

    def __init__(self, output_size):
        super().__init__()
        size = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
        if any(s is None for s in size):
            raise ValueError("MatrixAdaptiveAvgPool2d needs both output sides (None keeps a side: not supported)")
        self.output_size = tuple(int(s) for s in size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _averaging_matrix(self.output_size[0], x.shape[-2], x)
        cols = _averaging_matrix(self.output_size[1], x.shape[-1], x)
        return rows @ x @ cols.transpose(0, 1)


def _averaging_matrix(cells: int, size, like: torch.Tensor) -> torch.Tensor:
    """`cells x size`: row i averages the positions of cell i (1 / its width where inside, else 0)."""
    i = torch.arange(cells, device=like.device)
    start = i * size // cells
    end = ((i + 1) * size + cells - 1) // cells
    position = torch.arange(size, device=like.device)
    inside = (position >= start[:, None]) & (position < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


def _dynamic_capture_fails(model: nn.Module) -> tuple[str, str] | None:
    """The first layer of `model` listed in DYNAMIC_CAPTURE_FAILS, as (its name, why), or None."""
    import sys

    # a class whose module nothing has imported yet cannot be in the model: no import needed
    known = [(cls, why) for (module, name), why in DYNAMIC_CAPTURE_FAILS.items()
             if isinstance(cls := getattr(sys.modules.get(module), name, None), type)]
    for layer_name, layer in model.named_modules():
        for cls, why in known:
            if isinstance(layer, cls):
                return layer_name, why
    return None


def _is_multi_cell_pool(module: nn.Module) -> bool:
    if not isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return False
    size = module.output_size
    sizes = size if isinstance(size, (tuple, list)) else (size, size)
    return any(s not in (1, None) for s in sizes)


def _rewritable(module: nn.Module) -> bool:
    """An average pool to a fixed number of cells each way: MatrixAdaptiveAvgPool2d can replace it."""
    size = module.output_size
    sizes = size if isinstance(size, (tuple, list)) else (size,)
    return isinstance(module, nn.AdaptiveAvgPool2d) and None not in sizes


def _adaptive_pools(model: nn.Module, rewritable: bool) -> list[str]:
    """Adaptive pooling layers whose output is more than 1x1 (PPM's pyramid): those the matrix form
    can replace, or (`rewritable=False`) the others (max pooling, a side left at the input's size)."""
    return [name for name, module in model.named_modules()
            if _is_multi_cell_pool(module) and _rewritable(module) == rewritable]


def _with_matrix_pools(model: nn.Module) -> nn.Module:
    """A copy of `model` whose multi-cell adaptive average pools are MatrixAdaptiveAvgPool2d (the
    caller's model stays as it was)."""
    import copy

    model = copy.deepcopy(model)
    for name in _adaptive_pools(model, rewritable=True):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, MatrixAdaptiveAvgPool2d(parent.get_submodule(child).output_size))
    return model


def export_model(
    model: nn.Module,
    output: str | Path,
    format: str = "onnx",
    size: tuple[int, int] = (512, 512),
    dynamic: bool = False,
    opset: int | None = None,
    input_dtype: str = "uint8",
    argmax: bool = False,
    tolerance: float = 1e-3,
    log: Callable[[str], None] = print,
) -> dict:
    """Export `model` (a Segmenter, e.g. from `load_model`; moved to the CPU and put in eval mode)
    to `output` and verify the file.

    Static export: batch 1 and `size` fixed. `dynamic=True`: batch, height and width symbolic
    (height and width above the model's pad multiple; `size` is then the example size).
    Returns `{"path", "format", "checks": [{"shape", "max_abs_diff", "tolerance", "argmax_agreement"}]}`.
    Raises SceneparseError when a dependency is missing, the export is impossible, or the exported
    file disagrees with the eager model by more than `tolerance` (x the largest logit, at least 1).
    """
    if format not in FORMATS:
        raise SceneparseError(f"unknown export format {format!r}", f"use one of {', '.join(FORMATS)}")
    if input_dtype not in INPUT_DTYPES:
        raise SceneparseError(f"unknown input dtype {input_dtype!r}", f"use one of {', '.join(INPUT_DTYPES)}")
    if not hasattr(model, "encoder") or not hasattr(model.encoder, "pad_multiple"):
        raise SceneparseError("export needs a sceneparse Segmenter (from load_model or build_model)")
    height, width = (int(s) for s in size)
    multiple = int(model.encoder.pad_multiple)
    if dynamic and min(height, width) <= multiple:
        raise SceneparseError(f"--size {height} {width} is too small for a dynamic export of this model",
                              f"use sides above its pad multiple {multiple}, e.g. --size 512 512")
    if min(height, width) < 1:
        raise SceneparseError(f"--size must be positive, got {height} {width}")
    layer = _dynamic_capture_fails(model) if dynamic else None
    if layer is not None:
        raise SceneparseError(
            f"the {(model.config or {}).get('encoder', 'model')} encoder cannot be exported with dynamic "
            f"height/width: torch.export cannot keep them symbolic through {layer[1]} ({layer[0]})",
            "export at the fixed size your deployment resizes to (--size H W, without --dynamic)",
        )
    if format == "onnx":
        _require_onnx()
        pools = _adaptive_pools(model, rewritable=False)  # the others are rewritten below
        if dynamic and pools:
            raise SceneparseError(
                f"the {(model.config or {}).get('decoder', 'model')} decoder cannot be exported to ONNX with dynamic "
                f"height/width: its adaptive pooling ({', '.join(pools[:2])}{', ...' if len(pools) > 2 else ''}) "
                "has no ONNX operator, and the exporter would bake one input size into the graph",
                "export ONNX at the fixed size your deployment resizes to (--size H W, without --dynamic), "
                "or use --format pt2, which keeps sizes dynamic",
            )
        if opset is not None:
            import onnx

            newest = onnx.defs.onnx_opset_version()
            if not MIN_OPSET <= opset <= newest:
                raise SceneparseError(f"--opset {opset} is not an ONNX opset this installation can write",
                                      f"use {MIN_OPSET} to {newest}, or omit --opset (the exporter's default)")
    output = Path(output)
    if output.is_dir():  # found now, not after the capture when the move fails
        raise SceneparseError(f"--output {output} is a folder: it needs a file name",
                              f"e.g. --output {output / ('model.' + format)}")
    blocking = next((parent for parent in output.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise SceneparseError(f"cannot write {output}: {blocking} is a file, not a folder",
                              "choose an --output in a folder")
    # Everything is written into a fresh hidden folder beside the output and moved over it once
    # verified: a failed export leaves an earlier file of that name as it was; the staged file has
    # its final name (torch wants a .pt2 name; ONNX names a weights side file after its file); and
    # an unwritable destination is found now, before the slow capture.
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.TemporaryDirectory(prefix=f".{output.stem}.", suffix=".tmp", dir=output.parent)
    except OSError as err:
        raise SceneparseError(f"cannot write {output}: {err.strerror or err}",
                              "choose an --output in a folder you can write to") from None
    with staging as folder:
        staged = Path(folder) / output.name
        model = model.cpu().eval()
        mean, std = _normalization(model)
        # ONNX keeps H and W symbolic only with PPM's pyramid pools written as matrix products.
        deployed = _with_matrix_pools(model) if format == "onnx" and dynamic else model
        module = DeployModule(deployed, mean, std, argmax=argmax).eval()
        metadata = model_metadata(model, (height, width), dynamic, input_dtype, argmax)
        # torch.export specialises sizes 0 and 1: a dynamic batch needs an example batch of 2.
        example = _random_images(2 if dynamic else 1, height, width, input_dtype, seed=0)
        shapes = _dynamic_shapes(multiple) if dynamic else None
        program = _capture(module, example, shapes)
        try:
            if format == "onnx":
                _save_onnx(program, example, staged, metadata, opset, shapes)
            else:
                torch.export.save(program, staged, extra_files={METADATA_FILE: json.dumps(metadata)})
        except (OSError, RuntimeError) as err:  # torch.export.save reports I/O errors as RuntimeError
            raise _write_error(err, output, staged) from None
        layout = "dynamic N x 3 x H x W" if dynamic else f"1 x 3 x {height} x {width}"
        log(f"exported {output.name} ({format}, {layout}, {input_dtype} input, "
            f"{'class ids' if argmax else 'logits'} output); verifying")

        checks = []
        run = _runner(staged, format)
        for shape in _check_shapes(height, width, dynamic, multiple):
            check = _compare(model, mean, std, run, shape, input_dtype, argmax, tolerance)
            checks.append(check)
            if "error" in check:
                raise SceneparseError(
                    f"the exported {format} file fails on an input of shape {tuple(shape)}: {check['error']}; "
                    f"{output} was not written",
                    "export at the fixed size your deployment uses (no --dynamic), or try the other --format",
                )
            agreement = f"argmax agreement {100 * check['argmax_agreement']:.3f}%"
            log(f"verify {'x'.join(map(str, shape))}: " + (f"class ids: {agreement}" if argmax else
                f"max |difference| {check['max_abs_diff']:.2e} (tolerance {check['tolerance']:.2e}), {agreement}"))
            if not check["ok"]:
                raise SceneparseError(
                    f"the exported {format} file disagrees with the eager model at input {tuple(shape)}: "
                    f"max |difference| {check['max_abs_diff']:.3g} > {check['tolerance']:.3g}, argmax agreement "
                    f"{100 * check['argmax_agreement']:.2f}%; {output} was not written",
                    "report this with the command; meanwhile try the other --format, or a static export (no --dynamic)",
                )
        # The weights side file an earlier export of this name wrote belongs to the file replaced
        # below; this one does not read it, so it goes too (when this export wrote none).
        stale = output.parent / (output.name + ".data")
        stale = stale if format == "onnx" and not (staged.parent / stale.name).exists() else None
        try:
            for path in sorted(staged.parent.iterdir(), key=lambda p: p == staged):  # a weights side file first
                path.replace(output.parent / path.name)
            if stale is not None:
                stale.unlink(missing_ok=True)
        except OSError as err:
            raise _write_error(err, output, staged) from None
    return {"path": output, "format": format, "checks": checks, "metadata": metadata}


def _write_error(err: Exception, output: Path, staged: Path) -> SceneparseError:
    """A failed write, told with the user's path (the staging folder is ours, not theirs)."""
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    else:
        reason = first_line(err)
    return SceneparseError(f"cannot write {output}: {reason.replace(str(staged.parent), str(output.parent))}",
                           f"check the free space and permissions of {output.parent}")


def _random_images(n: int, h: int, w: int, input_dtype: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=gen)
    return images.to(INPUT_DTYPES[input_dtype])


def _dynamic_shapes(multiple: int) -> dict:
    """The symbolic axes of the input `image`, for torch.export and again for the ONNX exporter,
    which names the file's dynamic axes after these dims (else it writes its own `s40`, `s77`...)."""
    side = dict(min=multiple + 1)  # smaller inputs make a stride-`multiple` map of size 1
    return {"image": {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", **side),
                      3: torch.export.Dim("width", **side)}}


def _capture(module: nn.Module, example: torch.Tensor, shapes: dict | None):
    """torch.export the module (`shapes`: from `_dynamic_shapes`, or None for a static graph); a
    failure (an op or shape rule torch.export cannot trace) becomes one message instead of a
    tracer's traceback."""
    dynamic = shapes is not None
    try:
        with torch.no_grad():
            return torch.export.export(module, (example,), dynamic_shapes=shapes)
    except Exception as err:  # noqa: BLE001 - shown to the user with the way out
        # the first line says what failed; the next ones are the tracer's symbolic guards
        first = first_line(err)
        first = first if len(first) <= 200 else first[:200] + "..."
        raise SceneparseError(f"torch.export could not capture the model: {type(err).__name__}: {first}",
                              "try without --dynamic (a fixed --size)" if dynamic else None) from None


def _save_onnx(program, example, output: Path, metadata: dict, opset: int | None, shapes: dict | None) -> None:
    import warnings

    # The exporter logs (torch.onnx, onnxscript) a conversion to an older opset that it could not do,
    # traceback included, and carries on with its own opset: checked below and told once, by us.
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter about its own internals
            # `shapes` again, though the program already has them: from its Dims' names the exporter
            # names the dynamic axes (`batch`, `height`, `width`) everywhere they occur, the outputs'
            # included, where it would otherwise write its own symbols (`s40`, `s77`).
            onnx_program = torch.onnx.export(program, (example,), dynamo=True, opset_version=opset,
                                             input_names=["image"], output_names=[metadata["output"]["name"]],
                                             dynamic_shapes=shapes, verbose=False)
    except Exception as err:  # noqa: BLE001
        first = first_line(err)
        raise SceneparseError(f"ONNX export failed: {type(err).__name__}: {first}",
                              "try another --opset (the exporter's own is the default), or --format pt2") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    obtained = onnx_program.model.opset_imports.get("")
    if opset is not None and obtained != opset:
        raise SceneparseError(f"the ONNX exporter could not convert this model to --opset {opset}: "
                              f"it kept opset {obtained}",
                              f"omit --opset (the exporter's default), or use --opset {obtained} or above")
    metadata["opset"] = obtained
    for key, value in metadata.items():
        onnx_program.model.metadata_props[f"sceneparse.{key}"] = json.dumps(value)
    # Weights above onnxscript's threshold (1.5 GB, under protobuf's 2 GB limit) go to a side file
    # `<output name>.data` next to `output`: export_model moves it along.
    onnx_program.save(output)


def read_metadata(path: str | Path) -> dict:
    """The metadata `export_model` wrote into an `.onnx` or `.pt2` file."""
    path = Path(path)
    if not path.is_file():
        raise SceneparseError(f"exported model not found: {path}")
    onnx_file = _is_onnx(path)
    if onnx_file:
        try:
            import onnx
        except ImportError:
            raise SceneparseError("reading ONNX metadata needs the package 'onnx'", INSTALL_HINT) from None
    try:  # a checkpoint, an image...: one message naming the file, not the parser's traceback
        if onnx_file:
            proto = onnx.load(str(path), load_external_data=False)
            prefix = "sceneparse."
            return {p.key[len(prefix):]: json.loads(p.value) for p in proto.metadata_props
                    if p.key.startswith(prefix)}
        if path.suffix != ".pt2":  # a zip, but torch.export reads only .pt2 names (a checkpoint .pt, say)
            raise ValueError("a zip archive without the .pt2 name that torch.export files have")
        extra = {METADATA_FILE: ""}
        torch.export.load(path, extra_files=extra)
        return json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else {}
    except Exception as err:  # noqa: BLE001 - protobuf, zip and torch.export errors alike
        reason = first_line(err)
        raise SceneparseError(f"{path} is not a model exported by `sceneparse export` (ONNX or .pt2): {reason}",
                              "pass the .onnx or .pt2 file that `sceneparse export` wrote") from None


def _is_onnx(path: Path) -> bool:
    # a .pt2 file is a zip archive; an ONNX file is a protobuf
    with open(path, "rb") as f:
        return f.read(2) != b"PK"


def _runner(path: Path, format: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the exported file on a batch (as the deployment would)."""
    if format == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # share the CPU as torch is told to
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    module = torch.export.load(path).module()
    return lambda x: module(x).detach()


def _check_shapes(h: int, w: int, dynamic: bool, multiple: int) -> list[tuple[int, ...]]:
    """The export size; dynamic: also a batch of 2 at odd sides (padding needed) and a batch of 1
    at multiples of the pad multiple (no padding), neither of them the example size."""
    shapes = [(1, 3, h, w)]
    if dynamic:
        def odd(side: int) -> int:  # an odd side is never a multiple of the (even) pad multiple
            return max(multiple + 1, side // 2) | 1

        def whole(side: int) -> int:  # a multiple of the pad multiple other than the example's side
            size = max(2 * multiple, side // 2 // multiple * multiple)
            return size if size != side else size + multiple

        shapes += [(2, 3, odd(h), odd(w)), (1, 3, whole(h), whole(w))]
    return shapes


@torch.no_grad()
def _compare(model, mean, std, run, shape, input_dtype, argmax, tolerance) -> dict:
    images = _random_images(shape[0], shape[2], shape[3], input_dtype, seed=sum(shape))
    reference = model(normalize(images, mean, std)).float()  # the eager Segmenter itself
    try:
        out = run(images)
    except Exception as err:  # noqa: BLE001 - e.g. an ONNX graph that baked in the example's size
        first = first_line(err)
        return {"shape": list(shape), "max_abs_diff": float("inf"), "tolerance": tolerance,
                "argmax_agreement": 0.0, "ok": False, "error": f"{type(err).__name__}: {first}"}
    ref_ids = reference.argmax(dim=1)
    expected = ref_ids if argmax else reference
    if tuple(out.shape) != tuple(expected.shape):
        return {"shape": list(shape), "max_abs_diff": float("inf"), "tolerance": tolerance, "argmax_agreement": 0.0,
                "ok": False, "error": f"output shape {tuple(out.shape)}, expected {tuple(expected.shape)}"}
    if argmax:  # ids: the agreement is all there is to compare (near-ties may flip a few pixels)
        agreement = float((out == ref_ids).double().mean())
        return {"shape": list(shape), "max_abs_diff": 0.0, "tolerance": 0.0, "argmax_agreement": agreement,
                "ok": agreement >= 0.999}
    diff = float((out.float() - reference).abs().max())
    tol = tolerance * max(1.0, float(reference.abs().max()))
    agreement = float((out.argmax(dim=1) == ref_ids).double().mean())
    return {"shape": list(shape), "max_abs_diff": diff, "tolerance": tol, "argmax_agreement": agreement,
            "ok": diff <= tol}

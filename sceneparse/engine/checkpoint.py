"""One-file checkpoints: a plain dict written atomically, loadable with `torch.load(weights_only=True)`.

Format (see docs/architecture.md)::

    {"format": "sceneparse-checkpoint/1",
     "model": {"config": build_model kwargs, "state_dict": ...},
     "class_names": [...], "palette": [[r, g, b], ...],
     "normalization": {"mean": [...], "std": [...]},
     "train_state": {...}}            # only in training checkpoints

A crash, a full disk or a kill while saving never leaves a half-written file under the final name:
we write a temporary file in the same folder, fsync it, `os.replace` it over the target and fsync
the folder, so the previous checkpoint stays intact until the new one is complete.
"""
from __future__ import annotations

import json
import os
import random
import shlex
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sceneparse.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from sceneparse.engine.distributed import unwrap as _unwrap  # the Segmenter inside DDP/compile
from sceneparse.errors import SceneparseError, first_line
from sceneparse.models.pretrained import (
    CHECKPOINT_FORMAT_PREFIX,
    as_state_dict,
    is_sceneparse_checkpoint,
    load_error_reason,
    load_state_dict_strict,
    looks_like_csail,
)

FORMAT_VERSION = 1
FORMAT = f"{CHECKPOINT_FORMAT_PREFIX}{FORMAT_VERSION}"
DEFAULT_NORMALIZATION = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems (and Windows) cannot open folders: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # reading it means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj)` to `path` atomically; OSError (disk full, read-only) -> SceneparseError."""
    path = Path(path)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename: others could not read it
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as err:  # torch.save's zip writer reports a full disk as RuntimeError
        reason = getattr(err, "strerror", None) or first_line(err)
        raise SceneparseError(
            f"could not write checkpoint {path}: {reason}",
            hint="free disk space or choose a writable output_dir; the previous checkpoint is untouched",
        ) from None
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path


def save_model(
    path: str | Path,
    model: torch.nn.Module,
    class_names: list[str],
    palette: list[list[int]],
    normalization: dict | None = None,
    train_state: dict | None = None,
) -> Path:
    """Write a sceneparse checkpoint for `model` (a Segmenter, possibly wrapped) to `path`."""
    model = _unwrap(model)
    config = dict(getattr(model, "config", None) or {})
    if not config:
        raise ValueError("save_model needs a Segmenter built by build_model (it has no .config)")
    if config.get("num_classes") != len(class_names):
        raise SceneparseError(
            f"{path}: the model predicts {config.get('num_classes')} classes "
            f"but {len(class_names)} class names were given"
        )
    ckpt = {
        "format": FORMAT,
        "model": {"config": config, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}},
        "class_names": [str(n) for n in class_names],
        "palette": [[int(c) for c in rgb] for rgb in palette],
        # a loaded model carries its own (load_model sets it): saved again, it keeps it
        "normalization": {k: [float(x) for x in v] for k, v in
                          (normalization or getattr(model, "normalization", None) or DEFAULT_NORMALIZATION).items()},
    }
    if train_state is not None:
        ckpt["train_state"] = train_state
    return atomic_save(ckpt, path)


# What `sceneparse export` writes: deployable graphs, which predict, eval, serve and training do not read.
EXPORTED_SUFFIXES = {".onnx": "ONNX", ".pt2": "torch.export"}


def load_checkpoint(path: str | Path) -> dict:
    """Read and validate a sceneparse checkpoint file (no code runs: weights_only=True)."""
    path = Path(path)
    if path.is_dir():
        raise SceneparseError(f"{path} is a folder, not a checkpoint file", hint=_folder_hint(path))
    if not path.is_file():
        raise SceneparseError(f"checkpoint not found: {path}", hint="check the path")
    exported = EXPORTED_SUFFIXES.get(path.suffix.lower())
    if exported:  # not damaged, just the wrong kind of file: say so rather than "corrupt"
        raise SceneparseError(
            f"{path} is an exported model ({exported}), not a sceneparse checkpoint",
            "pass the checkpoint it was exported from (e.g. a run's best.pt); run the exported file "
            "itself with onnxruntime or torch.export.load, as docs/deploy.md shows")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, garbage bytes, pickled code objects...
        first = load_error_reason(err)
        raise SceneparseError(
            f"{path} is not a readable checkpoint (corrupt, truncated or not a torch file): {first}",
            hint=_unreadable_hint(path),
        ) from None
    if is_sceneparse_checkpoint(ckpt) and ckpt["format"] != FORMAT:
        raise _format_error(path, ckpt["format"])
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise _not_a_checkpoint(path, ckpt)
    return ckpt


def _folder_hint(folder: Path) -> str:
    """What to pass instead of a folder: a run's checkpoints in it, if it is a run's output_dir."""
    run = {"best.pt": "best validation score: predict, eval, model.weights",
           "last.pt": "latest, with the training state: also --resume"}
    found = [f"{folder / name} ({use})" for name, use in run.items() if (folder / name).is_file()]
    if found:
        return "pass one of its checkpoints: " + " or ".join(found)
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth"))[:3]
    return (f"pass a checkpoint file in it, e.g. {folder / others[0]}" if others
            else "pass a checkpoint file, e.g. a training run's OUTPUT_DIR/best.pt")


def _unreadable_hint(path: Path) -> str:
    """The way out for a damaged checkpoint. best.pt holds no training state, so for a damaged
    last.pt it is a new run's starting point (or a model to evaluate), never something to resume."""
    if path.name != "last.pt":
        return "use another checkpoint (e.g. the same run's best.pt or last.pt), or copy, download or convert it again"
    best = path.with_name("best.pt")
    if best.is_file():
        return (f"to resume, restore {path} (copy it again from where the run wrote it); or start a new run "
                f"from the best weights: model.weights={best} (best.pt holds weights only and cannot be "
                f"resumed); to evaluate or predict: --model {best}")
    return f"to resume, restore {path} (copy it again from where the run wrote it), or start the run over"


def _format_error(path: Path, found: str) -> SceneparseError:
    """A sceneparse checkpoint of another format version than this sceneparse reads."""
    from sceneparse import __version__

    version = found[len(CHECKPOINT_FORMAT_PREFIX):]
    if version.isdigit() and int(version) > FORMAT_VERSION:
        return SceneparseError(
            f"{path} was written by a newer sceneparse: its format is {found!r}, "
            f"this sceneparse ({__version__}) reads {FORMAT!r}",
            hint="upgrade sceneparse (pip install --upgrade sceneparse, or update your clone and reinstall it)",
        )
    return SceneparseError(
        f"{path} has an unknown checkpoint format {found!r} (this sceneparse, {__version__}, reads {FORMAT!r})",
        hint="the file was edited or written by other code: use a checkpoint saved by sceneparse",
    )


def _not_a_checkpoint(path: Path, obj: Any) -> SceneparseError:
    """Why a readable file is no sceneparse checkpoint, and what to do. A bare state_dict (most
    often `torch.save(model.state_dict(), ...)`) has the weights but not the model config and
    class names that building and using the model need."""
    found = as_state_dict(obj)
    if found is None:
        return SceneparseError(
            f"{path} is not a sceneparse checkpoint (no format={FORMAT!r} entry, and no state_dict)",
            hint="pass a checkpoint written by sceneparse: a training run's best.pt or last.pt, or a zoo model",
        )
    key, state = found
    where = "" if key is None else f" under {key!r}"
    if looks_like_csail(state):
        return SceneparseError(
            f"{path} is not a sceneparse checkpoint: it holds a bare state_dict{where} with the keys of "
            "CSAIL's encoder_epoch_N.pth or decoder_epoch_N.pth",
            hint="convert the encoder and decoder files of one CSAIL model into a checkpoint: sceneparse convert "
                 "csail --encoder encoder_epoch_N.pth --decoder decoder_epoch_N.pth --arch NAME --output model.pt",
        )
    load = f"torch.load({str(path)!r})" + ("" if key is None else f"[{key!r}]")
    save = (f"in Python, build the same model, load the weights and save a checkpoint: "
            f"model = sceneparse.build_model(ENCODER, DECODER, NUM_CLASSES); model.load_state_dict({load}); "
            f"sceneparse.save_model('model.pt', model, class_names, palette)")
    segmenter = all(k.startswith(("encoder.", "decoder.")) for k in state)
    return SceneparseError(
        f"{path} is not a sceneparse checkpoint: it holds a bare state_dict{where} ({len(state)} tensors, "
        "as torch.save(model.state_dict()) writes), the weights without the model config and class names",
        hint=save if segmenter else f"if it is an encoder's (backbone's) weights: model.encoder_weights={path}; "
                                    f"if a whole model's: {save}",
    )


def model_config(ckpt: dict) -> dict:
    """The build_model arguments a loaded checkpoint stores, brought up to date: an encnet saved
    before the decoder had SE-loss's class-presence head (on by default since 2026-11-23) rebuilds
    without one, so that its weights still load."""
    config = dict(ckpt["model"]["config"])
    if config.get("decoder") == "encnet" and "decoder.se_head.weight" not in ckpt["model"]["state_dict"]:
        config["decoder_options"] = {"se_loss": False, **(config.get("decoder_options") or {})}
    return config


def model_from_checkpoint(ckpt: dict, path: str | Path = "<checkpoint>", device: str | torch.device = "cpu"):
    """Build the Segmenter a loaded checkpoint dict describes, load its weights (strictly)."""
    from sceneparse.models import build_model

    config = model_config(ckpt)
    class_names = list(ckpt["class_names"])
    if config.get("num_classes") != len(class_names):
        raise SceneparseError(
            f"{path}: model config says {config.get('num_classes')} classes "
            f"but the checkpoint lists {len(class_names)} class names"
        )
    model = build_model(**config)
    load_state_dict_strict(model, ckpt["model"]["state_dict"],
                           f"{path}: the weights of {config.get('encoder')}+{config.get('decoder')} "
                           f"with {config.get('num_classes')} classes")
    model.class_names = class_names
    model.palette = [list(rgb) for rgb in ckpt["palette"]]
    model.normalization = dict(ckpt.get("normalization") or DEFAULT_NORMALIZATION)
    return model.to(device).eval()


def resolve_model(path_or_name: str | Path) -> Path:
    """The checkpoint file behind a path or a zoo name (a bare name with no such file: the zoo's
    cached copy, converted first from CSAIL's cached files if needed; nothing is downloaded here:
    `sceneparse zoo download` does that, and a model not in the cache is an error saying so)."""
    path = Path(path_or_name)
    if not path.exists() and not any(sep in str(path_or_name) for sep in ("/", os.sep)) and path.suffix == "":
        from sceneparse import zoo

        path = Path(zoo.resolve(str(path_or_name)))
    return path


def load_model(path_or_name: str | Path, device: str | torch.device = "cpu"):
    """A Segmenter in eval mode from a checkpoint file, or from a zoo name when no such file exists."""
    path = resolve_model(path_or_name)
    return model_from_checkpoint(load_checkpoint(path), path, device)


def _comparable(config: dict) -> dict:
    """A model config as plain JSON values, options always present: build_model leaves empty
    options out, and the Python API may give tuples where a YAML file gives lists."""
    config = json.loads(json.dumps(dict(config)))
    return {"encoder_options": {}, "decoder_options": {}, **config}


def config_difference(theirs: dict, ours: dict, skip: tuple[str, ...] = ()) -> tuple[list[str], str]:
    """The model settings in which two build_model configs differ (but `skip`), and the overrides
    that would give `ours` the values of `theirs` ('model.KEY=VALUE' ..., quoted for a shell; an
    option mapping is emptied first, since an override's mapping merges into the config's)."""
    theirs, ours = _comparable(theirs), _comparable(ours)
    differ = sorted(k for k in theirs.keys() | ours.keys() if k not in skip and theirs.get(k) != ours.get(k))
    overrides = []
    for k in differ:
        value = theirs.get(k)
        if isinstance(value, dict) and value:
            overrides.append(f"model.{k}={{}}")
        overrides.append(f"model.{k}={json.dumps(value)}")
    return differ, " ".join(map(shlex.quote, overrides))


def load_initial_weights(model, source: str | Path) -> dict:
    """Start `model` (a new Segmenter) from the weights of a sceneparse checkpoint (a path or a
    zoo name): fine-tuning. The checkpoint must hold the same encoder, decoder and options; every
    tensor must match, except that with another class count the class-specific tensors (the
    classifiers' weights and biases, whose first dimension is the class count) keep the model's
    fresh initialisation. Returns {"path", "fresh": those keys, "normalization" and "class_names":
    the checkpoint's}."""
    path = resolve_model(source)
    ckpt = load_checkpoint(path)
    theirs = _comparable(model_config(ckpt))
    differ, shown = config_difference(theirs, model.config, skip=("num_classes",))
    if differ:
        raise SceneparseError(
            f"{path} holds another model than the config (they differ in {', '.join(differ)})",
            f"set {shown} (the checkpoint's), or use model.encoder_weights for an ImageNet backbone")
    state, own = ckpt["model"]["state_dict"], model.state_dict()
    old, new = int(theirs["num_classes"]), int(model.config["num_classes"])
    fresh = [k for k, v in state.items() if old != new and k in own and v.ndim >= 1
             and v.shape[0] == old and own[k].shape[0] == new and v.shape[1:] == own[k].shape[1:]]
    state = {**state, **{k: own[k] for k in fresh}}
    load_state_dict_strict(model, state, f"{path}: the weights of {theirs.get('encoder')}+{theirs.get('decoder')}")
    return {"path": path, "fresh": fresh, "normalization": dict(ckpt.get("normalization") or DEFAULT_NORMALIZATION),
            "class_names": list(ckpt["class_names"])}


# ----------------------------------------------------------------- RNG state, weights_only-safe
def rng_state() -> dict:
    """Every RNG a training step touches, as tensors/lists/ints (what weights_only=True can read)."""
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's device only: every rank saves its own, and a run resumed with fewer
        # visible GPUs must still load.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

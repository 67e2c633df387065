"""Strict loading of weight files into encoders (ImageNet backbones) and modules in general.

`load_encoder_weights(encoder, source)` accepts CSAIL's ImageNet backbones (`resnet{18,50,101}-
imagenet.pth`, `mobilenet_v2.pth.tar`, `hrnetv2_w48-imagenet.pth`) and timm's own state_dicts
(torch files, or the `model.safetensors` files timm publishes on the Hugging Face hub).
The classifier head is the only thing dropped; every other difference is an error that names
the keys, because a silently half-loaded backbone trains, just badly.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from sceneparse.errors import SceneparseError, UnreadableFileError

# torch counts BN batches only for momentum=None; files from other code never carry it.
_OPTIONAL_SUFFIX = "num_batches_tracked"
# CSAIL's SyncBN saves three bookkeeping buffers per BatchNorm: never weights, always dropped.
SYNCBN_EXTRA_SUFFIXES = ("._tmp_running_mean", "._tmp_running_var", "._running_iter")
_SHOWN = 5  # keys listed per kind of mismatch
# Every sceneparse checkpoint's "format" entry starts so (the version follows: engine/checkpoint.py).
CHECKPOINT_FORMAT_PREFIX = "sceneparse-checkpoint/"
# Where other training code commonly puts a model's state_dict inside the file it saves.
_STATE_KEYS = ("state_dict", "model", "model_state_dict")
# The top-level modules of CSAIL's published encoders (ResNet with its 3-conv stem, MobileNetV2,
# HRNetV2) and decoders (c1, ppm, upernet, with _deepsup heads): ../shared/reference key lists.
_CSAIL_TOP_MODULES = frozenset({
    "conv1", "conv2", "conv3", "bn1", "bn2", "bn3", "layer1", "layer2", "layer3", "layer4", "features",
    "transition1", "transition2", "transition3", "stage2", "stage3", "stage4",
    "cbr", "cbr_deepsup", "conv_last", "conv_last_deepsup", "ppm", "ppm_conv", "ppm_last_conv", "fpn_in", "fpn_out",
})


def read_state_dict(
    source: str | os.PathLike,
    what: str = "weights file",
    checkpoint_message: str = "is a sceneparse checkpoint (a whole model with its config and class names), "
                              "not a bare state_dict",
    checkpoint_hint: str | None = None,
) -> dict[str, Tensor]:
    """`torch.load` a file safely (weights_only) and return its state_dict.

    Unwraps `{"state_dict": ...}` and DataParallel's `module.` prefixes. A sceneparse checkpoint
    is refused with `checkpoint_message` and `checkpoint_hint` (the caller knows what to do instead).
    """
    path = Path(source)
    if not path.is_file():
        raise SceneparseError(f"{what} {path} does not exist")
    try:
        obj = _load_safetensors(path) if _is_safetensors(path) else torch.load(path, map_location="cpu",
                                                                                weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or foreign files
        raise UnreadableFileError(
            f"cannot read {what} {path}: {load_error_reason(err)}",
            hint="the file is truncated, corrupt or not a PyTorch weights file; download it again",
        ) from None
    if is_sceneparse_checkpoint(obj):
        # Not UnreadableFileError: the file reads fine, it is just the wrong kind for this use.
        raise SceneparseError(f"{what} {path} {checkpoint_message}",
                              hint=checkpoint_hint or f"use it as a checkpoint: --model {path} (predict, eval) "
                                                      f"or model.weights={path} (training)")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UnreadableFileError(f"{what} {path} does not hold a state_dict (a dict of tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def is_sceneparse_checkpoint(obj) -> bool:
    """Whether a loaded file is a checkpoint written by sceneparse's save_model, of any format version."""
    return isinstance(obj, dict) and isinstance(obj.get("format"), str) and obj["format"].startswith(CHECKPOINT_FORMAT_PREFIX)


def as_state_dict(obj) -> tuple[str | None, dict[str, Tensor]] | None:
    """The state_dict a loaded file holds, as (the key it sits under or None, the state_dict without
    DataParallel's `module.` prefixes), or None if it holds none: a bare `torch.save(model.state_dict())`,
    or one wrapped as `{"state_dict": ...}` / `{"model": ...}` as training scripts often save it."""
    def is_state(value) -> bool:
        return isinstance(value, dict) and bool(value) and all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())

    if not isinstance(obj, dict):
        return None
    key = None if is_state(obj) else next((k for k in _STATE_KEYS if is_state(obj.get(k))), None)
    if key is None and not is_state(obj):
        return None
    state = obj if key is None else obj[key]
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return key, state


def looks_like_csail(state: dict[str, Tensor]) -> bool:
    """Whether a state_dict is one of CSAIL's encoder_epoch_N.pth / decoder_epoch_N.pth: every key
    starts with a module name of CSAIL's encoders and decoders (a Segmenter's start `encoder.` or
    `decoder.`; an ImageNet backbone also has its classifier, `fc`/`classifier`: not in the list)."""
    return bool(state) and all(k.split(".", 1)[0] in _CSAIL_TOP_MODULES for k in state)


def load_error_reason(err: Exception) -> str:
    """What a failed `torch.load(..., weights_only=True)` says, in a line: without torch's advice to
    retry with weights_only=False, which would run whatever code the file holds."""
    text = str(err).strip()
    if text.startswith("Weights only load failed"):
        return "it holds Python objects beyond tensors, or is not a torch file (torch's weights-only loader refused it)"
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _is_safetensors(path: Path) -> bool:
    """A safetensors file (how timm's weights on the Hugging Face hub come): an 8-byte header
    length, then the JSON header. Told by content, as a downloaded file's name may not say."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file  # installed with timm

    return load_file(str(path), device="cpu")


def _summary(label: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return f"{len(items)} {label}: {shown}{more}"


def drop_syncbn_extras(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` without the bookkeeping buffers of CSAIL's SyncBN (the only keys ever dropped)."""
    return {k: v for k, v in state.items() if not k.endswith(SYNCBN_EXTRA_SUFFIXES)}


def load_state_dict_strict(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Load `state` into `module` requiring the same keys and shapes (apart from BN batch counters).

    Mismatches raise SceneparseError naming `what` and a summary of missing/unexpected keys and
    shape differences.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(_OPTIONAL_SUFFIX)]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} file {list(state[k].shape)} vs model {list(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    problems = [
        _summary(label, items)
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if items
    ]
    if problems:
        raise SceneparseError(
            f"{what} does not match the model: " + "; ".join(problems),
            hint="check that the file was made for this architecture and class count",
        )
    full = {k: state.get(k, v) for k, v in own.items()}  # batch counters keep their value
    module.load_state_dict(full, strict=True)


def load_encoder_weights(encoder: nn.Module, source: str | os.PathLike) -> None:
    """Load backbone weights (a local path or an http(s) URL) into `encoder`, strictly.

    Keys under the encoder's classifier-head prefixes (and CSAIL's SyncBN bookkeeping buffers)
    are dropped; the rest is renamed from the
    file's layout (CSAIL's or timm's) to ours and must match exactly.
    """
    text = str(source)
    if text.startswith(("http://", "https://")):
        from sceneparse.zoo.download import fetch  # needs the network only for URLs

        path = fetch(text)
    else:
        path = Path(text)
    state = read_state_dict(
        path, "encoder weights file",
        checkpoint_message="is a sceneparse checkpoint (a whole model), not encoder weights",
        checkpoint_hint=f"start from the whole model with model.weights={path} model.encoder_weights=null; "
                        "model.encoder_weights takes encoder-only weight files (ImageNet backbones)")
    head = encoder.head_prefixes
    body = {k: v for k, v in drop_syncbn_extras(state).items() if not k.startswith(head)}
    load_state_dict_strict(encoder, encoder.adapt_state_dict(body), f"encoder weights file {path}")

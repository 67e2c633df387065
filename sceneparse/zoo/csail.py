"""Conversion of CSAIL's ADE20K models (`encoder_epoch_N.pth` + `decoder_epoch_N.pth`) to ours.

CSAIL's files are raw state_dicts. Each BatchNorm there is a SyncBN carrying three bookkeeping
buffers (`_tmp_running_mean`, `_tmp_running_var`, `_running_iter`) that we drop; nothing else is
dropped: every tensor must land in a parameter or buffer of the same shape, and every parameter
must be filled, or the conversion fails naming the keys.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from sceneparse.errors import SceneparseError
from sceneparse.models import Segmenter, build_model
from sceneparse.models.decoders import DECODERS
from sceneparse.models.pretrained import drop_syncbn_extras, load_state_dict_strict, read_state_dict
from sceneparse.zoo.registry import ZOO, ZooEntry


# The seven published architectures (encoder, decoder, epoch) live in one table, the zoo registry.
ARCHS: dict[str, ZooEntry] = ZOO


def get_arch(name: str) -> ZooEntry:
    """The ARCHS entry for `name` (CSAIL's folder prefix `ade20k-` is accepted)."""
    key = name.removeprefix("ade20k-")
    if key not in ARCHS:
        raise SceneparseError(f"unknown CSAIL architecture {name!r}", hint=f"use one of: {', '.join(ARCHS)}")
    return ARCHS[key]


def _state(source: str | os.PathLike | dict, what: str) -> dict[str, Tensor]:
    if isinstance(source, dict):
        return dict(source)
    return read_state_dict(
        source, what,
        checkpoint_message="is already a sceneparse checkpoint: there is nothing to convert",
        checkpoint_hint=f"use it as it is: sceneparse predict --model {source} / sceneparse eval --model {source}",
    )


def _describe(source, what: str) -> str:
    return what if isinstance(source, dict) else f"{what} {source}"


def from_csail(
    encoder: str | os.PathLike | dict,
    decoder: str | os.PathLike | dict,
    arch: str,
    num_classes: int | None = None,
) -> Segmenter:
    """Build `arch` and fill it from CSAIL's encoder and decoder state_dicts (paths or dicts).

    `num_classes` defaults to the decoder file's class count (150 for CSAIL's ADE20K models);
    when given, the file must have exactly that many. Returns the model in eval mode.
    """
    spec = get_arch(arch)
    enc_state = drop_syncbn_extras(_state(encoder, "CSAIL encoder file"))
    dec_state = drop_syncbn_extras(_state(decoder, "CSAIL decoder file"))
    dec_what = _describe(decoder, "CSAIL decoder file")

    classifier_key = f"{DECODERS[spec.decoder].classifier}.weight"
    if classifier_key not in dec_state:
        raise SceneparseError(
            f"{dec_what} has no {classifier_key!r}: it is not a {spec.decoder} decoder of {arch}",
            hint="pass the decoder_epoch_N.pth of the same model as the encoder, and the matching --arch",
        )
    file_classes = dec_state[classifier_key].shape[0]
    if num_classes is not None and num_classes != file_classes:
        raise SceneparseError(f"{dec_what} has {file_classes} classes, expected {num_classes}")

    model = build_model(spec.encoder, spec.decoder, file_classes)
    enc_what = f"{_describe(encoder, 'CSAIL encoder file')} (arch {arch})"
    load_state_dict_strict(model.encoder, model.encoder.adapt_state_dict(enc_state), enc_what)
    load_state_dict_strict(model.decoder, dec_state, f"{dec_what} (arch {arch})")
    return model.eval()


def convert_csail_files(
    encoder: str | os.PathLike, decoder: str | os.PathLike, arch: str, output: str | os.PathLike
) -> Path:
    """Convert CSAIL's two files to one sceneparse checkpoint with ADE20K's class names and palette."""
    # Imported here: checkpoint saving and dataset metadata are only needed for writing files.
    from sceneparse.data.meta import builtin_meta
    from sceneparse.engine.checkpoint import save_model

    ade20k = builtin_meta("ade20k")
    model = from_csail(encoder, decoder, arch, num_classes=len(ade20k["class_names"]))
    save_model(output, model, ade20k["class_names"], ade20k["palette"])
    return Path(output)

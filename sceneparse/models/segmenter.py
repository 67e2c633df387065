"""Segmenter = encoder + decoder, and `build_model` to make one by name."""
from __future__ import annotations

from typing import Any, NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from sceneparse.models.decoders import build_decoder
from sceneparse.models.encoders import Encoder, build_encoder
from sceneparse.models.layers import resize


class SegmenterOutput(NamedTuple):
    """Training-mode output of a deep-supervision model: logits and aux at the input size, and the
    per-image class-presence logits (N x classes) of a decoder that predicts them (EncNet's SE-loss)."""

    logits: Tensor
    aux: Tensor
    presence: Tensor | None = None


class Segmenter(nn.Module):
    """Takes normalised images `N x 3 x H x W`, returns logits `N x C x H x W`.

    The input is zero-padded (bottom/right) to a multiple of `encoder.pad_multiple`; the decoder's
    logits are resized bilinearly to the padded size and cropped back to H x W. In training mode a
    decoder with `forward_aux` (deep supervision) makes the output a `SegmenterOutput`.
    """

    def __init__(self, encoder: Encoder, decoder: nn.Module, config: dict[str, Any] | None = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.num_classes = decoder.num_classes
        # The build_model arguments that rebuild this model (what a checkpoint stores).
        self.config = config

    @property
    def has_aux(self) -> bool:
        return hasattr(self.decoder, "forward_aux")

    def forward(self, images: Tensor) -> Tensor | SegmenterOutput:
        height, width = images.shape[-2:]
        multiple = self.encoder.pad_multiple
        # Rounded up by floor division, not `-height % multiple`: under torch.compile with dynamic
        # shapes a modulo of a size reaches the interpolation's scale and inductor cannot lower it.
        pad_h = (height + multiple - 1) // multiple * multiple - height
        pad_w = (width + multiple - 1) // multiple * multiple - width
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        padded_size = images.shape[-2:]

        features = self.encoder(images)
        if self.training and self.has_aux:
            # a registry decoder may share work between its two heads; any other runs both
            forward_train = getattr(self.decoder, "forward_train", None)
            logits, aux, *presence = (forward_train(features) if forward_train is not None
                                      else (self.decoder(features), self.decoder.forward_aux(features)))
            logits, aux = (resize(x, padded_size)[..., :height, :width] for x in (logits, aux))
            return SegmenterOutput(logits, aux, *presence)
        return resize(self.decoder(features), padded_size)[..., :height, :width]


def build_model(
    encoder: str,
    decoder: str,
    num_classes: int,
    *,
    encoder_options: dict[str, Any] | None = None,
    decoder_options: dict[str, Any] | None = None,
) -> Segmenter:
    """Build a Segmenter from names, e.g. `build_model("resnet50dilated", "ppm_deepsup", 150)`.

    `encoder` is a name from `ENCODERS` or `timm:<model>`; `encoder_options` go to its builder
    (for timm: to `timm.create_model`), `decoder_options` to the decoder (e.g. `pool_scales`,
    `fpn_dim` for upernet). Weights are random; see `sceneparse.models.pretrained`.
    """
    config: dict[str, Any] = {"encoder": encoder, "decoder": decoder, "num_classes": int(num_classes)}
    if encoder_options:
        config["encoder_options"] = dict(encoder_options)
    if decoder_options:
        config["decoder_options"] = dict(decoder_options)
    enc = build_encoder(encoder, **(encoder_options or {}))
    dec = build_decoder(decoder, enc.channels, int(num_classes), **(decoder_options or {}))
    return Segmenter(enc, dec, config)

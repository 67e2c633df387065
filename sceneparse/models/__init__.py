"""Models: timm encoders named as CSAIL names them, decoders (CSAIL's and the classic heads), the Segmenter
and build_model."""
from sceneparse.models.decoders import DECODERS, build_decoder
from sceneparse.models.encoders import ENCODERS, Encoder, build_encoder
from sceneparse.models.pretrained import load_encoder_weights
from sceneparse.models.segmenter import Segmenter, SegmenterOutput, build_model

__all__ = [
    "DECODERS",
    "ENCODERS",
    "Encoder",
    "Segmenter",
    "SegmenterOutput",
    "build_decoder",
    "build_encoder",
    "build_model",
    "load_encoder_weights",
]

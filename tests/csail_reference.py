"""Test helpers: CSAIL-format state_dicts, from CSAIL's own code (mit-semseg) or from the key lists
in ../shared/reference, with the SyncBN bookkeeping buffers that real CSAIL files carry."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
KEYS_DIR = SHARED / "reference" / "csail_checkpoint_keys"

SEVEN_ARCHS = (
    "mobilenetv2dilated-c1_deepsup",
    "resnet18dilated-ppm_deepsup",
    "resnet50dilated-ppm_deepsup",
    "resnet101dilated-ppm_deepsup",
    "resnet50-upernet",
    "resnet101-upernet",
    "hrnetv2-c1",
)


# --- from the shared key lists -------------------------------------------------------------------


def read_key_lists(arch: str) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(encoder, decoder) key -> shape, from `ade20k-<arch>.keys.txt`."""
    parts: dict[str, dict[str, list[int]]] = {}
    current = None
    for line in (KEYS_DIR / f"ade20k-{arch}.keys.txt").read_text().splitlines():
        if line.startswith("# "):
            current = parts.setdefault(line.split()[1].split("_")[0], {})  # "encoder" / "decoder"
        elif line.strip():
            key, shape = line.split("\t")
            current[key] = [int(n) for n in shape.strip("[]").split(",") if n.strip()]
    return parts["encoder"], parts["decoder"]


def add_syncbn_extras(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """What CSAIL's SyncBN adds to every BatchNorm in a saved file."""
    out = dict(state)
    for key, value in state.items():
        if key.endswith(".running_mean"):
            prefix = key[: -len("running_mean")]
            out[prefix + "_tmp_running_mean"] = value.clone()
            out[prefix + "_tmp_running_var"] = state[prefix + "running_var"].clone()
            out[prefix + "_running_iter"] = torch.ones(1)
    return out


def synthetic_state(shapes: dict[str, list[int]], seed: int) -> dict[str, Tensor]:
    """Random tensors of these shapes (positive running_var) plus the SyncBN extras."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=gen)
        state[key] = value.abs() + 0.5 if key.endswith("running_var") else value
    return add_syncbn_extras(state)


# --- from CSAIL's own code (mit-semseg) ---------------------------------------------------------------


def csail_modules(arch: str, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """CSAIL's encoder and decoder for `arch`, random weights, built without any download."""
    from mit_semseg.models import hrnet, mobilenet, models, resnet

    depth_fc = {"resnet18": 512, "resnet50": 2048, "resnet101": 2048}
    encoder_name, decoder_name = arch.split("-")
    if encoder_name == "mobilenetv2dilated":
        encoder = models.MobileNetV2Dilated(mobilenet.mobilenetv2(pretrained=False), dilate_scale=8)
        fc_dim = 320
    elif encoder_name == "hrnetv2":
        encoder = hrnet.hrnetv2(pretrained=False)
        fc_dim = 720
    elif encoder_name.endswith("dilated"):
        base = encoder_name.removesuffix("dilated")
        encoder = models.ResnetDilated(getattr(resnet, base)(pretrained=False), dilate_scale=8)
        fc_dim = depth_fc[base]
    else:
        encoder = models.Resnet(getattr(resnet, encoder_name)(pretrained=False))
        fc_dim = depth_fc[encoder_name]
    decoder_cls = {
        "c1": models.C1,
        "c1_deepsup": models.C1DeepSup,
        "ppm_deepsup": models.PPMDeepsup,
        "upernet": lambda **kw: models.UPerNet(fpn_dim=512, **kw),
    }[decoder_name]
    decoder = decoder_cls(num_class=num_classes, fc_dim=fc_dim, use_softmax=True)
    return encoder, decoder


def _batchnorms(*modules: nn.Module):
    return [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def randomise(encoder: nn.Module, decoder: nn.Module, images: Tensor, seed: int) -> list[Tensor]:
    """Random weights and BN statistics that keep activations well scaled.

    Each part's BN running stats are first set to the batch statistics of `images` (one training-
    mode pass with momentum 1; the decoder's on the final eval-mode encoder features), then
    perturbed, so every BN differs from identity and the output probabilities are neither uniform
    nor one-hot. Returns the encoder's (final, eval-mode) feature maps of `images`.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in (*encoder.modules(), *decoder.modules()):
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)

    def calibrate(module, run):
        bns = _batchnorms(module)
        for bn in bns:
            bn.momentum = 1.0
        module.train()
        run()
        module.eval()
        for bn in bns:
            n = bn.num_features
            bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(n, generator=gen) * 0.2)
            bn.running_mean.add_(torch.randn(n, generator=gen) * 0.2 * bn.running_var.sqrt())
            bn.running_var.mul_(torch.rand(n, generator=gen) * 0.6 + 0.7)

    calibrate(encoder, lambda: encoder(images, return_feature_maps=True))
    features = encoder(images, return_feature_maps=True)
    calibrate(decoder, lambda: decoder(features, segSize=images.shape[-2:]))
    return features


def csail_file_state(module: nn.Module) -> dict[str, Tensor]:
    """`module.state_dict()` as CSAIL's files hold it: SyncBN extras present, no batch counters."""
    state = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert any(k.endswith("._running_iter") for k in state), "expected CSAIL's SyncBN buffers"
    return state

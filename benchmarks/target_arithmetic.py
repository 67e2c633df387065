"""What the speed targets of docs/benchmarks.md ask of the GPU, in arithmetic (runs on the CPU).

For each target model: the convolution FLOPs of one 512x512 forward pass (150 classes), counted
by torch.utils.flop_counter.FlopCounterMode, the largest single convolution's share of them, and
the sustained TFLOP/s that each img/s target (and CSAIL's fp32 eager figure) stands for. Training:
forward + backward (deep supervision included) of resnet50dilated-ppm_deepsup.

    python benchmarks/target_arithmetic.py            # prints a markdown table
    python benchmarks/target_arithmetic.py --camvid   # the CamVid recipe's candidates instead:
        parameters and training GFLOP per 360x480 image (forward + backward, 11 classes)
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from sceneparse.engine.train import segmentation_loss
from sceneparse.models import build_model

SIZE, CLASSES = 512, 150
# model: (batch-1 target, batch-16 target, CSAIL fp32 eager batch 1, batch 16), img/s, from the issue
TARGETS = {
    ("resnet50dilated", "ppm_deepsup"): (400, 1000, 177, 270),
    ("hrnetv2", "c1"): (200, 600, 23, 210),
    ("resnet50", "upernet"): (None, 700, 77, 172),
    ("mobilenetv2dilated", "c1_deepsup"): (None, 2500, 175, 631),
}
TRAIN_TARGET = 250  # img/s, resnet50dilated-ppm_deepsup, batch 16, 512x512 crops


def forward_flops(encoder: str, decoder: str) -> tuple[float, str, float]:
    """(total FLOPs, name of the costliest leaf convolution, its FLOPs) of one forward pass."""
    model = build_model(encoder, decoder, CLASSES).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, SIZE, SIZE))
    leaves = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)}
    per_conv = {name.removeprefix("Segmenter."): counts.get(torch.ops.aten.convolution, 0)
                for name, counts in counter.get_flop_counts().items()
                if name.removeprefix("Segmenter.") in leaves}
    biggest = max(per_conv, key=per_conv.get)
    return counter.get_total_flops(), biggest, per_conv[biggest]


def training_flops(encoder: str = "resnet50dilated", decoder: str = "ppm_deepsup", size=(SIZE, SIZE),
                   classes: int = CLASSES, **decoder_options) -> float:
    """FLOPs of one image's training step: forward and backward, deep supervision included."""
    model = build_model(encoder, decoder, classes, decoder_options=decoder_options).train()
    images = torch.randn(2, 3, *size)  # 2: training BatchNorm needs more than one sample
    masks = torch.randint(0, classes, (2, *size))
    with FlopCounterMode(display=False) as counter:
        segmentation_loss(model(images), masks, torch.nn.CrossEntropyLoss(), 0.4).backward()
    return counter.get_total_flops() / 2


# The CamVid recipe's candidates (docs/camvid.md): encoder, decoder, decoder options.
CAMVID_MODELS = [
    ("resnet18", "upernet", {"fpn_dim": 128}), ("hrnetv2_w18", "c1", {}), ("resnet18", "unet", {}),
    ("resnet18dilated", "c1_deepsup", {}),
    ("resnet50", "upernet", {"fpn_dim": 256}), ("resnet18dilated", "ppm_deepsup", {}),
    ("resnet50dilated", "ppm_deepsup", {}),
]


def camvid_table() -> None:
    print("| encoder + decoder | parameters | training GFLOP / 360x480 image | output stride |")
    print("| --- | --- | --- | --- |")
    for encoder, decoder, options in CAMVID_MODELS:
        model = build_model(encoder, decoder, 11, decoder_options=options)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        g = training_flops(encoder, decoder, (360, 480), 11, **options) / 1e9
        extra = f" ({', '.join(f'{k} {v}' for k, v in options.items())})" if options else ""
        model.eval()
        with torch.no_grad():  # the decoder's own output, before the Segmenter upsamples it
            stride = 64 // model.decoder(model.encoder(torch.zeros(1, 3, 64, 64))).shape[-1]
        print(f"| {encoder} + {decoder}{extra} | {params:.1f} M | {g:.0f} | {stride} |")


def tflops(gflop: float, img_s: float | None) -> str:
    return "-" if img_s is None else f"{gflop * img_s / 1000:.0f}"


def main() -> None:
    torch.manual_seed(0)
    print("| model | GFLOP / image | largest convolution (share) | TFLOP/s at the b1 / b16 target "
          "| TFLOP/s of CSAIL's fp32 b1 / b16 |")
    print("|---|---|---|---|---|")
    for (encoder, decoder), (b1, b16, csail1, csail16) in TARGETS.items():
        total, biggest, big = forward_flops(encoder, decoder)
        g = total / 1e9
        print(f"| {encoder}-{decoder} | {g:.0f} | `{biggest}` ({big / total:.0%}) | "
              f"{tflops(g, b1)} / {tflops(g, b16)} | {tflops(g, csail1)} / {tflops(g, csail16)} |")
    g = training_flops() / 1e9
    print(f"| training resnet50dilated-ppm_deepsup (forward + backward) | {g:.0f} | - | "
          f"- / {tflops(g, TRAIN_TARGET)} | - |")


if __name__ == "__main__":
    import sys

    camvid_table() if "--camvid" in sys.argv[1:] else main()

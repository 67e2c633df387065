"""What the speed targets of docs/benchmarks.md ask of the GPU, in arithmetic (runs on the CPU).

For each target model: the convolution FLOPs of one 512x512 forward pass (150 classes), counted
by torch.utils.flop_counter.FlopCounterMode, the largest single convolution's share of them, and
the sustained TFLOP/s that each img/s target (and CSAIL's fp32 eager figure) stands for. Training:
forward + backward (deep supervision included) of resnet50dilated-ppm_deepsup.

    python benchmarks/target_arithmetic.py      # prints a markdown table
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


def training_flops() -> float:
    model = build_model("resnet50dilated", "ppm_deepsup", CLASSES).train()
    images = torch.randn(2, 3, SIZE, SIZE)  # 2: training BatchNorm needs more than one sample
    masks = torch.randint(0, CLASSES, (2, SIZE, SIZE))
    with FlopCounterMode(display=False) as counter:
        segmentation_loss(model(images), masks, torch.nn.CrossEntropyLoss(), 0.4).backward()
    return counter.get_total_flops() / 2


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
    main()

"""Pixel-wise training losses: cross-entropy (optionally label-smoothed), OHEM cross-entropy, focal
loss, each optionally plus a soft Dice term. `build_loss(loss_cfg, class_weights)` makes one from
the `train.loss` settings.

All of them skip IGNORE_INDEX pixels, take optional per-class weights, compute in float32 whatever
the autocast dtype of the logits, and avoid host-device synchronisation (no `.item()`, no
data-dependent shapes), so a training step stays asynchronous on a GPU.

Weighted means follow `nn.CrossEntropyLoss`: the sum of each kept pixel's weighted loss over the
sum of their class weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sceneparse.data.meta import IGNORE_INDEX


def _weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    # 0 (with a gradient) when no pixel is kept, instead of 0/0
    return (values * weights).sum() / weights.sum().clamp(min=torch.finfo(values.dtype).tiny)


class _PixelLoss(nn.Module):
    """Shared bookkeeping: the class weights (a buffer: it follows .to(device)) and the ignore index."""

    def __init__(self, weight: Tensor | None = None, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.register_buffer("weight", None if weight is None else weight.float())
        self.ignore_index = ignore_index

    def _per_pixel(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Log-probabilities, log p of each pixel's class, its class weight (0 where ignored), the
        valid mask, and the labels with ignored pixels set to class 0 (safe to index with)."""
        log_probs = F.log_softmax(logits.float(), dim=1)
        valid = target != self.ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        log_p = log_probs.gather(1, safe.unsqueeze(1)).squeeze(1)
        weight = self.weight[safe] if self.weight is not None else torch.ones_like(log_p)
        return log_probs, log_p, weight * valid, valid, safe


class OhemCrossEntropy(_PixelLoss):
    """Cross-entropy over the hard pixels only (online hard example mining, as in the Cityscapes
    recipes of PSPNet/OCNet/HRNet): a pixel is kept when the probability of its true class is at
    most `threshold`, and at least the `min_kept` hardest valid pixels of the batch are kept (the
    threshold rises to the `min_kept`-th smallest probability when fewer are below it)."""

    def __init__(self, threshold: float = 0.7, min_kept: int = 100_000, weight: Tensor | None = None,
                 ignore_index: int = IGNORE_INDEX):
        super().__init__(weight, ignore_index)
        self.threshold, self.min_kept = float(threshold), int(min_kept)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _, log_p, weight, valid, _ = self._per_pixel(logits, target)
        prob = torch.where(valid, log_p.detach().exp(), torch.full_like(log_p, float("inf")))
        flat = prob.flatten()
        k = min(self.min_kept, flat.numel())
        # ignored pixels are +inf, so they sort last: with fewer valid pixels than min_kept the
        # k-th value is inf and every valid pixel is kept
        kth = flat.kthvalue(k).values if k > 0 else flat.new_tensor(float("inf"))
        keep = valid & (prob <= torch.maximum(kth, flat.new_tensor(self.threshold)))
        return _weighted_mean(-log_p, weight * keep)


class FocalLoss(_PixelLoss):
    """Focal loss (Lin et al., ICCV 2017), multi-class: `-(1 - p)^gamma log p` of each pixel's
    class, so well-classified pixels count less. `gamma=0` is cross-entropy; the class weights
    play the part of the paper's alpha."""

    def __init__(self, gamma: float = 2.0, weight: Tensor | None = None, ignore_index: int = IGNORE_INDEX):
        super().__init__(weight, ignore_index)
        self.gamma = float(gamma)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _, log_p, weight, valid, _ = self._per_pixel(logits, target)
        # 1 - p, accurate near p = 1, and kept off 0 (on ignored pixels too, which are multiplied
        # by weight 0 only afterwards): the gradient of q^gamma is infinite at q = 0 for gamma < 1,
        # and inf x 0 is NaN
        q = torch.where(valid, -torch.expm1(log_p), torch.ones_like(log_p)).clamp(min=torch.finfo(log_p.dtype).tiny)
        return _weighted_mean(-(q ** self.gamma) * log_p, weight)


class SoftDiceLoss(_PixelLoss):
    """`1 - mean_c 2|P_c . T_c| / (|P_c| + |T_c|)` over the batch, with P the softmax and T the
    one-hot labels, valid pixels only, over the classes present in the batch's labels (a class
    absent from both would score a free 1). Class weights, if given, weight the mean over classes."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        log_probs, log_p, _, valid, safe = self._per_pixel(logits, target)
        # Per-class sums without a one-hot N x C x H x W tensor (150 classes at 512x512 would make
        # each such tensor 150 MB an image): P.T and |T| by class index, |P| by one contraction.
        on = valid.to(log_p.dtype)
        intersection = log_p.new_zeros(log_probs.shape[1]).scatter_add_(0, safe.flatten(), (log_p.exp() * on).flatten())
        truth = log_p.new_zeros(log_probs.shape[1]).scatter_add_(0, safe.flatten(), on.flatten())
        predicted = torch.einsum("nc...,n...->c", log_probs.exp(), on)
        dice = 2 * intersection / (predicted + truth).clamp(min=1e-6)
        present = (truth > 0).to(log_p.dtype)
        weight = present * (self.weight if self.weight is not None else 1.0)
        return _weighted_mean(1 - dice, weight)  # = 1 - mean dice; 0 when no class is present


class CombinedLoss(nn.Module):
    """`main(logits, target) + dice_weight * dice(logits, target)`."""

    def __init__(self, main: nn.Module, dice: SoftDiceLoss, dice_weight: float):
        super().__init__()
        self.main, self.dice, self.dice_weight = main, dice, float(dice_weight)

    @property
    def weight(self) -> Tensor | None:
        return self.main.weight

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.main(logits, target) + self.dice_weight * self.dice(logits, target)


# train.loss.name -> the main loss from the `train.loss` settings, the class weights and the ignore index
LOSSES = {
    "cross_entropy": lambda cfg, weight, ignore: nn.CrossEntropyLoss(
        weight=weight, ignore_index=ignore, label_smoothing=float(cfg.label_smoothing)),
    "ohem": lambda cfg, weight, ignore: OhemCrossEntropy(cfg.ohem_threshold, cfg.ohem_min_kept, weight, ignore),
    "focal": lambda cfg, weight, ignore: FocalLoss(cfg.focal_gamma, weight, ignore),
}


def build_loss(loss_cfg, weight: Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> nn.Module:
    """The `train.loss` settings (name, label_smoothing, ohem_threshold, ohem_min_kept,
    focal_gamma, dice_weight) as a module `loss(logits, target) -> scalar`."""
    main = LOSSES[loss_cfg.name](loss_cfg, weight, ignore_index)
    if loss_cfg.dice_weight:
        return CombinedLoss(main, SoftDiceLoss(weight, ignore_index), loss_cfg.dice_weight)
    return main

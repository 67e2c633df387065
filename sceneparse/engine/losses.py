"""Pixel-wise training losses: cross-entropy (optionally label-smoothed), OHEM cross-entropy, focal
loss, Lovász-softmax, each optionally plus a soft Dice term and a Lovász-softmax term.
`build_loss(loss_cfg, class_weights)` makes one from the `train.loss` settings.

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
        # k-th value is inf and every valid pixel is kept; min_kept=0: the threshold alone
        kth = flat.kthvalue(k).values if k > 0 else flat.new_tensor(0.0)
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
        # an elementwise product and a sum, not an einsum: autocast would lower its matmul to bf16
        predicted = (log_probs.exp() * on.unsqueeze(1)).transpose(0, 1).flatten(1).sum(1)
        dice = 2 * intersection / (predicted + truth).clamp(min=1e-6)
        present = (truth > 0).to(log_p.dtype)
        weight = present * (self.weight if self.weight is not None else 1.0)
        return _weighted_mean(1 - dice, weight)  # = 1 - mean dice; 0 when no class is present


def _lovasz_jaccard_steps(fg_sorted: Tensor, dtype: torch.dtype) -> Tensor:
    """The steps `J(M_i) - J(M_(i-1))` of the Jaccard loss `J(M) = |M| / |F u M|` (the loss when the
    pixels M are mispredicted, F the class's pixels) along M_i = the first i pixels; a row a class.

    Written in closed form, not as differences of cumsum-built J values: with `a` class pixels and
    `b` others before pixel i (so |F u M_(i-1)| = |F| + b), a class pixel steps by `1 / (|F| + b)`,
    any other by `(|F| - a) / ((|F| + b)(|F| + b + 1))`. Each step, i.e. each pixel's gradient,
    keeps float32's relative precision (~1e-7), where differences of float32 J values near 1 are
    off by a median 2.5% at 10^6 pixels (measured); the counts are integers, exact past 2^24.

    A class without pixels (|F| = 0) gets steps 0 rather than 1, 0, 0, ...: callers weight such
    classes out, and the clamp below only keeps its 0/0 finite."""
    fg = fg_sorted.to(torch.int32)
    fg_before = fg.cumsum(1, dtype=torch.int32) - fg
    position = torch.arange(fg.shape[1], device=fg.device, dtype=torch.int32)
    size = fg.sum(1, keepdim=True, dtype=torch.int32)
    union = (size + position - fg_before).to(dtype).clamp(min=1)  # >= 1 wherever |F| >= 1
    other = (size - fg_before).to(dtype) / (union * (union + 1))
    return torch.where(fg_sorted, 1 / union, other)


class LovaszSoftmaxLoss(_PixelLoss):
    """Lovász-softmax (Berman, Rannen Triki, Blaschko, CVPR 2018): for each class c, the Lovász
    extension of the Jaccard loss (1 - IoU) evaluated at the vector of pixel errors
    `e_i = 1 - p_ic` on the class's pixels and `p_ic` elsewhere, p the softmax in float32:
    `sum_i e_(i) (J(first i) - J(first i-1))`, errors sorted in decreasing order. On one-hot
    probabilities it is exactly 1 - IoU of the class; in between it is its tightest convex
    (piecewise-linear) interpolation, so its gradient pushes mIoU directly.

    As in the paper's defaults for segmentation: all the batch's valid pixels together (not image
    by image: a class's IoU is a dataset-level count), and the mean over the classes present in the
    batch's labels (an absent class would score its largest probability, pushing it down for no
    IoU). Absent classes get weight 0 in the mean rather than being indexed out, so no shape
    depends on the data. Class weights, if given, weight that mean over classes (as SoftDiceLoss
    does): a class's weight scales its whole IoU term, not its pixels.

    Void (ignored) pixels get error 0: they sort after every pixel with a positive error, so they
    never enter the sets whose J steps are multiplied by a positive error, and add 0 themselves.

    Cost: one sort of a C x (N H W) tensor (about 0.5 s for 8 x 19 x 128 x 256 on one CPU thread,
    50x cross-entropy); the sort order and the J steps are kept for backward (with the softmax,
    about 17 bytes a class and pixel: 1.4 GB for 19 classes at 8 x 512 x 1024).

    Offered both as `train.loss.name=lovasz` (alone, as the paper and segmentation_models.pytorch /
    MMSegmentation's LovaszLoss use it) and as `train.loss.lovasz_weight` (a term added to any
    pixel loss, as `dice_weight` does, for the common cross-entropy + Lovász recipe): both are this
    one module, and a single loss name could not express the combination."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        # at least float32 under autocast; float64 stays float64 (gradcheck)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(1)
        num_classes = probs.shape[1]
        probs = probs.transpose(0, 1).reshape(num_classes, -1)  # C x P: the batch's pixels together
        target = target.reshape(1, -1)
        valid = target != self.ignore_index
        classes = torch.arange(num_classes, device=target.device).unsqueeze(1)
        fg = target == classes  # never true on void pixels: ignore_index is no class
        errors = torch.where(fg, 1 - probs, probs)
        errors = torch.where(valid, errors, torch.zeros_like(errors))
        errors, order = errors.sort(dim=1, descending=True)
        with torch.no_grad():  # piecewise linear: the steps are constant where the order is
            steps = _lovasz_jaccard_steps(fg.gather(1, order), errors.dtype)
        per_class = (errors * steps).sum(1)  # elementwise and a sum: no matmul for autocast to lower
        present = fg.any(1).to(per_class.dtype)
        weight = present * (self.weight if self.weight is not None else 1.0)
        return _weighted_mean(per_class, weight)  # 0 (with a gradient) when no class is present


class CombinedLoss(nn.Module):
    """`main(logits, target) + dice_weight * dice(logits, target) + lovasz_weight * lovasz(logits,
    target)`, leaving out a term that is None."""

    def __init__(self, main: nn.Module, dice: SoftDiceLoss | None = None, dice_weight: float = 0.0,
                 lovasz: LovaszSoftmaxLoss | None = None, lovasz_weight: float = 0.0):
        super().__init__()
        self.main, self.dice, self.dice_weight = main, dice, float(dice_weight)
        self.lovasz, self.lovasz_weight = lovasz, float(lovasz_weight)

    @property
    def weight(self) -> Tensor | None:
        return self.main.weight

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = self.main(logits, target)
        if self.dice is not None:
            loss = loss + self.dice_weight * self.dice(logits, target)
        if self.lovasz is not None:
            loss = loss + self.lovasz_weight * self.lovasz(logits, target)
        return loss


# train.loss.name -> the main loss from the `train.loss` settings, the class weights and the ignore index
LOSSES = {
    "cross_entropy": lambda cfg, weight, ignore: nn.CrossEntropyLoss(
        weight=weight, ignore_index=ignore, label_smoothing=float(cfg.label_smoothing)),
    "ohem": lambda cfg, weight, ignore: OhemCrossEntropy(cfg.ohem_threshold, cfg.ohem_min_kept, weight, ignore),
    "focal": lambda cfg, weight, ignore: FocalLoss(cfg.focal_gamma, weight, ignore),
    "lovasz": lambda cfg, weight, ignore: LovaszSoftmaxLoss(weight, ignore),
}


def build_loss(loss_cfg, weight: Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> nn.Module:
    """The `train.loss` settings (name, label_smoothing, ohem_threshold, ohem_min_kept,
    focal_gamma, dice_weight, lovasz_weight) as a module `loss(logits, target) -> scalar`."""
    main = LOSSES[loss_cfg.name](loss_cfg, weight, ignore_index)
    if loss_cfg.dice_weight or loss_cfg.lovasz_weight:
        dice = SoftDiceLoss(weight, ignore_index) if loss_cfg.dice_weight else None
        lovasz = LovaszSoftmaxLoss(weight, ignore_index) if loss_cfg.lovasz_weight else None
        return CombinedLoss(main, dice, loss_cfg.dice_weight, lovasz, loss_cfg.lovasz_weight)
    return main

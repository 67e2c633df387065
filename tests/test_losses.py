"""Training losses (`train.loss`): OHEM, focal and soft Dice checked by hand, Lovász-softmax against
its definition, cross-entropy's options reaching torch's loss, the settings checked at load, and
`train.optimizer`."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from sceneparse.engine.config import load_config
from sceneparse.engine.losses import (CombinedLoss, FocalLoss, LovaszSoftmaxLoss, OhemCrossEntropy, SoftDiceLoss,
                                      build_loss)
from sceneparse.errors import SceneparseError

IGNORE = 255


def two_class_logits(p_class0: list[float]) -> torch.Tensor:
    """1 x 2 x 1 x N logits whose softmax gives class 0 the probabilities `p_class0`."""
    p = torch.tensor(p_class0, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()]).float().view(1, 2, 1, -1)


def test_ohem_keeps_pixels_at_or_below_the_threshold():
    # true class 0 everywhere: probabilities 0.9 (easy), 0.6 and 0.3 (hard), one pixel ignored
    logits = two_class_logits([0.9, 0.6, 0.3, 0.5])
    target = torch.tensor([[[0, 0, 0, IGNORE]]])
    loss = OhemCrossEntropy(threshold=0.7, min_kept=1)(logits, target)
    assert loss.item() == pytest.approx(-(math.log(0.6) + math.log(0.3)) / 2, rel=1e-5)
    # min_kept=0 (Python API; configs ask for >= 1): the threshold alone, not every pixel
    loss = OhemCrossEntropy(threshold=0.7, min_kept=0)(logits, target)
    assert loss.item() == pytest.approx(-(math.log(0.6) + math.log(0.3)) / 2, rel=1e-5)


def test_ohem_keeps_at_least_min_kept_hardest_pixels():
    logits = two_class_logits([0.95, 0.9, 0.8, 0.3])
    target = torch.tensor([[[0, 0, 0, 0]]])
    # one pixel below 0.7, but three wanted: the three least probable (0.3, 0.8, 0.9)
    loss = OhemCrossEntropy(threshold=0.7, min_kept=3)(logits, target)
    assert loss.item() == pytest.approx(-(math.log(0.3) + math.log(0.8) + math.log(0.9)) / 3, rel=1e-5)
    # more wanted than there are valid pixels: all of them (the ignored one never)
    target = torch.tensor([[[0, 0, IGNORE, 0]]])
    loss = OhemCrossEntropy(threshold=0.7, min_kept=100)(logits, target)
    assert loss.item() == pytest.approx(-(math.log(0.95) + math.log(0.9) + math.log(0.3)) / 3, rel=1e-5)


def test_ohem_with_class_weights_is_a_weighted_mean_of_the_kept_pixels():
    logits = two_class_logits([0.6, 0.2, 0.99])  # class-0 probabilities; for class-1 pixels 1 - p
    target = torch.tensor([[[0, 1, 1]]])  # true-class probabilities 0.6, 0.8, 0.01
    weight = torch.tensor([2.0, 0.5])
    loss = OhemCrossEntropy(threshold=0.7, min_kept=1, weight=weight)(logits, target)
    expected = (2.0 * -math.log(0.6) + 0.5 * -math.log(0.01)) / (2.0 + 0.5)  # 0.8 is easy
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss", [OhemCrossEntropy(), FocalLoss(), SoftDiceLoss(), LovaszSoftmaxLoss()])
def test_a_batch_with_no_valid_pixel_gives_zero_with_a_gradient(loss):
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    value = loss(logits, torch.full((1, 2, 2), IGNORE))
    value.backward()
    assert value.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_focal_with_gamma_zero_is_weighted_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=gen)
    target = torch.randint(0, 4, (2, 5, 6), generator=gen)
    target[0, 0] = IGNORE
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0])
    expected = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE)(logits, target)
    assert FocalLoss(gamma=0.0, weight=weight)(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_focal_by_hand():
    logits = two_class_logits([0.9, 0.4])
    target = torch.tensor([[[0, 0]]])
    expected = (-(0.1 ** 2) * math.log(0.9) - (0.6 ** 2) * math.log(0.4)) / 2
    assert FocalLoss(gamma=2.0)(logits, target).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_gradients_stay_finite_on_saturated_and_ignored_pixels(gamma):
    # p rounds to 1 in float32 at a margin of 30: (1 - p)^gamma has an infinite slope there for gamma < 1
    logits = torch.tensor([[30.0, 0.0], [30.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 3).requires_grad_()
    target = torch.tensor([[[0, IGNORE, 0]]])
    FocalLoss(gamma=gamma)(logits, target).backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[..., 1], torch.zeros(1, 2, 1))  # the ignored pixel


def test_soft_dice_by_hand_over_the_classes_present():
    # 3 classes; pixels (true class, softmax): (0, [.7 .2 .1]), (0, [.4 .5 .1]), (1, [.2 .6 .2]);
    # class 2 absent from the labels: not averaged in. A fourth pixel is ignored.
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]], dtype=torch.float64)
    logits = probs.log().T.float().reshape(1, 3, 1, 4)
    target = torch.tensor([[[0, 0, 1, IGNORE]]])
    dice0 = 2 * (0.7 + 0.4) / ((0.7 + 0.4 + 0.2) + 2)
    dice1 = 2 * 0.6 / ((0.2 + 0.5 + 0.6) + 1)
    assert SoftDiceLoss()(logits, target).item() == pytest.approx(1 - (dice0 + dice1) / 2, rel=1e-5)
    weighted = SoftDiceLoss(weight=torch.tensor([3.0, 1.0, 5.0]))(logits, target)
    assert weighted.item() == pytest.approx(1 - (3 * dice0 + dice1) / 4, rel=1e-5)


def test_bf16_logits_are_computed_in_float32():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 5, 8, 8, generator=gen)
    target = torch.randint(0, 5, (1, 8, 8), generator=gen)
    for loss in (OhemCrossEntropy(min_kept=10), FocalLoss(), SoftDiceLoss(), LovaszSoftmaxLoss()):
        low = loss(logits.bfloat16(), target)
        assert low.dtype == torch.float32
        assert low.item() == pytest.approx(loss(logits.bfloat16().float(), target).item(), rel=1e-6)


def test_losses_stay_float32_inside_a_bf16_autocast_region():
    # float32 logits in a bf16 autocast region (the training step's): no matmul inside a loss may
    # be lowered to bf16 (Dice's per-class sums once were, through an einsum)
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 7, 16, 16, generator=gen) * 3
    target = torch.randint(0, 7, (2, 16, 16), generator=gen)
    target[0, :4] = 255
    for loss in (OhemCrossEntropy(min_kept=10), FocalLoss(), SoftDiceLoss(), LovaszSoftmaxLoss()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = loss(logits, target)
        assert inside.item() == pytest.approx(loss(logits, target).item(), rel=1e-6, abs=1e-7), type(loss).__name__


def lovasz_by_definition(probs: list[list[float]], labels: list[int], weight: list[float] | None = None) -> float:
    """Lovász-softmax from the definition, over the valid pixels given (`probs[i][c]`, `labels[i]`):
    for each class in the labels, with errors e_i = 1 - p_ic on its pixels and p_ic elsewhere,
    sorted in decreasing order, sum_i e_(i) (J(first i) - J(first i-1)), J(M) the Jaccard loss of
    the prediction that gets the pixels M wrong, counted with sets; then the (weighted) mean."""
    total = norm = 0.0
    for c in sorted(set(labels)):
        truth = {i for i, y in enumerate(labels) if y == c}
        errors = [1 - p[c] if i in truth else p[c] for i, p in enumerate(probs)]
        order = sorted(range(len(probs)), key=lambda i: -errors[i])

        def jaccard_loss(wrong):
            predicted = truth ^ wrong  # the class's pixels in M are missed, the others in M added
            return 1 - len(predicted & truth) / len(predicted | truth)

        loss = sum(errors[order[i]] * (jaccard_loss(set(order[:i + 1])) - jaccard_loss(set(order[:i])))
                   for i in range(len(order)))
        w = 1.0 if weight is None else weight[c]
        total, norm = total + w * loss, norm + w
    return total / norm


def test_lovasz_is_the_lovasz_extension_of_the_jaccard_loss():
    # 2 images x 4 pixels, 4 classes; class 3 absent from the labels, one pixel ignored, the
    # pixels of both images pooled (class 2 only in the second image)
    gen = torch.Generator().manual_seed(11)
    probs = (3 * torch.randn(2, 4, 1, 4, generator=gen, dtype=torch.float64)).softmax(1)
    target = torch.tensor([[[0, 1, 0, IGNORE]], [[1, 2, 0, 1]]])
    logits = probs.log().float()
    pixels = probs.permute(0, 2, 3, 1).reshape(-1, 4).tolist()  # the pixels in target.flatten()'s order
    labels = target.flatten().tolist()
    kept = [i for i, y in enumerate(labels) if y != IGNORE]
    for c in (0, 1, 2):  # other pixels sort between each class's own: both kinds of J steps count
        assert max(pixels[i][c] for i in kept if labels[i] != c) > min(1 - pixels[i][c] for i in kept if labels[i] == c)
    expected = lovasz_by_definition([pixels[i] for i in kept], [labels[i] for i in kept])
    assert LovaszSoftmaxLoss()(logits, target).item() == pytest.approx(expected, rel=1e-5)
    weight = [2.0, 1.0, 0.5, 7.0]
    expected = lovasz_by_definition([pixels[i] for i in kept], [labels[i] for i in kept], weight)
    loss = LovaszSoftmaxLoss(weight=torch.tensor(weight))(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_lovasz_of_one_hot_probabilities_is_one_minus_the_iou_of_each_class():
    # 4 classes; exact 0/1 probabilities (exp(-200) is 0 in float32) predicting `predicted`.
    # Class 3 is predicted but in no label: left out, as is the ignored pixel's prediction.
    labels = [[0, 0, 1, 1, 2, IGNORE], [0, 1, 1, 2, 2, 2]]
    predicted = [[0, 1, 1, 3, 0, 2], [0, 1, 2, 2, 2, 3]]
    target = torch.tensor(labels).view(2, 1, 6)
    logits = torch.where(torch.nn.functional.one_hot(torch.tensor(predicted), 4).bool(), 0.0, -200.0)
    logits = logits.permute(0, 2, 1).reshape(2, 4, 1, 6)
    pairs = [(y, p) for row, prow in zip(labels, predicted) for y, p in zip(row, prow) if y != IGNORE]
    ious = []
    for c in (0, 1, 2):
        both = sum(1 for y, p in pairs if y == c and p == c)
        either = sum(1 for y, p in pairs if y == c or p == c)
        ious.append(both / either)
    # by hand: each class right on 2 of the pixels labelled or predicted so, of 4, 5 and 5
    assert ious == [2 / 4, 2 / 5, 2 / 5]
    loss = LovaszSoftmaxLoss()(logits, target)
    assert loss.item() == pytest.approx(sum(1 - iou for iou in ious) / 3, rel=1e-6)


def test_lovasz_ignores_void_pixels_and_absent_classes():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 4, 1, 8, generator=gen, requires_grad=True)
    target = torch.tensor([[[0, 1, IGNORE, 2, 0, IGNORE, 1, IGNORE]]])  # class 3 absent
    kept = [0, 1, 3, 4, 6]
    value = LovaszSoftmaxLoss()(logits, target)
    value.backward()
    # the same as a batch without those pixels, and no gradient reaches them
    alone = logits.detach()[..., kept].requires_grad_()
    expected = LovaszSoftmaxLoss()(alone, target[..., kept])
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(logits.grad[..., kept], alone.grad)
    assert torch.equal(logits.grad[..., [2, 5, 7]], torch.zeros(1, 4, 1, 3))
    # whatever the void pixels' logits, however large
    noisy = logits.detach().clone()
    noisy[..., [2, 5, 7]] = torch.tensor([50.0, -50.0, 0.0, 9.0]).view(1, 4, 1, 1)
    assert LovaszSoftmaxLoss()(noisy, target).item() == pytest.approx(value.item(), rel=1e-6)
    # an absent class's weight changes nothing: it is not in the mean
    for w in (0.0, 1.0, 100.0):
        weighted = LovaszSoftmaxLoss(weight=torch.tensor([1.0, 1.0, 1.0, w]))(logits.detach(), target)
        assert weighted.item() == pytest.approx(value.item(), rel=1e-6)


def test_lovasz_gradients_are_finite_and_match_finite_differences():
    # saturated logits (errors exactly 0 or 1, with ties), ignored pixels, an absent class
    logits = torch.tensor([[30.0, 0.0, -30.0], [0.0, 1000.0, 0.0], [5.0, 5.0, 5.0], [-1000.0, 0.0, 1000.0]])
    logits = logits.T.reshape(1, 3, 1, 4).requires_grad_()
    target = torch.tensor([[[0, 1, IGNORE, 0]]])
    LovaszSoftmaxLoss(weight=torch.tensor([1.0, 2.0, 3.0]))(logits, target).backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[..., 2], torch.zeros(1, 3, 1))
    # away from ties the loss is linear in the errors: its autograd gradient is the true one
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (2, 2, 3), generator=gen)
    target[0, 0, 0] = IGNORE
    loss = LovaszSoftmaxLoss(weight=torch.tensor([1.0, 0.5, 2.0]))
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits,))


def test_lovasz_under_bf16_autocast_is_computed_in_float32():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 5, 16, 16, generator=gen)
    target = torch.randint(0, 5, (2, 16, 16), generator=gen)
    target[:, :3] = IGNORE
    loss = LovaszSoftmaxLoss(weight=torch.tensor([0.5, 1.0, 2.0, 1.5, 3.0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss(logits.bfloat16(), target)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(loss(logits.bfloat16().float(), target).item(), rel=1e-6)
    assert low.item() == pytest.approx(loss(logits, target).item(), rel=1e-2)  # bf16's rounding of the logits


def loss_settings(*overrides):
    return load_config(None, [f"train.loss.{o}" for o in overrides]).train.loss


def test_build_loss_makes_what_the_settings_say():
    weight = torch.tensor([1.0, 2.0])
    ce = build_loss(loss_settings("label_smoothing=0.1"), weight)
    assert isinstance(ce, torch.nn.CrossEntropyLoss) and ce.label_smoothing == 0.1 and ce.ignore_index == IGNORE
    assert torch.equal(ce.weight, weight)
    ohem = build_loss(loss_settings("name=ohem", "ohem_threshold=0.5", "ohem_min_kept=7"))
    assert isinstance(ohem, OhemCrossEntropy) and (ohem.threshold, ohem.min_kept) == (0.5, 7)
    focal = build_loss(loss_settings("name=focal", "focal_gamma=1.5", "dice_weight=0.5"), weight)
    assert isinstance(focal, CombinedLoss) and isinstance(focal.main, FocalLoss) and focal.main.gamma == 1.5
    assert torch.equal(focal.weight, weight)
    logits = torch.randn(1, 2, 3, 3)
    target = torch.randint(0, 2, (1, 3, 3))
    expected = FocalLoss(1.5, weight)(logits, target) + 0.5 * SoftDiceLoss(weight)(logits, target)
    assert focal(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    lovasz = build_loss(loss_settings("name=lovasz"), weight)
    assert isinstance(lovasz, LovaszSoftmaxLoss) and torch.equal(lovasz.weight, weight)
    assert lovasz.ignore_index == IGNORE
    both = build_loss(loss_settings("lovasz_weight=0.75", "dice_weight=0.5"), weight)
    assert isinstance(both, CombinedLoss) and isinstance(both.main, torch.nn.CrossEntropyLoss)
    expected = (torch.nn.CrossEntropyLoss(weight, ignore_index=IGNORE)(logits, target)
                + 0.5 * SoftDiceLoss(weight)(logits, target) + 0.75 * LovaszSoftmaxLoss(weight)(logits, target))
    assert both(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert build_loss(loss_settings("name=ohem", "lovasz_weight=1")).dice is None


@pytest.mark.parametrize("override, message", [
    ("train.loss.name=dice", "train.loss.name='dice' is not one of cross_entropy, ohem, focal, lovasz"),
    ("train.loss.label_smoothing=1.5", "train.loss.label_smoothing=1.5: expected a value in 0..1"),
    ("train.loss.ohem_threshold=0", "expected a probability in (0, 1]"),
    ("train.loss.ohem_min_kept=0", "expected a positive pixel count"),
    ("train.loss.dice_weight=-1", "train.loss.dice_weight=-1.0: expected a weight >= 0"),
    ("train.loss.focal_gamma=-1", "train.loss.focal_gamma=-1.0: expected a value >= 0"),
    ("train.loss.lovasz_weight=-1", "train.loss.lovasz_weight=-1.0: expected a weight >= 0"),
    ("train.loss.name=lovasz train.loss.lovasz_weight=1", "train.loss.name is lovasz already"),
    ("train.loss=ohem", "train.loss is a section, not a value"),
    ("train.loss.name=focal train.loss.label_smoothing=0.1",
     "train.loss.label_smoothing=0.1 only applies to train.loss.name=cross_entropy, not focal"),
    ("train.loss.ohem_min_kept=5000", "train.loss.ohem_min_kept=5000 only applies to train.loss.name=ohem, "
                                      "not cross_entropy: it would do nothing"),
    ("train.loss.name=lovasz train.loss.focal_gamma=1 train.loss.ohem_threshold=0.8",
     "train.loss.ohem_threshold=0.8, train.loss.focal_gamma=1.0 only apply to train.loss.name=focal or ohem"),
    ("train.se_weight=-1", "train.se_weight=-1.0: expected a weight >= 0"),
    ("train.deepsup_weight=-0.4", "train.deepsup_weight=-0.4: expected a weight >= 0"),
    ("train.optimizer=adam", "train.optimizer='adam' is not one of sgd, adamw"),
])
def test_bad_loss_and_optimizer_settings_are_refused_at_load(override, message):
    with pytest.raises(SceneparseError) as err:
        load_config(None, override.split())
    assert message in err.value.message


def test_config_files_can_set_the_loss_as_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(OmegaConf.to_yaml({"train": {"loss": {"name": "ohem", "ohem_min_kept": 5000}}}))
    loss = load_config(path).train.loss
    assert (loss.name, loss.ohem_min_kept, loss.ohem_threshold) == ("ohem", 5000, 0.7)

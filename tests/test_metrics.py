"""ConfusionMatrix against hand-worked examples and against CSAIL's evaluation formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from sceneparse.engine.metrics import IGNORE_INDEX, ConfusionMatrix
from sceneparse.errors import SceneparseError

I = IGNORE_INDEX


def _example() -> tuple[torch.Tensor, torch.Tensor]:
    # (target, prediction) pairs, row-major:
    # (0,0) (0,1) (1,1) (1,1) / (2,2) (2,0) (255,2) (1,2)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, I, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    return pred, target


def test_hand_computed_three_classes_with_ignore():
    pred, target = _example()
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    # rows = target, columns = prediction; the ignored pixel (255 -> predicted 2) is not counted.
    assert cm.matrix.tolist() == [[1, 1, 0],
                                  [0, 2, 1],
                                  [1, 0, 1]]
    r = cm.compute()
    # 7 labelled pixels, diagonal 1 + 2 + 1 = 4 correct.
    assert r["labelled_pixels"] == 7 and r["ignored_pixels"] == 1
    assert r["pixel_accuracy"] == pytest.approx(4 / 7)
    # target sums (2, 3, 2), prediction sums (2, 3, 2):
    # IoU0 = 1 / (2 + 2 - 1) = 1/3, IoU1 = 2 / (3 + 3 - 2) = 1/2, IoU2 = 1 / (2 + 2 - 1) = 1/3
    assert r["iou"] == pytest.approx([1 / 3, 1 / 2, 1 / 3])
    assert r["mean_iou"] == pytest.approx(7 / 18)
    # accuracy (recall) = 1/2, 2/3, 1/2 -> mean 5/9
    assert r["accuracy"] == pytest.approx([1 / 2, 2 / 3, 1 / 2])
    assert r["mean_accuracy"] == pytest.approx(5 / 9)
    # overall score = (7/18 + 4/7) / 2 = 121/252
    assert r["score"] == pytest.approx(121 / 252)
    assert r["class_pixels"] == [2, 3, 2]


def test_absent_classes_are_nan_and_left_out_of_means():
    # 4 classes: class 2 is neither a target nor predicted; class 3 is predicted once but never a
    # target. Pairs: (0,0) (0,3) (1,1).
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 3, 1]), torch.tensor([0, 0, 1]))
    r = cm.compute()
    iou, acc = r["iou"], r["accuracy"]
    # IoU0 = 1 / (2 + 1 - 1) = 1/2, IoU1 = 1/1, IoU2 absent -> NaN, IoU3 = 0 / (0 + 1 - 0) = 0
    assert iou[0] == pytest.approx(0.5) and iou[1] == 1.0 and math.isnan(iou[2]) and iou[3] == 0.0
    assert r["mean_iou"] == pytest.approx((0.5 + 1 + 0) / 3)
    # accuracy only where the class is a target: 1/2, 1, NaN, NaN -> mean 3/4
    assert acc[:2] == [0.5, 1.0] and math.isnan(acc[2]) and math.isnan(acc[3])
    assert r["mean_accuracy"] == pytest.approx(0.75)
    assert r["pixel_accuracy"] == pytest.approx(2 / 3)


def test_updates_accumulate_and_reset_clears():
    pred, target = _example()
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    cm.update(pred[None], target[None])  # any shape, as long as both agree
    assert cm.matrix.sum().item() == 14
    assert cm.compute()["pixel_accuracy"] == pytest.approx(4 / 7)
    cm.reset()
    assert cm.matrix.sum().item() == 0
    assert math.isnan(cm.compute()["pixel_accuracy"])


def test_only_ignored_pixels_count_nothing():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([I, I]))
    assert cm.matrix.sum().item() == 0 and cm.compute()["ignored_pixels"] == 2


def test_out_of_range_label_is_reported():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))  # 7 is neither a class nor ignore
    with pytest.raises(SceneparseError, match="outside 0..2"):
        cm.compute()


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        ConfusionMatrix(3).update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))


# --- CSAIL's formulas (mit_semseg utils.accuracy / intersectionAndUnion), written out independently
# with numpy: labels are shifted to -1 for unlabelled, accuracy is averaged over images weighted by
# labelled pixels, intersection and union are summed over images and IoU = I / (U + 1e-10).
def _csail_style(preds: list[np.ndarray], labels: list[np.ndarray], num_class: int):
    acc_sum, pix_sum = 0.0, 0
    inter = np.zeros(num_class)
    union = np.zeros(num_class)
    for p, l in zip(preds, labels):
        valid = l >= 0
        pix = valid.sum()
        acc = (valid & (p == l)).sum() / (pix + 1e-10)
        acc_sum += acc * pix
        pix_sum += pix
        p1 = (p + 1) * valid  # predictions on unlabelled pixels are dropped (become 0)
        l1 = l + 1
        hit = p1 * (p1 == l1)
        a_i = np.histogram(hit, bins=num_class, range=(1, num_class))[0]
        a_p = np.histogram(p1, bins=num_class, range=(1, num_class))[0]
        a_l = np.histogram(l1, bins=num_class, range=(1, num_class))[0]
        inter += a_i
        union += a_p + a_l - a_i
    iou = inter / (union + 1e-10)
    return acc_sum / pix_sum, iou


def test_matches_csail_formulas_on_random_data():
    rng = np.random.default_rng(0)
    num_class = 12
    preds, labels = [], []
    cm = ConfusionMatrix(num_class)
    for h, w in [(31, 47), (64, 40), (17, 90)]:
        label = rng.integers(0, num_class, size=(h, w))
        label[rng.random((h, w)) < 0.15] = -1  # CSAIL's unlabelled value
        # a noisy copy, so accuracy and IoU are neither 0 nor 1
        pred = np.where(rng.random((h, w)) < 0.6, label.clip(0), rng.integers(0, num_class, size=(h, w)))
        preds.append(pred)
        labels.append(label)
        ours = torch.from_numpy(np.where(label < 0, I, label))
        cm.update(torch.from_numpy(pred), ours)
    acc, iou = _csail_style(preds, labels, num_class)
    r = cm.compute()
    assert r["pixel_accuracy"] == pytest.approx(acc, rel=1e-9)
    assert r["iou"] == pytest.approx(iou.tolist(), rel=1e-8)
    assert r["mean_iou"] == pytest.approx(iou.mean(), rel=1e-8)  # every class occurs here


def test_all_reduce_leaves_one_process_alone(tmp_path):
    """Without a process group, or in a group of one, the matrix stays as it is (the sum over
    several processes is tested in test_distributed.py, against one process)."""
    cm = ConfusionMatrix(3)
    pred, target = _example()
    cm.update(pred, target)
    cm.all_reduce()  # not initialised: no-op
    assert cm.matrix.sum().item() == 7
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        cm.all_reduce()
        assert cm.matrix.sum().item() == 7
    finally:
        dist.destroy_process_group()

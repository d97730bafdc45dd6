"""MeanIoU against explicit per-class pixel counting."""

import copy

import numpy as np
import pytest
import torch
from reference_miou import reference_scores

from refvision.metrics import MeanIoU
from refvision.outputs.tables import format_table

IGNORE = 255


def random_batch(seed: int, num_classes: int, absent: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and targets ``(B, H, W)`` that agree on ~60 % of pixels, ~10 % ignored.

    Classes in ``absent`` appear in neither.
    """
    rng = np.random.default_rng(seed)
    present = np.array([c for c in range(num_classes) if c not in absent])
    shape = (int(rng.integers(1, 4)), int(rng.integers(5, 30)), int(rng.integers(5, 30)))
    target = rng.choice(present, size=shape)
    preds = np.where(rng.random(shape) < 0.6, target, rng.choice(present, size=shape))
    target = np.where(rng.random(shape) < 0.1, IGNORE, target)
    return torch.from_numpy(preds), torch.from_numpy(target)


def assert_matches_reference(result: dict, preds: np.ndarray, target: np.ndarray, num_classes: int) -> None:
    expected = reference_scores(preds, target, num_classes, IGNORE)
    for key, value in expected.items():
        np.testing.assert_allclose(result[key].numpy(), value, rtol=0, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("seed", range(12))
def test_matches_per_class_counting(seed: int) -> None:
    num_classes = 2 + seed % 5
    metric = MeanIoU(num_classes)
    batches = [random_batch(seed * 10 + k, num_classes) for k in range(3)]
    for preds, target in batches:
        metric.update(preds, target)
    all_preds = np.concatenate([p.flatten().numpy() for p, _ in batches])
    all_target = np.concatenate([t.flatten().numpy() for _, t in batches])
    assert_matches_reference(metric.compute(), all_preds, all_target, num_classes)


def test_scores_input_takes_the_argmax() -> None:
    preds, target = random_batch(0, 4)
    logits = torch.randn(*preds.shape, 4)
    # make the given class the largest score at every pixel, then move C to dim 1
    logits.scatter_(-1, preds.unsqueeze(-1), logits.abs().amax(-1, keepdim=True) + 1.0)
    logits = logits.permute(0, 3, 1, 2)
    from_ids, from_scores = MeanIoU(4), MeanIoU(4)
    from_ids.update(preds, target)
    from_scores.update(logits.softmax(dim=1), target)
    assert torch.equal(from_ids.confmat, from_scores.confmat)


def test_class_absent_from_both_is_nan_and_excluded() -> None:
    preds, target = random_batch(3, 5, absent=(2,))
    metric = MeanIoU(5)
    metric.update(preds, target)
    result = metric.compute()
    assert torch.isnan(result["iou_per_class"][2])
    assert not torch.isnan(result["iou_per_class"][[0, 1, 3, 4]]).any()
    assert result["miou"].item() == pytest.approx(result["iou_per_class"][[0, 1, 3, 4]].mean().item(), abs=1e-15)
    assert_matches_reference(result, preds.numpy(), target.numpy(), 5)


def test_predicted_but_absent_from_target_counts_as_zero() -> None:
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    preds = torch.tensor([[[0, 0], [0, 1]]])
    metric = MeanIoU(3)
    metric.update(preds, target)
    result = metric.compute()
    torch.testing.assert_close(
        result["iou_per_class"], torch.tensor([0.75, 0.0, float("nan")], dtype=torch.float64), equal_nan=True
    )
    assert result["miou"].item() == pytest.approx(0.375)
    assert result["mean_accuracy"].item() == pytest.approx(0.75)  # class 1 is not in the target


def test_ignored_pixels_do_not_count_whatever_is_predicted() -> None:
    target = torch.full((1, 3, 3), IGNORE)
    target[0, 0, 0] = 1
    preds = torch.zeros(1, 3, 3, dtype=torch.long)
    preds[0, 0, 0] = 1
    metric = MeanIoU(2)
    metric.update(preds, target)
    assert metric.confmat.tolist() == [[0, 0], [0, 1]]


def test_merge_and_sum_reduction_equal_one_instance() -> None:
    batches = [random_batch(40 + k, 6) for k in range(4)]
    single, first, second = MeanIoU(6), MeanIoU(6), MeanIoU(6)
    for k, (preds, target) in enumerate(batches):
        single.update(preds, target)
        (first if k % 2 else second).update(preds, target)
    merged = copy.deepcopy(first)
    merged.merge_state(second)
    assert torch.equal(merged.confmat, single.confmat)
    gathered = copy.deepcopy(first)
    gathered._sync_dist(dist_sync_fn=lambda t, group=None: [first.confmat, second.confmat])
    assert torch.equal(gathered.confmat, single.confmat)


def test_deterministic_mode_counts_the_same() -> None:
    preds, target = random_batch(7, 5)
    fast = MeanIoU(5)
    fast.update(preds, target)
    deterministic = MeanIoU(5)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        deterministic.update(preds, target)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(fast.confmat, deterministic.confmat)


@pytest.mark.parametrize(
    ("preds", "target", "message"),
    [
        (torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long), r"same \(B, H, W\)"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), r"\(B, 4, H, W\) scores for 4 classes"),
        (torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), "preds: expected integer class ids"),
        (torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4), "target: expected an integer tensor"),
        (torch.full((1, 4, 4), 4), torch.zeros(1, 4, 4, dtype=torch.long), r"preds: expected class ids in 0..3, got 4"),
        (
            torch.zeros(1, 4, 4, dtype=torch.long),
            torch.full((1, 4, 4), 7),
            r"target: expected class ids in 0..3 or ignore_index 255, got 7",
        ),
        (torch.zeros(1, 4, 4, dtype=torch.long), torch.full((1, 4, 4), -1), r"target: .* got -1"),
    ],
)
def test_bad_inputs_raise(preds, target, message) -> None:
    with pytest.raises(ValueError, match=message):
        MeanIoU(4).update(preds, target)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ignore_index"):
        MeanIoU(4, ignore_index=3)
    with pytest.raises(ValueError, match="class_names: expected 4 names"):
        MeanIoU(4, class_names=["a"])


def test_format_table() -> None:
    metric = MeanIoU(3, class_names=["road", "sky", "car"])
    metric.update(torch.tensor([[[0, 0], [0, 1]]]), torch.zeros(1, 2, 2, dtype=torch.long))
    lines = format_table(metric.compute(), metric.class_names).splitlines()
    assert [line.split() for line in lines[2:5]] == [["road", "75.00"], ["sky", "0.00"], ["car", "-"]]
    assert lines[-1].split() == ["mIoU", "37.50"]

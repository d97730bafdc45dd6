"""MixUp / CutMix on classification training batches, against an independent computation of the loss
on the mixed batch the network saw."""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from refvision.tasks.classification import ClassificationTask

C, LABEL_SMOOTHING = 5, 0.1


def _task(**options: float) -> ClassificationTask:
    torch.manual_seed(0)
    task = ClassificationTask(
        backbone="resnet18", num_classes=C, image_size=32, label_smoothing=LABEL_SMOOTHING, **options
    )
    task.log = lambda *args, **kwargs: None  # training_step logs; no Trainer here
    return task.train()


def _step(task: ClassificationTask, images: Tensor, labels: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """The loss of one training step, and the [0, 1] images and logits the network saw."""
    seen: dict[str, Tensor] = {}
    hook = task.model.register_forward_hook(
        lambda module, args, output: seen.update(inputs=args[0].detach(), logits=output.detach())
    )
    torch.manual_seed(seed)
    loss = task.training_step((images, labels), 0)
    hook.remove()
    mean, std = torch.tensor(task.mean).view(3, 1, 1), torch.tensor(task.std).view(3, 1, 1)
    return loss.detach(), seen["inputs"] * std + mean, seen["logits"]


def _reference_loss(logits: Tensor, labels: Tensor, lam: float) -> Tensor:
    """Cross-entropy with the mixed one-hot targets, label smoothing on top (torchvision's references)."""
    one_hot = F.one_hot(labels, C).double()
    soft = lam * one_hot + (1 - lam) * one_hot.roll(1, 0)
    smoothed = soft * (1 - LABEL_SMOOTHING) + LABEL_SMOOTHING / C
    return -(smoothed * logits.double().log_softmax(1)).sum(1).mean()


@pytest.fixture
def batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, 32, 32, generator=generator), torch.tensor([0, 3, 1, 4])


def test_both_alphas_zero_leave_the_step_unchanged(batch: tuple[Tensor, Tensor]) -> None:
    images, labels = batch
    task = _task()
    assert task.batch_mixing is None
    loss, seen, logits = _step(task, images, labels, seed=0)
    torch.testing.assert_close(seen, images, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, label_smoothing=LABEL_SMOOTHING))


def test_mixup_loss_is_cross_entropy_on_the_mixed_soft_targets(batch: tuple[Tensor, Tensor]) -> None:
    images, labels = batch
    loss, seen, logits = _step(_task(mixup_alpha=0.4), images, labels, seed=2)
    # The network saw lam * x + (1 - lam) * x.roll(1): recover lam by least squares and check the rest.
    other = images.roll(1, 0)
    lam = float(((seen - other) * (images - other)).sum() / ((images - other) ** 2).sum())
    assert 0 < lam < 1
    torch.testing.assert_close(seen, lam * images + (1 - lam) * other, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss.double(), _reference_loss(logits, labels, lam), rtol=1e-5, atol=1e-6)


def test_cutmix_loss_weights_the_labels_by_the_pasted_area(batch: tuple[Tensor, Tensor]) -> None:
    images, labels = batch
    for seed in range(20):  # a seed whose box is neither empty nor the whole image
        loss, seen, logits = _step(_task(cutmix_alpha=1.0), images, labels, seed=seed)
        pasted = (seen - images).abs().amax(dim=(0, 1)) > 1e-5  # (H, W): where the rolled batch shows
        if 0 < int(pasted.sum()) < pasted.numel():
            break
    rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
    box = torch.zeros_like(pasted)
    box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    assert torch.equal(pasted, box)  # one rectangle
    torch.testing.assert_close(seen, torch.where(box, images.roll(1, 0), images), rtol=0, atol=1e-5)
    lam = 1 - float(box.double().mean())
    torch.testing.assert_close(loss.double(), _reference_loss(logits, labels, lam), rtol=1e-5, atol=1e-6)


def test_both_alphas_pick_one_of_the_two_per_batch(batch: tuple[Tensor, Tensor]) -> None:
    images, labels = batch
    task = _task(mixup_alpha=0.4, cutmix_alpha=1.0)
    kinds = set()
    for seed in range(12):
        _, seen, _ = _step(task, images, labels, seed=seed)
        changed = (seen - images).abs().amax(dim=(0, 1)) > 1e-5
        kinds.add("mixup" if bool(changed.all()) else "cutmix")
    assert kinds == {"mixup", "cutmix"}


def test_negative_alpha_is_refused() -> None:
    with pytest.raises(ValueError, match=r"model.mixup_alpha=-1.*expected >= 0"):
        _task(mixup_alpha=-1.0)

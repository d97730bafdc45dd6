"""The speed options a GPU user expects (``model.channels_last``, ``model.compile``) and the GPU check
(``make gpu-check``), both walked on CPU: the options against the eager contiguous network, the check
by its ``--dry-run``."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from refvision.nn import DRConv, RefConv
from refvision.tasks.classification import ClassificationTask

REPO = Path(__file__).resolve().parents[1]


class TinyClassification(ClassificationTask):
    """ClassificationTask on a 4-layer network (a stem conv for RefConv, a 1x1 conv for DRConv)."""

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, self.num_classes),
        )


def _task(**options: bool) -> TinyClassification:
    """The tiny task with a RefConv stem and a DRConv 1x1 conv, the same weights on every call, set
    up as a Trainer sets it up."""
    torch.manual_seed(0)
    task = TinyClassification(num_classes=3, image_size=16, conv={"kind": "refconv", "select": "kxk"}, **options)
    with torch.no_grad():  # a trained refocusing transform, not the initial one
        task.model[0].refocus_weight.normal_(std=0.1)
    task.model = _with_drconv(task.model)
    task.setup("fit")
    return task


def _with_drconv(model: nn.Sequential) -> nn.Sequential:
    torch.manual_seed(1)
    model[3] = DRConv.from_conv(model[3], regions=4)
    with torch.no_grad():  # regions that differ
        model[3].generator.expand_weight.normal_(std=0.5)
    return model


def _step(task: TinyClassification, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits of a training forward and the gradients of its loss."""
    task.train()
    task.zero_grad(set_to_none=True)
    images, labels = task.on_after_batch_transfer((images, labels), 0)
    logits = task(images)
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), {name: p.grad for name, p in task.named_parameters() if p.grad is not None}


def test_speed_options_are_off_by_default_and_keep_checkpoint_keys() -> None:
    task = TinyClassification(num_classes=3)
    assert (task.channels_last, task.compile_network) == (False, False)
    assert TinyClassification(num_classes=3, channels_last=True, compile=True).hparams["compile"] is True
    plain, sped_up = _task(), _task(channels_last=True, compile=True)
    assert list(sped_up.state_dict()) == list(plain.state_dict())


def test_channels_last_gives_the_contiguous_outputs_and_gradients() -> None:
    plain, channels_last = _task(), _task(channels_last=True)
    assert channels_last.model[0].weight.is_contiguous(memory_format=torch.channels_last)  # RefConv's basis
    assert not channels_last.model[0].weight.is_contiguous()
    seen = []
    channels_last.model[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    logits, grads = _step(plain, images, labels)
    cl_logits, cl_grads = _step(channels_last, images, labels)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    torch.testing.assert_close(cl_logits, logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == cl_grads.keys() and {"model.0.refocus_weight", "model.3.guide_weight"} <= grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(cl_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert isinstance(channels_last.model[0], RefConv)


@pytest.mark.slow
def test_compiled_network_gives_the_eager_outputs_and_gradients() -> None:
    plain, compiled = _task(), _task(compile=True)
    compiling = []
    compiled.model[3].register_forward_pre_hook(lambda *_: compiling.append(torch.compiler.is_compiling()))
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    logits, grads = _step(plain, images, labels)
    compiled_logits, compiled_grads = _step(compiled, images, labels)
    assert compiling and all(compiling), "the network did not run compiled"
    torch.testing.assert_close(compiled_logits, logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == compiled_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    plain.eval(), compiled.eval()
    with torch.no_grad():  # eager eval on CPU takes DRConv's grouped layout, the compiled one the tiled
        torch.testing.assert_close(compiled(images), plain(images), rtol=1e-5, atol=1e-5)


DRCONV_VIEW_BUG = "Output 0 of _RegionConvFunction is a view and is being modified inplace"
"""DRConv's output is a view made inside its autograd Function, so an in-place op on it (the
in-place ReLU after every conv of SSD300-VGG16's backbone) fails in training."""

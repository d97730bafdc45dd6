"""``init_from`` misfits explained in the terms of their fix, on real files: a torchvision classifier for
1000 classes given to a 4-class task (a new head), timm weights given to a torchvision backbone."""

import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from refvision.tasks.classification import ClassificationTask


def _error(**options: object) -> str:
    with pytest.raises(ValueError) as info:
        ClassificationTask(**options)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_a_head_for_other_classes_is_named_with_both_sizes_and_the_fix(tmp_path: Path) -> None:
    source = torchvision.models.resnet18(weights=None, num_classes=1000)
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    message = _error(backbone="resnet18", num_classes=4, init_from=str(path))
    assert message.startswith(f"model.init_from='{path}' has another head: fc has 1000 classes in the file and 4 ")
    assert f"the other {len(source.state_dict()) - 2} tensors fit" in message
    assert "--model.init_strict false" in message
    # The fix named works: every tensor but the head's is the file's.
    task = ClassificationTask(backbone="resnet18", num_classes=4, init_from=str(path), init_strict=False)
    loaded = task.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items() if not k.startswith("fc."))
    assert loaded["fc.weight"].shape == (4, 512)


def test_timm_weights_for_a_torchvision_backbone_suggest_the_timm_backbone(tmp_path: Path) -> None:
    source = timm.create_model("mobilenetv2_100", pretrained=False)
    path = tmp_path / "timm_mobilenetv2.pth"
    torch.save(source.state_dict(), path)
    message = _error(backbone="mobilenet_v2", num_classes=1000, init_from=str(path))
    count = len(source.state_dict())
    assert f"0 tensors loaded, {count} missing, {count} unexpected" in message
    assert re.search(r"holds timm's mobilenetv2_100 weights \(keys conv_stem\.weight, bn1\.weight", message), message
    assert "features.0.0.weight" in message
    assert "num_batches_tracked" not in message and "running_mean" not in message
    assert message.endswith("pass --model.backbone timm:mobilenetv2_100 to build the model they are for")
    # The backbone suggested takes the file exactly.
    task = ClassificationTask(backbone="timm:mobilenetv2_100", num_classes=1000, init_from=str(path))
    assert all(torch.equal(task.model.state_dict()[k], v) for k, v in source.state_dict().items())


def test_timm_resnet_weights_share_torchvisions_keys_and_load_without_a_suggestion(tmp_path: Path) -> None:
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "timm_resnet18.pth"
    torch.save(source.state_dict(), path)
    task = ClassificationTask(backbone="resnet18", num_classes=1000, init_from=str(path))
    assert all(torch.equal(task.model.state_dict()[k], v) for k, v in source.state_dict().items())
    # A 4-class task: the head, not the library, is what differs.
    assert "has another head: fc has 1000 classes" in _error(backbone="resnet18", num_classes=4, init_from=str(path))


def test_other_misfits_list_weights_not_batchnorm_counters(tmp_path: Path) -> None:
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "no_layer4.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, path)
    message = _error(backbone="resnet18", num_classes=1000, init_from=str(path))
    missing = re.search(r"missing: ([^;]*);", message).group(1)
    assert missing.startswith("layer4.0.conv1.weight, layer4.0.bn1.weight") and "num_batches_tracked" not in missing
    assert "--model.init_strict false" in message

"""``--model.init_from`` with checkpoints written the way torchvision's reference scripts, OpenMMLab, timm and smp
write them."""

import argparse
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torchvision
from mmengine.runner.checkpoint import save_checkpoint
from safetensors.torch import save_file

from refvision.app.cli import lightning_cli
from refvision.app.demo.data import write_cityscapes, write_imagefolder


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("data") / "images", train_per_class=1, val_per_class=1, size=32)


def _classifier(images: Path, backbone: str, init_from: Path, *extra: str) -> torch.nn.Module:
    cli = lightning_cli(
        [
            "-c",
            "configs/demo/classification.yaml",
            "--data.root",
            str(images),
            "--model.backbone",
            backbone,
            "--model.init_from",
            str(init_from),
            "--trainer.logger",
            "false",
            *extra,
        ],
        run=False,
    )
    return cli.model.model


def _assert_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def _trained_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    return optimizer


def test_torchvision_reference_checkpoint(tmp_path: Path, images: Path) -> None:
    # references/classification/train.py: checkpoint = {"model", "optimizer", "lr_scheduler", "epoch", "args"}
    source = torchvision.models.resnet18(weights=None, num_classes=4)
    optimizer = _trained_optimizer(source)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[16, 22])  # state holds a Counter
    args = argparse.Namespace(model="resnet18", lr=0.1, epochs=26, lr_steps=[16, 22], device="cuda", weights=None)
    path = tmp_path / "model_25.pth"
    torch.save(
        {
            "model": source.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "epoch": 25,
            "args": args,
        },
        path,
    )
    _assert_equal(_classifier(images, "resnet18", path), source.state_dict())


def test_openmmlab_mmpretrain_resnet_checkpoint_maps_to_torchvision(tmp_path: Path, images: Path) -> None:
    # MMPretrain ImageClassifier(backbone=ResNet(depth=18), head=LinearClsHead): the key names of its
    # ResNet (mmpretrain/models/backbones/resnet.py) are torchvision's under "backbone.", the head's "head.fc.".
    source = torchvision.models.resnet18(weights=None, num_classes=4)
    state = {("head." if k.startswith("fc.") else "backbone.") + k: v for k, v in source.state_dict().items()}
    for key in (
        "backbone.conv1.weight",
        "backbone.bn1.running_var",
        "backbone.layer2.0.downsample.0.weight",
        "backbone.layer2.0.downsample.1.weight",
        "backbone.layer4.1.bn2.bias",
        "head.fc.weight",
    ):
        assert key in state
    meta = {
        "epoch": 100,
        "iter": 125100,
        "cfg": "model = dict(type='ImageClassifier', ...)",
        "seed": 1234,
        "experiment_name": "resnet18_8xb32_in1k",
        "time": "20230101_000000",
        "mmengine_version": "0.10.7",
        "dataset_meta": {"classes": ("a", "b", "c", "d")},
    }
    path = tmp_path / "epoch_100.pth"
    save_checkpoint(
        {"meta": meta, "state_dict": state, "optimizer": _trained_optimizer(source).state_dict()}, str(path)
    )
    _assert_equal(_classifier(images, "resnet18", path), source.state_dict())


def test_openmmlab_runner_checkpoint_with_message_hub_is_refused_clearly(tmp_path: Path, images: Path) -> None:
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Tiny(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor, mode: str = "tensor") -> object:
            out = self.backbone(x)
            return {"loss": torch.nn.functional.cross_entropy(out, y)} if mode == "loss" else out

    dataset = [(torch.randn(3), torch.tensor(i % 2)) for i in range(4)]
    runner = Runner(
        model=Tiny(),
        work_dir=str(tmp_path / "work"),
        train_cfg={"by_epoch": True, "max_epochs": 1},
        train_dataloader={
            "dataset": dataset,
            "batch_size": 2,
            "collate_fn": {"type": "default_collate"},
            "sampler": {"type": "DefaultSampler", "shuffle": False},
        },
        optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1}},
    )
    runner.train()
    path = tmp_path / "work" / "epoch_1.pth"
    with pytest.raises(
        ValueError,
        match=r"(?s)epoch_1\.pth needs pickle.*mmengine\.logging\.history_buffer\.HistoryBuffer"
        r".*message_hub.*publish_model\.py.*keep only its weights",
    ):
        _classifier(images, "resnet18", path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights(tmp_path: Path, images: Path, suffix: str) -> None:
    source = timm.create_model("resnet18", pretrained=False, num_classes=4)
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":  # timm's save_for_hf / push_to_hub
        save_file(source.state_dict(), str(path))
    else:  # timm's pytorch_model.bin / .pth files
        torch.save(source.state_dict(), path)
    _assert_equal(_classifier(images, "timm:resnet18", path), source.state_dict())


def test_smp_encoder_weights_go_into_the_encoder(tmp_path: Path) -> None:
    # smp's hub files: model.safetensors with the encoder's state dict (read by smp.encoders.get_encoder).
    encoder = smp.encoders.get_encoder("mobilenet_v2", weights=None)
    path = tmp_path / "model.safetensors"
    save_file(encoder.state_dict(), str(path))
    root = write_cityscapes(tmp_path / "cityscapes", num_train=1, num_val=1, size=(32, 64))
    cli = lightning_cli(
        [
            "-c",
            "configs/demo/segmentation.yaml",
            "--data.root",
            str(root),
            "--model.init_from",
            str(path),
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    _assert_equal(cli.model.model.encoder, encoder.state_dict())


def test_head_of_another_size_needs_init_strict_false(tmp_path: Path, images: Path) -> None:
    source = torchvision.models.resnet18(weights=None, num_classes=10)
    path = tmp_path / "ten.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(ValueError, match=r"has another head: fc has 10 classes in the file and 4 in the model"):
        _classifier(images, "resnet18", path)
    model = _classifier(images, "resnet18", path, "--model.init_strict", "false")
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    for key, value in expected.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.fc.weight.shape == (4, 512)

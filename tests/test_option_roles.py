"""Each task option declares its role; the command's rules follow the declarations.

A toy fourth task, defined here with options of every role under names no refvision task uses,
goes through the command: nothing outside it lists its options.
"""

import gc
import inspect
from pathlib import Path
from typing import Annotated, Any

import pytest
import torch
from lightning import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from refvision.app.lightning_cli import ConfigError, every_task, lightning_cli, roles_help
from refvision.checkpoints.deploy import load_task_checkpoint
from refvision.checkpoints.loading import describe_checkpoint
from refvision.tasks.base import RefvisionTask
from refvision.tasks.classification import ClassificationTask
from refvision.tasks.detection import DetectionTask
from refvision.tasks.options import Role, option_roles
from refvision.tasks.segmentation import SegmentationTask


class ToyData(LightningDataModule):
    """Random ``(3, side, side)`` images in [0, 1] of 2 classes; ``level`` describes the data."""

    def __init__(self, side: int = 8, level: float = 0.5, batch_size: int = 2) -> None:
        super().__init__()
        self.side, self.level, self.batch_size = side, level, batch_size
        self.num_classes = 2
        generator = torch.Generator().manual_seed(0)
        self.samples = TensorDataset(torch.rand(4, 3, side, side, generator=generator), torch.tensor([0, 1, 0, 1]))

    def _loader(self) -> DataLoader:
        return DataLoader(self.samples, batch_size=self.batch_size)

    train_dataloader = val_dataloader = test_dataloader = predict_dataloader = _loader


class ToyTask(RefvisionTask):
    """A one-conv classifier of ``(B, 3, side, side)`` images, with an option of every role."""

    monitor, monitor_mode = "val/accuracy", "max"
    logged_metrics = {"val": ("accuracy",), "test": ("accuracy",)}

    def __init__(
        self,
        width: Annotated[int, Role.ARCHITECTURE] = 4,
        num_classes: Annotated[int, Role.DATA] = 3,
        level: Annotated[float | None, Role.DATA] = None,
        side: Annotated[int, Role.DATA_ARGUMENT] = 16,
        temperature: Annotated[float, Role.RUN] = 1.0,
        loss_scale: Annotated[float, Role.TRAINING] = 1.0,
        start_file: Annotated[str | None, Role.WEIGHTS] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.width, self.num_classes, self.level, self.side = width, num_classes, level, side
        self.temperature, self.loss_scale, self.start_file = temperature, loss_scale, start_file
        self.configure_model_pipeline()
        self.configure_metrics()

    def build_model(self) -> nn.Module:
        model = nn.Sequential(
            nn.Conv2d(3, self.width, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(self.width, 2)
        )
        if self.start_file:
            model.load_state_dict(torch.load(self.start_file, weights_only=True))
        return model

    def example_inputs(self) -> Tensor:
        return torch.rand(1, 3, self.side, self.side)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(self.normalize(images)) / self.temperature

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        return self.loss_scale * nn.functional.cross_entropy(self(images), labels)

    def create_metric(self) -> MetricCollection:
        return MetricCollection({"accuracy": MulticlassAccuracy(2)})

    def evaluation_step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        images, labels = batch
        return self(images), labels

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0]).argmax(dim=1)


def _args(root: Path, *extra: str) -> list[str]:
    return [
        "--model",
        f"{__name__}.ToyTask",
        "--data",
        f"{__name__}.ToyData",
        "--data.side",
        "8",
        "--data.level",
        "0.5",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.limit_test_batches",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fit of the toy task started from a weights file (its Role.WEIGHTS option)."""
    root = tmp_path_factory.mktemp("toy")
    start = root / "start.pth"
    torch.save(ToyTask(side=8).model.state_dict(), start)
    lightning_cli(["fit", *_args(root, "--model.start_file", str(start))])
    return {"root": root, "best": root / "checkpoints/best.ckpt", "last": root / "checkpoints/last.ckpt"}


def test_the_toy_task_declares_a_role_for_each_option() -> None:
    roles = option_roles(ToyTask)
    assert {key: roles[key] for key in ("width", "level", "side", "temperature", "loss_scale", "start_file")} == {
        "width": Role.ARCHITECTURE,
        "level": Role.DATA,
        "side": Role.DATA_ARGUMENT,
        "temperature": Role.RUN,
        "loss_scale": Role.TRAINING,
        "start_file": Role.WEIGHTS,
    }
    assert ToyTask.options(Role.WEIGHTS) == ("init_from", "start_file")  # the base class's first


def test_the_data_sets_the_options_it_describes_and_weights_are_not_kept(fitted: dict[str, Path]) -> None:
    hparams = torch.load(fitted["best"], weights_only=True)["hyper_parameters"]
    # level from the data module's attribute, num_classes too (the task's default is 3), side from its argument.
    assert (hparams["level"], hparams["num_classes"], hparams["side"]) == (0.5, 2, 8)
    assert hparams["start_file"] is None and hparams["init_from"] is None
    with pytest.raises(ConfigError, match=r"model\.level=0\.1 but the data \(ToyData\) has level=0\.5"):
        lightning_cli(_args(fitted["root"], "--model.level", "0.1"), run=False)


def test_ckpt_path_refuses_a_contradicting_architecture_option(fitted: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"model\.width=8 but the checkpoint --ckpt_path .* has model\.width=4"):
        lightning_cli(["test", *_args(fitted["root"], "--model.width", "8", "--ckpt_path", str(fitted["best"]))])
    with pytest.raises(ConfigError, match=r"model\.level=0\.5 but the data \(ToyData\) has level=0\.25"):
        lightning_cli(["test", *_args(fitted["root"], "--data.level", "0.25", "--ckpt_path", str(fitted["best"]))])


def test_outside_fit_run_options_are_the_configs_and_training_options_are_not_compared(
    fitted: dict[str, Path],
) -> None:
    extra = ("--model.temperature", "2.5", "--model.loss_scale", "3", "--ckpt_path", str(fitted["best"]))
    cli = lightning_cli(["test", *_args(fitted["root"], *extra)])
    assert cli.model.temperature == 2.5  # the config's run setting replaces the checkpoint's 1.0
    assert cli.model.loss_scale == 1.0  # the checkpoint's, unused by test and not refused
    # Resuming a fit, both are compared like any other option.
    for option, value in (("temperature", "2.5"), ("loss_scale", "3")):
        with pytest.raises(ConfigError, match=rf"model\.{option}={value}.* but the checkpoint --ckpt_path"):
            lightning_cli(
                [
                    "fit",
                    *_args(fitted["root"] / "resume", f"--model.{option}", value, "--ckpt_path", str(fitted["last"])),
                ]
            )


def test_the_weights_options_are_the_ones_an_evaluation_asks_for(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"no weights given \(--ckpt_path, --model\.init_from, --model\.start_file\)"):
        lightning_cli(["validate", *_args(tmp_path)])


def test_checkpoints_are_described_and_rebuilt_by_the_declarations(fitted: dict[str, Path]) -> None:
    checkpoint = torch.load(fitted["best"], weights_only=True)
    assert describe_checkpoint(checkpoint) == "a refvision ToyTask checkpoint (width=4, num_classes=2)"
    task, hparams = load_task_checkpoint(fitted["best"])
    assert isinstance(task, ToyTask) and (task.width, task.level, task.side) == (4, 0.5, 8)


def test_an_option_without_a_role_is_refused_when_the_task_is_defined() -> None:
    with pytest.raises(TypeError, match=r"<locals>.Undeclared: init argument 'depth' declares 0 roles"):

        class Undeclared(ToyTask):
            def __init__(self, depth: int = 2, **kwargs: Any) -> None:
                super().__init__(**kwargs)

    with pytest.raises(TypeError, match=r"init argument 'depth' declares 2 roles; expected one"):

        class Twice(ToyTask):
            def __init__(self, depth: Annotated[int, Role.RUN, Role.TRAINING] = 2, **kwargs: Any) -> None:
                super().__init__(**kwargs)

    gc.collect()  # the refused classes are gone: the command never meets them among the tasks
    assert not {"Undeclared", "Twice"} & {task.__name__ for task in every_task()}


@pytest.mark.parametrize("task", every_task(), ids=lambda task: task.__name__)
def test_every_option_of_every_task_declares_one_role(task: type[RefvisionTask]) -> None:
    expected: list[str] = []
    for klass in task.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]
        expected += [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    assert sorted(option_roles(task)) == sorted(set(expected))


def test_the_real_tasks_are_among_those_checked() -> None:
    assert {ClassificationTask, DetectionTask, SegmentationTask, ToyTask} <= set(every_task())


def test_the_help_names_every_role() -> None:
    assert all(f"  {role.name} " in roles_help() and role.meaning in roles_help() for role in Role)

"""Models take [0, 1] RGB and normalise inside; the data module describes its data to the model.

The normalisation is checked against torchvision's ``normalize`` followed by the bare network (the
path the data presets took before); the links through the command itself (LightningCLI).
"""

from pathlib import Path

import pytest
import torch
from torchvision.transforms.v2.functional import normalize

from refvision.app.demo.data import write_cityscapes, write_imagefolder, write_vocdevkit
from refvision.app.lightning_cli import ConfigError, lightning_cli
from refvision.checkpoints.deploy import reparameterize_checkpoint
from refvision.data.cityscapes_labels import IGNORE_INDEX, PALETTE, TRAIN_CLASSES
from refvision.data.description import IMAGENET_MEAN, IMAGENET_STD, DataDescription, Statistics
from refvision.data.predict import PredictImagesDataModule
from refvision.data.voc_format import VOC_CLASSES, VOC_LABELS
from refvision.tasks.classification import ClassificationTask
from refvision.tasks.detection import DetectionTask
from refvision.tasks.segmentation import SegmentationTask

MEAN, STD = (0.2, 0.5, 0.7), (0.1, 0.3, 0.2)
"""Statistics unlike ImageNet's, so that a path that ignores them fails."""


def test_classification_normalises_its_input_as_the_data_presets_did() -> None:
    torch.manual_seed(0)
    task = ClassificationTask(backbone="resnet18", num_classes=5, image_size=32).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = task.model(normalize(images, list(IMAGENET_MEAN), list(IMAGENET_STD)))
        torch.testing.assert_close(task(images), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(task.profile_module()(images), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(task.raw_forward(task.model, images), expected, rtol=0, atol=1e-6)


def test_segmentation_normalises_with_its_mean_and_std_in_every_path() -> None:
    torch.manual_seed(0)
    task = SegmentationTask(num_classes=4, output_stride=16, example_size=(64, 64), mean=MEAN, std=STD).eval()
    images = torch.rand(1, 3, 40, 56)  # not a multiple of 16: whole inference pads the normalised image
    normalised = normalize(images, list(MEAN), list(STD))
    padded = torch.nn.functional.pad(normalised, (0, 8, 0, 8))
    with torch.no_grad():
        expected = task.model(padded)[..., :40, :56]
        torch.testing.assert_close(task(images), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(task.raw_forward(task.model, images), expected, rtol=0, atol=1e-5)
        square = torch.rand(1, 3, 64, 64)
        torch.testing.assert_close(
            task.profile_module()(square), task.model(normalize(square, list(MEAN), list(STD))), rtol=0, atol=1e-5
        )


def test_detection_normalises_in_its_transform_with_the_given_statistics() -> None:
    torch.manual_seed(0)
    own = DetectionTask(detector="ssdlite320_mobilenet_v2", num_classes=3, image_size=64).eval()
    assert own.model.transform.image_mean == [0.5, 0.5, 0.5]  # null: SSDLite's own
    given = DetectionTask(detector="ssdlite320_mobilenet_v2", num_classes=3, image_size=64, mean=MEAN, std=STD).eval()
    identity = DetectionTask(
        detector="ssdlite320_mobilenet_v2", num_classes=3, image_size=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
    ).eval()
    identity.load_state_dict(given.state_dict())
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            given.raw_forward(given.model, [image]),
            identity.raw_forward(identity.model, [normalize(image, list(MEAN), list(STD))]),
            rtol=0,
            atol=1e-5,
        )


@pytest.mark.parametrize(
    "task",
    [
        ClassificationTask(backbone="mobilenet_v2", num_classes=3, mean=MEAN, std=STD),
        SegmentationTask(num_classes=3, mean=MEAN, std=STD),
        DetectionTask(detector="ssdlite320_mobilenet_v2", num_classes=3, mean=MEAN, std=STD),
    ],
    ids=["classification", "segmentation", "detection"],
)
def test_normalisation_leaves_the_checkpoint_keys_alone(task: torch.nn.Module) -> None:
    assert list(task.state_dict()) == [f"model.{key}" for key in task.model.state_dict()]
    task.load_state_dict(task.state_dict(), strict=True)


def _cli(*args: str):
    return lightning_cli([*args, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"], run=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(
        tmp_path_factory.mktemp("data") / "images",
        classes=("circle", "square", "stripes"),
        train_per_class=2,
        val_per_class=1,
        size=32,
    )


def test_image_folders_set_the_classifiers_classes_and_statistics(folders: Path) -> None:
    cli = _cli(
        "-c",
        "configs/demo/classification.yaml",
        "--data.root",
        str(folders),
        "--data.mean",
        str(list(MEAN)),
        "--data.std",
        str(list(STD)),
    )
    model = cli.model
    assert (model.num_classes, model.class_names) == (3, ["circle", "square", "stripes"])
    assert (model.mean, model.std) == (MEAN, STD)
    assert model.model.fc.out_features == 3
    assert (model.hparams["class_names"], model.hparams["mean"]) == (["circle", "square", "stripes"], list(MEAN))
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor(MEAN))


def test_cityscapes_and_voc_describe_their_classes_and_colours(tmp_path: Path) -> None:
    cityscapes = write_cityscapes(tmp_path / "cityscapes", num_train=1, num_val=1, size=(64, 128))
    model = _cli("-c", "configs/demo/segmentation.yaml", "--data.root", str(cityscapes)).model
    assert model.class_names == list(TRAIN_CLASSES) and model.palette.tolist() == [list(c) for c in PALETTE]
    assert model.ignore_index == IGNORE_INDEX
    voc = write_vocdevkit(tmp_path / "VOCdevkit", num_train=2, num_test=2, size=(48, 64))
    model = _cli("-c", "configs/demo/detection.yaml", "--data.root", str(voc)).model
    assert model.class_names == ["__background__", *VOC_CLASSES] and model.num_classes == 21
    assert model.model.transform.image_mean == [0.5, 0.5, 0.5]  # VOC leaves the detector its own


def test_a_model_value_that_agrees_with_the_data_is_accepted(folders: Path) -> None:
    model = _cli(
        "-c",
        "configs/demo/classification.yaml",
        "--data.root",
        str(folders),
        "--model.num_classes",
        "3",
        "--model.class_names",
        "[circle, square, stripes]",
    ).model
    assert model.num_classes == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.num_classes", "10"], "model.num_classes=10 but the data (ImageFolderDataModule) has num_classes=3"),
        (
            ["--model.class_names", "[a, b, c]"],
            "model.class_names=['a', 'b', 'c'] but the data (ImageFolderDataModule) "
            "has class_names=['circle', 'square', 'stripes']",
        ),
        (
            ["--model.mean", str(list(MEAN))],
            f"model.mean={list(MEAN)} but the data (ImageFolderDataModule) has "
            f"mean={list(IMAGENET_MEAN)}: the data module sets model.mean",
        ),
    ],
)
def test_a_model_value_that_disagrees_with_the_data_is_refused(
    folders: Path, override: list[str], message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        _cli("-c", "configs/demo/classification.yaml", "--data.root", str(folders), *override)
    assert message in str(error.value)


def test_a_checkpoint_carries_the_data_description(tmp_path: Path, folders: Path) -> None:
    cli = lightning_cli(
        [
            "fit",
            "-c",
            "configs/demo/classification.yaml",
            "--data.root",
            str(folders),
            "--data.image_size",
            "32",
            "--data.resize_size",
            "32",
            "--data.batch_size",
            "2",
            "--data.mean",
            str(list(MEAN)),
            "--data.std",
            str(list(STD)),
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "1",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    best = cli.trainer.checkpoint_callback.best_model_path
    hparams = torch.load(best, weights_only=True)["hyper_parameters"]
    assert (hparams["num_classes"], hparams["class_names"]) == (3, ["circle", "square", "stripes"])
    assert (list(hparams["mean"]), list(hparams["std"])) == (list(MEAN), list(STD))
    reparameterize_checkpoint(best, tmp_path / "deploy.ckpt")
    deploy = torch.load(tmp_path / "deploy.ckpt", weights_only=True)["hyper_parameters"]
    assert deploy["class_names"] == ["circle", "square", "stripes"] and list(deploy["mean"]) == list(MEAN)


def test_plain_images_state_only_the_classes_they_are_given(tmp_path: Path) -> None:
    bare = PredictImagesDataModule(str(tmp_path), preset="segmentation")
    assert bare.description.stated() == {}
    assert not any(hasattr(bare, key) for key in ("num_classes", "class_names", "mean", "std", "palette"))
    named = PredictImagesDataModule(str(tmp_path), preset="segmentation", class_names="cityscapes")
    assert named.description.stated() == {
        "num_classes": 19,
        "class_names": TRAIN_CLASSES,
        "palette": PALETTE,
    }
    assert not hasattr(named, "mean") and named.palette == list(PALETTE)
    voc = PredictImagesDataModule(str(tmp_path), preset="detection", class_names="voc")
    assert voc.class_names == list(VOC_LABELS) and not hasattr(voc, "palette")


def test_a_description_states_its_statistics_even_when_they_are_the_models_own() -> None:
    own = DataDescription(VOC_LABELS, Statistics(None, None))
    assert own.stated() == {"num_classes": 21, "class_names": VOC_LABELS, "mean": None, "std": None}
    given = DataDescription(("a", "b"), Statistics([0.5, 0.5, 0.5], [1, 1, 1]))
    assert given.stated()["mean"] == (0.5, 0.5, 0.5) and given.stated()["std"] == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: Statistics((0.5, 0.5, 0.5), None),
            r"data.mean=\(0.5, 0.5, 0.5\), data.std=None: give both or neither",
        ),
        (lambda: Statistics((0.5, 0.5), (1.0, 1.0)), r"data.mean=\[0.5, 0.5\]: expected 3 values"),
        (lambda: DataDescription(("a", "b"), palette=((0, 0, 0),)), "palette has 1 colours but the data has 2 classes"),
        (
            lambda: DataDescription(("a", "b"), ignore_index=1),
            "ignore_index=1 is a class id; expected a value outside 0..1",
        ),
    ],
    ids=["half-statistics", "two-channels", "short-palette", "ignore-index-a-class"],
)
def test_an_inconsistent_description_is_refused(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_a_model_mean_for_voc_which_leaves_the_detector_its_own_is_refused(tmp_path: Path) -> None:
    voc = write_vocdevkit(tmp_path / "VOCdevkit", num_train=2, num_test=2, size=(48, 64))
    with pytest.raises(ConfigError) as error:
        _cli("-c", "configs/demo/detection.yaml", "--data.root", str(voc), "--model.mean", str(list(MEAN)))
    assert f"model.mean={list(MEAN)} but the data (VOCDataModule) has mean=None" in str(error.value)

"""DetectionTask: raw outputs of train vs deploy form, coordinates, and the `refvision` command end to end."""

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from refvision.app.cli import main
from refvision.app.demo.data import write_vocdevkit
from refvision.models.detection import build_detector
from refvision.nn.refconv import RefConv
from refvision.surgery.convert import reparameterize
from refvision.tasks.detection import DetectionTask

CONFIG = "configs/demo/detection.yaml"
SIZE = 64


def _args(root: Path, data: Path, *extra: str) -> list[str]:
    return [
        "-c",
        CONFIG,
        *extra,
        "--data.root",
        str(data),
        "--data.pin_memory",
        "false",
        "--data.image_size",
        str(SIZE),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
    ]


def _metrics(root: Path) -> dict[str, float]:
    """Last logged value of each metric in the CSV log under ``root``."""
    (path,) = root.glob("lightning_logs/version_*/metrics.csv")
    values: dict[str, float] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v != ""})
    return values


def _best(root: Path) -> Path:
    (path,) = root.glob("lightning_logs/version_*/checkpoints/best.ckpt")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vocdevkit(tmp_path_factory.mktemp("data") / "VOCdevkit", num_train=16, num_test=4, size=(48, 64))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    root = tmp_path_factory.mktemp("baseline")
    main(["fit", *_args(root, data)])
    return root


def test_raw_outputs_of_refconv_and_its_deploy_form_agree() -> None:
    torch.manual_seed(0)
    task = DetectionTask(image_size=SIZE, conv={"kind": "refconv", "select": "kxk"}).eval()
    refconvs = [m for m in task.model.modules() if isinstance(m, RefConv)]
    assert refconvs and all(
        name.startswith("backbone.features.") for name, m in task.model.named_modules() if isinstance(m, RefConv)
    )
    with torch.no_grad():
        for m in refconvs:
            m.refocus_weight.normal_(0.0, 0.1)
    deploy = reparameterize(task.model).eval()
    assert not any(isinstance(m, RefConv) for m in deploy.modules())
    images = [torch.rand(3, 40, 56), torch.rand(3, 64, 48)]
    with torch.no_grad():
        train_out = task.raw_forward(task.model, images)
        deploy_out = task.raw_forward(deploy, images)
    assert train_out.shape[0] == 2
    torch.testing.assert_close(deploy_out, train_out, rtol=1e-5, atol=1e-5 * float(train_out.abs().max()))
    build_detector("ssdlite320_mobilenet_v3_large", 21, image_size=SIZE).load_state_dict(
        deploy.state_dict(), strict=True
    )


def test_detections_are_in_input_pixels() -> None:
    # Upsampling by integer factors (nearest) is undone exactly by the model's bilinear resize,
    # so the network sees the same tensor and only the mapping back to input pixels differs.
    torch.manual_seed(0)
    task = DetectionTask(image_size=SIZE).eval()
    image = torch.rand(3, SIZE, SIZE)
    big = F.interpolate(image[None], scale_factor=(3, 2), mode="nearest")[0]
    with torch.no_grad():
        small_det, big_det = task([image, big])
    assert len(small_det["boxes"]) > 0
    torch.testing.assert_close(big_det["scores"], small_det["scores"])
    torch.testing.assert_close(big_det["boxes"], small_det["boxes"] * torch.tensor([2.0, 3.0, 2.0, 3.0]))
    assert float(big_det["boxes"][:, 2].max()) <= 2 * SIZE and float(big_det["boxes"][:, 3].max()) <= 3 * SIZE


def test_example_inputs_and_profile_module() -> None:
    task = DetectionTask(detector="ssdlite320_mobilenet_v2", image_size=SIZE).eval()
    (image,) = task.example_inputs()
    assert image.shape == (3, SIZE, SIZE)
    wrapper = task.profile_module()
    assert sum(p.numel() for p in wrapper.parameters()) == sum(p.numel() for p in task.model.parameters())
    assert torch.equal(wrapper([image]), task.raw_forward(task.model, [image]))


def test_class_count_must_match_the_data(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", *_args(tmp_path, data), "--model.num_classes", "5"])
    assert (
        "model.num_classes=5 (background included) but the data (VOCDataModule) has num_classes=21 "
        "(background included)"
    ) in capsys.readouterr().err


@pytest.mark.slow
def test_validation_logs_map(baseline: Path) -> None:
    metrics = _metrics(baseline)
    assert 0.0 <= metrics["val/map"] <= 1.0
    assert 0.0 <= metrics["val/coco_map"] <= 1.0
    assert metrics["train/loss"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["refconv", "drconv"])
def test_fit_deploy_and_test(tmp_path: Path, data: Path, baseline: Path, method: str) -> None:
    extra = ["-c", f"configs/conv/{method}.yaml", "--model.init_from", str(_best(baseline))]
    if method == "drconv":  # one block keeps the step short
        extra += ["--model.conv.include", "[backbone.features.0.2.*]"]
    root = tmp_path / method
    main(["fit", *_args(root, data, *extra)])
    deploy = _best(root).with_name("best-deploy.ckpt")
    assert deploy.is_file()
    checkpoint = torch.load(deploy, map_location="cpu", weights_only=True)
    assert checkpoint["refvision"]["max_abs_diff"] < 1e-3
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    if method == "refconv":
        build_detector("ssdlite320_mobilenet_v3_large", 21, image_size=SIZE).load_state_dict(state, strict=True)
    else:
        assert checkpoint["hyper_parameters"]["deploy"] is True

    test_root = tmp_path / "test"
    main(["test", *_args(test_root, data), "--ckpt_path", str(deploy)])
    assert 0.0 <= _metrics(test_root)["test/map"] <= 1.0


@pytest.mark.slow
def test_predict_writes_json_and_images(tmp_path: Path, data: Path, baseline: Path) -> None:
    out = tmp_path / "predictions"
    main(
        [
            "predict",
            *_args(tmp_path, data),
            "--ckpt_path",
            str(_best(baseline)),
            "--return_predictions",
            "false",
            "--trainer.callbacks+=refvision.outputs.writers.DetectionPredictionWriter",
            "--trainer.callbacks.output_dir",
            str(out),
            "--trainer.callbacks.score_threshold",
            "0.0",
        ]
    )
    records = json.loads((out / "detections.json").read_text())
    test_ids = (data / "VOC2007/ImageSets/Main/test.txt").read_text().split()
    assert [r["file"] for r in records] == [f"{i}.jpg" for i in test_ids]
    first = records[0]
    assert len(first["boxes"]) == len(first["scores"]) == len(first["labels"]) == len(first["class_names"]) > 0
    assert all(name != "__background__" for r in records for name in r["class_names"])
    assert sorted(p.name for p in (out / "boxes").glob("*.png")) == sorted(f"{i}.png" for i in test_ids)

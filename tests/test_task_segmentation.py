"""Segmentation: inference modes, OHEM, conversion of the dilated encoder, the CLI end to end."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.io import decode_png, read_file

from refvision import RefConv, reparameterize
from refvision.app.cli import lightning_cli, main
from refvision.app.demo.data import write_cityscapes
from refvision.models.losses import ohem_cross_entropy
from refvision.models.segmentation import build_segmenter
from refvision.models.segmentation_inference import segment, slide_inference, whole_inference
from refvision.tasks.segmentation import SegmentationTask


def _pixelwise() -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(3, 5, 1)


def test_whole_inference_pads_to_the_divisor_and_crops_back() -> None:
    seen = []
    model = _pixelwise()
    images = torch.randn(2, 3, 37, 50)

    def spy(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[-2:])
        return model(x)

    out = whole_inference(spy, images)
    assert seen == [(48, 64)] and out.shape == (2, 5, 37, 50)
    assert torch.allclose(out, model(images), atol=1e-6)


def test_overlapping_windows_average_to_the_whole_image_for_a_per_pixel_model() -> None:
    model, images = _pixelwise(), torch.randn(1, 3, 40, 70)
    slid = slide_inference(model, images, crop=(16, 32), stride=(12, 20), num_classes=5)
    assert torch.allclose(slid, model(images), atol=1e-6)


def test_one_window_covering_the_image_equals_whole_inference() -> None:
    model = build_segmenter("mobilenet_v2", 5, None, 16).eval()
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(slide_inference(model, images, (32, 48), (32, 48), 5), whole_inference(model, images))


def test_flip_and_scale_averaging() -> None:
    model, images = _pixelwise(), torch.randn(1, 3, 32, 32)
    # A per-pixel model commutes with flipping: flip TTA changes nothing.
    assert torch.allclose(segment(model, images, 5, flip=True), model(images), atol=1e-6)
    two = segment(model, images, 5, scales=[1.0, 0.5])
    half = F.interpolate(
        model(F.interpolate(images, scale_factor=0.5, mode="bilinear")), size=(32, 32), mode="bilinear"
    )
    assert torch.allclose(two, (model(images) + half) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="inference='tiles'"):
        segment(model, images, 5, mode="tiles")


def test_ohem_keeps_the_hard_pixels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 6, 7))
    target[0, 0, :3] = 255
    loss = ohem_cross_entropy(logits, target, thresh=0.3, min_kept=10)
    # Independent: per-pixel probabilities by hand, MMSeg's threshold rule.
    probs = logits.softmax(1)
    pixels = [(b, i, j) for b in range(2) for i in range(6) for j in range(7) if target[b, i, j] != 255]
    p = {px: float(probs[px[0], target[px], px[1], px[2]]) for px in pixels}
    kth = sorted(p.values())[10]
    keep = [px for px in pixels if p[px] < max(0.3, kth)]
    expected = sum(-torch.log(torch.tensor(p[px], dtype=torch.float64)) for px in keep) / len(keep)
    assert len(keep) >= 10
    assert torch.allclose(loss, expected)


def test_refconv_on_the_dilated_encoder_folds_exactly() -> None:
    task = SegmentationTask(num_classes=5, output_stride=8, conv={"kind": "refconv"}, example_size=(64, 64))
    refconvs = [m for m in task.model.modules() if isinstance(m, RefConv)]
    assert refconvs and all(name.startswith("encoder.") for name, m in task.model.named_modules() if m in refconvs)
    assert any(m.dilation[0] > 1 for m in refconvs)
    with torch.no_grad():
        for m in refconvs:
            m.refocus_weight.normal_(std=0.05)
    task.eval()
    x = task.example_inputs()
    with torch.no_grad():
        out, folded = task.raw_forward(task.model, x), task.raw_forward(reparameterize(task.model), x)
    assert torch.allclose(out, folded, rtol=1e-5, atol=1e-5 * out.abs().max())


def _args(root: Path, data: Path, *extra: str) -> list[str]:
    return [
        "-c",
        "configs/demo/segmentation.yaml",
        *extra,
        "--data.root",
        str(data),
        "--data.crop_size",
        "[64,128]",
        "--model.example_size",
        "[64,128]",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
    ]


def test_class_count_must_match_the_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_cityscapes(tmp_path / "cityscapes", num_train=1, num_val=1, size=(64, 128))
    with pytest.raises(SystemExit):
        main(["fit", *_args(tmp_path / "run", data), "--model.num_classes", "5"])
    assert (
        "model.num_classes=5 but the data (CityscapesDataModule) has num_classes=19: the data module sets "
        "model.num_classes; leave it out of the config"
    ) in capsys.readouterr().err


@pytest.mark.slow
def test_cli_fit_refconv_deploy_test_predict(tmp_path: Path) -> None:
    data = write_cityscapes(tmp_path / "cityscapes", num_train=4, num_val=2, size=(64, 128))
    base = lightning_cli(["fit", *_args(tmp_path / "base", data)]).trainer.checkpoint_callback.best_model_path
    cli = lightning_cli(
        ["fit", *_args(tmp_path / "ref", data, "-c", "configs/conv/refconv.yaml", "--model.init_from", base)]
    )
    deploy = Path(cli.trainer.checkpoint_callback.best_model_path).with_name("best-deploy.ckpt")
    state = torch.load(deploy, map_location="cpu", weights_only=True)["state_dict"]
    vanilla = build_segmenter("mobilenet_v2", 19, None, 16)
    vanilla.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    tested = lightning_cli(["test", *_args(tmp_path / "test", data), "--ckpt_path", str(deploy)])
    assert 0.0 <= float(tested.trainer.callback_metrics["test/miou"]) <= 1.0

    out = tmp_path / "pred"
    main(
        [
            "predict",
            *_args(tmp_path / "pred_run", data),
            "--ckpt_path",
            str(deploy),
            "--trainer.callbacks+=refvision.outputs.writers.SegmentationPredictionWriter",
            "--trainer.callbacks.output_dir",
            str(out),
        ]
    )
    first = sorted((data / "leftImg8bit" / tested.datamodule.test_split).glob("*/*.png"))[0]
    name = f"{first.parent.name}/{first.stem}.png"
    ids = decode_png(read_file(str(out / "labels" / name)))
    assert ids.shape == (1, 64, 128) and int(ids.max()) < 19
    assert all((out / folder / name).is_file() for folder in ("color", "overlay"))
    task = SegmentationTask.load_from_checkpoint(deploy).eval()
    image = tested.datamodule.predict_dataloader().dataset[0][0].unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(task(image).argmax(1)[0].to(torch.uint8), ids[0])

"""Bad data files, for real on disk: each error names the file, ``on_bad_sample: skip`` drops it.

Faults are written as they occur: a JPEG cut in half (passes every header check, fails only
when decoded, so it is met inside data-loader worker processes), a zero-byte file, text named
``.jpg``, a 16-bit label PNG, an ImageSets file listing an id twice, and images in formats
torchvision's decoder does not read (``.bmp``, ``.tif``, animated ``.gif``) made with Pillow.
"""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fit_process import REPO, fit_args
from PIL import Image

from refvision.app.demo.data import write_cityscapes, write_vocdevkit
from refvision.data import (
    CityscapesDataModule,
    CityscapesSegmentation,
    ImageFolderDataModule,
    PredictImagesDataModule,
    VOCDataModule,
)
from refvision.data.decode import decode
from refvision.data.imagefolder import CheckedImageFolder


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _module(root: Path, **kwargs) -> ImageFolderDataModule:
    options = dict(image_size=16, resize_size=16, batch_size=2, num_workers=2, pin_memory=False)
    return ImageFolderDataModule(str(root), **{**options, **kwargs})


def _images(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jpg"))


def test_zero_byte_and_non_image_files_are_named_at_setup(tree: Path) -> None:
    empty, text = _images(tree / "train" / "circle")[:2]
    empty.write_bytes(b"")
    text.write_text("not an image")
    dm = _module(tree)
    with pytest.raises(ValueError, match="2 bad file") as error:
        dm.setup("fit")
    assert f"{empty}: the file is empty (0 bytes)" in str(error.value)
    assert str(text) in str(error.value)


def test_truncated_jpeg_in_worker_processes_raises_naming_the_file(tree: Path) -> None:
    bad = _images(tree / "train" / "square")[0]
    _truncate(bad)
    dm = _module(tree)
    dm.setup("fit")  # its header is intact: only decoding finds it
    with pytest.raises(Exception, match=re.escape(str(bad))) as error:
        for _ in dm.train_dataloader():
            pass
    assert "truncated" in str(error.value)


def test_skip_drops_bad_files_at_setup_and_load_and_reports_them_per_epoch(
    tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty = _images(tree / "train" / "circle")[0]
    empty.write_bytes(b"")
    truncated = _images(tree / "train" / "square")[0]
    _truncate(truncated)
    dm = _module(tree, on_bad_sample="skip", batch_size=1)
    dm.setup("fit")
    assert [path for path, _ in dm.train_set.skipped] == [str(empty)]
    assert len(dm.train_set) == 7
    loader = dm.train_dataloader()
    for _epoch in range(2):  # worker processes: the report comes with every epoch
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="refvision"):
            seen = sum(len(labels) for _, labels in loader)
        assert seen == 6  # 8 files - 1 empty (setup) - 1 truncated (load time, in a worker)
        assert [path for path, _ in loader.skipped] == [str(truncated)]
        assert "truncated" in loader.skipped[0][1]
        report = [r.getMessage() for r in caplog.records if "skipped 1 bad sample" in r.getMessage()]
        assert len(report) == 1 and str(truncated) in report[0]


def test_batches_keep_their_structure_after_a_skip(tree: Path) -> None:
    _truncate(_images(tree / "val" / "circle")[0])
    dm = _module(tree, on_bad_sample="skip", num_workers=0, batch_size=4)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    images, labels = batches[0]
    assert images.shape == (3, 3, 16, 16) and labels.tolist() == [0, 1, 1]
    assert [len(b[1]) for b in batches] == [3]


def test_bmp_tif_and_animated_gif_are_read_not_dropped(tree: Path) -> None:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(2)]
    folder = tree / "train" / "circle"
    Image.fromarray(frames[0]).save(folder / "x.bmp")
    Image.fromarray(frames[0]).save(folder / "x.tif")
    Image.fromarray(frames[1], mode="RGB").save(folder / "x.tiff", compression="tiff_lzw")
    gif = [Image.fromarray(f).convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
    gif[0].save(folder / "x.gif", save_all=True, append_images=gif[1:])
    dataset = CheckedImageFolder(str(tree / "train"))
    assert len(dataset) == 8 + 4
    for name, expected in (("x.bmp", frames[0]), ("x.tif", frames[0]), ("x.tiff", frames[1])):
        assert torch.equal(decode(folder / name), torch.from_numpy(expected).permute(2, 0, 1)), name
    with Image.open(folder / "x.gif") as image:
        assert image.n_frames == 2
        first = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(decode(folder / "x.gif"), first)


def test_unreadable_image_format_and_stray_files_are_named(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    heic = tree / "train" / "square" / "photo.heic"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(16))
    (tree / "train" / "square" / "notes.txt").write_text("labels checked by hand")
    with caplog.at_level(logging.WARNING, logger="refvision"), pytest.raises(ValueError, match=re.escape(str(heic))):
        CheckedImageFolder(str(tree / "train"))
    assert any(str(tree / "train" / "square" / "notes.txt") in r.getMessage() for r in caplog.records)
    dataset = CheckedImageFolder(str(tree / "train"), on_bad_sample="skip")
    assert len(dataset) == 8 and dataset.skipped[0][0] == str(heic)


def test_empty_class_folder_is_named(tree: Path) -> None:
    empty = tree / "val" / "square"
    for path in empty.iterdir():
        path.unlink()
    (empty / ".DS_Store").write_bytes(b"\x00")
    dm = _module(tree)
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty))):
        dm.setup("validate")


@pytest.fixture()
def devkit(tmp_path: Path) -> Path:
    return write_vocdevkit(tmp_path / "VOCdevkit", num_train=4, num_test=2, size=(48, 64))


def _voc(devkit: Path, **kwargs) -> VOCDataModule:
    options = dict(train_sets=["2007-trainval"], batch_size=2, num_workers=0, pin_memory=False, preset="ssdlite")
    return VOCDataModule(str(devkit), **{**options, **kwargs})


def test_voc_id_listed_twice_names_file_and_id(devkit: Path) -> None:
    list_file = devkit / "VOC2007" / "ImageSets" / "Main" / "trainval.txt"
    ids = list_file.read_text().split()
    list_file.write_text("\n".join([*ids, ids[1]]) + "\n")
    dm = _voc(devkit)
    with pytest.raises(ValueError, match=re.escape(f"image set file {list_file} lists id {ids[1]!r} twice")):
        dm.setup("fit")


def test_voc_id_in_two_combined_image_sets_is_an_error(devkit: Path) -> None:
    main = devkit / "VOC2007" / "ImageSets" / "Main"
    first = (main / "trainval.txt").read_text().split()[0]
    (main / "extra.txt").write_text(first + "\n")
    dm = _voc(devkit, train_sets=["2007-trainval", "2007-extra"])
    with pytest.raises(ValueError, match=f"{first!r} of VOC2007 is listed in both"):
        dm.setup("fit")


def test_voc_truncated_jpeg_is_skipped_at_load_time(devkit: Path) -> None:
    image_id = (devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    bad = devkit / "VOC2007" / "JPEGImages" / f"{image_id}.jpg"
    _truncate(bad)
    dm = _voc(devkit, num_workers=1)
    dm.setup("validate")
    with pytest.raises(Exception, match=re.escape(str(bad))):
        list(dm.val_dataloader())
    dm = _voc(devkit, num_workers=1, on_bad_sample="skip")
    dm.setup("validate")
    loader = dm.val_dataloader()
    targets = [t for _, batch in loader for t in batch]
    assert len(targets) == len(dm.val_set) - 1 and loader.skipped[0][0] == str(bad)


def test_voc_difficult_objects_leave_training_targets_by_default(devkit: Path) -> None:
    for xml in sorted((devkit / "VOC2007" / "Annotations").glob("*.xml")):  # one difficult object per file
        xml.write_text(xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
    dm = _voc(devkit, train_sets=["2007-test"])
    dm.setup("fit")
    dm.train_set.transforms = dm.val_set.transforms = None
    train_difficult = [dm.train_set[i][1]["difficult"] for i in range(len(dm.train_set))]
    val_difficult = [dm.val_set[i][1]["difficult"] for i in range(len(dm.val_set))]
    expected = torch.cat([ann.difficult for ann in dm.val_set.annotations])
    assert expected.any(), "the generated test set must hold difficult objects"
    assert not torch.cat(train_difficult).any()
    assert torch.equal(torch.cat(val_difficult), expected)  # evaluation keeps them, flagged
    kept = _voc(devkit, train_sets=["2007-test"], train_difficult=True)
    kept.setup("fit")
    kept.train_set.transforms = None
    assert torch.equal(torch.cat([kept.train_set[i][1]["difficult"] for i in range(len(kept.train_set))]), expected)
    train_boxes = sum(len(d) for d in train_difficult)
    assert train_boxes == len(expected) - int(expected.sum())


def test_cityscapes_16_bit_label_png_is_named_before_training(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path / "cityscapes", num_train=2, num_val=1, size=(16, 32))
    label = sorted((root / "gtFine" / "val").rglob("*_gtFine_labelIds.png"))[0]
    values = np.array(Image.open(label), dtype=np.uint16)
    Image.fromarray(values).save(label)  # same ids, now a 16-bit PNG
    assert Image.open(label).mode.startswith("I;16")
    with pytest.raises(ValueError, match=re.escape(f"{label}: a 16-bit PNG label image")):
        CityscapesSegmentation(str(root), "val")
    with pytest.raises(ValueError, match="no valid Cityscapes samples"):
        CityscapesSegmentation(str(root), "val", on_bad_sample="skip")


@pytest.mark.parametrize(
    ("option", "value"),
    [("batch_size", "0"), ("batch_size", "-4"), ("image_size", "-5"), ("resize_size", "0")],
)
def test_non_positive_batch_and_image_sizes_are_one_line_errors_naming_the_option(
    tree: Path, tmp_path: Path, option: str, value: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "refvision", *fit_args(tmp_path / "run", tree, f"--data.{option}", value)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert any(f"data.{option}={value}: expected a positive integer" in line for line in errors), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize(
    ("module", "options", "message"),
    [
        (VOCDataModule, {"batch_size": 0}, "data.batch_size=0: expected a positive integer"),
        (VOCDataModule, {"image_size": -300}, "data.image_size=-300: expected a positive integer"),
        (CityscapesDataModule, {"crop_size": (512, 0)}, "data.crop_size=(512, 0): expected a positive integer"),
        (CityscapesDataModule, {"eval_size": (-1, 64)}, "data.eval_size=(-1, 64): expected a positive integer"),
        (CityscapesDataModule, {"val_batch_size": 0}, "data.val_batch_size=0: expected a positive integer"),
        (ImageFolderDataModule, {"num_workers": -1}, "data.num_workers=-1: expected an integer >= 0"),
        (PredictImagesDataModule, {"batch_size": -2}, "data.batch_size=-2: expected a positive integer"),
        (PredictImagesDataModule, {"image_size": 0}, "data.image_size=0: expected a positive integer"),
    ],
)
def test_every_data_module_refuses_non_positive_sizes(
    tmp_path: Path, tree: Path, module: type, options: dict, message: str
) -> None:
    roots = {
        VOCDataModule: lambda: write_vocdevkit(tmp_path / "VOCdevkit", num_train=2, num_test=2, size=(48, 64)),
        CityscapesDataModule: lambda: write_cityscapes(tmp_path / "cityscapes", num_train=1, num_val=1, size=(16, 32)),
        ImageFolderDataModule: lambda: tree,
        PredictImagesDataModule: lambda: tree / "val",
    }
    extra = {"preset": "classification"} if module is PredictImagesDataModule else {}
    if module is VOCDataModule:
        extra = {"train_sets": ["2007-trainval"]}
    with pytest.raises(ValueError, match=re.escape(message)):
        module(str(roots[module]()), **extra, **options)


@pytest.mark.slow
def test_fit_reports_samples_skipped_at_load_time_every_epoch(tree: Path, tmp_path: Path) -> None:
    bad = [_images(tree / split / "circle")[0] for split in ("train", "val")]
    for path in bad:
        _truncate(path)  # headers intact: dropped only when decoded, in the worker processes
    run = tmp_path / "run"
    args = fit_args(run, tree, "--data.on_bad_sample", "skip", "--data.num_workers", "2", "--data.batch_size", "4")
    args = [
        *args,
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_train_batches",
        "1.0",
        "--trainer.limit_val_batches",
        "1.0",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "refvision", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [line for line in result.stderr.splitlines() if "skipped 1 bad sample(s) in this pass over" in line]
    train = [line for line in reports if f"CheckedImageFolder({tree / 'train'})" in line]
    val = [line for line in reports if f"CheckedImageFolder({tree / 'val'})" in line]
    assert len(train) == 2 and all(f"{bad[0]}: cannot decode JPEG" in line for line in train), result.stderr[-4000:]
    assert len(val) == 3 and all(str(bad[1]) in line for line in val)  # sanity check + 2 epochs

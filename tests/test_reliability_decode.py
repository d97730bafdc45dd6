"""Image decoding of damaged, wide, rotated and oversized files, and image-folder layout faults.

Every file is written as it occurs: a PNG with damaged bytes (which libpng, inside
torchvision, answers with a segmentation fault unless the file is refused first: those tests
run the decoder in a subprocess), 16-bit and float TIFF / PGM / PNG, a phone photo with an
EXIF orientation tag, a BMP header declaring 20000 x 20000 pixels, a symbolic-link loop.
"""

import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode

from refvision.app.demo.data import write_vocdevkit
from refvision.data.bad_samples import BadSample
from refvision.data.decode import _CPP_LOCATION, BadImageError, decode
from refvision.data.imagefolder import CheckedImageFolder, ImageFolderDataModule
from refvision.data.predict import ImageFiles, image_suffixes, read_rgb
from refvision.data.voc import VOCDetection


def _png(tree: Path) -> Path:
    """A small PNG of the generated tree (``circle_0001.png``, 24 x 24)."""
    return tree / "train" / "circle" / "circle_0001.png"


def _python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: a segmentation fault there fails the test, not pytest."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _crashed(result: subprocess.CompletedProcess) -> str:
    return f"the decoder process ended with rc {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


def test_every_damaged_byte_of_a_png_decodes_or_raises_bad_image_error(tree: Path, tmp_path: Path) -> None:
    source = _png(tree)
    result = _python(f"""
        import json
        from pathlib import Path
        from refvision.data.decode import BadImageError, decode
        data, path = Path({str(source)!r}).read_bytes(), Path({str(tmp_path / "damaged.png")!r})
        outcomes = {{"decoded": 0, "BadImageError": 0}}
        for position in range(len(data)):
            for mask in (0xFF, 0x01):
                damaged = bytearray(data)
                damaged[position] ^= mask
                path.write_bytes(bytes(damaged))
                try:
                    decode(path)
                    outcomes["decoded"] += 1
                except BadImageError as error:
                    assert str(error).startswith(str(path)), error
                    outcomes["BadImageError"] += 1
        print(json.dumps(outcomes))
    """)
    assert result.returncode == 0, _crashed(result)
    outcomes = json.loads(result.stdout.splitlines()[-1])
    assert sum(outcomes.values()) == 2 * source.stat().st_size
    assert outcomes["BadImageError"] > 0


def test_damaged_and_truncated_png_errors_name_the_file_and_the_chunk(tree: Path, tmp_path: Path) -> None:
    data = bytearray(_png(tree).read_bytes())
    middle = len(data) // 2
    damaged = data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 40]) + data[middle + 40 :]
    (tmp_path / "damaged.png").write_bytes(bytes(damaged))
    (tmp_path / "truncated.png").write_bytes(bytes(data[:middle]))
    (tmp_path / "no_end.png").write_bytes(bytes(data[:-12]))  # every chunk intact, IEND missing
    result = _python(f"""
        from refvision.data.decode import BadImageError, decode
        for name in ("damaged.png", "truncated.png", "no_end.png"):
            try:
                decode({str(tmp_path)!r} + "/" + name)
                print("decoded", name)
            except BadImageError as error:
                print(error)
    """)
    assert result.returncode == 0, _crashed(result)
    damaged_error, truncated_error, no_end_error = result.stdout.splitlines()
    damaged, truncated = re.escape(str(tmp_path / "damaged.png")), re.escape(str(tmp_path / "truncated.png"))
    assert re.fullmatch(rf"{damaged}: PNG chunk 'IDAT' at byte \d+ fails its CRC-32 check.*", damaged_error)
    assert re.fullmatch(rf"{truncated}: PNG chunk 'IDAT' .* past the end of the file.*", truncated_error)
    assert no_end_error.startswith(f"{tmp_path / 'no_end.png'}: PNG ends at byte") and "IEND" in no_end_error


def test_damaged_png_in_worker_processes_is_a_skipped_sample(tree: Path) -> None:
    bad = _png(tree)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    dm = ImageFolderDataModule(
        str(tree), image_size=16, resize_size=16, batch_size=2, num_workers=2, pin_memory=False, on_bad_sample="skip"
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert sum(len(labels) for _, labels in loader) == 7
    assert [path for path, _ in loader.skipped] == [str(bad)] and "CRC-32" in loader.skipped[0][1]


def test_torchvision_source_location_is_cut_from_decoder_errors() -> None:
    for prefix in ("decode_jpeg, /w/csrc/io/image/cpu/decode_jpeg.cpp:171, ", "operator(), /w/cpu/decode_png.cpp:79, "):
        assert _CPP_LOCATION.sub("", prefix + "Image is incomplete or truncated") == "Image is incomplete or truncated"


def _write_16_bit(folder: Path, values: np.ndarray) -> list[Path]:
    """``values (H, W) uint16`` as a 16-bit PNG, TIFF and PGM."""
    paths = [folder / "wide.png", folder / "wide.tif", folder / "wide.pgm"]
    for path in paths:
        Image.fromarray(values).save(path)
    return paths


def test_16_bit_tiff_pgm_and_png_decode_to_the_same_uint16(tmp_path: Path) -> None:
    values = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 541).astype(np.uint16)
    expected = torch.from_numpy(values.astype(np.int32))
    for path in _write_16_bit(tmp_path, values):
        rgb, gray = decode(path), decode(path, ImageReadMode.GRAY)
        assert rgb.dtype == gray.dtype == torch.uint16, path
        assert rgb.shape == (3, 12, 10) and gray.shape == (1, 12, 10), path
        assert torch.equal(rgb.int(), expected.expand(3, -1, -1)) and torch.equal(gray[0].int(), expected), path
        assert torch.equal(read_rgb(path).int(), expected.expand(3, -1, -1) >> 8), path  # scaled, not clipped


def test_float_and_32_bit_tiff_are_refused_naming_file_and_mode(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 5), 0.5, np.float32)).save(tmp_path / "float.tif")
    Image.fromarray(np.full((4, 5), 70000, np.int32)).save(tmp_path / "int32.tif")
    Image.fromarray(np.full((4, 5), 700, np.int32)).save(tmp_path / "small_int32.tif")
    with pytest.raises(
        BadImageError,
        match=re.escape(
            f"{tmp_path / 'float.tif'}: 32-bit floating-point pixels "
            "(Pillow mode 'F'); expected an image with 8- or 16-bit"
        ),
    ):
        decode(tmp_path / "float.tif")
    with pytest.raises(
        BadImageError,
        match=re.escape(
            f"{tmp_path / 'int32.tif'}: 32-bit integer pixels (Pillow mode "
            "'I') with values 70000..70000, beyond 16 bits"
        ),
    ):
        read_rgb(tmp_path / "int32.tif")
    assert torch.equal(decode(tmp_path / "small_int32.tif"), torch.full((3, 4, 5), 700, dtype=torch.uint16))


def _photo(path: Path, orientation: int, stored: np.ndarray | None = None) -> np.ndarray:
    """Write ``stored (H, W, 3) uint8`` (default a 20 x 30 pattern) tagged with EXIF ``orientation``.

    Returns the pixels as the file stores them (after JPEG compression, for a ``.jpg``).
    """
    exif = Image.Exif()
    exif[0x0112] = orientation
    if stored is None:
        rng = np.random.default_rng(orientation)
        stored = np.kron(rng.integers(0, 256, (5, 6, 3)), np.ones((4, 5, 1))).astype(np.uint8)
    options = {".jpg": {"quality": 95}, ".webp": {"lossless": True}}.get(path.suffix, {})
    Image.fromarray(stored).save(path, exif=exif, **options)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
def test_exif_orientation_is_applied_alike_by_image_folders_and_predict(tree: Path, suffix: str) -> None:
    folder = tree / "train" / "square"
    for orientation in range(1, 9):
        _photo(folder / f"phone_{orientation}{suffix}", orientation)
    dataset = CheckedImageFolder(str(tree / "train"))
    predict = ImageFiles(folder)
    by_file = {predict.files[i].name: predict[i][0] for i in range(len(predict))}
    phones = [(index, Path(path)) for index, (path, _) in enumerate(dataset.samples) if "phone_" in path]
    assert len(phones) == 8
    for index, path in phones:
        with Image.open(path) as image:
            displayed = torch.from_numpy(np.asarray(ImageOps.exif_transpose(image).convert("RGB")).copy())
        sample = dataset[index][0]
        assert torch.equal(sample, displayed.permute(2, 0, 1)), path
        assert torch.equal(by_file[path.name], sample), path
        assert sample.shape == ((3, 30, 20) if int(path.stem[-1]) >= 5 else (3, 20, 30)), path  # 5..8 turn it


def test_voc_images_stay_on_their_stored_grid(tmp_path: Path) -> None:
    devkit = write_vocdevkit(tmp_path / "VOCdevkit", num_train=2, num_test=2, size=(48, 64))
    image_id = (devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    path = devkit / "VOC2007" / "JPEGImages" / f"{image_id}.jpg"
    with Image.open(path) as image:
        height, width = image.height, image.width
        stored = _photo(path, 6, np.asarray(image.convert("RGB")))  # the XML's boxes are on this grid
    assert height != width
    dataset = VOCDetection(str(devkit), ["2007-test"])
    index = [ann.image_path for ann in dataset.annotations].index(path)
    assert torch.equal(dataset[index][0], torch.from_numpy(stored.copy()).permute(2, 0, 1))
    assert decode(path, exif_orientation=True).shape == (3, width, height)


def _bomb(path: Path) -> Path:
    """A BMP header declaring 20000 x 20000 pixels (over Pillow's limit), little data after it."""
    info = struct.pack("<IiiHHIIiiII", 40, 20000, 20000, 1, 24, 0, 0, 0, 0, 0, 0)
    path.write_bytes(b"BM" + struct.pack("<IHHI", 54 + 100, 0, 0, 54) + info + bytes(100))
    return path


def test_decompression_bomb_names_the_file_and_the_setting(tree: Path) -> None:
    bomb = _bomb(tree / "train" / "circle" / "huge.bmp")
    hint = r"PIL\.Image\.MAX_IMAGE_PIXELS \(now \d+\); if you trust the file, set that higher"
    with pytest.raises(BadImageError, match=rf"^{re.escape(str(bomb))}: .*400000000 pixels.*{hint}"):
        decode(bomb)
    with pytest.raises(BadImageError, match=rf"^{re.escape(str(bomb))}: .*{hint}"):
        read_rgb(bomb)
    with pytest.raises(ValueError, match=rf"cannot read image {re.escape(str(bomb))}: .*{hint}"):
        ImageFiles(bomb.parent)
    dataset = CheckedImageFolder(str(tree / "train"), on_bad_sample="skip")
    sample = dataset[dataset.samples.index((str(bomb), 0))]
    assert isinstance(sample, BadSample) and sample.path == str(bomb) and "MAX_IMAGE_PIXELS" in sample.reason


def test_symbolic_link_loop_in_a_class_folder_is_an_error_naming_the_link(tree: Path) -> None:
    loop = tree / "train" / "circle" / "loop"
    loop.symlink_to("..")
    with pytest.raises(ValueError, match=re.escape(f"symbolic-link loop: {loop} leads to {tree.resolve() / 'train'}")):
        CheckedImageFolder(str(tree / "train"))
    assert len(ImageFiles(tree / "train")) == 8  # predict does not follow links into folders
    loop.unlink()
    (tree / "train" / "circle" / "more").symlink_to(tree / "val" / "circle")  # a link elsewhere is followed
    assert len(CheckedImageFolder(str(tree / "train"))) == 8 + 2


def test_predict_ignores_files_pillow_only_writes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    suffixes = image_suffixes()
    assert {".jpg", ".png", ".tif", ".webp", ".tga", ".mpo"} <= suffixes
    assert not {".pdf", ".palm"} & suffixes
    Image.new("RGB", (8, 8)).save(tmp_path / "page.pdf")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    with caplog.at_level(logging.INFO, logger="refvision"):
        files = ImageFiles(tmp_path).files
    assert files == [tmp_path / "photo.png"]
    assert any("1 files are not images" in r.getMessage() and ".pdf" in r.getMessage() for r in caplog.records)


def test_images_outside_class_folders_are_logged_by_name(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    stray = tree / "train" / "stray.jpg"
    shutil.copy(tree / "train" / "circle" / "circle_0000.jpg", stray)
    with caplog.at_level(logging.WARNING, logger="refvision"):
        dataset = CheckedImageFolder(str(tree / "train"))
    assert len(dataset) == 8
    assert any("outside the class folders" in r.getMessage() and str(stray) in r.getMessage() for r in caplog.records)


def test_class_whose_images_are_all_bad_is_an_error_under_skip(tree: Path) -> None:
    square = tree / "val" / "square"
    for path in square.iterdir():
        path.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"class folder {square}: every image file is bad")):
        CheckedImageFolder(str(tree / "val"), on_bad_sample="skip")

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
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode

from refvision.app.demo.data import write_vocdevkit
from refvision.data.decode import _CPP_LOCATION, DEFAULT_MAX_IMAGE_PIXELS, BadImageError, decode, read_header
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


LIMIT_MESSAGE = r"{width} x {height} pixels \({pixels}\) is over the limit of {limit} pixels per image"


def test_decompression_bomb_names_the_file_its_size_and_the_setting(tree: Path) -> None:
    bomb = _bomb(tree / "train" / "circle" / "huge.bmp")
    limit = LIMIT_MESSAGE.format(width=20000, height=20000, pixels=400000000, limit=DEFAULT_MAX_IMAGE_PIXELS)
    hint = "raise it with the environment variable REFVISION_MAX_IMAGE_PIXELS=400000000"
    with pytest.raises(BadImageError, match=rf"^{re.escape(str(bomb))}: {limit}.*{hint}$"):
        decode(bomb)
    with pytest.raises(BadImageError, match=rf"^{re.escape(str(bomb))}: {limit}"):
        read_rgb(bomb)
    with pytest.raises(ValueError, match=rf"{re.escape(str(bomb))}: {limit}"):  # at setup, from the header
        ImageFiles(bomb.parent)
    dataset = CheckedImageFolder(str(tree / "train"), on_bad_sample="skip")
    assert [path for path, _ in dataset.skipped] == [str(bomb)] and "REFVISION_MAX_IMAGE_PIXELS" in dataset.skipped[0][
        1
    ]


def _png_chunk(name: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + name + data + struct.pack(">I", zlib.crc32(name + data))


def _png_file(width: int, height: int, depth: int, colour: int, stream: bytes, interlace: int = 0) -> bytes:
    """A PNG of one IDAT ``stream`` (zlib data), every chunk with a valid CRC-32."""
    palette = _png_chunk(b"PLTE", bytes(range(48))) if colour == 3 else b""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + palette
        + _png_chunk(b"IDAT", stream)
        + _png_chunk(b"IEND", b"")
    )


def _png_rows(width: int, height: int, depth: int, colour: int, interlace: int, seed: int) -> bytes:
    """Filtered image data (filter types 0..4, random bytes) of a ``width`` x ``height`` PNG (Adam7: ``interlace``)."""
    rng = np.random.default_rng(seed)
    bits = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour] * depth
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    rows = b""
    for x0, y0, dx, dy in passes if interlace else [(0, 0, 1, 1)]:
        pass_width, pass_height = -(-max(width - x0, 0) // dx), -(-max(height - y0, 0) // dy)
        for _ in range(pass_height if pass_width else 0):
            high = 16 if (colour, depth) == (3, 8) else 256  # palette indices within the 16 colours of PLTE
            values = rng.integers(0, high, -(-pass_width * bits // 8), dtype=np.uint8)
            rows += bytes([int(rng.integers(0, 5))]) + values.tobytes()
    return rows


# (bit depth, colour type, interlace): Pillow's route (8-bit gray / RGB) and the checked libpng route.
PNG_KINDS = [(8, 2, 0), (8, 0, 1), (8, 6, 0), (16, 2, 0), (16, 0, 1), (8, 3, 1), (1, 0, 0), (4, 3, 0)]


def _damaged_pngs(folder: Path) -> dict[str, Path]:
    """Valid-CRC PNGs of every kind in :data:`PNG_KINDS` whose image data libpng cannot read, and their valid twins."""
    files = {}
    for depth, colour, interlace in PNG_KINDS:
        rows = _png_rows(19, 13, depth, colour, interlace, seed=depth + colour)
        kind = f"{depth}bit_type{colour}_interlace{interlace}"
        stream = zlib.compress(rows)
        bad_filter = bytearray(rows)
        bad_filter[0] = 7
        bad_check = bytearray(stream)
        bad_check[-1] ^= 0x01
        for fault, data in {
            "valid": stream,
            "short": zlib.compress(rows[: len(rows) // 2]),
            "one_byte_short": zlib.compress(rows[:-1]),
            "bad_filter": zlib.compress(bytes(bad_filter)),
            "bad_checksum": bytes(bad_check),
            "cut_stream": stream[: len(stream) // 2],
            "no_checksum": stream[:-4],
            "no_data": b"",
        }.items():
            files[f"{kind}_{fault}"] = folder / f"{kind}_{fault}.png"
            files[f"{kind}_{fault}"].write_bytes(_png_file(19, 13, depth, colour, data, interlace))
    return files


def test_png_with_valid_crcs_but_bad_image_data_raises_and_never_crashes(tmp_path: Path) -> None:
    files = _damaged_pngs(tmp_path)
    result = _python(f"""
        import json
        from refvision.data.decode import BadImageError, decode
        outcomes = {{}}
        for name, path in {json.dumps({name: str(path) for name, path in files.items()})}.items():
            try:
                outcomes[name] = list(decode(path).shape)
            except BadImageError as error:
                outcomes[name] = str(error)
        print(json.dumps(outcomes))
    """)
    assert result.returncode == 0, _crashed(result)  # rc -11 (SIGSEGV) before the check
    outcomes = json.loads(result.stdout.splitlines()[-1])
    for name, path in files.items():
        if name.endswith("_valid"):
            with Image.open(path) as image:  # Pillow, the reference, reads the valid twins
                assert outcomes[name] == [3, image.height, image.width], name
        elif name.endswith("_no_checksum") and isinstance(outcomes[name], list):  # every row is there: Pillow reads it
            assert outcomes[name] == outcomes[name.replace("no_checksum", "valid")], name
        else:
            assert isinstance(outcomes[name], str) and outcomes[name].startswith(f"{path}: "), (name, outcomes[name])


def test_png_with_valid_crcs_but_short_data_in_workers_is_a_named_skipped_sample(tree: Path) -> None:
    bad = _png(tree)
    rows = zlib.decompress(b"".join(_idat(bad.read_bytes())))
    with Image.open(bad) as image:
        depth, colour = 8, {"RGB": 2, "RGBA": 6, "L": 0}[image.mode]
        bad.write_bytes(_png_file(image.width, image.height, depth, colour, zlib.compress(rows[:-10])))
    result = _python(f"""
        from refvision.data.imagefolder import ImageFolderDataModule
        dm = ImageFolderDataModule({str(tree)!r}, image_size=16, resize_size=16, batch_size=2, num_workers=2,
                                   pin_memory=False, on_bad_sample="skip")
        dm.setup("fit")
        loader = dm.train_dataloader()
        print(sum(len(labels) for _, labels in loader))
        print(loader.skipped)
    """)
    assert result.returncode == 0, _crashed(result)  # "worker exited unexpectedly" before the check
    seen, skipped = result.stdout.splitlines()[-2:]
    assert seen == "7" and str(bad) in skipped and "truncated" in skipped


def _idat(data: bytes) -> list[bytes]:
    position, found = 8, []
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        if data[position + 4 : position + 8] == b"IDAT":
            found.append(data[position + 8 : position + 8 + length])
        position += 12 + length
    return found


def _every_format(folder: Path) -> list[Path]:
    """A 40 x 30 image in every format read here (a JPEG with an EXIF block before its frame header)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010E] = "x" * 5000  # ImageDescription: the frame header starts after 5 KB
    paths = []
    for name, options in {
        "a.jpg": {"exif": exif},
        "a.png": {},
        "a.gif": {},
        "a.bmp": {},
        "a.tif": {},
        "lossy.webp": {"quality": 80},
        "lossless.webp": {"lossless": True},
        "exif.webp": {"exif": exif},
        "a.ppm": {},
    }.items():
        path = folder / name
        image.save(path, **options)
        paths.append(path)
    big_endian = folder / "big_endian.tif"  # Pillow writes 16-bit big-endian samples as a big-endian ("MM") TIFF
    Image.new("I;16B", (40, 30)).save(big_endian)
    assert big_endian.read_bytes()[:2] == b"MM"
    paths.append(big_endian)
    pgm = folder / "comment.pgm"
    pgm.write_bytes(b"P5\n# made by hand\n40 # width\n30\n255\n" + bytes(1200))
    return [*paths, pgm]


def test_headers_give_the_size_pillow_reads(tmp_path: Path) -> None:
    for path in _every_format(tmp_path):
        header = read_header(path)
        with Image.open(path) as image:
            assert (header.width, header.height) == image.size == (40, 30), path
        assert decode(path).shape == (3, 30, 40), path


def test_one_pixel_limit_for_every_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _every_format(tmp_path)
    monkeypatch.setenv("REFVISION_MAX_IMAGE_PIXELS", "1199")
    limit = LIMIT_MESSAGE.format(width=40, height=30, pixels=1200, limit=1199)
    for path in paths:
        for read in (read_header, decode, read_rgb):
            with pytest.raises(BadImageError, match=rf"^{re.escape(str(path))}: {limit}.*PIXELS=1200$"):
                read(path)
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "sub" / "b.tga")
    Image.new("RGB", (40, 30)).save(tmp_path / "sub" / "c.png")
    Image.new("RGB", (30, 30)).save(tmp_path / "sub" / "small.jpg")
    with pytest.raises(ValueError, match=r"2 bad file\(s\)") as error:
        ImageFiles(tmp_path / "sub")  # predict reads every header at setup; tga: Pillow's header
    assert all(str(tmp_path / "sub" / name) in str(error.value) for name in ("b.tga", "c.png"))
    monkeypatch.setenv("REFVISION_MAX_IMAGE_PIXELS", "1200")
    assert all(decode(path).shape == (3, 30, 40) for path in paths)
    monkeypatch.setenv("REFVISION_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="REFVISION_MAX_IMAGE_PIXELS='lots': expected a positive number"):
        decode(paths[0])


def test_a_30000_x_30000_jpeg_header_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (40, 30)).save(path)
    data = bytearray(path.read_bytes())
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = struct.pack(">HH", 30000, 30000)
    path.write_bytes(bytes(data))
    limit = LIMIT_MESSAGE.format(width=30000, height=30000, pixels=900000000, limit=DEFAULT_MAX_IMAGE_PIXELS)
    with pytest.raises(BadImageError, match=rf"^{re.escape(str(path))}: {limit}"):
        decode(path)


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
    assert any(
        "1 file(s) are not images (.pdf)" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records
    )


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

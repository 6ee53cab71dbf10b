import io
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from datafiles import fail_listing
from PIL import Image, ImageFile

from tlfinetune.errors import DataError
from tlfinetune.images import (
    IMAGE_EXTENSIONS,
    PathList,
    is_image_file,
    list_images,
    load_rgb,
    probe_image,
    to_rgb,
)
from tlfinetune.sources import Split


def pixel(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    assert img.mode == "RGB"
    return tuple(int(v) for v in img.getpixel(xy))


def near(a: tuple[int, ...], b: tuple[int, ...], tol: int = 2) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height, with a tiny (wrong) IDAT and an IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )
    return path


def noisy_jpeg(path: Path, size: tuple[int, int] = (64, 48), **save: object) -> Path:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", **save)
    return path


# ---------------------------------------------------------------- mode conversions


def test_rgb_passes_through(tmp_path, make_image):
    img = load_rgb(make_image(tmp_path / "a.png", (10, 20, 30)))
    assert img.mode == "RGB" and img.size == (16, 12)
    assert pixel(img) == (10, 20, 30)


def test_grayscale_and_bilevel(tmp_path):
    Image.new("L", (8, 8), 77).save(tmp_path / "l.png")
    Image.new("1", (8, 8), 1).save(tmp_path / "one.png")
    assert pixel(load_rgb(tmp_path / "l.png")) == (77, 77, 77)
    assert pixel(load_rgb(tmp_path / "one.png")) == (255, 255, 255)


def test_alpha_is_composited_onto_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.putpixel((1, 1), (0, 0, 255, 0))  # fully transparent blue: shows white
    rgba.putpixel((2, 2), (0, 0, 0, 128))  # half-transparent black: mid-grey
    rgba.save(tmp_path / "rgba.png")
    img = load_rgb(tmp_path / "rgba.png")
    assert pixel(img, (0, 0)) == (255, 0, 0)
    assert pixel(img, (1, 1)) == (255, 255, 255)
    assert near(pixel(img, (2, 2)), (127, 127, 127), tol=2)

    la = Image.new("LA", (8, 8), (0, 0))
    la.save(tmp_path / "la.png")
    assert pixel(load_rgb(tmp_path / "la.png")) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 200, 0, 10, 20, 30] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.save(tmp_path / "p.png")
    img = load_rgb(tmp_path / "p.png")
    assert pixel(img, (0, 0)) == (0, 200, 0) and pixel(img, (1, 1)) == (10, 20, 30)

    p.info["transparency"] = 0  # index 0 transparent: green pixels show white
    p.save(tmp_path / "pt.png", transparency=0)
    img = load_rgb(tmp_path / "pt.png")
    assert pixel(img, (0, 0)) == (255, 255, 255)
    assert pixel(img, (1, 1)) == (10, 20, 30)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    img = load_rgb(tmp_path / "c.jpg")
    r, g, b = pixel(img, (8, 8))
    assert r > 200 and g < 60 and b < 60  # cyan-free, magenta+yellow = red


def test_16bit_png_mid_grey_stays_mid_grey(tmp_path):
    grey16 = np.full((8, 8), 32768, np.uint16)
    grey16[0, 0] = 65535
    grey16[0, 1] = 0
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    img = load_rgb(tmp_path / "g16.png")
    assert pixel(img, (4, 4)) == (128, 128, 128)  # not the near-white of a naive conversion
    assert pixel(img, (0, 0)) == (255, 255, 255)
    assert pixel(img, (1, 0)) == (0, 0, 0)


def test_16bit_big_endian_int32_and_float_modes():
    be = Image.frombytes("I;16B", (4, 4), np.full((4, 4), 16384, ">u2").tobytes())
    assert pixel(to_rgb(be)) == (64, 64, 64)
    i32 = Image.fromarray(np.full((4, 4), 65535, np.int32), "I")
    assert pixel(to_rgb(i32)) == (255, 255, 255)
    i32_8bit = Image.fromarray(np.full((4, 4), 200, np.int32), "I")
    assert pixel(to_rgb(i32_8bit)) == (200, 200, 200)
    f01 = Image.fromarray(np.full((4, 4), 0.5, np.float32), "F")
    assert pixel(to_rgb(f01)) == (128, 128, 128)
    f255 = Image.fromarray(np.full((4, 4), 100.0, np.float32), "F")
    assert pixel(to_rgb(f255)) == (100, 100, 100)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 high: left half red, right half blue. Orientation 6 means "rotate
    # 90 degrees clockwise to display": the upright image is 20 x 40 with red on top.
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    stored = Image.fromarray(pixels)
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rot.jpg", quality=95, exif=exif.tobytes())
    img = load_rgb(tmp_path / "rot.jpg")
    assert img.size == (20, 40)
    top, bottom = pixel(img, (10, 5)), pixel(img, (10, 34))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_large_jpeg_is_decoded_at_reduced_size_but_keeps_twice_the_target(tmp_path):
    path = noisy_jpeg(tmp_path / "big.jpg", size=(1024, 768))
    assert load_rgb(path).size == (1024, 768)
    small = load_rgb(path, target_size=64)
    assert min(small.size) >= 128 and small.size[0] < 1024
    assert small.size == (256, 192)  # 1/4 DCT scale: 1/8 would leave 96 < 2 * 64 rows
    assert load_rgb(path, target_size=400).size == (1024, 768)  # 1/2 would leave 384 < 800


# ---------------------------------------------------------------- bad files


def test_truncated_jpeg_names_the_file(tmp_path):
    path = noisy_jpeg(tmp_path / "cut.jpg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(DataError, match="cut.jpg"):
        probe_image(path)
    with pytest.raises(DataError, match="cut.jpg.*truncated"):
        load_rgb(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_jpeg_with_trailing_bytes_is_not_called_truncated(tmp_path):
    path = noisy_jpeg(tmp_path / "tail.jpg")
    path.write_bytes(path.read_bytes() + b"\0" * 5000)  # end marker far from the end
    info = probe_image(path)
    assert (info.width, info.height, info.format) == (64, 48, "JPEG")


def test_corrupt_data_in_a_complete_png_is_found_when_decoding(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(
        buf, "PNG"
    )
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 20
    data[start : start + 40] = bytes(b ^ 0x55 for b in data[start : start + 40])
    path = tmp_path / "broken.png"
    path.write_bytes(bytes(data))
    probe_image(path)  # the header and the end marker are fine
    with pytest.raises(DataError, match="broken.png"):
        load_rgb(path)


@pytest.mark.parametrize("name", ["garbage.jpg", "photo.heic", "scan.png"])
def test_unreadable_files_name_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(DataError, match=name.replace(".", r"\.")) as exc:
        probe_image(path)
    if name.endswith(".heic"):
        assert "pillow-heif" in str(exc.value)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty.png.*empty"):
        probe_image(tmp_path / "empty.png")
    with pytest.raises(DataError, match="gone.png"):
        probe_image(tmp_path / "gone.png")
    with pytest.raises(DataError, match="gone.png"):
        load_rgb(tmp_path / "gone.png")


def test_pixel_limit_names_file_and_setting(tmp_path, make_image):
    path = make_image(tmp_path / "wide.png", size=(40, 30))
    assert probe_image(path, max_image_pixels=1200).width == 40
    with pytest.raises(DataError, match=r"wide\.png.*max_image_pixels"):
        probe_image(path, max_image_pixels=1199)
    with pytest.raises(DataError, match=r"wide\.png.*max_image_pixels"):
        load_rgb(path, max_image_pixels=100)


def test_decompression_bomb_header_is_refused_and_pillow_settings_untouched(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    bomb = png_header_only(tmp_path / "bomb.png", 50_000, 50_000)  # 2.5e9 pixels
    with pytest.raises(DataError, match=r"bomb\.png.*max_image_pixels"):
        probe_image(bomb)  # Pillow's own DecompressionBombError, reworded
    with pytest.raises(DataError, match=r"bomb\.png.*max_image_pixels"):
        load_rgb(bomb)
    # A limit above Pillow's lets the header through (the pixels are not decoded here).
    info = probe_image(bomb, max_image_pixels=3_000_000_000)
    assert (info.width, info.height) == (50_000, 50_000)
    assert probe_image(bomb, max_image_pixels=None).width == 50_000
    assert before == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------- discovery


def test_list_images_recurses_sorted_and_skips_hidden_and_non_images(tmp_path, make_image):
    for rel in ["b.png", "a/z.jpg", "a/deeper/c.PNG", "a.bmp"]:
        make_image(tmp_path / rel, fmt="PNG")
    make_image(tmp_path / ".ipynb_checkpoints" / "x.png")
    make_image(tmp_path / "a" / ".hidden" / "y.png")
    make_image(tmp_path / "._resource.jpg", fmt="PNG")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "a" / "labels.csv").write_text("x")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a.bmp", "a/deeper/c.PNG", "a/z.jpg", "b.png"]


def test_image_extension_rules():
    assert is_image_file("x.JPG") and is_image_file("x.heic") and is_image_file("x.webp")
    assert not is_image_file("x.txt") and not is_image_file(".DS_Store")
    assert not is_image_file("._x.jpg")
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".webp"} <= IMAGE_EXTENSIONS


def test_path_list_behaves_as_a_sequence_of_paths(tmp_path):
    odd = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name on a UTF-8 file system
    names = [str(tmp_path / "a" / "x.jpg"), "rel/y.png", odd]
    files = PathList(names)
    assert len(files) == 3 and files[0] == tmp_path / "a" / "x.jpg" and files[-1] == Path(odd)
    assert list(files) == [Path(n) for n in names] and files == [Path(n) for n in names]
    assert files.take([2, 0]) == [Path(odd), Path(names[0])] and files[1:] == files.take([1, 2])
    assert files != [Path(n) for n in names[:2]]
    with pytest.raises(IndexError):
        files[3]


def test_a_split_keeps_each_path_in_its_bytes_not_as_python_objects():
    """Per-image bookkeeping stays a few hundred bytes: 1M images must not cost a GB of RAM."""
    n = 20_000
    paths = [f"/data/photos/class{i % 10}/IMG_{i:07d}.jpg" for i in range(n)]  # 36 bytes each
    tracemalloc.start()
    try:
        split = Split("folder /data/photos", [i % 10 for i in range(n)], paths)
        train = split.subset(range(0, n, 2))
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Paths (~36 B), offsets (8 B) and labels (8 B) per image, twice (split and subset).
    assert kept / n < 150, f"{kept / n:.0f} bytes per image"
    assert train.files[3] == Path(paths[6]) and train.labels[3] == 6


def test_symlinked_folders_are_followed_but_a_link_back_into_them_is_named(tmp_path, make_image):
    for rel in ["a/0.png", "a/1.png", "b/0.png", "elsewhere/x.png"]:
        make_image(tmp_path / rel)
    (tmp_path / "a" / "more").symlink_to(tmp_path / "elsewhere")  # not a loop: followed
    assert [p.name for p in list_images(tmp_path / "a")] == ["0.png", "1.png", "x.png"]
    # a link to the data folder from inside a class: followed, it reads b's images as a's
    (tmp_path / "a" / "loop").symlink_to("..")
    with pytest.raises(DataError, match=r"a/loop points to '\.\.'.*rm .*a/loop") as exc:
        list_images(tmp_path / "a")
    assert "loop" in str(exc.value) and "Traceback" not in str(exc.value)
    (tmp_path / "a" / "loop").unlink()
    # two folders linking to each other: os.walk went round them until the path got too long
    (tmp_path / "b" / "to_a").symlink_to("../a")
    (tmp_path / "a" / "to_b").symlink_to("../b")
    with pytest.raises(DataError, match=r"to_[ab] .*points to '\.\./[ab]'.*again and again"):
        list_images(tmp_path)


def test_a_folder_that_cannot_be_read_is_named_not_left_out(tmp_path, make_image, monkeypatch):
    for rel in ["a/0.png", "a/private/1.png", "b/0.png"]:
        make_image(tmp_path / rel)
    fail_listing(monkeypatch, tmp_path / "a" / "private")
    with pytest.raises(DataError, match=r"Cannot read the folder .*a/private \(Permission denied"):
        list_images(tmp_path / "a")
    with pytest.raises(DataError, match=r"chmod -R u\+rX .*a/private"):
        list_images(tmp_path)


def test_a_file_link_that_leads_to_itself_is_a_bad_image(tmp_path):
    (tmp_path / "self2.png").symlink_to("self1")
    (tmp_path / "self1").symlink_to("self2.png")
    for read in (probe_image, load_rgb):
        with pytest.raises(DataError, match=r"self2\.png cannot be opened.*leads back to itself"):
            read(tmp_path / "self2.png")
    assert [p.name for p in list_images(tmp_path)] == ["self2.png"]  # listed, then reported


def test_image_messages_leave_the_skip_advice_to_the_caller(tmp_path):
    """Whether skip_bad_images is on is the caller's to know: the message only names the file."""
    (tmp_path / "bad.png").write_bytes(b"junk")
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("bad.png", "empty.png"):
        with pytest.raises(DataError) as exc:
            probe_image(tmp_path / name)
        assert name in str(exc.value) and "skip_bad_images" not in str(exc.value)

"""vitkit.data.images: every PIL mode becomes correct 8-bit RGB; every bad file an ImageError."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import png_header
from vitkit import ImageError
from vitkit.data.images import is_image_file, load_image


def _rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def _saved(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_rgb_file_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    out = load_image(_saved(Image.fromarray(array), tmp_path / "x.png"))
    np.testing.assert_array_equal(_rgb(out), array)


def test_grayscale_and_one_bit_replicate_to_three_channels(tmp_path):
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = _rgb(load_image(_saved(Image.fromarray(gray), tmp_path / "g.png")))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)
    bits = Image.fromarray(gray > 127).convert("1")
    out = _rgb(load_image(_saved(bits, tmp_path / "b.png")))
    assert set(np.unique(out)) == {0, 255}
    np.testing.assert_array_equal(out[..., 0], np.where(gray > 127, 255, 0))


def test_rgba_composites_onto_white_by_default_and_can_drop_alpha(tmp_path):
    array = np.zeros((4, 4, 4), dtype=np.uint8)
    array[..., 0] = 200  # red channel
    array[0, :, 3] = 255  # row 0 opaque, row 1 half, rows 2-3 fully transparent
    array[1, :, 3] = 128
    path = _saved(Image.fromarray(array), tmp_path / "a.png")
    out = _rgb(load_image(path))
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out[2, 0], [255, 255, 255])
    assert abs(int(out[1, 0, 1]) - 127) <= 1  # half-transparent black over white: mid grey
    dropped = _rgb(load_image(path, background=None))
    np.testing.assert_array_equal(dropped[2, 0], [200, 0, 0])
    black = _rgb(load_image(path, background=(0, 0, 0)))
    np.testing.assert_array_equal(black[2, 0], [0, 0, 0])


def test_la_uses_alpha(tmp_path):
    la = Image.merge("LA", [Image.new("L", (3, 3), 50), Image.new("L", (3, 3), 0)])
    out = _rgb(load_image(_saved(la, tmp_path / "la.png")))
    np.testing.assert_array_equal(out, np.full((3, 3, 3), 255))


def test_palette_with_and_without_transparency(tmp_path):
    array = np.zeros((4, 4), dtype=np.uint8)
    array[:2] = 1
    palette = [10, 20, 30, 240, 0, 0] + [0] * (256 * 3 - 6)
    p = Image.frombytes("P", (4, 4), array.tobytes())
    p.putpalette(palette)
    out = _rgb(load_image(_saved(p, tmp_path / "p.png")))
    np.testing.assert_array_equal(out[0, 0], [240, 0, 0])
    np.testing.assert_array_equal(out[3, 3], [10, 20, 30])
    out = _rgb(load_image(_saved(p, tmp_path / "pt.png", transparency=0)))
    np.testing.assert_array_equal(out[3, 3], [255, 255, 255])  # index 0 transparent -> white
    np.testing.assert_array_equal(out[0, 0], [240, 0, 0])
    gif = _rgb(load_image(_saved(p, tmp_path / "p.gif", transparency=0)))
    np.testing.assert_array_equal(gif[3, 3], [255, 255, 255])


def test_cmyk_jpeg_and_tiff(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta + yellow: red
    out = _rgb(load_image(_saved(cmyk, tmp_path / "c.tif")))
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    out = _rgb(load_image(_saved(cmyk, tmp_path / "c.jpg", quality=100)))
    assert out[0, 0, 0] > 240 and out[0, 0, 1] < 15 and out[0, 0, 2] < 15


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path, mode):
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    image = Image.frombytes(
        mode, (5, 1), values.astype("<u2" if mode == "I;16" else ">u2").tobytes()
    )
    out = _rgb(load_image(image))[0, :, 0]
    np.testing.assert_array_equal(out, [0, 1, 4, 128, 255])
    if mode == "I;16":  # and from a real 16-bit PNG file
        out = _rgb(load_image(_saved(image, tmp_path / "16.png")))[0, :, 0]
        np.testing.assert_array_equal(out, [0, 1, 4, 128, 255])


def test_int32_and_float_modes():
    i32 = Image.fromarray(np.array([[0, 65535, 32768]], dtype=np.int32))
    assert i32.mode == "I"
    np.testing.assert_array_equal(_rgb(load_image(i32))[0, :, 0], [0, 255, 128])
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert f.mode == "F"
    np.testing.assert_array_equal(_rgb(load_image(f))[0, :, 0], [0, 128, 255])
    wide = Image.fromarray(np.array([[-10.0, 0.0, 10.0]], dtype=np.float32))
    np.testing.assert_array_equal(_rgb(load_image(wide))[0, :, 0], [0, 128, 255])


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high; left half white
    array[:, :20] = 255
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _saved(image, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(path)
    assert out.size == (20, 40)  # (width, height) swapped
    top, bottom = np.asarray(out)[:10].mean(), np.asarray(out)[-10:].mean()
    assert top > 200 and bottom < 50  # the left (white) half is now on top
    assert load_image(path, exif_transpose=False).size == (40, 20)


def test_accepts_bytes_and_file_objects(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (5, 6), (1, 2, 3)).save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).size == (5, 6)
    buffer.seek(0)
    assert load_image(buffer).getpixel((0, 0)) == (1, 2, 3)


def test_first_frame_of_animation(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert load_image(path).getpixel((0, 0)) == (255, 0, 0)


def _error(source, **kwargs) -> str:
    with pytest.raises(ImageError) as info:
        load_image(source, **kwargs)
    return str(info.value)


def test_bad_files_raise_image_error_naming_the_file(tmp_path):
    missing = tmp_path / "missing.jpg"
    assert _error(missing) == f"{missing}: no such file"
    assert _error(tmp_path).startswith(f"{tmp_path}: is a directory")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert _error(empty) == f"{empty}: empty file"
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n" * 10)
    assert _error(text).startswith(f"{text}: not an image file")

    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    message = _error(truncated)
    assert message.startswith(f"{truncated}: ") and "truncated" in message


def test_decompression_bombs_are_refused(tmp_path):
    huge = tmp_path / "bomb.png"
    huge.write_bytes(png_header(100_000, 100_000))  # 10 G pixels in ~100 bytes
    message = _error(huge)
    assert message.startswith(f"{huge}: ") and "decompression bomb" in message
    assert "decompression bomb" in _error(huge, max_pixels=None)  # PIL's own hard limit

    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    message = _error(big, max_pixels=50_000)
    assert "300x200 = 60,000 pixels" in message and "50,000" in message
    assert load_image(big, max_pixels=60_000).size == (300, 200)


def test_is_image_file():
    assert is_image_file("a/b.JPG") and is_image_file("x.webp")
    assert not is_image_file("notes.txt")


def test_refusing_bombs_from_many_threads_leaves_the_warning_filters_alone(capfd):
    """Predict and serve decode in threads. PIL warns (DecompressionBombWarning) while it reads
    the header of an image vitkit then refuses; silencing that by swapping the process-wide
    filters in each thread at once can leave a filter behind, or let the warning through. An
    exporter silencing every warning (`_graph.quiet`, int8 calibration in serve) at the same
    time must not leave its "ignore all" behind either."""
    import threading
    import warnings

    bomb = png_header(12_000, 12_000)  # above PIL's warning limit, below its hard one
    before = list(warnings.filters)
    errors: list[str] = []

    def work() -> None:
        for _ in range(200):
            try:
                load_image(bomb)
            except ImageError as exc:
                errors.append(str(exc))

    def export_chatter() -> None:  # calibration or export silencing everything meanwhile
        from vitkit.infer._graph import quiet

        for _ in range(300):
            with quiet():
                pass

    threads = [threading.Thread(target=work) for _ in range(8)]
    threads.append(threading.Thread(target=export_chatter))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so the blocks interleave
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(errors) == 1600 and all("decompression bomb" in e for e in errors)
    assert warnings.filters == before
    assert "DecompressionBombWarning" not in capfd.readouterr().err

"""Photos decoded as a person sees them (common/photo.py): every bit depth, mode, orientation and colour profile a
camera, phone or editor writes becomes the 8-bit sRGB picture a viewer shows, or a DataError naming the reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from biomass_cache.common.errors import DataError
from biomass_cache.common.photo import load_image


def png_16bit(path, pixels: np.ndarray) -> None:
    """A 16-bit PNG (gray: (H, W), RGB: (H, W, 3)) written chunk by chunk: Pillow cannot write 48-bit RGB."""
    h, w = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    rows = pixels.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_a_16bit_grayscale_photo_is_scaled_not_clipped(tmp_path):
    """The issue's case: true mean 81.5 on the 8-bit scale was read as all white (255)."""
    gray = np.full((32, 64), 81, np.uint16) * 257
    gray[:, ::2] = 82 * 257  # mean 81.5 of 255
    Image.fromarray(gray).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    image = np.asarray(load_image(tmp_path / "g16.png"))
    assert image.shape == (32, 64, 3) and image.mean() == pytest.approx(81.5)
    assert (image[:, 0] == 82).all() and (image[:, 1] == 81).all()
    png_16bit(tmp_path / "g16b.png", gray)  # the big-endian form Pillow may open as mode I
    assert np.array_equal(np.asarray(load_image(tmp_path / "g16b.png")), image)
    full = np.array([[0, 257, 32896, 65535] * 8] * 16, np.uint16)
    Image.fromarray(full).save(tmp_path / "range.png")
    assert np.asarray(load_image(tmp_path / "range.png"))[0, :4, 0].tolist() == [0, 1, 128, 255]


def test_a_16bit_rgb_photo_keeps_its_colours(tmp_path):
    rgb = np.zeros((16, 32, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200 * 257, 100 * 257, 30 * 257
    png_16bit(tmp_path / "rgb48.png", rgb)
    assert np.asarray(load_image(tmp_path / "rgb48.png"))[0, 0].tolist() == [200, 100, 30]


def test_pixels_with_no_photo_brightness_are_refused(tmp_path):
    Image.fromarray(np.full((16, 32), 0.5, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"f.tif: floating-point pixels .*save it as an 8- or 16-bit"):
        load_image(tmp_path / "f.tif")
    for value in (1 << 20, 200):  # 200: 8-bit values in a 32-bit file were read as black
        Image.fromarray(np.full((16, 32), value, np.int32)).save(tmp_path / "i.tif")
        with pytest.raises(DataError, match=r"i.tif: 32-bit integer pixels have no standard brightness"):
            load_image(tmp_path / "i.tif")


def test_transparency_is_refused_and_an_opaque_alpha_dropped(tmp_path):
    rgba = np.zeros((16, 32, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 180, 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert np.asarray(load_image(tmp_path / "opaque.png"))[0, 0].tolist() == [0, 180, 0]
    rgba[:4, :, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "holes.png")
    with pytest.raises(DataError, match=r"holes.png: 128 of its 512 pixels are transparent"):
        load_image(tmp_path / "holes.png")
    palette = Image.new("P", (32, 16), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0])
    palette.save(tmp_path / "p.png", transparency=1)
    with pytest.raises(DataError, match=r"p.png: 512 of its 512 pixels are transparent"):
        load_image(tmp_path / "p.png")


@pytest.mark.parametrize("tag, turn", [(1, None), (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270),
                                       (8, Image.Transpose.ROTATE_90), (2, Image.Transpose.FLIP_LEFT_RIGHT)])
def test_exif_orientation_stands_the_photo_upright(tmp_path, tag, turn):
    """A phone stores a portrait sensor read-out plus the turn to apply; the photo is what the viewer shows."""
    stored = np.zeros((64, 32, 3), np.uint8)  # 32 wide, 64 tall as stored
    stored[:8, :8] = (255, 0, 0)  # a red mark in the stored top-left corner
    image = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = tag
    image.save(tmp_path / "phone.png", exif=exif)
    seen = np.asarray(load_image(tmp_path / "phone.png"))
    expected = np.asarray(image if turn is None else image.transpose(turn))
    assert np.array_equal(seen, expected)
    if tag in (6, 8):
        assert seen.shape == (32, 64, 3)  # landscape, as seen
    if tag == 6:
        assert seen[0, -1].tolist() == [255, 0, 0]  # turned clockwise: the stored top-left is the top-right


def test_a_turned_jpeg_is_drafted_to_the_size_seen(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (400, 800), (90, 140, 60)).save(tmp_path / "p.jpg", exif=exif, quality=95)
    assert load_image(tmp_path / "p.jpg").size == (800, 400)
    assert load_image(tmp_path / "p.jpg", at_least=(200, 100)).size == (200, 100)  # 1/4 scale, not 1/2


def rgb_profile(primaries) -> bytes:
    """A minimal ICC v2 RGB display profile: D50 white, the given primaries (XYZ) and gamma 2.2 curves."""
    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(2.2 * 256)) + b"\0\0"
    tags = [(b"wtpt", xyz(0.9642, 1.0, 0.8249)), *zip((b"rXYZ", b"gXYZ", b"bXYZ"), (xyz(*p) for p in primaries)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    start, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, body in tags:
        table += sig + struct.pack(">II", start + len(data), len(body))
        data += body
    header = (struct.pack(">I", start + len(data)) + bytes(4) + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + bytes(12)
              + b"acsp" + bytes(28) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + data


SRGB_PRIMARIES = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))  # D50-adapted


def test_an_embedded_colour_profile_is_applied(tmp_path):
    """Pixels stored as (255, 0, 0) under a profile whose red primary is sRGB's green look green: they are
    green in sRGB. An sRGB profile leaves the pixels as stored."""
    red, green, blue = SRGB_PRIMARIES
    image = Image.new("RGB", (32, 16), (255, 0, 0))
    image.save(tmp_path / "swapped.png", icc_profile=rgb_profile((green, red, blue)))
    assert np.asarray(load_image(tmp_path / "swapped.png"))[0, 0].tolist() == [0, 255, 0]
    image.save(tmp_path / "jpeg.jpg", icc_profile=rgb_profile((green, red, blue)), quality=100)
    r, g, b = np.asarray(load_image(tmp_path / "jpeg.jpg"))[8, 16].tolist()
    assert g > 240 and r < 15 and b < 15
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 32, 3), dtype=np.uint8))
    photo.save(tmp_path / "srgb.png", icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    assert np.array_equal(np.asarray(load_image(tmp_path / "srgb.png")), np.asarray(photo))


def test_an_unreadable_colour_profile_is_warned_and_skipped(tmp_path, capsys):
    image = Image.new("RGB", (32, 16), (10, 200, 30))
    image.save(tmp_path / "junk.png", icc_profile=b"not a profile")
    (tmp_path / "link.png").symlink_to(tmp_path / "junk.png")
    for path in ("junk.png", "link.png", "junk.png"):
        assert np.array_equal(np.asarray(load_image(tmp_path / path)), np.asarray(image))
    assert capsys.readouterr().err.count("junk.png: its embedded colour profile cannot be read") == 1


def test_other_modes_convert_as_a_viewer_shows_them(tmp_path):
    Image.new("CMYK", (32, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    r, g, b = np.asarray(load_image(tmp_path / "cmyk.jpg"))[8, 16].tolist()
    assert r > 240 and g < 15 and b < 15  # full magenta + yellow ink: red
    Image.new("L", (32, 16), 77).save(tmp_path / "gray.jpg", quality=100)
    assert np.asarray(load_image(tmp_path / "gray.jpg"))[0, 0].tolist() == [77, 77, 77]
    Image.new("1", (32, 16), 1).save(tmp_path / "bw.png")
    assert np.asarray(load_image(tmp_path / "bw.png"))[0, 0].tolist() == [255, 255, 255]


def test_photos_that_are_not_one_picture_are_refused_with_the_reason(tmp_path):
    frames = [Image.new("RGB", (32, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match=r"anim.gif: holds 2 frames"):
        load_image(tmp_path / "anim.gif")
    (tmp_path / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic" + bytes(64))
    with pytest.raises(DataError, match=r"phone.heic: a HEIC photo, which Pillow cannot read; convert it to JPEG"):
        load_image(tmp_path / "phone.heic")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "moved-away.jpg")
    with pytest.raises(DataError, match=r"gone.jpg: a broken link \(to .*moved-away.jpg\)"):
        load_image(tmp_path / "gone.jpg")
    (tmp_path / "notes.jpg").write_text("hello")
    with pytest.raises(DataError, match=r"notes.jpg: not an image Pillow can read"):
        load_image(tmp_path / "notes.jpg")


@pytest.mark.parametrize("size", [(1, 1), (15, 64), (64, 15)])
def test_a_photo_smaller_than_a_patch_is_refused(tmp_path, size):
    Image.new("RGB", size, (90, 140, 60)).save(tmp_path / "tiny.png")
    with pytest.raises(DataError, match=rf"tiny.png: {size[0]}x{size[1]} px is too small to show a quadrat"):
        load_image(tmp_path / "tiny.png")
    Image.new("RGB", (16, 16), (90, 140, 60)).save(tmp_path / "small.png")
    assert load_image(tmp_path / "small.png").size == (16, 16)


def test_exif_bytes_that_do_not_parse_leave_the_photo_as_stored(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 16), (1, 2, 3)).save(buffer, "JPEG", exif=b"Exif\0\0garbage-that-is-no-tiff")
    (tmp_path / "x.jpg").write_bytes(buffer.getvalue())
    assert load_image(tmp_path / "x.jpg").size == (32, 16)

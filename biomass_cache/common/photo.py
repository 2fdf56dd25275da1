"""Photos decoded as a person sees them: upright (EXIF orientation), in sRGB (an embedded colour profile applied),
8 bits a channel (16-bit photos scaled, not clipped), or refused with the reason and what to do.

Every path that reads a photo (extraction, live LoRA, prediction, plots) goes through `load_image`, so one photo
is one set of pixels everywhere.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from biomass_cache.common.data import SEP
from biomass_cache.common.errors import DataError

MAX_DECODED_PIXELS = 64_000_000  # 192 MB of RGB: far above any quadrat photo, far below a decompression bomb
MIN_SIDE = 16  # px: one backbone patch; a smaller photo cannot show a quadrat
TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
NOT_PILLOW = {".heic": "HEIC", ".heif": "HEIF", ".dng": "raw DNG", ".cr2": "raw CR2", ".nef": "raw NEF",
              ".arw": "raw ARW"}
SRGB = ImageCms.createProfile("sRGB")
WARNED: set[Path] = set()  # photos whose unreadable colour profile this process has reported
# EXIF orientation -> the transpose that stands the photo upright (what ImageOps.exif_transpose does, without
# re-reading the EXIF block or copying it along).
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}


def load_image(path: str | Path, at_least: tuple[int, int] | None = None) -> Image.Image:
    """Open a photo fully (so truncation shows up here, not later) as the 8-bit RGB picture a viewer shows. With
    `at_least` (W, H, as the photo is seen), a JPEG is decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) that
    keeps it at least that size (PIL's draft).

    The size to decode is checked from the header first: above MAX_DECODED_PIXELS (after the draft scale) the
    photo is refused, like PIL's decompression bombs, instead of being decoded whole."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below decides
            with Image.open(path) as im:
                frames = getattr(im, "n_frames", 1)
                if frames > 1 and im.format != "MPO":  # MPO: a camera JPEG with extra views; the first is the photo
                    raise DataError(f"{path}: holds {frames} frames (an animation or a multi-page file); save the "
                                    "one frame to use as a JPEG or PNG")
                turned = orientation(im) in TURNED
                if at_least is not None:
                    im.draft(None, at_least[::-1] if turned else at_least)
                w, h = im.size
                if w * h > MAX_DECODED_PIXELS:
                    raise DataError(f"{path}: image too large ({w}x{h} px to decode; the limit is "
                                    f"{MAX_DECODED_PIXELS / 1e6:.0f} Mpx after JPEG draft scaling); downscale the "
                                    "photo")
                im.load()
                return as_seen(im, path)
    except DataError:
        raise
    except FileNotFoundError as e:
        if path.is_symlink():
            raise DataError(f"{path}: a broken link (to {os.readlink(path)}); link it to the photo again") from e
        raise DataError(f"{path}: image file not found") from e
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: image too large ({e}; the limit is {MAX_DECODED_PIXELS / 1e6:.0f} Mpx after JPEG "
                        "draft scaling); downscale the photo") from e
    except UnidentifiedImageError as e:
        kind = NOT_PILLOW.get(path.suffix.lower())
        what = f"a {kind} photo, which Pillow cannot read" if kind else "not an image Pillow can read"
        raise DataError(f"{path}: {what}; convert it to JPEG or PNG") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: corrupt or truncated image ({e})") from e


def orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1: as stored; 2-8: mirrored and/or turned), 1 when absent or unreadable."""
    try:
        value = im.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError, TypeError):  # a broken EXIF block: the pixels still stand as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def as_seen(im: Image.Image, path: Path) -> Image.Image:
    """The decoded image in 8-bit RGB, upright and in sRGB; a photo with no faithful 8-bit RGB form is refused."""
    turn = orientation(im)
    profile = im.info.get("icc_profile")
    if im.mode == "F":
        raise DataError(f"{path}: floating-point pixels (a measurement, not a photo); save it as an 8- or "
                        "16-bit RGB or grayscale image")
    if im.mode == "I" and im.format != "PNG":  # a PNG holds at most 16 bits; a 32-bit TIFF may hold any range
        raise DataError(f"{path}: 32-bit integer pixels have no standard brightness (a viewer could show them all "
                        "black or all white); save it as an 8- or 16-bit image")
    if im.mode in SIXTEEN_BIT or im.mode == "I":
        values = np.asarray(im, dtype=np.int64)
        im = Image.fromarray(np.rint(np.clip(values, 0, 65535) / 257).astype(np.uint8), "L")  # 65535 -> 255
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ALPHA:
        alpha = im.getchannel(im.mode[-1])
        low = alpha.getextrema()[0]
        if low < 255:
            clear = int(np.count_nonzero(np.asarray(alpha) < 255))
            raise DataError(f"{path}: {clear} of its {alpha.width * alpha.height} pixels are transparent, and a "
                            "viewer would show its background there; save the photo without transparency (JPEG, or "
                            "PNG without alpha)")
    if profile and im.mode in ("RGB", "RGBA", "L", "LA", "CMYK"):
        im = to_srgb(im.convert({"RGBA": "RGB", "LA": "L"}.get(im.mode, im.mode)), profile, path)
    if im.mode != "RGB":
        im = im.convert("RGB")
    if turn != 1:
        im = im.transpose(TRANSPOSE[turn])
    if min(im.size) < MIN_SIDE:
        raise DataError(f"{path}: {im.width}x{im.height} px is too small to show a quadrat (each side needs at "
                        f"least {MIN_SIDE} px, one backbone patch); use the original photo")
    return im


def to_srgb(im: Image.Image, profile: bytes, path: Path) -> Image.Image:
    """The pixels under their embedded colour profile, converted to sRGB (what a colour-managed viewer shows; the
    backbone learned from sRGB pictures). An sRGB profile changes nothing; an unreadable one is skipped, warned."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        if "srgb" in ImageCms.getProfileDescription(source).lower().replace(" ", ""):
            return im
        return ImageCms.profileToProfile(im, source, SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as e:
        where = path.resolve()  # the photo itself, not a link to it (predict's temporary folder)
        if where not in WARNED:  # once per photo: a forked worker inherits what its parent said
            WARNED.add(where)
            print(f"warning: {where}: its embedded colour profile cannot be read ({e}); its pixels are taken as "
                  "sRGB", file=sys.stderr)
        return im


# what cameras, phones and editors save; HEIC is listed so that it is refused with its reason, never passed over
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif", ".mpo", ".heic", ".heif")


def list_photos(photo_dir: Path) -> list[Path]:
    """The photo files of a folder (not recursive, hidden files such as macOS's `._NAME.jpg` left out), sorted;
    ids (file stems) must be unique. What else the folder holds is named, not passed over in silence."""
    if not photo_dir.is_dir():
        raise DataError(f"{photo_dir}: not a folder of photos")
    entries = sorted(p for p in photo_dir.iterdir() if not p.name.startswith("."))
    photos = [p for p in entries if p.suffix.lower() in PHOTO_SUFFIXES and not p.is_dir()]  # broken links: refused
    if not photos:
        raise DataError(f"{photo_dir}: no {'/'.join(PHOTO_SUFFIXES)} files in this folder")
    others = [p.name + ("/" if p.is_dir() else "") for p in entries if p not in photos]
    if others:
        print(f"note: {photo_dir}: left out {len(others)} entr{'y' if len(others) == 1 else 'ies'} that "
              f"{'is not a photo' if len(others) == 1 else 'are not photos'}: {others[:5]}"
              f"{' ...' if len(others) > 5 else ''}", file=sys.stderr)
    seen: dict[str, Path] = {}
    for p in photos:
        if p.stem in seen:
            raise DataError(f"{photo_dir}: {seen[p.stem].name} and {p.name} would share the image id {p.stem!r}")
        if SEP in p.stem or "," in p.stem:
            raise DataError(f"{p}: file names must not contain {SEP!r} or ',' (the stem becomes the image id)")
        seen[p.stem] = p
    return photos


ASPECT_TOLERANCE = 0.10  # relative difference of width/height ratios beyond which a photo is visibly distorted
MAX_ENLARGE = 4  # a photo enlarged more than this to the model input shows the backbone blur


def check_photos(photos: list[Path], input_sizes: set[tuple[int, int]], skip_bad: bool
                 ) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Decode every photo once (as extraction will) before anything is written: returns (readable photos,
    [(unreadable photo, reason)]); without `skip_bad` the first unreadable photo is a DataError. Warns, once per
    photo, when its aspect ratio differs from a model input's (W, H) by more than ASPECT_TOLERANCE (the photo is
    resized to the input, so its content is stretched) and when it is enlarged more than MAX_ENLARGE times."""
    good, bad = [], []
    smallest = min(input_sizes, default=None)
    for p in photos:
        try:
            image = load_image(p, at_least=smallest)
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{e}; --skip-bad skips unreadable photos and lists them at the end") from None
            bad.append((p, str(e)))
            continue
        good.append(p)
        ratio = image.width / image.height
        if smallest and min(image.width / smallest[0], image.height / smallest[1]) < 1 / MAX_ENLARGE:
            print(f"warning: {p}: {image.width}x{image.height} px is enlarged more than {MAX_ENLARGE}x to the model "
                  f"input {smallest[0]}x{smallest[1]}: the backbone sees blur, not pasture; use the original photo",
                  file=sys.stderr)
        for w, h in sorted(input_sizes):
            if abs(ratio / (w / h) - 1) > ASPECT_TOLERANCE:
                print(f"warning: {p}: aspect ratio (width/height) {ratio:.2f} differs from the model input's "
                      f"{w / h:.2f} ({w}x{h}): the photo is stretched to fit; crop it to {w}:{h} for "
                      "undistorted predictions and density maps", file=sys.stderr)
                break
    if not good:
        raise DataError(f"none of the {len(photos)} photos could be read (first: {bad[0][1]})")
    return good, bad


def report_skipped(bad: list[tuple[Path, str]]) -> None:
    """The end of a prediction that left unreadable photos out (`check_photos(skip_bad=True)`): which, and why."""
    if bad:
        print(f"skipped {len(bad)} unreadable photo(s):", file=sys.stderr)
        for _, reason in bad:
            print(f"  {reason}", file=sys.stderr)

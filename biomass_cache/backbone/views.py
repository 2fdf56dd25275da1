"""Image views fed to the frozen backbone: the clean view, seeded training augmentations and test-time flips.

Every view is a pure function of (image, image_id, view index, seed, size, policy): all random parameters come from
a numpy Generator seeded by sha256(f"{image_id}|{view}|{seed}"), never from a global RNG, so DataLoader workers,
resumed runs and other machines produce identical pixels. The crop and resize happen first, in one antialiased
uint8 resize of the photo (torch's, which matches PIL's to one grey level at a fraction of its CPU cost);
everything else runs on the small float tensor with torchvision.transforms.v2.functional.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms import InterpolationMode

from biomass_cache.common.photo import load_image
from biomass_cache.common.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TTA_VIEWS = ("clean", "hflip", "vflip", "hvflip")
SPLITS = ("train", "test")
RESAMPLE = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
            "bicubic": InterpolationMode.BICUBIC}
WATERMARK_COLOURS = ((1.0, 1.0, 1.0), (1.0, 0.85, 0.1), (1.0, 0.55, 0.1), (0.95, 0.95, 0.6))
# One independent random stream per augmentation: changing one part of the policy never shifts the others' draws.
_STREAMS = ("clean", "crop", "flip", "affine", "colour", "blur", "noise", "watermark", "spot", "erase")


@dataclass(frozen=True)
class ViewPolicy:
    """Training augmentation policy for views 1..V-1 (the reference defaults). `asdict` goes in the fingerprint.

    Ranges are (low, high) drawn uniformly unless said otherwise; probabilities are per view.
    """

    resample: str = "bilinear"  # filter of the crop+resize (antialiased when shrinking); view 0 uses it too
    decode_oversample: float = 2.0  # JPEGs decode at the smallest DCT scale (1, 1/2, 1/4, 1/8) keeping >= this
    # many photo pixels per view pixel each way (PIL draft: decode is most of a view's CPU cost); 0 = full size
    p_clean: float = 0.1  # leave the whole view clean (identical to view 0)
    crop_area: tuple[float, float] = (0.8, 1.0)  # random resized crop: fraction of the image area kept
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect / output aspect, log-uniform
    p_hflip: float = 0.5
    p_vflip: float = 0.5
    p_affine: float = 1.0
    affine_degrees: float = 5.0  # rotation in [-d, d]
    affine_translate: float = 0.02  # fraction of width / height, each in [-t, t]
    affine_scale: tuple[float, float] = (0.95, 1.05)
    affine_shear: float = 2.0  # degrees, x and y each in [-s, s]
    p_colour: float = 0.8
    brightness: float = 0.2  # factor in [1-b, 1+b]
    contrast: float = 0.2
    saturation: float = 0.1
    p_blur: float = 0.5
    blur_kernel: tuple[int, int] = (3, 7)  # odd sizes in this range
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    p_noise: float = 0.5
    noise_std: float = 0.01  # on the [0, 1] image
    p_watermark: float = 0.3
    watermark_height: tuple[float, float] = (0.03, 0.06)  # text height as a fraction of the view height
    p_light_spot: float = 0.3
    spot_radius: tuple[float, float] = (0.1, 0.3)  # Gaussian sigma as a fraction of min(W, H)
    spot_strength: tuple[float, float] = (0.2, 0.5)  # peak brightening (screen blend)
    p_erase: float = 0.25
    erase_area: tuple[float, float] = (0.02, 0.10)  # fraction of the view's pixels
    erase_ratio: tuple[float, float] = (0.3, 3.3)  # height / width, log-uniform

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # from JSON
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            if f.name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise ValueError(f"ViewPolicy.{f.name} must be a probability in [0, 1], got {value}")
            if isinstance(value, tuple) and (len(value) != 2 or value[0] > value[1] or value[0] < 0):
                raise ValueError(f"ViewPolicy.{f.name} must be a range (low, high) with 0 <= low <= high, got {value}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"ViewPolicy.resample must be one of {sorted(RESAMPLE)}, got {self.resample!r}")
        if self.crop_area[1] > 1 or self.crop_area[0] <= 0 or self.crop_ratio[0] <= 0 or self.erase_ratio[0] <= 0:
            raise ValueError("ViewPolicy.crop_area must lie in (0, 1]; crop_ratio and erase_ratio must be positive")
        if self.decode_oversample != 0 and self.decode_oversample < 1:
            raise ValueError(f"ViewPolicy.decode_oversample must be 0 (full-size decode) or >= 1, got "
                             f"{self.decode_oversample}")
        lo, hi = self.blur_kernel
        if lo < 3 or lo % 2 == 0 or hi % 2 == 0:
            raise ValueError(f"ViewPolicy.blur_kernel must be odd sizes >= 3, got {self.blur_kernel}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViewPolicy:
        """Rebuild from `asdict` output (JSON config or a store fingerprint); unknown keys are an error."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown ViewPolicy keys: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_size(size: tuple[int, int]) -> tuple[int, int]:
    """(W, H), both positive multiples of the 16-pixel patch size."""
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size):
        raise DataError(f"size must be (W, H) integers, got {size!r}")
    w, h = int(size[0]), int(size[1])
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        raise DataError(f"size must be positive multiples of 16 (the patch size), got W x H = {w} x {h}")
    return w, h


def validate_tiles(size: tuple[int, int], tiles: int) -> int:
    """The number of side-by-side tiles the backbone sees the (W, H) input as: an integer >= 1 that cuts W into
    pieces of whole 16-pixel patches (`size` stays the whole input: 448 x 224 in 2 tiles is two 224 x 224)."""
    if isinstance(tiles, bool) or not isinstance(tiles, (int, np.integer)) or tiles < 1:
        raise DataError(f"tiles must be an integer >= 1, got {tiles!r}")
    w, h = size
    if w % (16 * tiles):
        raise DataError(f"size {w}x{h} does not split into tiles = {tiles} pieces of whole 16-pixel patches: its width "
                        f"must be a multiple of {16 * tiles}; change the size (e.g. "
                        f"{max(1, round(w / (16 * tiles))) * 16 * tiles}x{h}) or the tiles")
    return int(tiles)


def parse_view_size(text: str) -> tuple[int, int]:
    """'960x480' -> (960, 480), validated."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise DataError(f"size must look like WxH, e.g. 960x480, got {text!r}")
    return validate_size((int(parts[0]), int(parts[1])))


def load_photo(path: str | Path, size: tuple[int, int], policy: ViewPolicy) -> torch.Tensor:
    """The photo decoded for views of `size` (W, H) as a (3, H', W') uint8 RGB tensor (pixels in channels-last
    order, the layout the resize is fastest on); JPEGs at a reduced scale as `policy.decode_oversample` allows.
    Every path that makes views (extraction, live LoRA, prediction) decodes through here, so their pixels agree."""
    w, h = validate_size(size)
    o = policy.decode_oversample
    return F.pil_to_tensor(load_image(path, at_least=(math.ceil(w * o), math.ceil(h * o)) if o else None))


def view_rng(image_id: str, view: int, seed: int) -> np.random.Generator:
    """The Generator every random parameter of a view comes from."""
    digest = hashlib.sha256(f"{image_id}|{view}|{seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def make_view(image: torch.Tensor, image_id: str, view: int, seed: int, size: tuple[int, int],
              policy: ViewPolicy, split: str = "train") -> torch.Tensor:
    """One view of a photo from `load_photo` ((3, H', W') uint8 RGB) as a (3, H, W) float32 ImageNet-normalised
    tensor.

    View 0 is always the clean view (resize to `size`, normalise). For split "train", views >= 1 follow
    `policy`; for split "test" the views are the TTA flips in TTA_VIEWS.
    """
    w, h = validate_size(size)
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"make_view takes a (3, H, W) uint8 RGB tensor (views.load_photo), got {got}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(view, bool) or not isinstance(view, (int, np.integer)) or view < 0:
        raise ValueError(f"view must be a non-negative integer, got {view!r}")
    if split == "test" and view >= len(TTA_VIEWS):
        raise ValueError(f"split 'test' has {len(TTA_VIEWS)} TTA views {TTA_VIEWS}, got view {view}")
    if split == "test" or view == 0:
        x = _resize(image, (w, h), None, policy.resample)
        if TTA_VIEWS[view] in ("hflip", "hvflip"):
            x = F.horizontal_flip(x)
        if TTA_VIEWS[view] in ("vflip", "hvflip"):
            x = F.vertical_flip(x)
        return _normalise(x)
    streams = dict(zip(_STREAMS, view_rng(image_id, view, seed).spawn(len(_STREAMS))))
    if streams["clean"].random() < policy.p_clean:
        return _normalise(_resize(image, (w, h), None, policy.resample))
    box = _crop_box(streams["crop"], (image.shape[2], image.shape[1]), w / h, policy)
    x = _resize(image, (w, h), box, policy.resample)
    for step in (_flip, _affine, _watermark, _light_spot, _colour, _blur, _noise, _erase):
        x = step(x, streams, policy)
    return _normalise(x)


def _resize(image: torch.Tensor, size: tuple[int, int], box: tuple[int, int, int, int] | None,
            resample: str) -> torch.Tensor:
    """Crop (box: left, top, right, bottom in source pixels) and resize to size (W, H), antialiased, in uint8;
    then (3, H, W) float in [0, 1]."""
    left, top, right, bottom = box or (0, 0, image.shape[2], image.shape[1])
    small = F.resized_crop(image, top, left, bottom - top, right - left, [size[1], size[0]],
                           interpolation=RESAMPLE[resample], antialias=True)
    return F.to_dtype(small, torch.float32, scale=True)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)).contiguous()


def _crop_box(rng: np.random.Generator, image_size: tuple[int, int], out_ratio: float,
              policy: ViewPolicy) -> tuple[int, int, int, int]:
    """Random resized crop (area fraction and aspect relative to the output's); centre crop when 10 tries fail.
    The box (left, top, right, bottom) is rounded to whole pixels, inside the image."""
    img_w, img_h = image_size
    log_lo, log_hi = math.log(policy.crop_ratio[0]), math.log(policy.crop_ratio[1])
    for _ in range(10):
        area = img_w * img_h * rng.uniform(*policy.crop_area)
        ratio = out_ratio * math.exp(rng.uniform(log_lo, log_hi))
        cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if cw <= img_w and ch <= img_h:
            left, top = rng.uniform(0, img_w - cw), rng.uniform(0, img_h - ch)
            return _whole_pixels(left, top, cw, ch, image_size)
    # Fallback: the largest centred crop whose aspect is the image's, clamped to the allowed range.
    ratio = min(max(img_w / img_h, out_ratio * policy.crop_ratio[0]), out_ratio * policy.crop_ratio[1])
    cw, ch = min(img_w, img_h * ratio), min(img_h, img_w / ratio)
    return _whole_pixels((img_w - cw) / 2, (img_h - ch) / 2, cw, ch, image_size)


def _whole_pixels(left: float, top: float, width: float, height: float,
                  image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box of at least one pixel each way, rounded, inside the image."""
    w, h = min(max(1, round(width)), image_size[0]), min(max(1, round(height)), image_size[1])
    x, y = min(max(0, round(left)), image_size[0] - w), min(max(0, round(top)), image_size[1] - h)
    return x, y, x + w, y + h


def _flip(x: torch.Tensor, streams: dict[str, np.random.Generator], policy: ViewPolicy) -> torch.Tensor:
    rng = streams["flip"]
    hflip, vflip = rng.random() < policy.p_hflip, rng.random() < policy.p_vflip
    x = F.horizontal_flip(x) if hflip else x
    return F.vertical_flip(x) if vflip else x


def _affine(x: torch.Tensor, streams: dict[str, np.random.Generator], policy: ViewPolicy) -> torch.Tensor:
    rng = streams["affine"]
    if rng.random() >= policy.p_affine:
        return x
    h, w = x.shape[-2:]
    t = policy.affine_translate
    return F.affine(
        x,
        angle=float(rng.uniform(-policy.affine_degrees, policy.affine_degrees)),
        translate=[float(rng.uniform(-t, t) * w), float(rng.uniform(-t, t) * h)],
        scale=float(rng.uniform(*policy.affine_scale)),
        shear=[float(rng.uniform(-policy.affine_shear, policy.affine_shear)) for _ in range(2)],
        interpolation=InterpolationMode.BILINEAR,
        fill=list(IMAGENET_MEAN),  # uncovered corners become 0 after normalisation
    )


def _colour(x: torch.Tensor, streams: dict[str, np.random.Generator], policy: ViewPolicy) -> torch.Tensor:
    rng = streams["colour"]
    if rng.random() >= policy.p_colour:
        return x
    jitters = [(F.adjust_brightness, policy.brightness), (F.adjust_contrast, policy.contrast),
               (F.adjust_saturation, policy.saturation)]
    factors = [rng.uniform(max(0.0, 1 - j), 1 + j) for _, j in jitters]
    for k in rng.permutation(len(jitters)):
        x = jitters[k][0](x, float(factors[k]))
    return x


def _blur(x: torch.Tensor, streams: dict[str, np.random.Generator], policy: ViewPolicy) -> torch.Tensor:
    rng = streams["blur"]
    if rng.random() >= policy.p_blur:
        return x
    kernel = int(rng.choice(np.arange(policy.blur_kernel[0], policy.blur_kernel[1] + 1, 2)))
    sigma = float(rng.uniform(*policy.blur_sigma))
    return F.gaussian_blur(x, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


def _noise(x: torch.Tensor, streams: dict[str, np.random.Generator], policy: ViewPolicy) -> torch.Tensor:
    rng = streams["noise"]
    if rng.random() >= policy.p_noise:
        return x
    noise = torch.from_numpy(rng.standard_normal(tuple(x.shape), dtype=np.float32))
    return (x + policy.noise_std * noise).clamp_(0.0, 1.0)


def _watermark(x: torch.Tensor, streams: dict[str, np.random.Generator], policy: ViewPolicy) -> torch.Tensor:
    """A camera-style date/time stamp drawn with PIL in a random corner."""
    rng = streams["watermark"]
    if rng.random() >= policy.p_watermark:
        return x
    h, w = x.shape[-2:]
    text = (f"{rng.integers(2015, 2026)}/{rng.integers(1, 13):02d}/{rng.integers(1, 29):02d} "
            f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}")
    font = ImageFont.load_default(size=max(6, round(h * rng.uniform(*policy.watermark_height))))
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
    alpha = F.to_dtype(F.pil_to_tensor(mask), torch.float32, scale=True)[:, : h, : w]  # clip to the view
    mh, mw = alpha.shape[-2:]
    margin_x, margin_y = round(0.02 * w), round(0.02 * h)
    corner = int(rng.integers(4))
    x0 = margin_x if corner % 2 == 0 else w - mw - margin_x
    y0 = margin_y if corner < 2 else h - mh - margin_y
    x0, y0 = min(max(x0, 0), w - mw), min(max(y0, 0), h - mh)
    colour = torch.tensor(WATERMARK_COLOURS[int(rng.integers(len(WATERMARK_COLOURS)))]).view(3, 1, 1)
    x = x.clone()
    patch = x[:, y0:y0 + mh, x0:x0 + mw]
    x[:, y0:y0 + mh, x0:x0 + mw] = patch * (1 - alpha) + colour * alpha
    return x


def _light_spot(x: torch.Tensor, streams: dict[str, np.random.Generator], policy: ViewPolicy) -> torch.Tensor:
    """A soft bright radial blob (sun glint), screen-blended so the image stays in [0, 1]."""
    rng = streams["spot"]
    if rng.random() >= policy.p_light_spot:
        return x
    h, w = x.shape[-2:]
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    sigma = rng.uniform(*policy.spot_radius) * min(h, w)
    strength = rng.uniform(*policy.spot_strength)
    gy = torch.exp(-((torch.arange(h, dtype=torch.float32) - cy) ** 2) / (2 * sigma**2))
    gx = torch.exp(-((torch.arange(w, dtype=torch.float32) - cx) ** 2) / (2 * sigma**2))
    blob = strength * gy[:, None] * gx[None, :]
    return x + blob * (1 - x)


def _erase(x: torch.Tensor, streams: dict[str, np.random.Generator], policy: ViewPolicy) -> torch.Tensor:
    """Random erasing with the ImageNet mean colour (0 after normalisation); skipped if 10 tries do not fit."""
    rng = streams["erase"]
    if rng.random() >= policy.p_erase:
        return x
    h, w = x.shape[-2:]
    log_lo, log_hi = math.log(policy.erase_ratio[0]), math.log(policy.erase_ratio[1])
    for _ in range(10):
        area = h * w * rng.uniform(*policy.erase_area)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        eh, ew = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < eh < h and 0 < ew < w:
            i, j = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            return F.erase(x, i, j, eh, ew, torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
    return x

"""Views: clean view 0, seeded deterministic augmentation, test-time flips, size and policy validation."""

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from biomass_cache.backbone.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewPolicy,
    _crop_box,
    load_photo,
    make_view,
    parse_view_size,
    validate_size,
    view_rng,
)

SIZE = (64, 32)
ALL_ON = ViewPolicy(p_clean=0.0, p_affine=1.0, p_colour=1.0, p_blur=1.0, p_noise=1.0, p_watermark=1.0,
                    p_light_spot=1.0, p_erase=1.0)
ALL_OFF = ViewPolicy(p_clean=0.0, crop_area=(1.0, 1.0), crop_ratio=(1.0, 1.0), p_hflip=0.0, p_vflip=0.0,
                     p_affine=0.0, p_colour=0.0, p_blur=0.0, p_noise=0.0, p_watermark=0.0, p_light_spot=0.0,
                     p_erase=0.0)


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (10, 20, 3), dtype=np.uint8)  # smooth-ish content, 2:1 like the quadrat photos
    return Image.fromarray(base).resize((160, 80), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def photo(picture):
    return F.pil_to_tensor(picture)  # what load_photo returns


def test_clean_view_is_plain_resize_and_normalise(photo, picture):
    x = make_view(photo, "ID1", 0, seed=5, size=SIZE, policy=ALL_ON)
    assert x.shape == (3, 32, 64) and x.dtype == torch.float32
    ref = np.asarray(picture.resize(SIZE, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0  # PIL's resize
    ref = (ref - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    one_level = 1 / 255 / min(IMAGENET_STD)
    np.testing.assert_allclose(x.numpy(), ref.transpose(2, 0, 1), atol=one_level * 1.001, rtol=0)
    # view 0 ignores id, seed, policy and split
    assert torch.equal(x, make_view(photo, "other", 0, seed=9, size=SIZE, policy=ViewPolicy(), split="test"))


@pytest.mark.slow
def test_views_are_deterministic_and_distinct(photo):
    for policy in (ViewPolicy(), ALL_ON):
        views = [make_view(photo, "ID1", v, 0, SIZE, policy) for v in range(1, 7)]
        np.random.seed(99)  # the global RNGs play no part
        torch.manual_seed(99)
        again = [make_view(photo, "ID1", v, 0, SIZE, policy) for v in range(1, 7)]
        assert all(torch.equal(a, b) for a, b in zip(views, again))
        assert len({hashlib.sha256(v.numpy().tobytes()).hexdigest() for v in views}) == len(views)
    one = make_view(photo, "ID1", 1, 0, SIZE, ALL_ON)
    assert not torch.equal(one, make_view(photo, "ID1", 1, 1, SIZE, ALL_ON))  # other seed
    assert not torch.equal(one, make_view(photo, "ID2", 1, 0, SIZE, ALL_ON))  # other image id


def test_test_split_views_are_exact_flips(photo):
    clean = make_view(photo, "ID1", 0, 0, SIZE, ViewPolicy(), split="test")
    flips = [make_view(photo, "ID1", v, 0, SIZE, ViewPolicy(), split="test") for v in (1, 2, 3)]
    assert torch.equal(flips[0], clean.flip(-1))
    assert torch.equal(flips[1], clean.flip(-2))
    assert torch.equal(flips[2], clean.flip(-1).flip(-2))
    assert all(f.shape == (3, 32, 64) for f in flips)
    with pytest.raises(ValueError, match="TTA"):
        make_view(photo, "ID1", 4, 0, SIZE, ViewPolicy(), split="test")
    with pytest.raises(ValueError, match="split"):
        make_view(photo, "ID1", 1, 0, SIZE, ViewPolicy(), split="val")
    with pytest.raises(ValueError, match="view"):
        make_view(photo, "ID1", -1, 0, SIZE, ViewPolicy())


def test_everything_off_matches_clean_view(photo):
    clean = make_view(photo, "ID1", 0, 0, SIZE, ALL_OFF)
    torch.testing.assert_close(make_view(photo, "ID1", 3, 0, SIZE, ALL_OFF), clean, atol=1e-5, rtol=0)
    certain_clean = replace(ALL_ON, p_clean=1.0)
    assert torch.equal(make_view(photo, "ID1", 3, 0, SIZE, certain_clean), clean)


@pytest.mark.parametrize("part", [
    dict(crop_area=(0.8, 0.8)), dict(p_hflip=1.0), dict(p_vflip=1.0), dict(p_affine=1.0), dict(p_colour=1.0),
    dict(p_blur=1.0), dict(p_noise=1.0), dict(p_watermark=1.0), dict(p_light_spot=1.0), dict(p_erase=1.0),
])
def test_each_augmentation_changes_the_view(photo, part):
    clean = make_view(photo, "ID1", 2, 0, SIZE, ALL_OFF)
    changed = make_view(photo, "ID1", 2, 0, SIZE, replace(ALL_OFF, **part))
    assert changed.shape == clean.shape
    assert (changed - clean).abs().max() > 0.05


def test_non_rgb_and_very_wide_images(picture, tmp_path):
    for mode in ("L", "RGBA", "P"):
        picture.convert(mode).save(tmp_path / f"{mode}.png")
        x = load_photo(tmp_path / f"{mode}.png", SIZE, ViewPolicy())
        assert x.shape == (3, 80, 160) and x.dtype == torch.uint8
        assert make_view(x, "ID1", 1, 0, SIZE, ALL_ON).shape == (3, 32, 64)
    for bad in (picture, F.pil_to_tensor(picture.convert("L")), F.pil_to_tensor(picture).float()):
        with pytest.raises(ValueError, match="uint8 RGB tensor"):
            make_view(bad, "ID1", 0, 0, SIZE, ALL_ON)
    wide = F.pil_to_tensor(picture.resize((400, 25)))
    assert make_view(wide, "ID1", 1, 0, SIZE, ALL_ON).shape == (3, 32, 64)
    left, top, right, bottom = _crop_box(view_rng("x", 1, 0), (400, 25), 2.0, ViewPolicy())  # fallback
    assert (top, bottom) == (0, 25) and right - left == round(25 * 2.0 * 4 / 3)
    assert abs(left - (400 - right)) <= 1
    for v in range(20):
        box = _crop_box(view_rng("x", v, 0), (160, 80), 2.0, ViewPolicy())
        left, top, right, bottom = box
        assert all(isinstance(b, int) for b in box)
        assert 0 <= left < right <= 160 and 0 <= top < bottom <= 80
        assert 0.8 * 160 * 80 - 160 - 80 <= (right - left) * (bottom - top) <= 160 * 80


def test_size_validation():
    assert validate_size((960, 480)) == (960, 480)
    assert parse_view_size("960x480") == (960, 480)
    for bad in [(60, 32), (64, 0), (64,), ("64", 32), (64.0, 32), (True, 32)]:
        with pytest.raises(ValueError):
            validate_size(bad)
    for bad in ["960", "960x", "axb", "961x480"]:
        with pytest.raises(ValueError):
            parse_view_size(bad)


def test_policy_validation_and_round_trip():
    policy = ViewPolicy(p_noise=0.7)
    assert ViewPolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    with pytest.raises(ValueError, match="unknown"):
        ViewPolicy.from_dict({"p_nose": 0.1})
    for bad in [dict(p_blur=1.5), dict(crop_area=(0.9, 0.8)), dict(crop_area=(0.5, 1.2)), dict(blur_kernel=(3, 6)),
                dict(resample="box2"), dict(resample="lanczos")]:
        with pytest.raises(ValueError):
            ViewPolicy(**bad)


def test_load_photo_decodes_jpeg_at_reduced_scale_and_keeps_the_view(picture, tmp_path):
    path = tmp_path / "big.jpg"
    picture.resize((512, 256), Image.Resampling.BILINEAR).save(path, quality=95)
    size = (64, 32)
    full = load_photo(path, size, ViewPolicy(decode_oversample=0))
    assert full.shape == (3, 256, 512)
    assert load_photo(path, size, ViewPolicy()).shape == (3, 64, 128)  # 1/4 scale keeps 2x the view each way
    assert load_photo(path, size, ViewPolicy(decode_oversample=4)).shape == (3, 128, 256)
    assert load_photo(path, (256, 128), ViewPolicy()).shape == (3, 256, 512)  # never below the oversampling
    for view in (0, 1, 2):  # the reduced decode changes pixels a little, not the picture
        a = make_view(load_photo(path, size, ViewPolicy()), "ID1", view, 0, size, ALL_OFF)
        b = make_view(full, "ID1", view, 0, size, ALL_OFF)
        assert (a - b).abs().mean() < 0.05 and (a - b).abs().max() < 1.0
    with pytest.raises(ValueError, match="decode_oversample"):
        ViewPolicy(decode_oversample=0.5)

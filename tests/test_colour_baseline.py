"""biomass_cache.train.baseline: the colour statistics against a hand-computed two-pixel photo; the ridge's
inner CV on cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from biomass_cache.common.metrics import competition_r2
from biomass_cache.train import baseline as cb


def test_colour_stats_of_a_red_and_a_green_pixel(tmp_path):
    image = Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0]]], np.uint8))
    got = dict(zip(cb.STAT_NAMES, cb.colour_stats(image)))
    assert len(cb.STAT_NAMES) == 33
    half = {"mean": 127.5, "std": 127.5, "q10": 25.5, "q50": 127.5, "q90": 229.5}  # two values, 0 and 255
    for stat, v in half.items():
        assert got[f"rgb_0_{stat}"] == pytest.approx(v) and got[f"rgb_1_{stat}"] == pytest.approx(v)
        assert got[f"rgb_2_{stat}"] == 0
        assert got[f"hsv_0_{stat}"] == pytest.approx(v / 3)  # hue 0 and 85 (120 degrees of 360, scaled to 255)
        assert got[f"hsv_1_{stat}"] == got[f"hsv_2_{stat}"] == (0 if stat == "std" else 255)
    # chromatic (r, g, b) = (1, 0, 0) and (0, 1, 0): ExG = -1 and 2
    assert got["exg_mean"] == pytest.approx(0.5) and got["exg_std"] == pytest.approx(1.5)
    assert got["exg_share_above_0.1"] == 0.5
    image.save(tmp_path / "p.png")
    assert np.array_equal(cb.colour_stats_of([tmp_path / "p.png"])[0], cb.colour_stats(image))


@pytest.mark.slow
def test_ridge_recovers_a_linear_truth_and_falls_back_to_the_mean_on_noise():
    rng = np.random.default_rng(0)
    n = 200
    folds = np.repeat(np.arange(5), n // 5)
    x = rng.normal(size=(n, 4))
    coef = rng.uniform(5, 10, (4, 5))
    y = 60 + x @ coef
    y[:, 3], y[:, 4] = y[:, 0] + y[:, 2], y[:, 0] + y[:, 1] + y[:, 2]  # GDM and total from the parts
    oof, alphas = cb.ridge_inner_cv_oof(x, y, folds)
    assert competition_r2(y, oof) > 0.999 and max(alphas) <= 0.1 and len(alphas) == 5

    noise = rng.normal(size=(n, 4))
    oof, alphas = cb.ridge_inner_cv_oof(noise, y, folds)
    means = np.stack([y[folds != f].mean(axis=0) for f in folds])  # each row: its training folds' mean
    assert np.median(alphas) >= 1000  # the inner CV sees there is nothing to fit
    assert abs(competition_r2(y, oof) - competition_r2(y, means)) < 0.05

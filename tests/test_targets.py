import numpy as np
import pytest
import torch

from biomass_cache.common.targets import (
    PLOT_AREA_M2,
    TARGETS,
    ZScore,
    components_to_targets,
    target_mask,
    targets_to_total_ratio,
    to_density,
    to_grams,
)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_reconstruction_identities(lib):
    rng = np.random.default_rng(0)
    c = rng.gamma(1.5, 5.0, size=(64, 3))
    c = torch.tensor(c) if lib == "torch" else c
    y = components_to_targets(c)
    y = np.asarray(y)
    assert y.shape == (64, 5)
    np.testing.assert_allclose(y[:, 3], y[:, 0] + y[:, 2])
    np.testing.assert_allclose(y[:, 4], y[:, 0] + y[:, 1] + y[:, 2])
    total, ratio, ok = targets_to_total_ratio(torch.tensor(y) if lib == "torch" else y)
    ratio, total = np.asarray(ratio), np.asarray(total)
    assert np.asarray(ok).all()
    np.testing.assert_allclose(ratio.sum(1), 1.0)
    np.testing.assert_allclose(components_to_targets(ratio * total[:, None]), y, rtol=1e-12)


def test_ratio_mask_rules():
    y = np.array(
        [
            [1.0, 2.0, 3.0, 4.0, 6.0],  # fine
            [0.0, 0.0, 0.0, 0.0, 0.0],  # total 0: no ratio
            [np.nan, 2.0, 3.0, np.nan, 6.0],  # component missing: no ratio
            [1.0, 2.0, 3.0, 4.0, np.nan],  # total missing: no ratio
        ]
    )
    total, ratio, ok = targets_to_total_ratio(y)
    assert ok.tolist() == [True, False, False, False]
    assert np.isfinite(ratio).all() and (ratio[1:] == 0).all()
    assert target_mask(y).sum() == 20 - 3


def test_density_round_trip():
    g = np.array([0.0, 21.0, 45.3])
    np.testing.assert_allclose(to_density(g), g / 0.21)
    np.testing.assert_allclose(to_grams(to_density(g)), g)
    assert PLOT_AREA_M2 == pytest.approx(0.21)
    np.testing.assert_allclose(to_density(g, area=0.5), g * 2)


def test_zscore_invert_exact_and_json(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 30.0, size=(40, 5))
    x[3, 2] = np.nan
    z = ZScore.fit(x)
    np.testing.assert_allclose(z.mean[2], np.nanmean(x[:, 2]))
    np.testing.assert_allclose(z.inverse(z.transform(x)), x, rtol=1e-12, equal_nan=True)
    t = torch.tensor(x, dtype=torch.float32)
    torch.testing.assert_close(z.inverse(z.transform(t)), t, equal_nan=True)
    z.save(tmp_path / "z.json")
    z2 = ZScore.load(tmp_path / "z.json")
    np.testing.assert_array_equal(z2.mean, z.mean)
    np.testing.assert_array_equal(z2.std, z.std)
    assert z2.names == TARGETS
    assert z.column("Dry_Total_g").mean[0] == z.mean[4]


def test_zscore_errors():
    with pytest.raises(ValueError, match="at least 2 finite"):
        ZScore.fit(np.array([[1.0, 2, 3, 4, 5], [np.nan, 2, 3, 4, 5]]))
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        ZScore.fit(np.ones((4, 3)))
    with pytest.raises(ValueError, match="lack keys"):
        ZScore.from_dict({"mean": [0.0]})
